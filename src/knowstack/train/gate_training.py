"""Per-contributor gates (PHATGOOSE, Muqeeth et al. 2024, "Learning to Route Among Specialized Experts for
Zero-Shot Generalization"): each contributor, on their own data, trains one gate vector v per module their LoRA
adapter targets, with the base and the adapter frozen; the adapter's output in that module is scaled by
sigmoid(v . x), x the module's input. v starts at zero (every gate 1/2) and trains briefly (the paper and
microsoft/mttl's implementation: 100 steps, learning rate 1e-3). The vectors are written beside the adapter
(GATES_FILE, one tensor per module, named as the module), so they travel with it; a LoRA-MoE's `gates` router
reads them (combine/routers.py, modeling/lora_moe.py).

The adapter runs as PEFT applies it (unmerged): a pre-hook keeps each LoRA module's input and a hook on its
lora_B multiplies lora_B's output by the gate, which equals gating the adapter's delta (PEFT scales it after).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knowstack.atomic import honour_umask
from knowstack.config import GateTrainingConfig, TrainingConfig
from knowstack.data.batches import batch_order, pack, tokenize_examples
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modeling.routing import GATES_FILE

_DECLARED = GateTrainingConfig()


@dataclass(frozen=True)
class GateTraining:
    # the defaults are config.py GateTrainingConfig's and the training recipe's max_length (one declaration)
    steps: int = _DECLARED.steps
    lr: float = _DECLARED.lr
    batch_size: int = _DECLARED.batch_size
    max_length: int = TrainingConfig().max_length
    seed: int = 0


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The PEFT LoRA Linear modules of `model` (a PeftModel with one adapter), by the base module's name."""
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and len(getattr(module, "lora_A", {})) > 0:
            found[name.removeprefix("base_model.model.")] = module
    if not found:
        raise KnowstackError("the adapter targets no Linear module to gate", field="adapter")
    return found


def attach_gates(model: nn.Module) -> tuple[dict[str, nn.Parameter], list]:
    """A zero gate vector per LoRA module, applied as sigmoid(v . x) to the module's adapter output; returns
    the vectors and the hook handles."""
    gates: dict[str, nn.Parameter] = {}
    handles = []
    for name, module in lora_modules(model).items():
        weight = module.base_layer.weight
        gate = nn.Parameter(torch.zeros(weight.shape[1], device=weight.device, dtype=torch.float32))
        gates[name] = gate
        kept: dict[str, torch.Tensor] = {}

        def keep_input(mod: nn.Module, args: tuple, kept=kept) -> None:
            kept["x"] = args[0]

        def gate_output(mod: nn.Module, args: tuple, output: torch.Tensor, kept=kept, gate=gate) -> torch.Tensor:
            scale = torch.sigmoid(kept["x"].float() @ gate).unsqueeze(-1)
            return (output.float() * scale).to(output.dtype)

        handles.append(module.register_forward_pre_hook(keep_input))
        for lora_b in module.lora_B.values():
            handles.append(lora_b.register_forward_hook(gate_output))
    return gates, handles


def train_gates(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                settings: GateTraining) -> tuple[dict[str, torch.Tensor], dict]:
    """Trains the gate vectors of `model` (the base with the contributor's adapter, PEFT, unmerged) on
    `examples` (answer-only LM loss), everything else frozen; returns the vectors by module and the loss
    curve."""
    from knowstack.modeling.loss import answer_loss_sum

    if not examples:
        raise KnowstackError("gate training needs examples", field="train_data")
    for param in model.parameters():
        param.requires_grad_(False)
    gates, handles = attach_gates(model)
    optimizer = torch.optim.Adam(list(gates.values()), lr=settings.lr)
    tokenized = tokenize_examples(tokenizer, examples, settings.max_length)
    order = batch_order(len(tokenized), settings.batch_size, 1.0, settings.steps, settings.seed)
    device = next(model.parameters()).device
    curve = []
    try:
        for indices in order:
            inputs = {k: v.to(device) for k, v in pack([tokenized[i] for i in indices]).items()}
            answer_tokens = max(sum(tokenized[i].answer_tokens for i in indices), 1)
            loss = answer_loss_sum(model, inputs) / answer_tokens
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(round(loss.item(), 4))
    finally:
        for handle in handles:
            handle.remove()
    vectors = {name: gate.detach().float().cpu().contiguous() for name, gate in gates.items()}
    return vectors, {"steps": len(order), "first": curve[0], "last": curve[-1], "curve": curve}


def save_gates(adapter_dir: Path, gates: dict[str, torch.Tensor]) -> Path:
    """The gate vectors written beside the adapter (GATES_FILE), atomically."""
    from safetensors.torch import save_file

    path = Path(adapter_dir) / GATES_FILE
    tmp = path.with_name(f".{GATES_FILE}.tmp")
    save_file(gates, str(tmp), metadata={"format": "pt"})
    honour_umask(tmp)
    tmp.replace(path)
    return path


def gate_adapter(base: str | Path, adapter: str | Path, examples: Sequence[Example], settings: GateTraining,
                 tokenizer_path: str | Path | None = None) -> dict:
    """Loads the base with `adapter` (PEFT), trains its gates on `examples`, writes them into the adapter dir;
    returns a summary (modules, the loss curve, the file)."""
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    torch.manual_seed(settings.seed)
    # float32: the gates are small and trained briefly; on this process's GPU where the model fits
    model = on_gpu_if_it_fits(load_model(base, adapter, dtype="float32", merge_adapter=False))
    tokenizer = load_tokenizer(tokenizer_path or base)
    gates, summary = train_gates(model, tokenizer, examples, settings)
    path = save_gates(Path(adapter), gates)
    return {"file": str(path), "modules": len(gates), **summary}
