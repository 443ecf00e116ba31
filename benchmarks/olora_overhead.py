"""O-LoRA overhead: the step time of an O-LoRA round with 6 earlier rounds' adapters vs plain LoRA.

Same model, same batch: a random Llama of the built-in size (hidden 256, 4 layers, BPE vocab 4096)
with the default LoRA (r 8 on all 28 linear layers) and one packed batch of 16 examples (30-150
tokens, loss on the answer only), trained as knowstack's loop trains it (per-example attention over
the packed row, answer-only loss, clipping, AdamW). A plain LoRA step and an O-LoRA step differ only
by the extra loss, lambda * sum over the modules of sum |A_t A_prev^T|, where A_prev holds the A
matrices of 6 earlier rounds (48 rows per module), read from 6 saved PEFT adapter dirs as a study
reads them. The CPU is shared with other work, so the two kinds of step alternate one by one
(`--steps` of each, after warm-up) and the ratio printed is the median over adjacent pairs, robust
to load that drifts; the penalty's own cost (forward + backward, timed alone) is printed beside it.

    .venv/bin/python benchmarks/olora_overhead.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers.utils import logging as hf_logging

from knowstack.data.batches import collate, tokenize_examples
from knowstack.modeling.loss import answer_loss_sum
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train import TrainSettings, attention
from knowstack.train.olora import OLoraPenalty, stack_previous

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _corpus, build_model, build_tokenizer, make_examples  # noqa: E402

EARLIER_ROUNDS = 6
LAMBDA = 0.5
BATCH = 16
MAX_LENGTH = 256


def lora_model(model_dir: Path) -> torch.nn.Module:
    defaults = TrainSettings(finetune="lora")
    config = LoraConfig(r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=defaults.lora_dropout,
                        target_modules=list(defaults.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(load_model(model_dir, dtype=torch.float32), config)


def save_earlier_adapters(model_dir: Path, out: Path) -> list[Path]:
    """6 adapters as 6 earlier rounds leave them (fresh PEFT inits, one seed each: only A matters)."""
    dirs = []
    for round_ in range(EARLIER_ROUNDS):
        torch.manual_seed(100 + round_)
        dirs.append(out / f"round{round_ + 1}")
        lora_model(model_dir).save_pretrained(dirs[-1], safe_serialization=True)
    return dirs


def make_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], extra: OLoraPenalty | None) -> Callable[[], None]:
    """One optimizer step as the training loop takes it (one micro-batch = the whole batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5)
    scale = 1.0 / int((inputs["labels"] != -100).sum())

    def step() -> None:
        loss = answer_loss_sum(model, inputs) * scale
        if extra is not None:
            loss = loss + extra(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def penalty_alone(model: torch.nn.Module, previous: dict[str, torch.Tensor], repeats: int = 50) -> float:
    """Seconds of one penalty forward + backward."""
    penalty = OLoraPenalty(previous, LAMBDA)
    penalty(model).backward()  # warm-up, and the one-time matching of modules
    start = time.perf_counter()
    for _ in range(repeats):
        penalty(model).backward()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    corpus = _corpus()
    tokenizer = build_tokenizer(corpus)
    examples = make_examples(corpus, tokenizer, BATCH)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "base"
        build_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        previous = stack_previous(save_earlier_adapters(model_dir, tmp))
        torch.manual_seed(0)
        model = lora_model(model_dir)
        tokenized = tokenize_examples(load_tokenizer(model_dir), examples, MAX_LENGTH)
    model.get_base_model().set_attn_implementation(attention.NAME)  # as the loop trains packed rows
    model.train()
    inputs = collate(tokenized, pack_rows=True, pad_token_id=tokenizer.pad_token_id)
    shapes = sorted({tuple(t.shape) for t in previous.values()})
    print(f"model: Llama hidden 256, 4 layers, vocab 4096; LoRA r 8 on {len(previous)} modules; A_prev shapes "
          f"{shapes} ({EARLIER_ROUNDS} earlier rounds); torch threads {torch.get_num_threads()}")
    print(f"batch: {BATCH} examples packed in one row, {sum(len(t) for t in tokenized)} tokens; "
          f"{args.steps} steps of each kind, alternating, after 3 warm-up steps of each\n")

    lora_step = make_step(model, inputs, None)
    olora_step = make_step(model, inputs, OLoraPenalty(previous, LAMBDA))
    for _ in range(3):
        lora_step()
        olora_step()
    pairs = []
    for index in range(args.steps):
        # Alternate which goes first, so neither side always follows the other.
        first, second = (lora_step, olora_step) if index % 2 == 0 else (olora_step, lora_step)
        a, b = timed(first), timed(second)
        pairs.append((a, b) if index % 2 == 0 else (b, a))
    alone = penalty_alone(model, previous)

    lora_times, olora_times = [p[0] for p in pairs], [p[1] for p in pairs]
    ratio = statistics.median(o / lo for lo, o in pairs)
    print(f"{'':8} {'median ms/step':>15} {'best ms/step':>13}")
    print(f"{'LoRA':8} {statistics.median(lora_times) * 1000:15.1f} {min(lora_times) * 1000:13.1f}")
    print(f"{'O-LoRA':8} {statistics.median(olora_times) * 1000:15.1f} {min(olora_times) * 1000:13.1f}")
    print(f"\npenalty alone (forward + backward): {alone * 1000:.2f} ms = "
          f"{alone / min(lora_times) * 100:.2f}% of the best LoRA step")
    print(f"ratio O-LoRA / LoRA step time: {ratio:.3f}x (median of {len(pairs)} adjacent pairs; "
          f"best vs best {min(olora_times) / min(lora_times):.3f}x; goal <= 1.05x)")


if __name__ == "__main__":
    main()
