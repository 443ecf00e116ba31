"""Stand-in fine-tuned checkpoints for the merge and MoE tests (a helper module, not collected as tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def perturbed(model_dir: Path, out: Path, seed: int, scale: float,
              copy: tuple[str, ...] = ("config.json",)) -> Path:
    """A stand-in for a one-round FFT model: the base plus small seeded random changes everywhere (each tensor
    in its own dtype; a sharded base's shards and index kept), with the files named in `copy` (those that exist)
    taken from the base."""
    from knowstack.modeling.streaming import INDEX_FILE, weight_files

    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    for file in weight_files(model_dir):
        tensors = load_file(file)
        save_file({k: (v + scale * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in tensors.items()},
                  out / file.name, metadata={"format": "pt"})
    if (model_dir / INDEX_FILE).is_file():
        (out / INDEX_FILE).write_bytes((model_dir / INDEX_FILE).read_bytes())
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


def peft_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each LoRA module of a PEFT adapter dir, read from its own files as PEFT applies it (not through knowstack's
    reader, which the tests check): module name -> (A, B, scale), its delta scale * B @ A, scale its alpha
    (alpha_pattern, else lora_alpha) over its rank (A's rows: rank_pattern's where there is one). modules_to_save
    are not LoRA and are left out."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    found = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
            found[module] = (a, tensors[name.replace(".lora_A.", ".lora_B.")], alpha / a.shape[0])
    return found
