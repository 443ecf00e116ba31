"""One training run, FFT or LoRA, in a loop that runs unchanged under `accelerate launch`.

The recipe is the paper's (HF Trainer semantics): AdamW, a warmup + constant/linear/cosine schedule,
an effective batch of `batch_size` examples per optimizer step reached by gradient accumulation,
gradient clipping, and a loss that is by default the mean over the answer tokens of the whole effective batch
(Trainer's `num_items_in_batch`, since transformers 4.46), or with `loss_reduction: micro_batch` the mean of
per-micro-batch token means (Trainer up to 4.45, which the paper ran).

Distribution is done by hand rather than through a prepared DataLoader: every process computes
the same seeded batch order and takes a strided share of each effective batch, so a step is the
same `batch_size` examples whatever the number of processes. Accumulation is done by hand too
(`no_sync` on all but the last micro-batch), because Accelerator's own accumulation divides the
loss by a fixed number of micro-batches, which is wrong when micro-batches hold unequal token counts.

Tested (tests/test_distributed.py): 2 processes on CPU (gloo DDP) give the 1-process loss curve and
weights to float tolerance. train/launch.py starts the processes (`accelerate launch` with a config from
configs/accelerate/: DDP, FSDP, DeepSpeed ZeRO-2/3); on CPU it sets ACCELERATE_USE_CPU=1, because
accelerate 1.15 only picks multi-CPU DDP when told to use the CPU, and `accelerate launch --cpu
--num_processes N` without MPI starts a single process.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.data.batches import (
    TokenizedExample,
    batch_order,
    collate,
    micro_batches,
    shard,
    tokenize_examples,
)
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modelcard import (
    STUDY_SCORES_NOTE,
    ModelCardInfo,
    examples_sha256,
    hub_name,
    model_input,
    training_card,
    write_model_card,
)
from knowstack.modeling import attention
from knowstack.modeling.families import INPUT_EMBEDDING, OUTPUT_EMBEDDING, checked_lora_targets
from knowstack.modeling.loss import answer_logits, answer_loss_sum
from knowstack.modeling.streaming import MAX_SHARD_BYTES
from knowstack.modelio import load_model, load_tokenizer, save_model, set_config_dtype
from knowstack.progress import step_bar
from knowstack.train import tracking as trackers
from knowstack.train.settings import TrainSettings
from knowstack.train.tracking import Tracking
from knowstack.usage import Usage

ExtraLoss = Callable[[torch.nn.Module], torch.Tensor]
# (the unwrapped model, a micro-batch's inputs, its answer-token logits) -> a term on the scale of the summed
# answer-token loss, added to it (LwF's distillation, train/regularizers.py)
MicroLoss = Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
SUMMARY_FILE = "train_summary.json"
# transformers' scheduler names; "constant" with warmup_steps=0 is the plain constant rate.
_SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def train(
    model_path: str | Path,
    examples: Sequence[Example],
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    adapter_init: str | Path | None = None,
    progress_desc: str = "train",
    extra_loss: ExtraLoss | None = None,
    micro_loss: MicroLoss | None = None,
    tracking: Tracking | None = None,
    tokenizer_path: str | Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Fine-tune `model_path` on `examples`; write a full model (FFT) or a PEFT adapter (LoRA) to out_dir.

    adapter_init: a PEFT adapter to start from; LoRA continues training it, FFT merges it into the
    weights first. extra_loss(model) is added once per optimizer step (e.g. O-LoRA's orthogonality
    penalty, EWC's); it receives the unwrapped (PEFT) model. micro_loss(model, inputs, logits) is added to every
    micro-batch's summed answer-token loss and scaled with it (LwF's distillation). tracking: experiment trackers to log each step to
    (train/tracking.py); their files end up in out_dir/tracking. tokenizer_path: the tokenizer, where it is not
    the model dir's (a study's base.tokenizer). Returns the train_summary.json contents.
    """
    examples = list(examples)
    if not examples:
        raise KnowstackError("no training examples", path=out_dir)
    usage = Usage.start()  # peak memory of loading and training, in the process that trains
    logging_dir = trackers.staging_dir(out_dir)
    accelerator = Accelerator(**trackers.accelerator_kwargs(tracking, logging_dir))
    set_seed(settings.seed)  # before the LoRA init, which draws random A matrices
    tokenizer = load_tokenizer(tokenizer_path or model_path, trust_remote_code=trust_remote_code)
    model = _load_trainable(model_path, settings, adapter_init, trust_remote_code)
    fitted: dict[str, int] = {}
    tokenized = tokenize_examples(tokenizer, examples, settings.max_length, counts=fitted, overlong=settings.overlong)
    if accelerator.is_main_process:
        _warn_overlong(progress_desc, fitted, len(examples), settings.max_length, settings.overlong)
    if not tokenized:
        raise KnowstackError(f"every training example's answer is longer than max_length ({settings.max_length} "
                             "tokens)", path=out_dir, field="max_length")
    plan = batch_order(len(tokenized), settings.batch_size, settings.epochs, settings.max_steps, settings.seed)
    trackers.start(accelerator, tracking, settings.to_dict(), logging_dir)

    model, record = run_steps(accelerator, model, tokenized, plan, settings, tokenizer.pad_token_id,
                              extra_loss=extra_loss, micro_loss=micro_loss, progress_desc=progress_desc)
    summary = _summary(settings, examples, tokenized, plan, record, accelerator.num_processes,
                       model_path, adapter_init, fitted)
    summary.update({k: v for k, v in usage.record().items() if k != "seconds"})
    trackers.finish(accelerator, tracking)
    data_sha = examples_sha256((ex.prompt, ex.answer) for ex in examples)

    def card() -> ModelCardInfo:  # built on the main process only: it hashes the base's files
        return training_card(settings.to_dict(), model_path, adapter_init, summary, data_sha)

    _save(accelerator, model, tokenizer, Path(out_dir), settings, model_path, summary, card, logging_dir)
    return summary


