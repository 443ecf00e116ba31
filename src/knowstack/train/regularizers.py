"""The classic continual-learning regularisers as additions to a sequential round's loss: EWC and LwF.

EWC (Kirkpatrick et al. 2017), online (Schwarz et al. 2018; Huszár 2018):

    loss = task loss + lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

theta* is the previous round's model, which is where the round starts: FFT keeps a copy of its trainable weights as
they are before the first optimizer step; for LoRA the weights are W0 + s B A on the previous round's merged model
W0, so the anchor is a delta of zero and the penalty is lambda / 2 * sum F_W (s B A)^2 over the adapted weights (its
gradient reaches the adapter's A and B; at B = 0, where a fresh adapter starts, it is 0). F is the diagonal
Fisher of the previous rounds' data (combine/statistics.py, `knowstack statistics`): one statistics dir per
earlier round, taken on that round's model and task, accumulated as F~_t = decay * F~_(t-1) + F_t (online EWC: one
anchor and one Fisher whatever the number of rounds; decay 1 sums them, which Huszár shows is the consistent
recursive Laplace approximation, where Kirkpatrick's one penalty per task double counts the earlier ones). The
Fisher of a LoRA round is the Fisher of the effective weight, so rounds of either kind stack by weight name.

The penalty is added once per optimizer step, as O-LoRA's (train/loop.py extra_loss), so lambda weighs it against
the step's mean answer-token loss.

LwF (Li & Hoiem 2017): the previous round's model (the round's start: for LoRA the model with the adapter switched
off, for FFT a frozen copy taken before the first step) scores the current task's examples without gradient, and

    loss = task loss + lambda * sum over answer tokens of KL(softmax(z_prev / T) || softmax(z / T))

on the same tokens and the same reduction as the task loss (Li & Hoiem's soft-target cross-entropy at T = 2 and
lambda_o = 1, less the teacher's entropy). The teacher's logits are computed in the loop, micro-batch by
micro-batch, rather than precomputed as a step: a precomputed step would store a vocabulary-sized row per answer
token (0.5 MB per token for Llama 3's 128k vocabulary), where recomputing costs one forward without gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from knowstack.errors import KnowstackError
from knowstack.modeling.loss import answer_logits, distillation_kl_sum

_PEFT_PREFIX = "base_model.model."


def online_fisher(files: Sequence[str | Path], decay: float = 1.0) -> dict[str, torch.Tensor]:
    """F~ = sum_i decay^(t-i) F_i over the earlier rounds' Fisher files (round order, the last round's last), in
    float32: online EWC's accumulated Fisher."""
    if not files:
        raise KnowstackError("EWC needs the Fisher of at least one earlier round")
    total: dict[str, torch.Tensor] = {}
    for age, path in enumerate(reversed(list(files))):
        weight = decay ** age
        for name, value in load_file(str(path)).items():
            value = value.float() * weight if weight != 1 else value.float()
            total[name] = total[name] + value if name in total else value
    return total


