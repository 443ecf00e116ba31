"""Evaluation speed: knowstack's batched KV-cache greedy generation vs one example at a time.

Both sides decode the same prompts (real prompts of the built-in summary and code tasks) with the
same random Llama of the built-in size (hidden 256, 4 layers, BPE vocab 4096) and the same number
of new tokens; the peer is HF `generate` called once per prompt, the way simple evaluation scripts
do it. The script also checks that both give identical greedy outputs, then prints seconds and the
ratio it measured. Each side runs `--repeats` times and keeps its best time (the CPU may be shared).

    .venv/bin/python benchmarks/generation.py [--prompts 128] [--new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from knowstack.builtin import sources
from knowstack.builtin.new_tasks import code_items, summary_items
from knowstack.builtin.pretrain import ModelShape, make_model
from knowstack.builtin.tokenizer import train_tokenizer
from knowstack.evaluate.generate import generate


def one_at_a_time(model, tokenizer, prompts: list[str], new_tokens: int) -> list[str]:
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def best_time(fn, repeats: int) -> tuple[float, list[str]]:
    best, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tokenizer = train_tokenizer([d.text for d in sources.stdlib_docs()], 4096)
    model = make_model(tokenizer, ModelShape(), seed=0).eval()
    rng = random.Random(0)
    half = args.prompts // 2
    prompts = [i["prompt"] for i in summary_items(half, rng) + code_items(args.prompts - half, rng)]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.new_tokens} new tokens each, "
          f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")

    batched_s, batched = best_time(
        lambda: generate(model, tokenizer, prompts, max_new_tokens=args.new_tokens, batch_size=args.batch_size),
        args.repeats)
    single_s, single = best_time(lambda: one_at_a_time(model, tokenizer, prompts, args.new_tokens), args.repeats)
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    print(f"{'method':<36}{'seconds':>10}{'prompts/s':>12}")
    print(f"{'knowstack batched (KV cache, left pad)':<36}{batched_s:>10.2f}{len(prompts) / batched_s:>12.1f}")
    print(f"{'HF generate, one prompt at a time':<36}{single_s:>10.2f}{len(prompts) / single_s:>12.1f}")
    print(f"identical greedy outputs: {same}/{len(prompts)}")
    print(f"speed-up: {single_s / batched_s:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
