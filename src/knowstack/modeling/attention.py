"""Attention over packed rows that costs what the examples cost, not what the row costs.

Given restarting position_ids, transformers builds a block-diagonal mask for a packed row and SDPA
computes all T x T scores of it, most of them masked: on CPU that was ~20% of a training step of
the built-in model at 4 examples per row. This implementation runs causal SDPA on each example's
segment instead (no mask at all), which is the same function at sum(L_i^2) cost. It is registered
with transformers' AttentionInterface, so the model code is untouched; rows that are not a single
packed row (padding with an attention mask, several rows) go to the stock SDPA path.

It honours what every family knowstack knows passes to its attention function (transformers 5.x):
`scaling` (Gemma's query_pre_attn_scalar), `sliding_window` (Mistral, Gemma-2/3's local layers: a segment
longer than the window gets a banded causal mask) and `softcap` (Gemma-2's attention logit soft-capping,
computed as its stock eager attention does, since SDPA cannot cap). tests/test_families_train.py checks,
for each family, that a packed row's loss and gradients are those of its examples run one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "knowstack_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each example in a packed row: a new one wherever the position does not go up by 1."""
    positions = position_ids[0]
    starts = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
    edges = [0, *starts.tolist(), positions.shape[0]]
    return list(zip(edges[:-1], edges[1:], strict=True))


def segment_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The stock attention of the families knowstack knows, per packed segment: causal, within the layer's sliding
    window where it has one (Mistral; Gemma-2/3's local layers), with the attention logits soft-capped where the
    family caps them (Gemma-2: eager math, as its stock eager function; SDPA cannot cap)."""
    position_ids = kwargs.get("position_ids")
    single_packed_row = (
        attention_mask is None and position_ids is not None and query.shape[0] == 1
        and query.shape[2] == key.shape[2] and position_ids.shape[-1] == query.shape[2]
    )
    if not single_packed_row:  # `_mask` built SDPA's own mask where one is needed: the window and padding are in it
        if attention_mask is None and (sliding_window is not None or softcap is not None):
            # none built (`_mask` skips a single unpadded row): causal, within the window
            attention_mask = causal_mask(query.shape[2], key.shape[2], sliding_window, query.device)
        if softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return _eager(module, query, key, value, attention_mask, dropout, scaling, softcap), None
    dropout = dropout if module.training else 0.0
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split, not one slice per segment: the backward of a slice is a zero tensor of the whole row with the
    # slice's gradient copied in, summed over segments (quadratic in the segment count; a third of the
    # profiled forward + backward at 16 examples a row, ~1.1x on a whole FFT step); split's backward is one
    # cat. The same numbers, bit for bit.
    sizes = [e - s for s, e in segment_bounds(position_ids.reshape(1, -1))]
    outputs = [
        _segment(module, q, k, v, dropout, scaling, sliding_window, softcap)
        for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2), strict=True)
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _segment(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
             scaling: float | None, sliding_window: int | None, softcap: float | None) -> torch.Tensor:
    """One example's attention, (batch, heads, length, dim) in and out, its keys and values one per query head."""
    length = query.shape[2]
    window = sliding_window if sliding_window is not None and length > sliding_window else None
    if softcap is None and window is None:  # plainly causal: SDPA's causal kernel, no mask at all
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                                is_causal=True)
    mask = causal_mask(length, length, window, query.device)
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                                scale=scaling)
    return _eager(module, query, key, value, mask, dropout, scaling, softcap, repeated=True).transpose(1, 2)


def causal_mask(queries: int, keys: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """(queries x keys) True where a query attends: the last `queries` positions of `keys` each see themselves and
    earlier keys, within the sliding window if any (transformers' rule: key > query - window)."""
    offset = torch.arange(keys - queries, keys, device=device)[:, None] - torch.arange(keys, device=device)[None, :]
    mask = offset >= 0
    return mask & (offset < sliding_window) if sliding_window is not None else mask


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None, dropout: float, scaling: float | None, softcap: float, *,
           repeated: bool = False) -> torch.Tensor:
    """Soft-capped attention in the operations and order of Gemma-2's stock eager function (scores scaled, capped
    as softcap * tanh(scores / softcap), masked, softmax in float32). mask: True where a query attends (SDPA's
    boolean form), or None for plainly causal. Returns (batch, length, heads, dim)."""
    if not repeated:
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # no scaling given: 1/sqrt(head dim), as SDPA's and the stock eager functions' default
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(query.shape[2], key.shape[2], None, query.device)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


def _mask(*args, **kwargs) -> torch.Tensor | None:
    # A packed row needs no mask (the forward keeps each segment causal and in its window); otherwise SDPA's own
    # (boolean; the window and any padding in it; None where plainly causal).
    if kwargs.get("attention_mask") is None and kwargs.get("batch_size", 1) == 1:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, segment_attention_forward)
AttentionMaskInterface.register(NAME, _mask)


@contextmanager
def packed_attention(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, SDPA/eager models run knowstack's segment attention (the training loop's): each
    sequence of a packed row attends to itself alone, at the cost of its own length squared. Stock
    attention isolates packed sequences only when called without a cache (a block-diagonal mask over the
    whole row); this does not depend on that. Flash/flex attention handle packed rows already."""
    current = model.config._attn_implementation
    if current not in ("sdpa", "eager"):
        yield
        return
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(current)
