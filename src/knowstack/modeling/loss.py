"""The training loss: summed cross-entropy over the answer tokens of a micro-batch.

One function, shared by training (train/loop.py), router and gate training (train/router_training.py,
train/gate_training.py) and the gradient statistics of merges (combine/statistics.py), so that all of them
score an example the same way, bit for bit.
"""

from __future__ import annotations

import torch

from knowstack.data.batches import scored_positions


def answer_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the scored (answer) tokens of one micro-batch.

    logits_to_keep gets a boolean mask of the scored positions, so the vocabulary projection (the
    largest matmul of a small model) skips prompts and padding entirely.
    """
    keep, targets = scored_positions(inputs["labels"])
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    # use_cache=False matters: with a cache object present, transformers does not infer the
    # packed (block-diagonal) mask from position_ids.
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1]).float()
    return torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction="sum")
