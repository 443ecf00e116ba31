"""Merge fine-tuned models and LoRA adapters of one base into one model, tensor by tensor.

    merge_models("ties", [m1, m2, a3], out, base=base, options=MergeOptions(density=0.2))

Inputs are full HF model dirs (one-round FFT models) or PEFT LoRA adapter dirs (one-round LoRA);
the output is a full HF model dir that AutoModelForCausalLM loads: the base's config and tokenizer
files (chat template and generation_config too), sharded safetensors and their index, in the base's dtype
unless another is asked for, tied where the base and the models are (combine/inputs.py), and merge.json (what was merged, how); a linear merge of
LoRA adapters is also written, exactly, as a PEFT adapter in adapter/ (lora_sum.py). It is written
into a temporary dir renamed when complete. Memory: one tensor per input (in float32) plus the
method's working tensors, whatever the model's size; the output is streamed to disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.combine.compatibility import check_compatible
from knowstack.combine.inputs import (
    FullModel,
    LoraAdapter,
    common_tie,
    open_input,
    write_output_config,
)
from knowstack.combine.lora_sum import ADAPTER_DIR, representable, save_adapter, write_sum_adapter
from knowstack.combine.merge_factors import get_factor_method, merge_lora_factors
from knowstack.combine.merges import METHODS, MergeMethod, MergeOptions, get_method
from knowstack.combine.statistics import Statistics, check_statistics, open_statistics
from knowstack.errors import KnowstackError
from knowstack.kernels import large_pages_for_tensors
from knowstack.modeling.streaming import MAX_SHARD_BYTES, ShardedWriter, wait_for_hashes
from knowstack.modelio import copy_model_files, dtype_name, output_dtype
from knowstack.progress import step_bar

MERGE_FILE = "merge.json"

Input = FullModel | LoraAdapter


def merge_models(
    method: str,
    models: Sequence[str | Path],
    out: str | Path,
    *,
    base: str | Path | None = None,
    weights: Sequence[float] | None = None,
    options: MergeOptions | None = None,
    seed: int = 0,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
    statistics: Sequence[str | Path] | None = None,
    dtype: str = "auto",
    input_hashes: bool = True,
) -> Path:
    """Merge `models` (model dirs and/or LoRA adapter dirs) with `method` into the model dir `out`. statistics: for
    a method that reads statistics of each model's data (regmean, fisher), one statistics dir per model, in the
    models' order (combine/statistics.py). dtype: the output's floating tensors' (modelio.DTYPE_CHOICES; "auto":
    each as the base's). input_hashes: the model card lists each input's sha256, taken as the merge reads it (False:
    none, and the card and merge.json say so)."""
    large_pages_for_tensors()
    chosen = get_method(method)
    method = chosen.name  # mergekit's name (`linear`) is an alias of the method's own
    cast = output_dtype(dtype)
    options = options or MergeOptions()
    inputs = [open_input(path) for path in models]
    if not inputs:
        raise KnowstackError("give at least one model to merge", field="models")
    factors = options.lora_space == "factors"
    if factors:
        get_factor_method(method)
        full = next((m for m in inputs if not isinstance(m, LoraAdapter)), None)
        if full is not None:
            raise KnowstackError("lora_space 'factors' merges LoRA adapters only; this is a full model", path=full.path)
    chosen.check_inputs(len(inputs), weights)
    chosen.check_options(options)
    weight_tensor = _weights(weights, len(inputs))
    in_delta_space = chosen.uses_base or factors or any(isinstance(m, LoraAdapter) for m in inputs)
    if in_delta_space and base is None:
        raise KnowstackError(f"'{method}' on {'LoRA adapters' if not chosen.uses_base else 'task vectors'} "
                             "needs the base model (--base)", field="base")
    base_model = FullModel(Path(base).expanduser()) if base is not None else None
    reference = base_model or inputs[0]
    assert isinstance(reference, FullModel)
    tied = common_tie([m for m in [base_model, *inputs] if isinstance(m, FullModel)])
    check_compatible(reference, inputs, name="the base" if base_model is not None else "the first model")
    contributed = _statistics(chosen, statistics, inputs, reference)
    for model in [*inputs, base_model]:
        if isinstance(model, FullModel):
            model.reader.hash_files = input_hashes  # the card's content hashes, taken as the merge reads each file

    out = Path(out).expanduser()
    sources = [m.path for m in inputs] + ([base_model.path] if base_model else [])
    if out.resolve() in {path.resolve() for path in sources}:
        raise KnowstackError("the output dir is one of the inputs (it would be replaced)", path=out)
    with atomic_dir(out) as tmp:
        merged_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = {} if factors else None
        _write_merged(tmp, chosen, reference, base_model if in_delta_space else None, inputs, weight_tensor,
                      options, seed, max_shard_bytes, progress, merged_factors, contributed, cast)
        written = cast or reference.weights_dtype()
        write_output_config(reference, tmp, tied=tied, dtype=written)
        copy_model_files(reference.path, tmp)
        adapter = factors or representable(chosen, inputs)
        if merged_factors is not None:
            write_factor_adapter(tmp / ADAPTER_DIR, merged_factors, inputs, str(base))
        elif adapter:
            assert chosen.coefficients is not None
            write_sum_adapter(tmp / ADAPTER_DIR, chosen.coefficients(weight_tensor.tolist(), options), inputs,
                              str(base))
        record = {
            "method": method, "base": str(base) if base is not None else None,
            "models": [str(m.path) for m in inputs], "kinds": [m.kind for m in inputs],
            "weights": weight_tensor.tolist(), "adapter": ADAPTER_DIR if adapter else None,
            "lora_space": options.lora_space if any(isinstance(m, LoraAdapter) for m in inputs) else None,
            "dtype": dtype_name(written),
        }
        if contributed is not None:
            record["statistics"] = [str(stats.path) for stats in contributed]
        # the settings this method reads, and only those (an option it does not read would look as if it counted)
        record.update({name: seed if name == "seed" else options.value(name) for name in chosen.options})
        if not input_hashes:
            record["input_hashes"] = False  # recorded only when left out: merge.json is as before otherwise
        atomic_write_json(tmp / MERGE_FILE, record)
        wait_for_hashes()  # the inputs' hashes, taken while the merge read them, for the card
        _write_cards(tmp, method, base, [m.path for m in inputs], record)
    return out


def _write_cards(tmp: Path, method: str, base: str | Path | None, models: list[Path], record: dict) -> None:
    """README.md with Hub metadata for the merged model, and for its exact PEFT adapter where there is one."""
    from knowstack.modelcard import merge_card, write_model_card

    settings = {k: v for k, v in record.items() if k not in ("base", "models", "adapter")}
    hashes = record.get("input_hashes", True)
    write_model_card(tmp, merge_card(method, base, models, settings, input_hashes=hashes))
    if record["adapter"]:
        card = merge_card(method, base, models, settings, input_hashes=hashes)
        card.relation, card.library_name, card.title = "adapter", "peft", f"{card.title}, as one LoRA adapter"
        card.how_to_load = "peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)"
        write_model_card(tmp / ADAPTER_DIR, card)


def _write_merged(tmp: Path, method: MergeMethod, reference: FullModel, base: FullModel | None, inputs: list[Input],
                  weights: torch.Tensor, options: MergeOptions, seed: int, max_shard_bytes: int,
                  progress: bool, merged_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
                  statistics: list[Statistics] | None = None, cast: torch.dtype | None = None) -> None:
    """Every tensor `reference` presents, in its on-disk order, merged and streamed into shards in `tmp`.
    With a `base`, the method works on task vectors (and LoRA deltas); without, on the full weights.
    merged_factors: given for a merge in LoRA factor space, and filled with each module's merged (A, B).
    statistics: each input's, for a method that reads them. cast: the floating tensors' dtype (None: each
    as the reference's)."""
    specs = reference.specs
    order = reference.order()
    dtypes = {name: cast if cast is not None and specs[name].torch_dtype.is_floating_point
              else specs[name].torch_dtype for name in order}
    writer = ShardedWriter(tmp, [(name, dtypes[name], specs[name].shape) for name in order], max_shard_bytes)
    for name in step_bar(order, f"merge {method.name}", unit="tensor", disable=not progress):
        if statistics is not None:
            merged = _merge_with_statistics(method, name, base, inputs, weights, options, statistics)
        elif merged_factors is not None:
            assert base is not None
            merged = _merge_factors(method.name, name, base, inputs, weights, options, seed, merged_factors)
        elif base is not None:
            merged = _merge_deltas(method, name, base, inputs, weights, options, seed)
        else:
            merged = _merge_full(method, name, inputs, weights, options, seed)
        writer.write(name, merged.to(dtypes[name]))
        del merged  # not alive while the next tensor is merged
        # the views' hashes done, so that no map of this tensor's inputs is resident while the next one's are read
        wait_for_hashes()
    writer.close()


def _weights(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n, dtype=torch.float64)
    if len(weights) != n:
        raise KnowstackError(f"{len(weights)} weights for {n} models: give one weight per model", field="weights")
    if any(not w > 0 for w in weights):
        raise KnowstackError("weights must be positive (they are relative: only their ratios matter)",
                             field="weights")
    return torch.tensor(list(weights), dtype=torch.float64)


def _generator(seed: int, name: str) -> torch.Generator:
    # Seeded per tensor from (seed, name): the same merge gives the same bits in any order or sharding.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _merge_full(method: MergeMethod, name: str, inputs: list[Input], weights: torch.Tensor,
                options: MergeOptions, seed: int) -> torch.Tensor:
    models = [m for m in inputs if isinstance(m, FullModel)]
    # the tensors a method changes are its own copies; the others are read from the mapped files, not copied
    tensors = [m.full(name) if i == 0 or not method.changes_first_only else m.full_to_read(name)
               for i, m in enumerate(models)]
    if not tensors[0].is_floating_point():
        return _same_everywhere(name, tensors, inputs)
    return method.fn(tensors, weights, options, _generator(seed, name) if method.random else None)