def _warn_overlong(desc: str, fitted: dict[str, int], n_examples: int, max_length: int, rule: str) -> None:
    """One line per training run (a task's step) that says how many examples did not fit, if any."""
    overlong = fitted["truncated"] + fitted["answer_cut"] + fitted["dropped"]
    if overlong:
        # the paper's rule cuts answers and drops nothing; knowstack's keeps answers and drops what cannot
        fate = (f"{fitted['answer_cut']} had their answer cut (the paper's rule)" if rule == "paper" else
                f"{fitted['dropped']} were dropped (answer alone too long)")
        print(f"warning: {desc}: {overlong} of {n_examples} training examples are longer than max_length "
              f"({max_length} tokens): {fitted['truncated']} had the middle of their prompt cut (answer kept), "
              f"{fate}", file=sys.stderr, flush=True)


# The dtype of the weights (and so of AdamW's state) while they train, by TrainSettings.precision.
TRAINING_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def _load_trainable(
    model_path: str | Path, settings: TrainSettings, adapter_init: str | Path | None, trust_remote_code: bool = False
) -> torch.nn.Module:
    # float32 by default: on CPU there is no faster dtype to train in, and mixed precision on accelerators is
    # accelerate's job (`--mixed_precision bf16`), which autocasts the forward. bf16: the paper's script's way.
    dtype = TRAINING_DTYPES[settings.precision]
    if settings.finetune == "fft":
        return make_trainable(load_model(model_path, adapter_init, dtype=dtype, merge_adapter=True,
                                         trust_remote_code=trust_remote_code), settings)
    base = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if adapter_init is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_init), is_trainable=True)
    return make_trainable(base, settings)


