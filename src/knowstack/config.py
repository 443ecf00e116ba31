"""The study config: a YAML file validated into typed settings, with errors that name file and field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from knowstack.combine.merges import METHODS as MERGE_METHODS
from knowstack.combine.merges import OPTIONS as MERGE_OPTIONS
from knowstack.combine.merges import SWEEPABLE_OPTIONS as MERGE_SWEEPABLE
from knowstack.errors import KnowstackError, located

Finetune = Literal["fft", "lora"]
# The metrics a new-knowledge task is scored by (evaluate/protocols.py says how each is read and computed).
TaskMetric = Literal["accuracy", "exact_match", "rouge_l", "edit_similarity", "sari", "math"]
METRICS: tuple[str, ...] = get_args(TaskMetric)
# The paper's learning rate (constant, FFT and LoRA alike): the default where a config gives none.
PAPER_LR = 2e-5
# The study configs shipped with the package (`knowstack demo`'s, the built-in worlds' recipes).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Protocol = Literal["builtin", "paper"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
# How new-knowledge answers are read and scored unless a config, command or call says otherwise (evaluate/protocols.py)
DEFAULT_PROTOCOL = "builtin"
# An evaluation's examples per forward pass (new and old knowledge, every command and API call that evaluates)
EVAL_BATCH_SIZE = 32
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SettingError(ValueError):
    """A rule a section's validator finds broken by one of its settings (a model_validator's error is located at the
    section): parse_config names that setting under the section's path (methods.moe.router_init, not methods.moe)."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


def _each_once(value: list[str], message: str) -> list[str]:
    """A list setting that names each choice at most once, and at least one."""
    if not value or len(set(value)) != len(value):
        raise ValueError(message)
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelConfig(Strict):
    """Either the built-in world (a preset name) or a model to start from (hub id or local dir)."""

    builtin: Literal["test", "quick", "full"] | None = None
    model: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> BaseModelConfig:
        if (self.builtin is None) == (self.model is None):
            raise ValueError("give exactly one of 'builtin' (a preset) or 'model' (a hub id or path)")
        return self


# A study task's name: it names steps, models and files (a registry's task, named by its dir, is renamed to fit:
# registry/evaluate.py `study_names`).
TASK_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


class TaskConfig(Strict):
    """A new-knowledge task: a TRACE-layout dir, or math as MetaMathQA train + GSM8K test files.
    epochs / max_steps: this task's training budget, in place of the training recipe's, in every round that
    trains on it (one-round, sequential, O-LoRA, replay, and so merge and MoE); a joint run, on all tasks at
    once, keeps the recipe's. A sweep point that sets epochs or max_steps overrides it. micro_batch_size: this
    task's, in place of the recipe's, in the same rounds (with `loss_reduction: micro_batch` it weighs the loss, as
    the paper's per-task per-device batch sizes did)."""

    name: Annotated[str, Field(pattern=TASK_NAME_PATTERN)]
    format: Literal["trace", "math"] = "trace"
    path: Path | None = None
    train_file: Path | None = None
    eval_file: Path | None = None
    test_file: Path | None = None
    metric: TaskMetric
    max_train: int | None = Field(default=None, gt=0)
    max_test: int | None = Field(default=None, gt=0)
    epochs: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    micro_batch_size: int | None = Field(default=None, gt=0)
    protocol: Protocol | None = None  # this task's scoring protocol, where it differs from evaluation.protocol

    @model_validator(mode="after")
    def _has_data(self) -> TaskConfig:
        if self.path is None and self.test_file is None:
            raise ValueError("give 'path' (a task dir) or 'test_file' (and 'train_file' to train on it)")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give a task's budget as 'epochs' or 'max_steps', not both")
        return self

    def budget(self) -> dict[str, Any]:
        """The training settings this task's own settings replace ({} when it has none)."""
        own: dict[str, Any] = {} if self.micro_batch_size is None else {"micro_batch_size": self.micro_batch_size}
        if self.epochs is not None:
            return {**own, "epochs": self.epochs, "max_steps": None}
        if self.max_steps is not None:
            return {**own, "max_steps": self.max_steps}
        return own


class BuiltinTasks(Strict):
    """Some of the built-in world's tasks, in the order given (a shorter study, e.g. a sweep)."""

    builtin: list[str]

    @field_validator("builtin")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return _each_once(value, "name each built-in task once, at least one")


OldMetric = str | dict[str, str]
DEFAULT_OLD_METRIC = "acc"


class OldKnowledgeConfig(Strict):
    """metric: the lm-eval metric reported for every old-knowledge task (acc), or a mapping task -> metric
    (e.g. acc_norm for arc_challenge, as the paper reports it), where a task not named reports acc."""

    tasks: Literal["builtin"] | list[str] = "builtin"
    include_path: Path | None = None
    metric: OldMetric = DEFAULT_OLD_METRIC
    limit: int | None = Field(default=None, gt=0)
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int = Field(default=EVAL_BATCH_SIZE, gt=0)
    # Whether lm-eval's prompts start with the BOS token: None, as the tokenizer does by default (lm-eval since
    # 0.4.8's); false, as lm-eval up to mid-2024 ran a causal LM (the paper's). Passed to lm-eval explicitly, so the
    # scores do not depend on the installed harness's default; the value used is kept beside them.
    add_bos_token: bool | None = None

    @field_validator("tasks")
    @classmethod
    def _some_tasks_once_each(cls, value: Literal["builtin"] | list[str]) -> Literal["builtin"] | list[str]:
        # An empty list is a plan that scores no old knowledge (a registry's compose scores it itself); a user's
        # study needs some (validate.check_study says so).
        if isinstance(value, list):
            if any(not name.strip() for name in value):
                raise ValueError("a task name must not be empty")
            repeated = sorted({name for name in value if value.count(name) > 1})
            if repeated:
                raise ValueError(f"'{repeated[0]}' is listed more than once")
        return value

    @field_validator("metric")
    @classmethod
    def _metric_names(cls, value: OldMetric) -> OldMetric:
        names = [value] if isinstance(value, str) else list(value.values())
        if isinstance(value, dict) and not value:
            raise ValueError("name a metric, or map at least one task to its metric")
        if any(not name.strip() for name in names):
            raise ValueError("a metric name must not be empty")
        return value

    @model_validator(mode="after")
    def _mapped_tasks_are_evaluated(self) -> OldKnowledgeConfig:
        if isinstance(self.metric, dict) and isinstance(self.tasks, list):
            unknown = [task for task in self.metric if task not in self.tasks]
            if unknown:
                raise ValueError(f"metric is given for '{unknown[0]}', which is not one of the old-knowledge tasks")
        return self


