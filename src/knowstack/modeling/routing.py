"""An MoE's router weights and the decoder layers that hold its routers: shared by the code that builds
an MoE (combine/), loads it (lora_moe.py) and trains its routers (train/router_training.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from knowstack.errors import KnowstackError


@dataclass
class Router:
    """One layer's router: logits = weight @ x (+ bias); rows are experts in MoE order."""

    weight: torch.Tensor  # (experts, hidden)
    bias: torch.Tensor | None = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise KnowstackError(f"{type(model).__name__} has no model.layers: MoE mixing supports Llama-family models")
    return layers
