"""Stand-in fine-tuned checkpoints for the merge and MoE tests (a helper module, not collected as tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturbed(model_dir: Path, out: Path, seed: int, scale: float,
              copy: tuple[str, ...] = ("config.json",)) -> Path:
    """A stand-in for a one-round FFT model: the base plus small seeded random changes everywhere,
    with the files named in `copy` (those that exist) taken from the base."""
    tensors = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    save_file({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    for name in copy:
        if (model_dir / name).is_file():
            (out / name).write_bytes((model_dir / name).read_bytes())
    return out


def variant(model_dir: Path, out: Path, seed: int, copy: tuple[str, ...] = (), **changes: object) -> Path:
    """A fresh random Llama of `model_dir`'s config with `changes` (e.g. attention_bias=True), saved to
    `out` with the files named in `copy` taken from `model_dir` (a base of another shape, to mix)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model_dir)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in copy:
        if (model_dir / name).is_file():
            (out / name).write_bytes((model_dir / name).read_bytes())
    return out
