"""Training throughput: knowstack's FFT and LoRA steps vs a plain HF Trainer (+PEFT) on the same work.

Both sides train the same random Llama of the built-in size (hidden 256, 4 layers, BPE vocab 4096)
on the same examples (prompt + answer of 30-150 tokens, loss on the answer only), with the same
effective batch (16), learning rate, schedule, clipping and max length, for one epoch, so both
process exactly the same tokens. Two peers, both the standard Trainer: with DataCollatorForSeq2Seq
padding each micro-batch to its longest example, and with DataCollatorWithFlattening (padding-free
packing: the paper's own recipe; transformers masks each packed example from the position ids, so
examples do not see each other). The stronger of the two is the peer. Throughput counts real (non-padding) tokens per
second of the training loop (knowstack: the loop's own timer; Trainer: train_runtime). Each
configuration runs `--repeats` times, alternating, and the best time is kept, because the CPU is
shared and the best run is the one least disturbed.

    .venv/bin/python benchmarks/train_throughput.py [--examples 192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

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
from knowstack.data.formats import Example
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train import TrainSettings, train
from knowstack.train.batches import tokenize_examples

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


def make_examples(corpus: list[str], tokenizer: PreTrainedTokenizerFast, n: int, seed: int = 0) -> list[Example]:
    """Prompts of 20-110 tokens and answers of 8-40 tokens cut from the corpus: 30-150 tokens in all."""
    rng = random.Random(seed)
    words = " ".join(corpus).split()
    examples = []
    while len(examples) < n:
        start = rng.randrange(len(words) - 200)
        prompt_words, answer_words = rng.randint(14, 75), rng.randint(5, 26)
        prompt = "Question: " + " ".join(words[start : start + prompt_words]) + "\nAnswer:"
        answer = " " + " ".join(words[start + prompt_words : start + prompt_words + answer_words])
        n_tokens = len(tokenizer(prompt + answer)["input_ids"]) + 1
        if 30 <= n_tokens <= 150:
            examples.append(Example(prompt, answer))
    return examples


def run_knowstack(model_dir: Path, examples: list[Example], finetune: str, micro: int, out: Path) -> float:
    settings = TrainSettings(
        finetune=finetune, lr=LR, batch_size=BATCH, micro_batch_size=micro, max_length=MAX_LENGTH, epochs=1
    )
    summary = train(model_dir, examples, out, settings, progress_desc=f"knowstack {finetune}")
    return summary["seconds"]


def run_trainer(model_dir: Path, examples: list[Example], finetune: str, micro: int, out: Path,
                collator_kind: str = "padded") -> float:
    """The standard recipe: pre-tokenized answer-only labels, a padding or flattening collator, Trainer."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    if finetune == "lora":
        from peft import LoraConfig, get_peft_model

        defaults = TrainSettings(finetune="lora")
        model = get_peft_model(model, LoraConfig(
            r=defaults.lora_r, lora_alpha=defaults.lora_alpha, lora_dropout=defaults.lora_dropout,
            target_modules=list(defaults.target_modules), task_type="CAUSAL_LM",
        ))
    # The same token ids and labels knowstack trains on, so only the batching and the loop differ.
    features = [{"input_ids": list(ex.input_ids), "labels": list(ex.labels)}
                for ex in tokenize_examples(tokenizer, examples, MAX_LENGTH)]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=micro, gradient_accumulation_steps=BATCH // micro,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, num_train_epochs=1,
        save_strategy="no", report_to=[], logging_steps=10_000, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0,
    )
    if collator_kind == "flattening":
        collator = DataCollatorWithFlattening(return_position_ids=True)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
    return trainer.train().metrics["train_runtime"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=192, help="training examples (a multiple of 16)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--micro", type=int, default=TrainSettings().micro_batch_size,
                        help="knowstack's micro-batch size (default: its default)")
    parser.add_argument("--trainer-micro", default="4,16",
                        help="Trainer micro-batch sizes to try; the fastest is the peer")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()

    corpus = _corpus()
    tokenizer = build_tokenizer(corpus)
    examples = make_examples(corpus, tokenizer, args.examples)
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
              f"{'/'.join(map(str, trainer_micros))} (padded, fastest kept), lr {LR} constant, 1 epoch = "
              f"{len(examples) // BATCH} steps, best of {args.repeats} runs\n")

        def trainer_run(kind: str):
            return lambda *a: run_trainer(*a, collator_kind=kind)

        runs = [("knowstack", run_knowstack, args.micro)]
        runs += [(f"Trainer {kind}", trainer_run(kind), m) for kind in PEERS for m in trainer_micros]
        best: dict[tuple[str, str], tuple[float, int]] = {}
        for repeat in range(args.repeats):
            for finetune in ("fft", "lora"):
                for name, runner, micro in runs:
                    start = time.perf_counter()
                    seconds = runner(model_dir, examples, finetune, micro, tmp / f"{name}-{finetune}-{micro}-{repeat}")
                    wall = time.perf_counter() - start
                    key = (finetune, name)
                    best[key] = min(best.get(key, (float("inf"), 0)), (seconds, micro))
                    print(f"  run {repeat + 1}: {finetune:4} {name:18} micro {micro:2} {tokens / seconds:7.0f} tokens/s "
                          f"(loop {seconds:.1f}s, call {wall:.1f}s)", file=sys.stderr)

    header = "".join(f"{'Trainer ' + kind + ' tok/s':>24} {'(micro)':>7}" for kind in PEERS)
    print(f"{'finetune':8} {'knowstack tok/s':>16}{header} {'vs stronger':>12}")
    for finetune in ("fft", "lora"):
        ours = tokens / best[(finetune, "knowstack")][0]
        peers = {kind: best[(finetune, f"Trainer {kind}")] for kind in PEERS}
        cells = "".join(f"{tokens / s:24.0f} {m:7}" for s, m in peers.values())
        strongest = tokens / min(s for s, _ in peers.values())
        print(f"{finetune:8} {ours:16.0f}{cells} {ours / strongest:11.2f}x")
    print("\n(ratio = knowstack / the faster Trainer (padded or flattened), real tokens per second of the "
          "training loop; goal >= 1.2x)")

if __name__ == "__main__":
    main()