def _task_vector(model: Input, name: str, base: torch.Tensor, last: bool) -> torch.Tensor | None:
    """One input's task vector; the last one's made with no viewed map resident (every task vector, the base and
    a map at once would raise the peak over a plain read's)."""
    if last:
        wait_for_hashes()
    return model.delta(name, base, view=not last) if isinstance(model, FullModel) else model.delta(name, base)


def _merge_deltas(method: MergeMethod, name: str, base: FullModel, inputs: list[Input], weights: torch.Tensor,
                  options: MergeOptions, seed: int) -> torch.Tensor:
    raw = base.view(name)  # only read: every task vector and the result are new tensors
    if not raw.is_floating_point():
        return _same_everywhere(name, [raw] + [m.full(name) for m in inputs if isinstance(m, FullModel)], inputs)
    base_tensor = raw.float()
    deltas = [_task_vector(m, name, base_tensor, i == len(inputs) - 1) for i, m in enumerate(inputs)]
    if all(d is None for d in deltas):
        return base_tensor  # no adapter touches this weight
    taus = [d if d is not None else torch.zeros_like(base_tensor) for d in deltas]
    if not method.uses_base and method.coefficients is None:
        # a nonlinear method of the full weights (slerp, karcher): each input's own weight, the base's plus its delta
        return method.fn([tau.add_(base_tensor) for tau in taus], weights, options,
                         _generator(seed, name) if method.random else None)
    merged = method.fn(taus, weights, options, _generator(seed, name) if method.random else None)
    return merged.add_(base_tensor)