def make_trainable(model: PreTrainedModel, settings: TrainSettings) -> torch.nn.Module:
    """FFT: every parameter of `model` trained; LoRA: a fresh PEFT adapter of the settings' rank, alpha, dropout and
    target modules on it (its A matrices drawn from torch's global generator: seed that first)."""
    if settings.finetune == "fft":
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=model_lora_targets(model, settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def model_lora_targets(model: PreTrainedModel, names: Sequence[str]) -> list[str]:
    """The modules of `model` that LoRA adapts for the target `names` (Llama's names resolved to the family's
    own: every linear layer of attention and MLP by default, fused ones included); one clear error where a name
    matches no module, before anything is trained (PEFT refuses only when none matches)."""
    modules = dict(model.named_modules())
    linear = [name.rpartition(".")[2] for name, module in modules.items() if isinstance(module, torch.nn.Linear)]
    return checked_lora_targets(getattr(model.config, "model_type", None), list(names), modules, linear,
                                path=getattr(model.config, "_name_or_path", None) or None)


def _base_model(model: torch.nn.Module) -> PreTrainedModel:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _use_segment_attention(model: torch.nn.Module) -> str | None:
    """Switch SDPA/eager models to per-example attention for packed rows; returns what to restore.

    Flash/flex attention already handle packed rows natively, so they are left alone. The original
    implementation is restored before saving, so no checkpoint ever names ours.
    """
    base = _base_model(model)
    current = base.config._attn_implementation
    if current not in ("sdpa", "eager"):
        return None
    base.set_attn_implementation(attention.NAME)
    return current


def _make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    # As HF Trainer: no weight decay on biases and norm weights (the 1-D parameters).
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)