def old_metric_of(metric: OldMetric, task: str) -> str:
    """The metric reported for one old-knowledge task."""
    return metric if isinstance(metric, str) else metric.get(task, DEFAULT_OLD_METRIC)


def describe_old_metric(metric: OldMetric) -> str:
    """'acc', or 'acc_norm for arc_challenge, piqa; acc elsewhere' (a report's words for it)."""
    if isinstance(metric, str):
        return metric
    by_metric: dict[str, list[str]] = {}
    for task, name in metric.items():
        by_metric.setdefault(name, []).append(task)
    parts = [f"{name} for {', '.join(tasks)}" for name, tasks in by_metric.items() if name != DEFAULT_OLD_METRIC]
    return "; ".join(parts + [f"{DEFAULT_OLD_METRIC} elsewhere"])


class LoraConfig(Strict):
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LLAMA_LINEAR))


class TrainingConfig(Strict):
    """The paper's recipe by default: constant lr 2e-5, effective batch 16, answer-only loss, packing. The one
    declaration of every training setting and its default: a study, `knowstack train`, a registry compose and
    the API all build their runs from it (train/settings.py TrainSettings.from_config)."""

    lr: float | None = Field(default=None, gt=0)
    lr_of_pretrain_peak: float | None = Field(default=None, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, gt=0)
    micro_batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=1024, gt=8)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    pack: bool = True
    # How the weights are held while they train. float32: float32 weights and AdamW state (autocast by accelerate
    # where a launch sets mixed_precision); bf16: weights and AdamW state in bfloat16, as a script that loads its
    # model with torch_dtype=bfloat16 and sets no mixed precision trains it (the paper's).
    precision: Literal["float32", "bf16"] = "float32"
    # The loss of an optimizer step. token: one mean over the answer tokens of the whole effective batch (Trainer
    # since transformers 4.46); micro_batch: the mean of each micro-batch's own token mean (Trainer up to 4.45, the
    # paper's), so an example weighs more in a micro-batch of short answers.
    loss_reduction: Literal["token", "micro_batch"] = "token"
    # An example longer than max_length (data/truncation.py). keep-answer: the middle of the prompt is cut, the
    # answer never (one that does not fit alone is dropped); paper: the paper's collator's rule, which also cuts an
    # answer longer than half the window, keeping its start (prompt and answer shortened in proportion).
    overlong: Literal["keep-answer", "paper"] = "keep-answer"
    # The paper's scripts' pad token: where the base's tokenizer has none, `[PAD]` is added and the embeddings (and
    # an untied output layer) grow a row, the mean of the others, whose logit is in every softmax. A study then
    # builds every model from that grown base (a `pad-base` step): training, merges and MoEs; the `base` row
    # scores the base as it is (modelio.add_pad_token, docs/paper-config.md).
    add_pad_token: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # experiment trackers (train/tracking.py); not part of any step's cache key
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)

    @field_validator("micro_batch_size")
    @classmethod
    def _micro_within_batch(cls, value: int, info: ValidationInfo) -> int:
        """A micro batch is part of one batch: one given larger is refused (left at its default, with a smaller
        batch, it is the whole batch in one pass, as it has always been: keys and saved configs stay valid)."""
        batch = info.data.get("batch_size")
        default = cls.model_fields["micro_batch_size"].default
        if batch is not None and value > batch and value != default:
            raise ValueError(f"{value} is larger than the batch size, {batch}: a micro batch is part of one batch; "
                             f"give at most {batch}")
        return value

    @model_validator(mode="after")
    def _one_lr(self) -> TrainingConfig:
        if self.lr is not None and self.lr_of_pretrain_peak is not None:
            raise ValueError("give 'lr' or 'lr_of_pretrain_peak', not both")
        # the default micro batch, larger than the batch, is the whole batch in one pass
        if self.micro_batch_size < self.batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of micro_batch_size")
        return self

    def learning_rate(self, pretrain_peak: float | None = None) -> float:
        """The rate a run trains at: `lr`, else `lr_of_pretrain_peak` x the built-in base's pretraining peak, else
        the paper's 2e-5."""
        if self.lr is not None:
            return self.lr
        if self.lr_of_pretrain_peak is not None:
            if pretrain_peak is None:
                raise KnowstackError("'lr_of_pretrain_peak' needs a built-in base (its pretraining peak rate); give "
                                     "'lr'", field="training.lr_of_pretrain_peak")
            return self.lr_of_pretrain_peak * pretrain_peak
        return PAPER_LR


class EvaluationConfig(Strict):
    # How new-knowledge tasks are scored (evaluate/protocols.py): the paper's scoring, or the built-in world's.
    protocol: Protocol = DEFAULT_PROTOCOL
    batch_size: int = Field(default=EVAL_BATCH_SIZE, gt=0)
    max_test: int | None = Field(default=None, gt=0)
    max_new_tokens: dict[str, int] = Field(default_factory=dict)
    # lm-eval's BOS for the tasks it scores (GSM8K under the paper's protocol), as old_knowledge.add_bos_token
    add_bos_token: bool | None = None


