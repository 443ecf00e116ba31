"""An MoE's router weights and the decoder layers that hold its routers: shared by the code that builds
an MoE (combine/), loads it (lora_moe.py) and trains its routers (train/router_training.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from knowstack.errors import KnowstackError

# A contributor's gate vectors for their LoRA adapter (PHATGOOSE), one tensor per module, beside the adapter's
# files: written by train/gate_training.py, read by the `gates` router (combine/moe_lora.py), kept by the registry.
GATES_FILE = "phatgoose_gates.safetensors"
# The tokens of a prompt a router reads, its last ones: the prompt-based router inits (combine/routers.py) and the
# experts' loads measured around router training (train/router_training.py)
ROUTER_PROMPT_TOKENS = 512

@dataclass
class Router:
    """One layer's router: logits = weight @ x (+ bias); rows are experts in MoE order."""

    weight: torch.Tensor  # (experts, hidden)
    bias: torch.Tensor | None = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM of the families knowstack knows (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise KnowstackError(f"{type(model).__name__} has no model.layers: MoE mixing supports Llama-family models")
    return layers


def on_attention_input(layer: nn.Module, read: Callable[[torch.Tensor], None]) -> RemovableHandle:
    """Calls `read` with what a decoder layer's self-attention reads, before it runs: the output of the layer's
    input norm in every pre-norm family (Llama, Mistral, Qwen, Gemma, Phi-3), the residual stream itself in
    OLMo-2's (it has no norm before attention, only after). A pre-hook on `self_attn`, which every family's layer
    calls with `hidden_states` as a keyword."""
    attention = getattr(layer, "self_attn", None)
    if not isinstance(attention, nn.Module):
        raise KnowstackError(f"{type(layer).__name__} has no self_attn: LoRA-MoE routes on a decoder layer's "
                             "attention input")

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        read(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    return attention.register_forward_pre_hook(hook, with_kwargs=True)