def run_steps(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenized: Sequence[TokenizedExample],
    plan: list[list[int]],
    settings: TrainSettings,
    pad_token_id: int,
    *,
    extra_loss: ExtraLoss | None = None,
    micro_loss: MicroLoss | None = None,
    progress_desc: str = "train",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The optimizer steps of `plan` (the example indices of each step: batch_order's) on a model made trainable
    (make_trainable), on the accelerator's device and in its precision: what train() runs between loading the model
    and saving it.

    Returns the prepared model and the record: losses, extras (extra_loss of each step), lrs, seconds (the whole
    loop) and step_seconds (each optimizer step up to its loss read back, so the device has finished it)."""
    restore_attention = _use_segment_attention(model) if settings.pack else None
    optimizer = _make_optimizer(model, settings)
    scheduler = get_scheduler(
        _SCHEDULER_NAMES[settings.schedule],
        optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=len(plan),
    )
    # The scheduler is deliberately not prepared: a prepared one steps num_processes times per
    # step, which assumes a prepared DataLoader; ours steps once per optimizer step.
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses: list[float] = []
    extras: list[float] = []
    lrs: list[float] = []
    step_seconds: list[float] = []
    bar = step_bar(plan, progress_desc, disable=not accelerator.is_local_main_process, unit="step")
    start = time.perf_counter()
    for batch in bar:
        lrs.append(scheduler.get_last_lr()[0])
        step_start = time.perf_counter()
        loss, extra = _optimizer_step(accelerator, model, optimizer, tokenized, batch, settings,
                                      pad_token_id, extra_loss, micro_loss)
        step_seconds.append(time.perf_counter() - step_start)
        scheduler.step()
        losses.append(loss)
        if extra is not None:
            extras.append(extra)
        _log_step(accelerator, len(losses), loss, lrs[-1], extra,
                  sum(len(tokenized[i]) for i in batch) / step_seconds[-1], getattr(extra_loss, "name", None))
        bar.set_postfix(loss=f"{loss:.4f}")
    seconds = time.perf_counter() - start
    if restore_attention is not None:
        _base_model(accelerator.unwrap_model(model)).set_attn_implementation(restore_attention)
    return model, {"losses": losses, "extras": extras, "lrs": lrs, "seconds": seconds, "step_seconds": step_seconds}


def _log_step(accelerator: Accelerator, step: int, loss: float, lr: float, extra: float | None,
              tokens_per_second: float, extra_name: str | None = None) -> None:
    """One optimizer step to the trackers (train/tracking.py); nothing happens without any. extra_name: what the
    extra loss is called (O-LoRA's, which came first, where it says nothing)."""
    if not accelerator.trackers:
        return
    values = {"train/loss": loss, "train/lr": lr, "train/tokens_per_second": tokens_per_second}
    if extra is not None:
        values[f"train/{extra_name or 'olora_penalty'}"] = extra
    accelerator.log(values, step=step)


def _optimizer_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenized: Sequence[TokenizedExample],
    batch: list[int],
    settings: TrainSettings,
    pad_token_id: int,
    extra_loss: ExtraLoss | None,
    micro_loss: MicroLoss | None = None,
) -> tuple[float, float | None]:
    """Forward/backward over this process's micro-batches, then one optimizer step; returns the batch loss."""
    world = accelerator.num_processes
    mine = shard(batch, accelerator.process_index, world)
    # A process with no share of a small last batch still runs one (zero-weighted) pass, so that
    # every process joins the gradient all-reduce.
    weight = 1.0 if mine else 0.0
    micros = micro_batches(mine or batch[:1], settings.micro_batch_size)
    scales = _loss_scales(tokenized, batch, micros, settings, world)
    ce_total = torch.zeros((), device=accelerator.device)
    loss_total = torch.zeros((), device=accelerator.device)
    extra_value = None
    for k, micro in enumerate(micros):
        last = k == len(micros) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        # DeepSpeed steps its engine inside backward() unless told that more micro-batches follow.
        accelerator.sync_gradients = last
        with sync:
            inputs = collate([tokenized[i] for i in micro], pack_rows=settings.pack, pad_token_id=pad_token_id)
            inputs = {key: value.to(accelerator.device) for key, value in inputs.items()}
            if micro_loss is None:
                ce_sum = answer_loss_sum(model, inputs) * weight
                loss = ce_sum * scales[k]
            else:
                logits, targets = answer_logits(model, inputs)
                ce_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") * weight
                # on the loss's own scale: summed over the answer tokens, then scaled as the loss is
                loss = (ce_sum + micro_loss(accelerator.unwrap_model(model), inputs, logits) * weight) * scales[k]
            if last and extra_loss is not None:
                # Added once per step, on the synchronising pass; identical on every process, so
                # DDP's averaging leaves it as is.
                extra = extra_loss(accelerator.unwrap_model(model))
                loss = loss + extra
                extra_value = float(extra.detach())
            accelerator.backward(loss)
        ce_total = ce_total + ce_sum.detach()
        loss_total = loss_total + ce_sum.detach() * (scales[k] / world)
    if settings.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if settings.loss_reduction == "micro_batch":
        return float(accelerator.reduce(loss_total, reduction="sum")), extra_value
    ce_total = accelerator.reduce(ce_total, reduction="sum")
    return float(ce_total) / max(sum(tokenized[i].answer_tokens for i in batch), 1), extra_value


def _loss_scales(tokenized: Sequence[TokenizedExample], batch: list[int], micros: list[list[int]],
                 settings: TrainSettings, world: int) -> list[float]:
    """What each of this process's micro-batches' summed answer-token loss is multiplied by, so that the gradients
    DDP averages over the processes are those of the step's loss (settings.loss_reduction).

    token: every token of the effective batch weighs the same (its answer-token count is known to every process).
    micro_batch: each micro-batch's token mean weighs the same, over the micro-batches of every process (HF Trainer
    before transformers 4.46, whose gradient accumulation divides each micro-batch's mean loss by their count)."""
    if settings.loss_reduction == "token":
        return [world / max(sum(tokenized[i].answer_tokens for i in batch), 1)] * len(micros)
    shares = (shard(batch, rank, world) for rank in range(world))
    count = sum(len(micro_batches(share, settings.micro_batch_size)) for share in shares if share)
    return [world / (count * max(sum(tokenized[i].answer_tokens for i in micro), 1)) for micro in micros]


def loss_fell(curve: Sequence[float]) -> bool | None:
    """Whether a run's training loss fell: the mean over its last quarter of steps below the mean over its first
    quarter (one step is noise); None for a run of fewer than 2 steps, which shows nothing."""
    if len(curve) < 2:
        return None
    quarter = max(1, len(curve) // 4)
    return sum(curve[-quarter:]) / quarter < sum(curve[:quarter]) / quarter


def _summary(
    settings: TrainSettings,
    examples: list[Example],
    tokenized: list[TokenizedExample],
    plan: list[list[int]],
    record: dict[str, Any],
    world_size: int,
    model_path: str | Path,
    adapter_init: str | Path | None,
    fitted: dict[str, int],
) -> dict[str, Any]:
    drawn = [i for batch in plan for i in batch]
    total_tokens = sum(len(tokenized[i]) for i in drawn)
    seconds = record["seconds"]
    summary: dict[str, Any] = {
        "finetune": settings.finetune,
        "model_path": str(model_path),
        "adapter_init": str(adapter_init) if adapter_init is not None else None,
        "steps": len(plan),
        "examples": len(drawn),
        "unique_examples": len(tokenized),
        # overlong examples (settings.overlong): prompts cut in the middle (answer kept), answers cut (the paper's
        # rule), and those whose answer alone did not fit (knowstack's rule drops them)
        "truncated_examples": fitted["truncated"],
        "answer_cut_examples": fitted["answer_cut"],
        "dropped_examples": fitted["dropped"],
        "answer_tokens": sum(tokenized[i].answer_tokens for i in drawn),
        "total_tokens": total_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total_tokens / seconds, 1) if seconds > 0 else None,
        "world_size": world_size,
        "loss_curve": record["losses"],
        "lr_curve": record["lrs"],
        "final_loss": record["losses"][-1],
        "settings": settings.to_dict(),
    }
    if record["extras"]:
        summary["extra_loss_curve"] = record["extras"]
    return summary


def _save(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    settings: TrainSettings,
    model_path: str | Path,
    summary: dict[str, Any],
    card: Callable[[], ModelCardInfo],
    logging_dir: Path,
) -> None:
    accelerator.wait_for_everyone()
    # A collective under FSDP/DeepSpeed (gathers shards), so every process calls it.
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        dtype = None
        if settings.finetune == "fft":
            state_dict = _without_tied_copies(unwrapped, state_dict)
            dtype = _base_dtype(model_path)
            state_dict = _cast(state_dict, dtype)
        with atomic_dir(out_dir) as tmp:
            # FFT: a full HF model dir; LoRA: PEFT writes only adapter_model.safetensors + adapter_config.json.
            unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True,
                                      max_shard_size=MAX_SHARD_BYTES)
            if dtype is not None:
                set_config_dtype(tmp, dtype)
            elif getattr(_base_model(unwrapped), "generation_config", None) is not None:
                # an adapter dir: the base's generation settings, as a full model dir has them
                _base_model(unwrapped).generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / SUMMARY_FILE, summary)
            write_model_card(tmp, card())
            trackers.move_into(logging_dir, tmp)
    accelerator.wait_for_everyone()


