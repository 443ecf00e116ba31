"""The settings of one training run: everything that changes the weights it produces.

Every default and every limit is config.py's TrainingConfig's (the one declaration); a run's settings are that
recipe with its learning rate resolved and its finetune and seed chosen (`TrainSettings.from_config`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from knowstack.config import LLAMA_LINEAR, PAPER_LR, LoraConfig, TrainingConfig
from knowstack.errors import KnowstackError

# Every linear layer of a Llama block: the paper's LoRA targets attention and MLP alike.
LLAMA_LINEAR_MODULES = LLAMA_LINEAR
FINETUNES = ("fft", "lora")
_RECIPE = TrainingConfig()  # the declared defaults


@dataclass(frozen=True)
class TrainSettings:
    finetune: str = "fft"
    lr: float = PAPER_LR
    schedule: str = _RECIPE.schedule
    warmup_steps: int = _RECIPE.warmup_steps
    epochs: float = _RECIPE.epochs
    max_steps: int | None = _RECIPE.max_steps
    batch_size: int = _RECIPE.batch_size  # effective batch: examples per optimizer step, over all processes
    # Examples per forward pass (per process); the rest is accumulation. With packing and per-example
    # attention, bigger rows are faster on CPU (measured on the built-in model: 16 > 8 > 4).
    micro_batch_size: int = _RECIPE.micro_batch_size
    max_length: int = _RECIPE.max_length  # tokens per example (prompt + answer + eos); an overlong prompt loses its middle
    weight_decay: float = _RECIPE.weight_decay
    max_grad_norm: float = _RECIPE.max_grad_norm
    seed: int = 0
    lora_r: int = _RECIPE.lora.r
    lora_alpha: float = _RECIPE.lora.alpha
    lora_dropout: float = _RECIPE.lora.dropout
    target_modules: tuple[str, ...] = tuple(_RECIPE.lora.target_modules)
    pack: bool = _RECIPE.pack
    precision: str = _RECIPE.precision
    loss_reduction: str = _RECIPE.loss_reduction
    overlong: str = _RECIPE.overlong  # how an example longer than max_length is cut (data/truncation.py)

    def __post_init__(self) -> None:
        # A list from YAML/JSON becomes a tuple, so settings stay hashable and compare equal.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self.validate()

    @classmethod
    def from_config(cls, training: TrainingConfig, *, finetune: str, seed: int,
                    pretrain_peak: float | None = None) -> TrainSettings:
        """The one way a run's settings are made from a recipe (a study step, `knowstack train`, a compose)."""
        lora = training.lora
        return cls(finetune=finetune, lr=training.learning_rate(pretrain_peak), schedule=training.schedule,
                   warmup_steps=training.warmup_steps, epochs=training.epochs, max_steps=training.max_steps,
                   batch_size=training.batch_size, micro_batch_size=training.micro_batch_size,
                   max_length=training.max_length, weight_decay=training.weight_decay,
                   max_grad_norm=training.max_grad_norm, seed=seed, lora_r=lora.r, lora_alpha=lora.alpha,
                   lora_dropout=lora.dropout, target_modules=tuple(lora.target_modules), pack=training.pack,
                   precision=training.precision, loss_reduction=training.loss_reduction,
                   overlong=training.overlong)

    def validate(self) -> None:
        """TrainingConfig's own checks, on these values (one declaration of every limit)."""
        if self.finetune not in FINETUNES:
            raise KnowstackError(f"must be one of {', '.join(FINETUNES)}", field="finetune")
        if not self.lr > 0:
            raise KnowstackError("must be positive", field="lr")
        try:
            TrainingConfig(lr=self.lr, schedule=self.schedule, warmup_steps=self.warmup_steps, epochs=self.epochs,
                           max_steps=self.max_steps, batch_size=self.batch_size,
                           micro_batch_size=self.micro_batch_size, max_length=self.max_length,
                           weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm, pack=self.pack,
                           precision=self.precision, loss_reduction=self.loss_reduction, overlong=self.overlong,
                           lora=LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                                           target_modules=list(self.target_modules)))
        except ValidationError as err:
            first = err.errors()[0]
            location = [str(part) for part in first["loc"]]
            field = f"lora_{location[-1]}" if location[:1] == ["lora"] and location[-1] != "target_modules" \
                else location[-1] if location else None
            raise KnowstackError(first["msg"].removeprefix("Value error, "), field=field) from None

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
