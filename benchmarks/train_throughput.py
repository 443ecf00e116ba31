"""Training throughput: knowstack's FFT and LoRA steps vs a plain HF Trainer (+PEFT) on the same work.

Both sides train the same random Llama of the built-in size (hidden 256, 4 layers, BPE vocab 4096)
on the same examples (prompt + answer of 30-150 tokens, loss on the answer only), with the same
effective batch (16), learning rate, schedule, clipping and max length, for one epoch, so both
process exactly the same tokens. Two peers, both the standard Trainer with its defaults (AdamW, fused
on CPU since torch 2.8): with DataCollatorForSeq2Seq padding each micro-batch to its longest example,
and with DataCollatorWithFlattening (padding-free packing: the paper's own recipe). transformers builds a
block-diagonal mask from the restarting position ids only when no cache is passed (Trainer sets
use_cache=False); each flattening run first checks that its packed logits equal the per-example ones.
Throughput counts real (non-padding) tokens per second of the training loop (knowstack: the loop's own
timer; Trainer: train_runtime).

Each round runs every configuration once, in an order rotated from round to round (load that drifts hits all
alike). A peer's figure in a round is its faster micro-batch size; the stronger peer is the faster of the two;
the ratio knowstack / stronger peer is taken per round, and its median and range over the rounds are reported,
with the load average before and after. --json PATH writes the same figures for a script.

    .venv/bin/python benchmarks/train_throughput.py [--examples 192] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from knowstack.builtin.pretrain import ModelShape, make_model
from knowstack.data.batches import TokenizedExample, tokenize_examples
from knowstack.data.formats import Example
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train import TrainSettings, train
from knowstack.train.loop import make_trainable

BATCH = 16
MAX_LENGTH = 256
LR = 2e-5
PEERS = ("padded", "flattening")


def _corpus() -> list[str]:
    """Real English text that ships with Python: the docstrings of stdlib modules and their members."""
    import collections
    import email
    import json
    import os
    import pathlib
    import re
    import statistics
    import string
    import textwrap
    import unittest

    texts = []
    for module in (os, re, json, collections, pathlib, statistics, string, textwrap, unittest, email, random):
        texts.append(inspect.getdoc(module) or "")
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if doc and len(doc) > 40:
                texts.append(doc)
    return [t for t in dict.fromkeys(texts) if t]


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    shape = ModelShape(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=704, context=512)
    return make_model(tokenizer, shape, seed=0)


def make_examples(corpus: list[str], tokenizer: PreTrainedTokenizerFast, n: int, seed: int = 0, *,
                  prompt_words: tuple[int, int] = (14, 75), answer_words: tuple[int, int] = (5, 26),
                  tokens: tuple[int, int] = (30, 150)) -> list[Example]:
    """Prompts and answers cut from the corpus, of so many words each (inclusive ranges) and `tokens` in all (with
    eos). The defaults: prompts of 20-110 tokens and answers of 8-40, 30-150 tokens in all."""
    rng = random.Random(seed)
    words = " ".join(corpus).split()
    examples = []
    while len(examples) < n:
        start = rng.randrange(len(words) - max(200, prompt_words[1] + answer_words[1]))
        n_prompt, n_answer = rng.randint(*prompt_words), rng.randint(*answer_words)
        prompt = "Question: " + " ".join(words[start : start + n_prompt]) + "\nAnswer:"
        answer = " " + " ".join(words[start + n_prompt : start + n_prompt + n_answer])
        n_tokens = len(tokenizer(prompt + answer)["input_ids"]) + 1
        if tokens[0] <= n_tokens <= tokens[1]:
            examples.append(Example(prompt, answer))
    return examples


def run_knowstack(model_dir: Path, examples: list[Example], finetune: str, micro: int, out: Path) -> float:
    settings = TrainSettings(
        finetune=finetune, lr=LR, batch_size=BATCH, micro_batch_size=micro, max_length=MAX_LENGTH, epochs=1
    )
    summary = train(model_dir, examples, out, settings, progress_desc=f"knowstack {finetune}")
    return summary["seconds"]


def check_flattening_isolates(model: torch.nn.Module, features: list[dict[str, list[int]]], n: int = 3,
                              tolerance: float = 1e-4) -> None:
    """Raise unless a flattened row of n examples gives each example's own logits, as the model is set up now.

    transformers infers the block-diagonal mask from the position ids only without a cache; a model called with
    use_cache=True would let packed examples see each other and train on a different (cheaper) problem. tolerance:
    relative and absolute (a GPU's attention kernels differ between the two layouts by more than a CPU's).
    """
    row = DataCollatorWithFlattening()(features[:n])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        flat = model(input_ids=row["input_ids"].to(device), position_ids=row["position_ids"].to(device)).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([f["input_ids"]], device=device)).logits[0]
                           for f in features[:n]])
    model.train(was_training)
    if not torch.allclose(flat, alone, rtol=tolerance, atol=tolerance):
        raise RuntimeError("the flattened Trainer peer lets packed examples attend to each other "
                           f"(max logit difference {float((flat - alone).abs().max()):.3g})")


def features_of(tokenized: list[TokenizedExample]) -> list[dict[str, list[int]]]:
    """The same token ids and labels knowstack trains on, as a Trainer dataset: only the batching and the loop differ."""
    return [{"input_ids": list(ex.input_ids), "labels": list(ex.labels)} for ex in tokenized]


def peer_collator(collator_kind: str, tokenizer: PreTrainedTokenizerFast) -> Any:
    """The peer's standard collator: padding each micro-batch to its longest example, or padding-free flattening."""
    if collator_kind == "flattening":
        return DataCollatorWithFlattening(return_position_ids=True)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def make_trainer(model: torch.nn.Module, features: list[dict[str, list[int]]], tokenizer: PreTrainedTokenizerFast,
                 recipe: TrainSettings, micro: int, out: Path, collator_kind: str = "padded", *,
                 max_steps: int | None = None, gpu: bool = False, collator: Any = None, callbacks: list | None = None,
                 tolerance: float = 1e-4) -> Trainer:
    """The standard recipe: HF Trainer (its defaults: AdamW, fused where the device has it) with knowstack's lr,
    constant schedule, warmup, weight decay, clipping and effective batch (recipe.batch_size examples a step, by
    accumulating micro-batches), over `features` for one epoch or max_steps steps. gpu: on the GPU with bf16 autocast
    (over the model's own weights, float32 as knowstack's), else on the CPU in float32. collator: the collator to
    use (default peer_collator's); a flattening peer is checked to keep its packed examples apart (as Trainer set the
    model up: use_cache off)."""
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, recipe.batch_size // micro), learning_rate=recipe.lr,
        lr_scheduler_type="constant", warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm, num_train_epochs=1, max_steps=max_steps or -1, save_strategy="no",
        report_to=[], logging_steps=10_000, use_cpu=not gpu, bf16=gpu, dataloader_num_workers=0, disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=features,
                      data_collator=collator or peer_collator(collator_kind, tokenizer), callbacks=callbacks)
    if collator_kind == "flattening":
        check_flattening_isolates(trainer.model, features, tolerance=tolerance)
    return trainer


