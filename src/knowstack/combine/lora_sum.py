"""A linear merge of LoRA adapters as one PEFT LoRA adapter, exactly.

A linear merge (average, task average, task arithmetic) of LoRA deltas is sum_i c_i s_i B_i A_i, with c_i the
coefficient the method declares (its normalised weight, times lambda for the task merges) and s_i adapter i's scale. That is itself a LoRA of rank sum_i r_i: A = [A_1; ...; A_n] (rows stacked)
and B = [c_1 s_1 B_1, ..., c_n s_n B_n] (columns side by side), at scale 1 (lora_alpha = r). So the merge can
be kept as a small adapter beside the full model, loaded by PEFT onto the base, and equal to the full model
up to float rounding. TIES, DARE and the other nonlinear merges trim or drop entries of the full deltas, which are no longer low rank:
they have no exact adapter, and none is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from knowstack.atomic import atomic_write_json
from knowstack.combine.inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
from knowstack.combine.merges import MergeMethod

ADAPTER_DIR = "adapter"


def representable(method: MergeMethod, inputs: Sequence[object]) -> bool:
    """Whether the merge is exactly a LoRA adapter: a linear method (one that declares its coefficients), on LoRA
    adapters alike in layout."""
    adapters = [m for m in inputs if isinstance(m, LoraAdapter)]
    return (method.coefficients is not None and len(adapters) == len(inputs) > 0
            and len({bool(a.config.get("fan_in_fan_out")) for a in adapters}) == 1)


def write_sum_adapter(folder: Path, factors: Sequence[float], adapters: Sequence[LoraAdapter], base: str) -> Path:
    """The merged adapter sum_i factors_i s_i B_i A_i (adapter_config.json + adapter_model.safetensors) in `folder`,
    which is inside the merge's temporary output dir (so it appears whole or not at all)."""
    modules = sorted({name for adapter in adapters for name in adapter.modules})
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in modules:
        a_parts, b_parts = [], []
        for adapter, factor in zip(adapters, factors, strict=True):
            if name in adapter.modules:
                a_name, b_name, scale = adapter.modules[name]
                a_parts.append(adapter.reader.read(a_name).float())
                b_parts.append(adapter.reader.read(b_name).float() * (factor * scale))
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.cat(a_parts, dim=0).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).contiguous()
        ranks[module] = sum(a.shape[0] for a in a_parts)
    return save_adapter(folder, tensors, ranks, bool(adapters[0].config.get("fan_in_fan_out")), base)


def save_adapter(folder: Path, tensors: dict[str, torch.Tensor], ranks: dict[str, int], fan_in_fan_out: bool,
                 base: str) -> Path:
    """A PEFT LoRA adapter dir of `tensors` (lora_A / lora_B per module) at scale 1 (lora_alpha = r)."""
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    differing = {module: r for module, r in ranks.items() if r != common}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        # scale 1 everywhere: lora_alpha = r, per module where a module's rank differs
        "r": common, "lora_alpha": common, "rank_pattern": differing, "alpha_pattern": dict(differing),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None,
    })
    return folder
