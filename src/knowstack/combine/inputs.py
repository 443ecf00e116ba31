"""The inputs of a merge: full model dirs and PEFT LoRA adapter dirs, read one tensor at a time.

A full model gives its weights theta (and tau = theta - base); a LoRA adapter gives, for each
weight it targets, tau = scale * B @ A with scale = alpha / r (alpha / sqrt(r) with rsLoRA),
exactly the delta that PEFT's merge_and_unload adds to the base.

A full model is read as transformers loads it: tied (its output layer is its input embedding) when it stores no
output layer, or one equal to its embedding (another tool's redundant copy), whatever its config says; untied when
it stores one that differs (a tie a user broke). Tied models present no output layer, so that what a tied base
and its fine-tunes present agrees. Where tied and untied models are combined (`common_tie`), each tied one
presents its embedding as its output layer too, so that the untied ones' output layers are merged (or mixed)
against it, and the output is untied.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from knowstack.errors import KnowstackError
from knowstack.modeling.families import INPUT_EMBEDDING, OUTPUT_EMBEDDING
from knowstack.modeling.streaming import SafetensorsReader, TensorSpec
from knowstack.modelio import with_dtype, write_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROW_LOOK = 4096  # elements of the output layer and the embedding compared before comparing them whole


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise KnowstackError(f"cannot read: {err}", path=path) from None
    if not isinstance(value, dict):
        raise KnowstackError("not a JSON object", path=path)
    return value


class FullModel:
    """A HF model dir: config.json + safetensors weights, presented tie-aware (the module's docstring): `specs`
    are the tensors it presents, `read` reads one of them in its stored dtype."""

    kind = "fft"

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise KnowstackError("not a model dir (no config.json)", path=self.path)
        self.config = read_json(self.path / "config.json")
        self.reader = SafetensorsReader.from_dir(self.path)
        self.tied = self._stored_tied()
        self.specs: dict[str, TensorSpec] = {name: spec for name, spec in self.reader.specs.items()
                                             if not (self.tied and name == OUTPUT_EMBEDDING)}
        self._aliases: dict[str, str] = {}  # a presented name -> the stored tensor it reads

    def _stored_tied(self) -> bool:
        """Tied: an embedding and no output layer of its own, or one equal to the embedding (its first elements
        first: an untied model's differ there, and nothing more is read)."""
        stored = self.reader.specs
        if INPUT_EMBEDDING not in stored:
            return False
        if OUTPUT_EMBEDDING not in stored:
            return True
        head, embedding = stored[OUTPUT_EMBEDDING], stored[INPUT_EMBEDDING]
        if (head.shape, head.dtype) != (embedding.shape, embedding.dtype):
            return False
        if not torch.equal(self.reader.read_start(OUTPUT_EMBEDDING, ROW_LOOK),
                           self.reader.read_start(INPUT_EMBEDDING, ROW_LOOK)):
            return False
        return torch.equal(self.reader.read(OUTPUT_EMBEDDING), self.reader.read(INPUT_EMBEDDING))

    def present_output_layer(self) -> None:
        """A tied model presents its embedding as its output layer too (to be combined with untied models)."""
        if self.tied and OUTPUT_EMBEDDING not in self.specs:
            self._aliases[OUTPUT_EMBEDDING] = INPUT_EMBEDDING
            self.specs[OUTPUT_EMBEDDING] = replace(self.reader.specs[INPUT_EMBEDDING], name=OUTPUT_EMBEDDING)

    def names(self) -> set[str]:
        return set(self.specs)

    def order(self) -> list[str]:
        """The presented names in the order their bytes lie on disk (an output layer read from the embedding
        last, where save_pretrained puts an untied one)."""
        return [name for name in self.reader.names() if name in self.specs and name not in self._aliases] + list(
            self._aliases)

    def read(self, name: str) -> torch.Tensor:
        return self.reader.read(self._aliases.get(name, name))

    def view(self, name: str) -> torch.Tensor:
        """A tensor in its stored dtype, mapped from the file without a copy (SafetensorsReader.view): only read it."""
        return self.reader.view(self._aliases.get(name, name))

    def full(self, name: str) -> torch.Tensor:
        """A tensor in float32, the caller's own (it may change it in place)."""
        return self.read(name).float()

    def full_to_read(self, name: str) -> torch.Tensor:
        """A tensor in float32, only to be read: the mapped file's bytes themselves where they are float32."""
        return self.view(name).float()

    def weights_dtype(self) -> torch.dtype:
        """The dtype most of its floating parameters are stored in (what config.json's dtype names)."""
        counts: Counter[torch.dtype] = Counter()
        for spec in self.specs.values():
            if spec.torch_dtype.is_floating_point:
                counts[spec.torch_dtype] += math.prod(spec.shape)
        return counts.most_common(1)[0][0] if counts else torch.float32

    def delta(self, name: str, base: torch.Tensor, view: bool = False) -> torch.Tensor | None:
        """The weight minus `base`. view: from the mapped file, the difference a new tensor (no copy of the weight
        first), for all but the last task vector of a merge: a map beside a new difference holds one weight more
        at once than reading into the difference's own tensor, which only the last one's would raise the peak by."""
        if not view:
            return self.full(name).sub_(base)
        stored = self.view(name)
        return stored.float().sub_(base) if stored.dtype != torch.float32 else torch.sub(stored, base)


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


def common_tie(models: Sequence[FullModel]) -> bool:
    """Whether what combines `models` is tied: all of them are. Where some are not, the tied ones present their
    embedding as their output layer too (FullModel.present_output_layer), so all present the same tensors."""
    tied = all(model.tied for model in models)
    if not tied:
        for model in models:
            model.present_output_layer()
    return tied


def open_input(path: str | Path) -> FullModel | LoraAdapter:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise KnowstackError("model or adapter dir not found", path=path)
    if (path / ADAPTER_CONFIG).is_file():
        return LoraAdapter(path)
    return FullModel(path)


def write_output_config(model: FullModel, folder: Path, *, tied: bool, dtype: torch.dtype) -> None:
    """`model`'s config.json for an output made from it whose floating weights are `dtype`, tied or not: copied as
    it is where nothing changes; otherwise with its dtype fields (modelio.with_dtype) and tie_word_embeddings
    (where `model` has the embedding a tie is read from) set to what was written."""
    config = with_dtype(model.config, dtype)
    if INPUT_EMBEDDING in model.reader.specs and model.config.get("tie_word_embeddings") is not tied:
        config["tie_word_embeddings"] = tied
    if config == model.config:
        shutil.copyfile(model.path / "config.json", Path(folder) / "config.json")  # mode: the umask's, not the input's
    else:
        write_config(folder, config)