def _statistics(method: MergeMethod, given: Sequence[str | Path] | None, inputs: list[Input],
                reference: FullModel) -> list[Statistics] | None:
    """Each input's statistics, opened and checked against the model's weights before any tensor is merged."""
    if method.statistics is None:
        if given:
            raise KnowstackError(f"'{method.name}' reads no statistics; --statistics is for "
                                 f"{', '.join(n for n, m in METHODS.items() if m.statistics)}", field="statistics")
        return None
    given = list(given or [])
    if len(given) != len(inputs):
        missing = inputs[len(given)].path if len(given) < len(inputs) else None
        detail = f": none for {missing}" if missing is not None else ""
        raise KnowstackError(f"'{method.name}' needs the {method.statistics} statistics of every model, one "
                             f"statistics dir per model in their order; got {len(given)} for {len(inputs)} models"
                             f"{detail}", field="statistics")
    shapes = {name: tuple(spec.shape) for name, spec in reference.specs.items()}
    opened = [open_statistics(path, method.statistics) for path in given]
    for stats, model in zip(opened, inputs, strict=True):
        check_statistics(stats, shapes)
        if isinstance(model, LoraAdapter) and not stats.names() <= model.names():
            outside = sorted(stats.names() - model.names())[0]
            raise KnowstackError(f"statistics for '{outside}', which the adapter {model.path} does not target: "
                                 "these are another model's statistics", path=stats.path)
    covered = set.union(*(stats.names() for stats in opened))
    for stats in opened:
        if stats.names() != covered:
            lacking = sorted(covered - stats.names())[0]
            raise KnowstackError(f"no '{method.statistics}' statistics for '{lacking}', which the other models' "
                                 "statistics have: every model needs statistics of the same weights (adapters "
                                 "targeting the same modules, or all full models)", path=stats.path)
    return opened