def _base_dtype(model_path: str | Path) -> torch.dtype:
    """The dtype an FFT model is saved in: its base's (trained in float32, a bf16 8B base stays a 16 GB
    checkpoint)."""
    base_dtype = getattr(AutoConfig.from_pretrained(str(model_path)), "dtype", None)
    return base_dtype if isinstance(base_dtype, torch.dtype) and base_dtype.is_floating_point else torch.float32


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict less a tied output layer (config tie_word_embeddings, and equal to the embedding), so that a
    fine-tune of a tied base saves what the base saved. save_pretrained drops it itself only while the two share
    storage, which a cast or a gather (FSDP, DeepSpeed) undoes."""
    tied = getattr(_base_model(model).config.get_text_config(), "tie_word_embeddings", False)
    head, embedding = state_dict.get(OUTPUT_EMBEDDING), state_dict.get(INPUT_EMBEDDING)
    if not tied or head is None or embedding is None or head.shape != embedding.shape:
        return state_dict
    if not torch.equal(head, embedding):
        return state_dict
    return {name: value for name, value in state_dict.items() if name != OUTPUT_EMBEDDING}


def merge_adapter(model_path: str | Path, adapter_path: str | Path, out_dir: str | Path, *,
                  trust_remote_code: bool = False) -> Path:
    """Base + LoRA adapter folded into one full model dir (sequential LoRA's next base)."""
    model = load_model(model_path, adapter_path, dtype="auto", merge_adapter=True, trust_remote_code=trust_remote_code)
    tokenizer_source = adapter_path if (Path(adapter_path) / "tokenizer_config.json").is_file() else model_path
    card = ModelCardInfo(title=f"{hub_name(model_path)} with a LoRA adapter merged in", base_model=hub_name(model_path),
                         relation="finetune", library_name="transformers", method="LoRA adapter merged into the base",
                         inputs=[model_input(model_path, "base model"), model_input(adapter_path, "adapter")],
                         scores_note=STUDY_SCORES_NOTE, how_to_load="AutoModelForCausalLM.from_pretrained(DIR)")
    return save_model(model, load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code), Path(out_dir),
                      card=card)
