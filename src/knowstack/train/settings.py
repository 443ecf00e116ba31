"""The settings of one training run: everything that changes the weights it produces."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from knowstack.errors import KnowstackError

# Every linear layer of a Llama block: the paper's LoRA targets attention and MLP alike.
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINETUNES = ("fft", "lora")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainSettings:
    finetune: str = "fft"
    lr: float = 2e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16  # effective batch: examples per optimizer step, over all processes
    # Examples per forward pass (per process); the rest is accumulation. With packing and per-example
    # attention, bigger rows are faster on CPU (measured on the built-in model: 16 > 8 > 4).
    micro_batch_size: int = 16
    max_length: int = 512  # tokens per example (prompt + answer + eos); an overlong prompt loses its middle
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LLAMA_LINEAR_MODULES
    pack: bool = True

    def __post_init__(self) -> None:
        # A list from YAML/JSON becomes a tuple, so settings stay hashable and compare equal.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self.validate()

    def validate(self) -> None:
        if self.finetune not in FINETUNES:
            raise KnowstackError(f"must be one of {', '.join(FINETUNES)}", field="finetune")
        if self.schedule not in SCHEDULES:
            raise KnowstackError(f"must be one of {', '.join(SCHEDULES)}", field="schedule")
        positive = {
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "max_length": self.max_length,
            "lora_r": self.lora_r,
        }
        for name, value in positive.items():
            if not value > 0:
                raise KnowstackError("must be positive", field=name)
        if self.max_steps is not None and self.max_steps <= 0:
            raise KnowstackError("must be positive (or null for epochs)", field="max_steps")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise KnowstackError("warmup_steps, weight_decay and max_grad_norm must not be negative")
        if not 0 <= self.lora_dropout < 1:
            raise KnowstackError("must be in [0, 1)", field="lora_dropout")
        if self.max_length < 2:
            raise KnowstackError("must be at least 2 tokens", field="max_length")
        if not self.target_modules:
            raise KnowstackError("must name at least one module", field="target_modules")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, in a fixed order, for hashing and for train_summary.json."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise KnowstackError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**data)