def _merge_with_statistics(method: MergeMethod, name: str, base: FullModel | None, inputs: list[Input],
                           weights: torch.Tensor, options: MergeOptions, statistics: list[Statistics]) -> torch.Tensor:
    """A method of the full weights that reads each model's statistics of this weight; a weight no model has
    statistics for (RegMean: all but the linear layers) is their weighted average, as the methods' papers do."""
    from knowstack.combine.merges.blocks import weighted_mean

    if base is not None:
        raw = base.read(name)
        if not raw.is_floating_point():
            return _same_everywhere(name, [raw] + [m.full(name) for m in inputs if isinstance(m, FullModel)], inputs)
        base_tensor = raw.float()
        if all(isinstance(m, LoraAdapter) and name not in m.modules for m in inputs):
            return base_tensor  # no adapter touches this weight
        # a full model's own weight; an adapter's, the base's plus its delta
        tensors = [m.full(name) if isinstance(m, FullModel) else
                   _or_base(m.delta(name, base_tensor), base_tensor) for m in inputs]
    else:
        tensors = [m.full(name) for m in inputs if isinstance(m, FullModel)]
        if not tensors[0].is_floating_point():
            return _same_everywhere(name, tensors, inputs)
    found = [stats.tensor(name) for stats in statistics]
    if all(value is None for value in found):
        return weighted_mean(tensors, weights)
    assert all(value is not None for value in found), "_statistics checks that all cover the same weights"
    return method.fn(tensors, weights, options, None, found)  # type: ignore[call-arg]


def _or_base(delta: torch.Tensor | None, base: torch.Tensor) -> torch.Tensor:
    return base.clone() if delta is None else delta.add_(base)


def _merge_factors(method: str, name: str, base: FullModel, inputs: list[Input], weights: torch.Tensor,
                   options: MergeOptions, seed: int, merged: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The base's weight plus B'A', the product of the adapters' A and B merged apart (PEFT's way; every input is
    a LoraAdapter here). The adapters that do not target this weight take no part in it, as in PEFT."""
    base_tensor = base.read(name)
    targeting = [(m, float(w)) for m, w in zip(inputs, weights.tolist(), strict=True)
                 if isinstance(m, LoraAdapter) and name in m.modules]
    if not targeting or not base_tensor.is_floating_point():
        return base_tensor
    factors = []
    for adapter, _ in targeting:
        a_name, b_name, scale = adapter.modules[name]
        factors.append((adapter.reader.read(a_name).float(), adapter.reader.read(b_name).float(), scale))
    generator = _generator(seed, name) if get_factor_method(method).random else None
    merged_a, merged_b = merge_lora_factors(method, factors, [w for _, w in targeting], options, generator)
    merged[name] = (merged_a, merged_b)
    delta = merged_b @ merged_a
    if targeting[0][0].config.get("fan_in_fan_out"):
        delta = delta.T
    if delta.shape != base_tensor.shape:
        raise KnowstackError(f"merged LoRA delta of '{name}' has shape {tuple(delta.shape)}, the base's weight "
                             f"{tuple(base_tensor.shape)}", path=targeting[0][0].path)
    return delta.add_(base_tensor.float())


def write_factor_adapter(folder: Path, merged: dict[str, tuple[torch.Tensor, torch.Tensor]], inputs: list[Input],
                         base: str) -> Path:
    """The factor-space merge as the PEFT adapter it is (A', B' at scale 1), beside the full model."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, (merged_a, merged_b) in merged.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = merged_a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = merged_b.contiguous()
        ranks[module] = merged_a.shape[0]
    fan_in_fan_out = any(bool(m.config.get("fan_in_fan_out")) for m in inputs if isinstance(m, LoraAdapter))
    return save_adapter(folder, tensors, ranks, fan_in_fan_out, base)


def _same_everywhere(name: str, tensors: list[torch.Tensor], inputs: list[Input]) -> torch.Tensor:
    # Integer buffers cannot be averaged; they must simply agree.
    if any(not torch.equal(tensors[0], t) for t in tensors[1:]):
        raise KnowstackError(f"non-float tensor '{name}' differs between the models", path=inputs[0].path)
    return tensors[0]


