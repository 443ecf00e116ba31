"""The inputs of a merge: full model dirs and PEFT LoRA adapter dirs, read one tensor at a time.

A full model gives its weights theta (and tau = theta - base); a LoRA adapter gives, for each
weight it targets, tau = scale * B @ A with scale = alpha / r (alpha / sqrt(r) with rsLoRA),
exactly the delta that PEFT's merge_and_unload adds to the base.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from knowstack.errors import KnowstackError
from knowstack.modeling.streaming import SafetensorsReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KnowstackError(f"cannot read: {err}", path=path) from None
    if not isinstance(value, dict):
        raise KnowstackError("not a JSON object", path=path)
    return value


class FullModel:
    """A HF model dir: config.json + safetensors weights."""

    kind = "fft"

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise KnowstackError("not a model dir (no config.json)", path=self.path)
        self.config = read_json(self.path / "config.json")
        self.reader = SafetensorsReader.from_dir(self.path)

    def names(self) -> set[str]:
        return set(self.reader.specs)

    def full(self, name: str) -> torch.Tensor:
        return self.reader.read(name).float()

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        return self.full(name).sub_(base)


class LoraAdapter:
    """A PEFT LoRA adapter dir: adapter_config.json + adapter_model.safetensors (plain LoRA on Linear)."""

    kind = "lora"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_json(self.path / ADAPTER_CONFIG)
        self._check_supported()
        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise KnowstackError(f"no {ADAPTER_WEIGHTS} (pickled adapters are never read)", path=self.path)
        self.reader = SafetensorsReader([weights])
        self.modules = self._modules()

    def _check_supported(self) -> None:
        cfg = self.config
        unsupported = {
            "peft_type": cfg.get("peft_type", "LORA") != "LORA",
            "use_dora": bool(cfg.get("use_dora")),
            "modules_to_save": bool(cfg.get("modules_to_save")),
            "bias": cfg.get("bias", "none") != "none",
        }
        for field, bad in unsupported.items():
            if bad:
                raise KnowstackError(f"only plain LoRA adapters can be merged ({field}={cfg.get(field)!r})",
                                     path=self.path / ADAPTER_CONFIG, field=field)

    def _modules(self) -> dict[str, tuple[str, str, float]]:
        """Base weight name -> (A tensor, B tensor, scale)."""
        modules: dict[str, tuple[str, str, float]] = {}
        for name in self.reader.specs:
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_A\.weight", name)
            if match is None:
                if not re.fullmatch(r".+\.lora_B\.weight", name):
                    raise KnowstackError(f"unsupported adapter tensor '{name}' (plain LoRA on Linear layers only)",
                                         path=self.path / ADAPTER_WEIGHTS)
                continue
            module = match.group(1)
            a_spec = self.reader.specs[name]
            b_name = name[: -len("lora_A.weight")] + "lora_B.weight"
            if b_name not in self.reader.specs or len(a_spec.shape) != 2:
                raise KnowstackError(f"adapter tensor '{name}' has no matching lora_B or is not 2-D",
                                     path=self.path / ADAPTER_WEIGHTS)
            modules[f"{module}.weight"] = (name, b_name, self._scale(module, a_spec.shape[0]))
        return modules

    def _scale(self, module: str, rank: int) -> float:
        # The rank is the A matrix's; alpha may be overridden per module, matched as PEFT matches keys.
        alpha = float(self.config.get("lora_alpha", 8))
        for pattern, value in (self.config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                alpha = float(value)
                break
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def names(self) -> set[str]:
        return set(self.modules)

    def base_model_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def delta(self, name: str, base: torch.Tensor) -> torch.Tensor | None:
        """scale * B @ A for a weight this adapter targets; None for one it leaves alone."""
        if name not in self.modules:
            return None
        a_name, b_name, scale = self.modules[name]
        delta = self.reader.read(b_name).float() @ self.reader.read(a_name).float()
        if self.config.get("fan_in_fan_out"):
            delta = delta.T.contiguous()
        if delta.shape != base.shape:
            raise KnowstackError(f"LoRA delta of '{name}' has shape {tuple(delta.shape)} but the base's weight "
                                 f"is {tuple(base.shape)}: the base is not this adapter's base", path=self.path)
        return delta.mul_(scale)


def open_input(path: str | Path) -> FullModel | LoraAdapter:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise KnowstackError("model or adapter dir not found", path=path)
    if (path / ADAPTER_CONFIG).is_file():
        return LoraAdapter(path)
    return FullModel(path)
