"""The training loss: summed cross-entropy over the answer tokens of a micro-batch, and the distillation term that
LwF adds to it.

One function, shared by training (train/loop.py), router and gate training (train/router_training.py,
train/gate_training.py) and the gradient statistics of merges (combine/statistics.py), so that all of them
score an example the same way, bit for bit.
"""

from __future__ import annotations

import torch

from knowstack.data.batches import scored_positions


def answer_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (float32, one row per scored token) at the scored (answer) positions of one micro-batch, and the
    token each row predicts.

    logits_to_keep gets a boolean mask of the scored positions, so the vocabulary projection (the
    largest matmul of a small model) skips prompts and padding entirely.
    """
    keep, targets = scored_positions(inputs["labels"])
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    # use_cache=False matters: with a cache object present, transformers does not infer the
    # packed (block-diagonal) mask from position_ids.
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)


def answer_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the scored (answer) tokens of one micro-batch."""
    logits, targets = answer_logits(model, inputs)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def distillation_kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of KL(softmax(teacher / T) || softmax(student / T)): LwF's distillation term (Li & Hoiem
    2017's soft-target cross-entropy less the teacher's entropy, which has no gradient), one row per scored token.
    The teacher's logits carry no gradient."""
    teacher_log_p = torch.log_softmax(teacher.detach().float() / temperature, dim=-1)
    student_log_p = torch.log_softmax(student.float() / temperature, dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum()