class _WeightedSquare(torch.autograd.Function):
    """sum F (x - a)^2 with its gradient 2 F (x - a) computed again in backward, so that no parameter-sized
    difference is kept between forward and backward (FFT's penalty covers every weight)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, anchor, fisher)
        return (fisher * (x.float() - anchor).square()).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, anchor, fisher = ctx.saved_tensors
        return (grad * 2 * fisher * (x.float() - anchor)).to(x.dtype), None, None


def lora_modules(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """{the adapted weight's name in the base model: (PEFT LoRA layer, its active adapter)} of a PEFT model; {} for
    a plain model. The name is the one statistics give the weight ('model.layers.0.mlp.up_proj.weight')."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        adapters = [a for a in module.active_adapters if a in module.lora_A] if isinstance(module, LoraLayer) else []
        if adapters:
            found[f"{name.removeprefix(_PEFT_PREFIX)}.weight"] = (module, adapters[0])
    return found


def _lora_term(module: torch.nn.Module, adapter: str, fisher: torch.Tensor, weight_a: torch.Tensor) -> torch.Tensor:
    # weight_a is the A matrix itself, passed so that the checkpoint sees a tensor that needs a gradient
    return (fisher * module.get_delta_weight(adapter).float().square()).sum()


class EwcPenalty:
    """The loop's extra_loss for one EWC round: lambda / 2 x sum F (theta - theta*)^2, theta* the weights the round
    starts from (taken at the first call, before any optimizer step). Records the unweighted sum of every optimizer
    step (`values`), for the train summary."""

    name = "ewc_penalty"

    def __init__(self, fisher: Mapping[str, torch.Tensor], lam: float):
        if lam < 0 or not math.isfinite(lam):
            raise KnowstackError("must not be negative", field="lambda")
        if not fisher:
            raise KnowstackError("EWC needs the Fisher of at least one earlier round")
        self.fisher = dict(fisher)
        self.lam = float(lam)
        self._terms: list[tuple[Any, ...]] | None = None
        self._model_id: int | None = None
        self._lora = False
        self._values: list[torch.Tensor] = []

    def _match(self, model: torch.nn.Module) -> list[tuple[Any, ...]]:
        # Matched once, the Fisher moved to the weights' device once, the anchor copied once: the first call is
        # before the first optimizer step, so the weights are still the previous round's.
        modules = lora_modules(model)
        self._lora = bool(modules)
        terms: list[tuple[Any, ...]] = []
        if modules:
            for name, (module, adapter) in modules.items():
                fisher = self._fisher_for(name, module.get_base_layer().weight)
                if fisher is not None:
                    terms.append((module, adapter, fisher))
        else:
            for name, param in model.named_parameters():
                fisher = self._fisher_for(name, param) if param.requires_grad else None
                if fisher is not None:
                    terms.append((param, param.detach().float().clone(), fisher))
        if not terms:
            raise KnowstackError("no trainable weight of the model has a Fisher from the earlier rounds (statistics "
                                 "of another model?)")
        return terms

    def _fisher_for(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        fisher = self.fisher.get(name)
        if fisher is None:
            return None
        if tuple(fisher.shape) != tuple(weight.shape):
            raise KnowstackError(f"the Fisher of '{name}' is {list(fisher.shape)}, the weight {list(weight.shape)}")
        return fisher.to(device=weight.device, dtype=torch.float32)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """sum F (theta - theta*)^2, unweighted."""
        if self._terms is None or self._model_id != id(model):
            self._terms, self._model_id = self._match(model), id(model)
        if self._lora:
            from torch.utils.checkpoint import checkpoint

            # recomputed in backward: only one module's delta is held at a time
            parts = [checkpoint(_lora_term, module, adapter, fisher, module.lora_A[adapter].weight,
                                use_reentrant=False) for module, adapter, fisher in self._terms]
        else:
            parts = [_WeightedSquare.apply(param, anchor, fisher) for param, anchor, fisher in self._terms]
        return torch.stack(parts).sum()

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        penalty = self.penalty(model)
        self._values.append(penalty.detach())
        return penalty * (self.lam / 2)

    @property
    def values(self) -> list[float]:
        return [float(v) for v in self._values]

    def record(self) -> dict[str, object]:
        """What the round's train summary keeps: lambda, what the penalty covers, and its value at every step."""
        values = self.values
        return {"lambda": self.lam, "weights": len(self._terms or []), "lora": self._lora,
                "penalty_curve": values, "penalty_first": values[0] if values else None,
                "penalty_last": values[-1] if values else None}


class LwfDistillation:
    """The loop's micro_loss for one LwF round: lambda x the summed KL from the previous round's model's answer-token
    distribution to the model's, both at temperature T. Records the KL per answer token of every micro-batch."""

    def __init__(self, lam: float, temperature: float):
        if lam < 0 or not math.isfinite(lam):
            raise KnowstackError("must not be negative", field="lambda")
        if not temperature > 0:
            raise KnowstackError("must be positive", field="temperature")
        self.lam = float(lam)
        self.temperature = float(temperature)
        self._teacher: torch.nn.Module | None = None
        self._per_token: list[float] = []

    def teacher_logits(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The previous round's model's logits at the answer positions, without gradient and without dropout."""
        with torch.no_grad():
            if lora_modules(model):  # the adapter switched off is the merged model the round started from
                training = model.training
                model.eval()
                try:
                    with model.disable_adapter():
                        logits, _ = answer_logits(model, inputs)
                finally:
                    model.train(training)
                return logits
            if self._teacher is None:  # the first call is before the first optimizer step
                self._teacher = copy.deepcopy(model).eval().requires_grad_(False)
            logits, _ = answer_logits(self._teacher, inputs)
            return logits

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        kl = distillation_kl_sum(logits, self.teacher_logits(model, inputs), self.temperature)
        self._per_token.append(float(kl.detach()) / max(int(logits.shape[0]), 1))
        return kl * self.lam

    def record(self) -> dict[str, object]:
        """What the round's train summary keeps: lambda, T, and the KL per answer token at the first and last
        micro-batch (0 at the first: the model starts as the teacher)."""
        values = self._per_token
        return {"lambda": self.lam, "temperature": self.temperature, "micro_batches": len(values),
                "kl_per_token_first": values[0] if values else None,
                "kl_per_token_last": values[-1] if values else None}