# Settings a method's `sweep` (or `points`) may vary, by where they live: the training recipe (every
# trained method), and each method's own. Each is also a results column, filled where a point sets it.
TRAINING_SWEEP = ("lr", "lr_of_pretrain_peak", "epochs", "max_steps", "rank", "alpha")
LORA_ONLY_SWEEP = ("rank", "alpha")
_COLUMNS = (*TRAINING_SWEEP, "lambda", "fraction", "density", "drop_rate", "top_k", "t", "gamma", "epsilon")
# a sweepable option a merge method declares later is a column too, after these (results files keep their columns)
SWEEP_COLUMNS = (*_COLUMNS, *(name for name in MERGE_SWEEPABLE if name not in _COLUMNS))
# the settings of the methods' own a sweep may change, but lambda (MergeConfig's lam)
OWN_SWEEP = ("fraction", "top_k", *(name for name in MERGE_SWEEPABLE if name != "lambda"))
SweepValues = list[float] | dict[Finetune, list[float]]


class Sweepable(Strict):
    """Settings to sweep, on top of the method's own (always run, the 'equal settings' point):
    sweep: setting -> values (or finetune -> values, e.g. lr: {fft: [...], lora: [...]}), expanded as a
    product; points: a list of settings -> value, each one point. A value equal to the method's own
    setting adds nothing (that point is the method's own run)."""

    SWEEPABLE: ClassVar[tuple[str, ...]] = TRAINING_SWEEP
    sweep: dict[str, SweepValues] | None = None
    points: list[dict[str, float]] | None = None

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name, values in (value or {}).items():
            cls._sweepable(name)
            for listed in values.values() if isinstance(values, dict) else [values]:
                if not listed or len(set(listed)) != len(listed):
                    raise ValueError(f"sweep '{name}': give each value once, at least one")
                _positive(name, listed)
        return value

    @field_validator("points")
    @classmethod
    def _points(cls, value: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
        for point in value or []:
            if not point:
                raise ValueError("a point names at least one setting")
            for name, number in point.items():
                cls._sweepable(name)
                _positive(name, [number])
        return value

    @classmethod
    def _sweepable(cls, name: str) -> None:
        if name not in cls.SWEEPABLE:
            raise ValueError(f"'{name}' cannot be swept here; sweepable: {', '.join(cls.SWEEPABLE)}")


def _positive(name: str, values: list[float]) -> None:
    if name in MERGE_OPTIONS:  # a merge option's range is its declaration's (combine/merges/)
        problems = [MERGE_OPTIONS[name].problem(v) for v in values]
        if any(problems):
            raise ValueError(f"sweep '{name}': {next(p for p in problems if p)}")
        return
    integral = name in ("max_steps", "rank", "top_k")
    if any(v <= 0 for v in values):
        raise ValueError(f"sweep '{name}': values must be positive")
    if integral and any(float(v) != int(v) for v in values):
        raise ValueError(f"sweep '{name}': values must be whole numbers")
    if name == "fraction" and any(v > 1 for v in values):
        raise ValueError(f"sweep '{name}': values must be at most 1")


class MethodConfig(Sweepable):
    finetune: list[Finetune] = Field(default_factory=lambda: ["fft", "lora"])

    @field_validator("finetune")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one of fft, lora")
        return value


Lambda = Annotated[float, Field(ge=0)]


def one_run(value: Any) -> Any:
    """A number given for a list of lambdas: one run with it."""
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class OLoraConfig(Sweepable):
    """O-LoRA runs (sequential LoRA + orthogonality penalty), one per entry of `lambdas`: a weight
    for every round, or a list of one weight per round (round 1 has no earlier adapter to penalize
    against, so its entry has no effect). The default is the paper's two runs, 0.5 and 5."""

    lambdas: list[Lambda | list[Lambda]] = Field(default_factory=lambda: [0.5, 5.0])

    _scalar_is_one_run = field_validator("lambdas", mode="before")(classmethod(lambda cls, value: one_run(value)))

    @field_validator("lambdas")
    @classmethod
    def _runs(cls, value: list[float | list[float]]) -> list[float | list[float]]:
        if not value:
            raise ValueError("name at least one lambda")
        if any(isinstance(v, list) and not v for v in value):
            raise ValueError("a per-round list of lambdas must not be empty")
        keys = [tuple(v) if isinstance(v, list) else v for v in value]
        if len(set(keys)) != len(keys):
            raise ValueError("lambdas must differ (each names one O-LoRA run)")
        return value


class RegularizedConfig(MethodConfig):
    """A sequential method with a regulariser, one run per entry of `lambdas` (its weight; a number is one run)."""

    lambdas: list[Lambda] = Field(default_factory=lambda: [1.0])

    _scalar_is_one_run = field_validator("lambdas", mode="before")(classmethod(lambda cls, value: one_run(value)))

    @field_validator("lambdas")
    @classmethod
    def _runs(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("name at least one lambda")
        if len(set(value)) != len(value):
            raise ValueError("lambdas must differ (each names one run)")
        return value


class EwcConfig(RegularizedConfig):
    """Sequential training with EWC (Kirkpatrick et al. 2017, online: Schwarz et al. 2018), one run per entry of
    `lambdas` (the penalty's weight): from round 2 on, each round adds lambda / 2 x sum F (theta - theta*)^2, theta*
    the previous round's model (LoRA: a zero delta of the adapted weights) and F the diagonal Fisher of the earlier
    rounds' data, each round's taken on its first fisher_examples training examples with its model
    (combine/statistics.py) and accumulated as F~ = fisher_decay x F~ + F (1: summed)."""

    lambdas: list[Lambda] = Field(default_factory=lambda: [100.0])
    fisher_examples: int = Field(default=256, gt=0)
    fisher_decay: float = Field(default=1.0, gt=0, le=1)


class LwfConfig(RegularizedConfig):
    """Sequential training with LwF (Li & Hoiem 2017), one run per entry of `lambdas` (their lambda_o): from round
    2 on, each round adds lambda x the KL from the previous round's model's answer-token distribution to the
    model's, on the current task's examples, both at `temperature` (the paper's T = 2, lambda_o = 1)."""

    temperature: float = Field(default=2.0, gt=0)


class JointConfig(MethodConfig):
    """Joint training on all tasks at once. uniform: smaller tasks upsampled so every task is drawn
    equally often (the paper); proportional: every task once, as large as it is."""

    sampling: Literal["uniform", "proportional"] = "uniform"


class ReplayConfig(MethodConfig):
    """Sequential training where each round adds fraction x |current task| examples of every
    earlier task (upsampled when the earlier task is smaller); the paper replays 10%."""

    SWEEPABLE: ClassVar[tuple[str, ...]] = (*TRAINING_SWEEP, "fraction")
    fraction: float = Field(default=0.1, gt=0, le=1)


# The merge methods, in combine/merges/ order; each method's module declares the settings it reads (only these
# enter its step's key, so that changing TIES' density does not redo the average) and its own options' type,
# default and range, from which MergeConfig's fields are made.
MergeMethodName = Literal[tuple(MERGE_METHODS)]  # type: ignore[valid-type]
LoraSpace = Literal["delta", "factors"]


def _in_range(option: Any) -> AfterValidator:
    """The option's one range check (combine/merges/ Option.problem), as pydantic runs it."""
    def check(value: Any) -> Any:
        problem = option.problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value
    return AfterValidator(check)


# One field per declared merge option (combine/merges/): its type, default and range, `lam` spelt lambda.
MergeOptionFields = create_model(
    "MergeOptionFields", __base__=MethodConfig,
    **{option.field: (Annotated[option.type, _in_range(option)],
                      Field(default=option.default, alias=option.name if option.attribute else None))
       for option in MERGE_OPTIONS.values()})


class MergeConfig(MergeOptionFields):  # type: ignore[misc,valid-type]
    """Merging the one-round models (FFT) / adapters (LoRA) of all tasks into one model, once per
    method in `methods`. density: the fraction of each task vector TIES keeps; drop_rate: DARE's p;
    lambda: the scale of the merged task vector; seed: DARE's draws (default: the study's seed);
    lora_space: the LoRA merges of the deltas s B A (delta) or of the A and B factors apart, as PEFT's
    add_weighted_adapter (factors: the paper's LoRA TIES / DARE-TIES, combine/merge_factors.py), for every
    method or per method ({ties: factors}: the others stay delta). methods may be given per finetune
    ({fft: [average], lora: [average, ties]}). The other methods' settings, with mergekit's defaults where it has
    one: t (SLERP's position between the two models; mergekit requires it), gamma (breadcrumbs: the fraction of
    largest-magnitude entries dropped), epsilon (DELLA: keep probabilities spread over density +- epsilon),
    max_iter and tol (the Karcher mean's iterations), regmean_alpha (RegMean: the factor on the off-diagonal entries
    of each Gram matrix; 1 is the exact least-squares merge), fisher_floor (Fisher merging: added to every Fisher
    entry, so that an entry no model's data moves is a plain average), statistics_examples (RegMean and Fisher: the
    first training examples of each task its statistics are computed on). The definitions: docs/methods.md,
    combine/merges/."""

    SWEEPABLE: ClassVar[tuple[str, ...]] = MERGE_SWEEPABLE
    methods: list[MergeMethodName] | dict[Finetune, list[MergeMethodName]] = Field(
        default_factory=lambda: ["average", "ties", "ties-dare"])
    # the merge options (density, drop_rate, lambda, ...): MergeOptionFields' fields, from their declarations
    # FusionBench's Fisher merging (fisher_merging.yaml: num_fisher_examples 256)
    statistics_examples: int = Field(default=256, gt=0)
    seed: int | None = None
    lora_space: LoraSpace | dict[MergeMethodName, LoraSpace] = "delta"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | dict[str, list[str]]) -> list[str] | dict[str, list[str]]:
        for listed in value.values() if isinstance(value, dict) else [value]:
            _each_once(listed, "name each merge method once, at least one")
        return value

    def methods_for(self, finetune: str) -> list[str]:
        """The merge methods run on this finetune's models (a finetune a mapping leaves out runs none)."""
        return list(self.methods.get(finetune, [])) if isinstance(self.methods, dict) else list(self.methods)

    def lora_space_of(self, method: str) -> str:
        return self.lora_space if isinstance(self.lora_space, str) else self.lora_space.get(method, "delta")


class ContinualMergeConfig(MergeConfig):
    """Continual merging: round by round, the running model merges the next task's one-round model (FFT) or adapter
    (LoRA) with each merge method in `methods` (no data, one model kept), evaluated after every round like
    sequential training (R[stage][task], BWT). weighting: running (the running model weighs as the t-1 tasks it
    holds, so a linear merge after round t is the average of all t one-round models) or equal (each merge halves
    the running model's share: earlier tasks fade geometrically)."""

    methods: list[MergeMethodName] | dict[Finetune, list[MergeMethodName]] = Field(
        default_factory=lambda: ["average", "ties"])
    weighting: Literal["running", "equal"] = "running"


SEARCHABLE_MERGES: tuple[str, ...] = ("task-arithmetic", "ties", "dare", "ties-dare", "breadcrumbs", "della",
                                       "della-linear", "average", "task-average")


class SearchConfig(Strict):
    """Search of the composition within a forgetting budget (study/search.py): over `trials` evaluations, a TPE
    search (optuna) of the merge method (one of `methods`), its lambda (in `lam_range`), density or drop rate where
    the method reads them (`density_range`) and a weight per merged model (in `weight_range`; for LoRA adapters
    LoraHub's per-adapter weights). Each trial is scored on the tasks' eval splits (never test) and on old
    knowledge's held-out slice: the `old_items` items of each old-knowledge task after the first
    old_knowledge.limit ones (which the test scoring reads); the chosen point learns the most (mean eval score) of
    the trials whose held-out old AVE falls at most `max_old_loss` percent below the base's. It is then scored on
    test as every model of the study."""

    finetune: list[Finetune] = Field(default_factory=lambda: ["fft"])
    methods: list[MergeMethodName] = Field(default_factory=lambda: ["task-arithmetic", "ties", "dare"])
    trials: int = Field(default=20, gt=0)
    max_old_loss: float = Field(default=2.0, ge=0)  # percent of the base's held-out AVE
    old_items: int = Field(default=20, gt=0)
    lam_range: tuple[float, float] = (0.1, 1.5)
    density_range: tuple[float, float] = (0.1, 1.0)
    weight_range: tuple[float, float] = (0.1, 1.0)
    seed: int | None = None  # the sampler's and DARE's draws (default: the study's seed)

    @field_validator("methods")
    @classmethod
    def _searchable(cls, value: list[str]) -> list[str]:
        _each_once(value, "name each merge method once, at least one")
        unknown = [name for name in value if name not in SEARCHABLE_MERGES]
        if unknown:
            raise ValueError(f"the search takes {', '.join(SEARCHABLE_MERGES)}; not {unknown[0]} (it reads statistics "
                             "of the data or merges a fixed number of models)")
        return value

    @field_validator("lam_range", "density_range", "weight_range")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"a range is [low, high] with 0 < low <= high, got [{low}, {high}]")
        return value

    @field_validator("density_range")
    @classmethod
    def _density(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[1] > 1:
            raise ValueError(f"a density is at most 1, got {value[1]}")
        return value


class RouterTrainingConfig(Strict):
    """Training of the MoE's routers alone (experts and everything else frozen): `steps` optimizer steps
    of `batch_size` examples drawn from the first `examples_per_task` training examples of each mixed
    task, answer-only LM loss + aux_loss_coef x the load-balancing loss."""

    steps: int = Field(default=50, gt=0)
    examples_per_task: int = Field(default=16, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, gt=0)
    aux_loss_coef: float = Field(default=0.01, ge=0)


class GateTrainingConfig(Strict):
    """Per-contributor gates (router: gates, PHATGOOSE): each one-round adapter's gate vectors trained on its own
    task's first `examples_per_task` training examples (None: all), base and adapter frozen, for `steps` steps of
    `batch_size` at `lr` (PHATGOOSE's 100 steps at 1e-3)."""

    steps: int = Field(default=100, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, gt=0)
    examples_per_task: int | None = Field(default=None, gt=0)


# Every router init of an MoE, with its one line for `knowstack mix --help` (definitions: combine/routers.py).
MOE_ROUTERS: dict[str, str] = {
    "random": "rows drawn from N(0, initializer_range), a fresh Mixtral router",
    "uniform": "zero rows: every expert equally likely (top_k = the number of experts, or router training)",
    "base-biased": "random rows plus a logit bias for the routed base expert (needs base_expert: routed)",
    "prompts": "each expert's row: the base's normalised mean router input on a few of its prompts",
    "none": "no router: every expert with equal weight",
    "arrow": "LoRA-MoE, training-free: per module, each adapter's top right singular vector of its B A; scores "
             "|row . x| / temperature (Arrow; PEFT's ArrowConfig)",
    "hidden": "mergekit-moe's gate_mode hidden: last-token hidden states on an expert's prompts minus those on the "
              "other experts' prompts, normalised",
    "cheap-embed": "mergekit-moe's gate_mode cheap_embed: the normalised sum of the prompts' token embeddings "
                   "(minus the other experts'), the same in every layer",
    "gates": "LoRA-MoE, per module: the gate vector each contributor trained for their own adapter on their own "
             "data (`knowstack gate`), standardized (PHATGOOSE)",
    "moetify": "moetify's routing (the paper's MoEs): FFT-MoE rows from the base's residual stream at each layer's "
               "input on an expert's prompts; LoRA-MoE random routers per module, sigmoid gates, every expert",
}
MoeRouter = Literal["random", "uniform", "base-biased", "prompts", "none", "arrow", "hidden", "cheap-embed", "gates",
                   "moetify"]
# Named settings of a mixture (`preset: NAME` in the moe section, `knowstack mix --preset NAME`); the section's own
# settings win. btx: Branch-Train-MiX (Sukhbaatar et al. 2024): the one-round models' MLPs as experts, every
# other weight their average, a fresh router trained top-2 with the Switch load-balancing loss (coefficient 0.01).
MOE_PRESETS: dict[str, dict[str, Any]] = {
    "btx": {"experts": ["fft"], "shared": "average", "top_k": 2, "router": "random", "router_training": {}},
}


PER_MODULE_ROUTERS = ("arrow", "gates")  # built per module from each adapter, training-free
# The dtypes a LoRA-MoE's routers may be stored in (MoeConfig.router_dtype); float32, the first, is the default.
RouterDtype = Literal["float32", "float16", "bfloat16"]
# How a LoRA-MoE's random routers are drawn (MoeConfig.router_init); per-module, the first, is the default.
RouterInit = Literal["per-module", "moetify"]


def moe_problems(kinds: set[str], *, router: str, base_expert: str, attention: bool, routing: str | None,
                 trains: bool, temperature: bool, gate_training: bool = False, router_dtype: str = "float32",
                 router_init: str = "per-module") -> list[tuple[str, str]]:
    """What cannot go together in a mixture, as (setting, message), the first first: the one check of each rule,
    made where a study's config is read (MoeConfig, for every kind of expert it mixes) and where a mixture is built
    (combine/moe.py, for its kind). kinds: fft and/or lora; attention, trains (router training), temperature and
    gate_training: whether each is given; routing, router_dtype and router_init: as given (None: the router's own)."""
    module_router = router in PER_MODULE_ROUTERS
    rules = [
        (router == "base-biased" and base_expert != "routed", "router",
         "the base-biased router needs the base as a routed expert (base_expert: routed)"),
        ("lora" in kinds and base_expert == "always-on", "base_expert",
         "a LoRA-MoE always keeps the base: the adapters add to it ('base_expert: always-on' is for FFT-MoE; use "
         "'routed' for a null expert)"),
        ("lora" in kinds and attention, "attention",
         "a LoRA-MoE already mixes every module its adapters target ('attention' is for FFT-MoE, experts: [fft])"),
        (router == "none" and trains, "router_training", "a router-free MoE ('router: none') has no router to train"),
        ("fft" in kinds and routing is not None, "routing",
         "'routing' is for LoRA-MoE (experts: [lora]): an FFT-MoE routes each mixed MLP, and each mixed attention "
         "projection"),
        (module_router and "fft" in kinds, "router",
         f"the {router} router is built from LoRA adapters: use experts: [lora] (mix LoRA adapters)"),
        (module_router and routing == "layer", "routing",
         f"the {router} router is per module: leave 'routing' unset or 'module'"),
        (module_router and base_expert == "routed", "base_expert",
         f"the {router} router has no row for the base (a null adapter): base_expert must be none"),
        (module_router and trains, "router_training",
         f"the {router} router is training-free (its rows come from the adapters): leave router training out"),
        (router != "gates" and gate_training, "gate_training", "'gate_training' is the gates router's (router: gates)"),
        (router != "arrow" and temperature, "temperature", "'temperature' is the arrow router's"),
        (router in ("hidden", "cheap-embed") and routing == "module", "routing",
         f"the {router} router builds one row per layer from hidden states: leave 'routing' unset or 'layer'"),
        (router == "moetify" and "lora" in kinds and routing == "layer", "routing",
         "moetify's LoRA-MoE has a router per module: leave 'routing' unset or 'module'"),
        (router_dtype != "float32" and "lora" not in kinds, "router_dtype",
         "'router_dtype' is a LoRA-MoE's (experts: [lora]): an FFT-MoE's routers are in its model's dtype"),
        (router_init == "moetify" and (router != "moetify" or "lora" not in kinds), "router_init",
         "'router_init: moetify' draws the routers of moetify's LoRA-MoE: use router: moetify with experts: [lora]"),
        (router_init == "moetify" and base_expert == "routed", "base_expert",
         "moetify's LoRA-MoE has no base expert (blend.py's experts are the adapters): base_expert must be none"),
    ]
    return [(field, message) for failed, field, message in rules if failed]


class MoeConfig(Sweepable):
    """Mixing the one-round models (experts: fft, a Mixtral-style FFT-MoE) or adapters (lora, a LoRA-MoE)
    of all tasks, or of `tasks` (a list, or per kind of expert: {fft: [...]} mixes those for the FFT-MoE and all
    tasks for the LoRA-MoE), into one mixture of experts, one per entry of `experts`.
    top_k: experts per token; layers: the layers to mix (default all); shared: attention, norms,
    embeddings from the base or the average of the models (FFT only); base_expert: the base as a routed
    expert, or always on (FFT only); router: random | uniform | base-biased | prompts (each expert's row
    from the base's hidden states on the first `prompts_per_expert` training prompts of its task) |
    none (router-free: all experts with equal weight) | arrow (LoRA only, training-free: per module, each
    adapter's top right singular vector of B A, PEFT's Arrow) | hidden (mergekit-moe's gate_mode hidden:
    an expert's prompts against the other experts' as negative prompts) | cheap-embed (mergekit-moe's
    cheap_embed) | moetify (moetify's routing, the paper's: an FFT-MoE's rows from the base's residual stream at each
    layer's input on the first `prompts_per_expert` training prompts; a LoRA-MoE's random routers per module,
    sigmoid gates, every expert chosen whatever `top_k`, which is then the FFT-MoE's); seed: random routers
    (default: the study's);
    attention: self-attention projections (q_proj, k_proj, v_proj, o_proj) that are experts too, each
    with its own router (FFT only: a LoRA-MoE already mixes every module its adapters target);
    routing (LoRA only): a router per layer, or per module, each reading its module's input (moetify's
    per-module routers; unset: per module for arrow, per layer otherwise); temperature: arrow's softmax
    temperature (unset: 1); gate_training: how each one-round adapter's gates are trained for router gates
    (unset: GateTrainingConfig's defaults); router_dtype (LoRA only): the dtype the routers are stored in
    (float16: moetify's, blend.py saves its LoRA-MoE in float16), run in float32 on the stored values as PEFT loads
    moetify's routers (an FFT-MoE's routers are its model's dtype); router_init (router: moetify, LoRA only):
    per-module (each router drawn from (seed, module)) or moetify (the draws of moetify's blend.py on a CPU:
    set_seed(1399), then every LoRA layer's init in PEFT's module order, then the routers; combine/routers.py);
    preset: named settings (MOE_PRESETS; btx: Branch-Train-MiX), the section's own settings on top. The section may be a list of mixtures, each reported as its own run `moe-<experts>-<name>`; name:
    that run's name (default: its router), unique in the list."""

    SWEEPABLE: ClassVar[tuple[str, ...]] = ("top_k",)
    experts: list[Finetune] = Field(default_factory=lambda: ["fft", "lora"])
    tasks: list[str] | dict[Finetune, list[str]] | None = None
    top_k: int = Field(default=2, ge=1)
    layers: list[Annotated[int, Field(ge=0)]] | None = None
    shared: Literal["base", "average"] = "base"
    base_expert: Literal["none", "routed", "always-on"] = "none"
    router: MoeRouter = "prompts"
    prompts_per_expert: int = Field(default=8, gt=0)
    router_training: RouterTrainingConfig | None = None
    seed: int | None = None
    attention: list[Literal["q_proj", "k_proj", "v_proj", "o_proj"]] | None = None
    routing: Literal["layer", "module"] | None = None
    temperature: float | None = Field(default=None, gt=0)
    name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]*$")
    gate_training: GateTrainingConfig | None = None
    router_dtype: RouterDtype = "float32"
    router_init: RouterInit = "per-module"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """`preset: NAME` expands to MOE_PRESETS[NAME] under the section's own settings (and is then gone: a
        mixture is the same step whether its settings came from a preset or were written out)."""
        if not isinstance(data, dict) or "preset" not in data:
            return data
        name = data["preset"]
        if name not in MOE_PRESETS:
            raise ValueError(f"unknown preset {name!r} (presets: {', '.join(MOE_PRESETS)})")
        return {**MOE_PRESETS[name], **{k: v for k, v in data.items() if k != "preset"}}

    @field_validator("experts")
    @classmethod
    def _experts(cls, value: list[str]) -> list[str]:
        return _each_once(value, "name each of fft, lora once, at least one")

    @field_validator("attention")
    @classmethod
    def _attention(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        return _each_once(value, "name each attention projection to mix once, at least one")

    @model_validator(mode="after")
    def _consistent(self) -> MoeConfig:
        for listed in self.tasks.values() if isinstance(self.tasks, dict) else [self.tasks]:
            if listed is not None and (not listed or len(set(listed)) != len(listed)):
                raise SettingError("'tasks' names each task to mix once, at least one", "tasks")
        problems = moe_problems(set(self.experts), router=self.router, base_expert=self.base_expert,
                                attention=bool(self.attention), routing=self.routing,
                                trains=self.router_training is not None, temperature=self.temperature is not None,
                                gate_training=self.gate_training is not None, router_dtype=self.router_dtype,
                                router_init=self.router_init)
        if problems:
            setting, message = problems[0]
            raise SettingError(message, setting)
        return self


class MethodsConfig(Strict):
    """The methods to run."""

    one_round: MethodConfig | None = Field(default=None, alias="one-round")
    sequential: MethodConfig | None = None
    olora: OLoraConfig | None = None
    ewc: EwcConfig | None = None
    lwf: LwfConfig | None = None
    joint: JointConfig | None = None
    replay: ReplayConfig | None = None
    merge: MergeConfig | None = None
    moe: MoeConfig | list[MoeConfig] | None = None
    continual_merge: ContinualMergeConfig | None = Field(default=None, alias="continual-merge")
    search: SearchConfig | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


ACCELERATE_CONFIGS = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


class LaunchSettings(Strict):
    """num_processes > 1 (or an accelerate_config) runs a train step as `accelerate launch` of that
    many processes on one machine, one per GPU. accelerate_config: a shipped config (ddp, fsdp,
    deepspeed-zero2, deepspeed-zero3; ddp when not given) or the path of an accelerate config YAML;
    mixed_precision overrides the accelerate config's."""

    num_processes: int = Field(default=1, ge=1)
    accelerate_config: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None

    @field_validator("accelerate_config")
    @classmethod
    def _known_or_yaml(cls, value: str | None) -> str | None:
        if value is not None and value not in ACCELERATE_CONFIGS and not value.endswith((".yaml", ".yml")):
            raise ValueError(f"name one of {', '.join(ACCELERATE_CONFIGS)} or an accelerate config .yaml file")
        return value

    @property
    def launched(self) -> bool:
        return self.num_processes > 1 or self.accelerate_config is not None


class LaunchConfig(LaunchSettings):
    """How train steps run: by default in the study's own process. lora: other settings for LoRA and
    O-LoRA steps (e.g. FSDP for FFT of an 8B model, DDP for its adapters: O-LoRA's penalty needs
    unsharded A matrices). cpu: processes on the CPU (gloo DDP), for machines without GPUs. Not part
    of any step's key, since the same global batch gives the same weights on any number of processes, except
    mixed_precision, which changes the numbers: it keys the steps that train launched."""

    cpu: bool = False
    lora: LaunchSettings | None = None

    def for_finetune(self, finetune: str) -> LaunchSettings:
        if finetune == "lora" and self.lora is not None:
            return self.lora
        return LaunchSettings(num_processes=self.num_processes, accelerate_config=self.accelerate_config,
                              mixed_precision=self.mixed_precision)


class ExecutorConfig(Strict):
    """How the local executor uses this machine's cores. jobs: how many independent steps run at once, each in its
    own process with the cores divided between them ("auto": one per core); a step too large to share the
    machine (study/resources.py: more than `shared_params` parameters, or launched as several processes) runs
    alone with every core. 1 (the default): one step at a time, in the study's process, with every core. Not part of
    any step's key, but not free of consequences: a step on fewer threads sums in another order, and on the quick
    world's model that changes trained weights beyond rounding, and some scores (measured on the demo against jobs 1
    on 2 cores); on the test preset's tiny model the bytes are the same. A study is reproducible for a given jobs setting and core count.
    threads "all" keeps the numbers of jobs 1 whatever jobs is (each step on as many threads as jobs 1 gives it)."""

    jobs: Literal["auto"] | Annotated[int, Field(ge=1)] = 1
    # The torch threads of each step run beside others: "share" = cores // jobs; "all" = the thread count (and so
    # the numbers) of jobs 1, torch's own, the jobs then taking turns on the cores; or a number.
    threads: Literal["share", "all"] | Annotated[int, Field(ge=1)] = "share"
    shared_params: int = Field(default=100_000_000, gt=0)
    # Link finished steps from, and publish them to, the machine's shared step cache (KNOWSTACK_CACHE; docs/config.md
    # "Shared step cache"); false: compute every step in the study dir.
    shared_cache: bool = True


class StudyConfig(Strict):
    name: str
    seed: int = 0
    # Repeat every trained model once per seed (the world stays the one `seed` builds): intervals then cover
    # seed variance too. None: one run, at `seed`.
    seeds: list[int] | None = None
    base: BaseModelConfig
    tasks: Literal["builtin"] | BuiltinTasks | list[TaskConfig] = "builtin"
    old_knowledge: OldKnowledgeConfig = Field(default_factory=OldKnowledgeConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    methods: MethodsConfig = Field(default_factory=MethodsConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _builtin_consistency(self) -> StudyConfig:
        builtin = self.base.builtin is not None
        if not builtin and self.builtin_tasks:
            raise ValueError("'tasks: builtin' needs 'base.builtin'; list your own tasks for another base")
        if not builtin and self.old_knowledge.tasks == "builtin":
            raise ValueError("'old_knowledge.tasks: builtin' needs 'base.builtin'; name lm-eval tasks")
        if not builtin and self.training.lr_of_pretrain_peak is not None:
            raise ValueError("'training.lr_of_pretrain_peak' needs 'base.builtin'; give 'training.lr'")
        if builtin and self.training.lr is None and self.training.lr_of_pretrain_peak is None:
            raise ValueError("give 'training.lr' or 'training.lr_of_pretrain_peak'")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError("'seeds' must list at least one seed, each once")
        if isinstance(self.tasks, list):
            names = [task.name for task in self.tasks]
            if len(set(names)) != len(names):
                raise ValueError("task names must be unique")
            for index, task in enumerate(self.tasks):
                _check_task_recipe(self.training, task, index)
        return self


    @property
    def builtin_tasks(self) -> bool:
        """The tasks are (some of) the built-in world's."""
        return not isinstance(self.tasks, list)

    def builtin_task_names(self, known: list[str]) -> list[str]:
        """The built-in tasks this study runs, in its order; an unknown name is the config's error."""
        if self.tasks == "builtin":
            return known
        assert isinstance(self.tasks, BuiltinTasks)
        unknown = [name for name in self.tasks.builtin if name not in known]
        if unknown:
            raise KnowstackError(f"unknown built-in task '{unknown[0]}' (known: {', '.join(known)})",
                                 field="tasks.builtin")
        return list(self.tasks.builtin)


def _check_task_recipe(training: TrainingConfig, task: TaskConfig, index: int) -> None:
    """A task's own micro batch, with the recipe's batch, passes the recipe's checks (here, not when its step runs)."""
    if task.micro_batch_size is None:
        return
    try:
        TrainingConfig.model_validate({**training.model_dump(), "micro_batch_size": task.micro_batch_size})
    except ValidationError as err:
        message = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(located(message, field=f"tasks[{index}].micro_batch_size")) from None


def _error_field(error: Any) -> str:
    """The field a pydantic error is about: its location, and the setting a section's rule names (SettingError)."""
    path = _field_path(tuple(error["loc"]))
    cause = (error.get("ctx") or {}).get("error")
    return f"{path}.{cause.setting}" if isinstance(cause, SettingError) else path


def _field_path(location: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif "[" in str(item) or str(item).startswith(("function-", "constrained-")) or str(item)[:1].isupper():
            continue  # pydantic's name for a union branch (a type, or a model's class name), not a field
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _resolve_paths(raw: Any, root: Path) -> Any:
    """Relative data paths in a config are relative to the config file, not the working dir."""
    if isinstance(raw, dict):
        resolved = {}
        for key, value in raw.items():
            if key == "accelerate_config" and isinstance(value, str) and value.endswith((".yaml", ".yml")):
                # a config file of the user's, relative to the study config; a shipped name stays a name
                resolved[key] = os.path.normpath(root / Path(value).expanduser())
            elif key in ("path", "train_file", "eval_file", "test_file", "include_path") and isinstance(value, str):
                candidate = Path(value).expanduser()
                # normpath, not resolve: a config reached through a symlinked dir stays relative to it
                resolved[key] = os.path.normpath(candidate if candidate.is_absolute() else root / candidate)
            else:
                resolved[key] = _resolve_paths(value, root)
        return resolved
    if isinstance(raw, list):
        return [_resolve_paths(item, root) for item in raw]
    return raw


def parse_config(raw: Any, source: str | Path = "<config>", root: Path | None = None) -> StudyConfig:
    if not isinstance(raw, dict):
        raise KnowstackError("the config must be a YAML mapping", path=source)
    if root is not None:
        raw = _resolve_paths(raw, root)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        # With unions pydantic reports each branch; the deepest location is the user's real mistake.
        first = max(err.errors(), key=lambda e: len(_error_field(e)))
        field = _error_field(first) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise KnowstackError(message, path=source, field=field) from None


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise KnowstackError("config file not found", path=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise KnowstackError(f"not valid YAML: {err}", path=path) from None
    return parse_config(raw, source=path, root=path.parent.absolute())