def run_trainer(model_dir: Path, examples: list[Example], finetune: str, micro: int, out: Path,
                collator_kind: str = "padded") -> float:
    """The standard recipe on the CPU: pre-tokenized answer-only labels, a padding or flattening collator, Trainer."""
    tokenizer = load_tokenizer(model_dir)
    recipe = TrainSettings(finetune=finetune, lr=LR, batch_size=BATCH)
    model = make_trainable(load_model(model_dir, dtype=torch.float32), recipe)  # PEFT's LoRA, as knowstack's
    features = features_of(tokenize_examples(tokenizer, examples, MAX_LENGTH))
    trainer = make_trainer(model, features, tokenizer, recipe, micro, out, collator_kind)
    return trainer.train().metrics["train_runtime"]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rotated(runs: list, round_: int) -> list:
    """The round's order: each round starts one configuration later, so none always runs first or last."""
    shift = round_ % len(runs)
    return runs[shift:] + runs[:shift]


def summarize(finetune: str, rows: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """One finetune's figures from its runs (dicts: round, name, micro, tokens_per_second)."""
    def per_round(name: str) -> list[tuple[float, int]]:
        best = []
        for round_ in range(repeats):
            runs = [r for r in rows if r["round"] == round_ and r["name"] == name]
            fastest = max(runs, key=lambda r: r["tokens_per_second"])
            best.append((fastest["tokens_per_second"], fastest["micro"]))
        return best

    ours = [tps for tps, _ in per_round("knowstack")]
    peers = {kind: per_round(f"Trainer {kind}") for kind in PEERS}
    stronger = [max(peers[kind][r][0] for kind in PEERS) for r in range(repeats)]
    ratios = [o / s for o, s in zip(ours, stronger, strict=True)]
    peer_medians = {kind: statistics.median(tps for tps, _ in peers[kind]) for kind in PEERS}
    return {
        "finetune": finetune,
        "knowstack_tokens_per_second": {**spread(ours), "per_round": ours},
        "peers": {kind: {"tokens_per_second": {**spread([t for t, _ in peers[kind]]),
                                               "per_round": [t for t, _ in peers[kind]]},
                         "micro_per_round": [m for _, m in peers[kind]]} for kind in PEERS},
        "stronger_peer": max(peer_medians, key=peer_medians.get),
        "ratio_vs_stronger_peer": {**spread(ratios), "per_round": ratios},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=192, help="training examples (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every configuration (the ratio's median)")
    parser.add_argument("--micro", type=int, default=TrainSettings().micro_batch_size,
                        help="knowstack's micro-batch size (default: its default)")
    parser.add_argument("--trainer-micro", default="4,16",
                        help="Trainer micro-batch sizes to try; the fastest of each round is the peer's figure")
    parser.add_argument("--finetunes", default="fft,lora")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    finetunes = args.finetunes.split(",")
    load_before = os.getloadavg()

    corpus = _corpus()
    tokenizer = build_tokenizer(corpus)
    examples = make_examples(corpus, tokenizer, args.examples)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "base"
        model = build_model(tokenizer)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        tokenized = tokenize_examples(load_tokenizer(model_dir), examples, MAX_LENGTH)
        tokens = sum(len(ex) for ex in tokenized)
        lengths = sorted(len(ex) for ex in tokenized)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: Llama {n_params / 1e6:.1f}M params (hidden 256, 4 layers, vocab 4096), torch threads "
              f"{torch.get_num_threads()}")
        print(f"data: {len(examples)} examples, {tokens} tokens, length {lengths[0]}-{lengths[-1]} "
              f"(median {lengths[len(lengths) // 2]}), answer tokens {sum(ex.answer_tokens for ex in tokenized)}")
        trainer_micros = [int(m) for m in args.trainer_micro.split(",")]
        print(f"recipe: effective batch {BATCH}, knowstack micro {args.micro} (packed), Trainer micro "
              f"{'/'.join(map(str, trainer_micros))} (fastest kept per round), lr {LR} constant, 1 epoch = "
              f"{len(examples) // BATCH} steps, {args.repeats} rounds in rotated order, load average "
              f"{load_before[0]:.2f}\n")

        def trainer_run(kind: str):
            return lambda *a: run_trainer(*a, collator_kind=kind)

        runs = [("knowstack", run_knowstack, args.micro)]
        runs += [(f"Trainer {kind}", trainer_run(kind), m) for kind in PEERS for m in trainer_micros]
        for round_ in range(args.repeats):
            for finetune in finetunes if round_ % 2 == 0 else finetunes[::-1]:
                for name, runner, micro in rotated(runs, round_):
                    start = time.perf_counter()
                    out = tmp / f"{name}-{finetune}-{micro}-{round_}"
                    seconds = runner(model_dir, examples, finetune, micro, out)
                    wall = time.perf_counter() - start
                    shutil.rmtree(out, ignore_errors=True)
                    rows.append({"round": round_, "finetune": finetune, "name": name, "micro": micro,
                                 "seconds": seconds, "tokens_per_second": tokens / seconds,
                                 "load_average": os.getloadavg()[0]})
                    print(f"  round {round_ + 1}: {finetune:4} {name:18} micro {micro:2} {tokens / seconds:7.0f} "
                          f"tokens/s (loop {seconds:.1f}s, call {wall:.1f}s, load {os.getloadavg()[0]:.2f})",
                          file=sys.stderr)
    load_after = os.getloadavg()

    results = [summarize(ft, [r for r in rows if r["finetune"] == ft], args.repeats) for ft in finetunes]
    header = "".join(f"{'Trainer ' + kind + ' tok/s':>24}" for kind in PEERS)
    print(f"{'finetune':8} {'knowstack tok/s':>16}{header} {'vs stronger: median':>20} {'(range)':>14}")
    for result in results:
        cells = "".join(f"{result['peers'][kind]['tokens_per_second']['median']:24.0f}" for kind in PEERS)
        ratio = result["ratio_vs_stronger_peer"]
        print(f"{result['finetune']:8} {result['knowstack_tokens_per_second']['median']:16.0f}{cells} "
              f"{ratio['median']:19.2f}x {ratio['min']:6.2f}-{ratio['max']:.2f}x")
    print(f"\n(tokens/s: medians over {args.repeats} rounds of real tokens per second of the training loop; ratio = "
          "knowstack / the faster Trainer of each round (padded or flattened), its median and range over the rounds; "
          f"goal >= 1.2x; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, on "
          f"{os.cpu_count()} cores)")
    if args.json:
        report = {
            "benchmark": "train_throughput", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "model": {"params": n_params, "hidden": 256, "layers": 4, "vocab": 4096},
            "data": {"examples": len(examples), "tokens": tokens, "steps": len(examples) // BATCH},
            "recipe": {"batch": BATCH, "lr": LR, "max_length": MAX_LENGTH, "knowstack_micro": args.micro,
                       "trainer_micro": trainer_micros},
            "repeats": args.repeats,
            "load_average": {"before": list(load_before), "after": list(load_after)},
            "results": results, "runs": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
