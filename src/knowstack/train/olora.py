"""O-LoRA (Wang et al. 2023): sequential LoRA whose new A matrices are pushed away from earlier rounds'.

    loss = task loss + lambda * sum over target modules of sum_jk |(A_t A_prev^T)[j, k]|

A_t is the current round's trainable LoRA A of a module (r x in), A_prev the row-concatenation of
the frozen A matrices of every earlier round for that module (sum of their ranks x in); the sum is
element-wise absolute, as in O-LoRA's and the paper's code. Only A_t receives a gradient.

The penalty is added once per optimizer step. The paper's code adds it to every micro-batch's loss,
but accelerate's backward divides each micro-batch's loss by the accumulation steps, so there too it
weighs lambda per optimizer step: the same lambda means the same here, whatever the micro-batch size.

Earlier rounds' A matrices are read from their PEFT adapter dirs and written beside the new round as
safetensors (never pickles), keyed by the module's path in the base model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from knowstack.atomic import honour_umask
from knowstack.errors import KnowstackError

PREVIOUS_A_FILE = "olora_previous_A.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def module_key(parameter_name: str) -> str | None:
    """'base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight' -> 'model.layers.0.mlp.up_proj'.

    The same key for a live PEFT model's parameter and for a saved adapter's tensor (which has no
    adapter name), so the two can be matched.
    """
    if ".lora_A." not in parameter_name:
        return None
    return parameter_name.split(".lora_A.", 1)[0].removeprefix(_PEFT_PREFIX)


def adapter_a_matrices(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA A matrix of every module of a saved PEFT adapter."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise KnowstackError("not a PEFT adapter dir (no adapter_model.safetensors)", path=adapter_dir)
    tensors = load_file(str(path))
    out = {key: tensor for name, tensor in tensors.items() if (key := module_key(name)) is not None}
    if not out:
        raise KnowstackError("the adapter has no LoRA A matrices", path=path)
    return out


def stack_previous(adapter_dirs: Iterable[str | Path]) -> dict[str, torch.Tensor]:
    """Earlier rounds' A matrices per module, concatenated by rows in round order (A_prev)."""
    per_module: dict[str, list[torch.Tensor]] = {}
    for adapter_dir in adapter_dirs:
        for key, tensor in adapter_a_matrices(adapter_dir).items():
            per_module.setdefault(key, []).append(tensor.float())
    return {key: torch.cat(parts, dim=0).contiguous() for key, parts in per_module.items()}


def save_previous(path: Path, previous: Mapping[str, torch.Tensor]) -> None:
    """Write A_prev as safetensors, under a temporary name first (as every artifact)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({key: tensor.contiguous() for key, tensor in previous.items()}, str(tmp))
    honour_umask(tmp)
    tmp.replace(path)


def load_previous(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def trainable_a_matrices(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA A weight of every adapted module of a PEFT model, by module key."""
    return {
        key: param
        for name, param in model.named_parameters()
        if param.requires_grad and (key := module_key(name)) is not None
    }


def orthogonality_penalty(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum over (A_t, A_prev) pairs of sum |A_t A_prev^T|."""
    terms = [(current @ previous.T).abs().sum() for current, previous in pairs]
    if not terms:
        raise KnowstackError("no module has both a current and an earlier LoRA A matrix")
    return torch.stack(terms).sum()


class OLoraPenalty:
    """The loop's extra_loss for one O-LoRA round: lambda x the penalty against frozen A_prev.

    Records the unweighted penalty of every optimizer step (`values`), for the train summary.
    """

    def __init__(self, previous: Mapping[str, torch.Tensor], lam: float):
        if lam < 0:
            raise KnowstackError("must not be negative", field="lambda")
        if not previous:
            raise KnowstackError("O-LoRA needs at least one earlier round's A matrices")
        self.previous = dict(previous)
        self.lam = float(lam)
        self._pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
        self._model_id: int | None = None
        self._values: list[torch.Tensor] = []

    def _match(self, model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        # Matched once, and A_prev moved to the parameters' device and dtype once: this runs every step.
        current = trainable_a_matrices(model)
        pairs = []
        for key, param in current.items():
            previous = self.previous.get(key)
            if previous is None:
                continue
            if previous.shape[1] != param.shape[1]:
                raise KnowstackError(f"earlier A of '{key}' has {previous.shape[1]} columns, the current "
                                     f"{param.shape[1]}")
            pairs.append((param, previous.detach().to(device=param.device, dtype=param.dtype)))
        if not pairs:
            raise KnowstackError("no module of the current adapter matches an earlier round's adapter "
                                 "(different target_modules?)")
        return pairs

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self._pairs is None or self._model_id != id(model):
            self._pairs, self._model_id = self._match(model), id(model)
        penalty = orthogonality_penalty(self._pairs)
        self._values.append(penalty.detach())
        return penalty * self.lam

    @property
    def values(self) -> list[float]:
        return [float(v) for v in self._values]

    def record(self) -> dict[str, object]:
        """What the round's train summary keeps: lambda and the penalty at every step."""
        values = self.values
        return {
            "lambda": self.lam,
            "modules": len(self._pairs or []),
            # rows of A_prev: the summed rank of the earlier rounds' adapters
            "previous_rows": max(int(t.shape[0]) for t in self.previous.values()),
            "penalty_curve": values,
            "penalty_first": values[0] if values else None,
            "penalty_last": values[-1] if values else None,
        }
