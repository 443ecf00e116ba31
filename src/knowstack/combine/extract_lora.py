"""A full fine-tune as a LoRA adapter: each targeted linear module's delta (model - base), truncated by SVD to rank r.

    extract_lora(base, model, out, rank=16)      # -> the record also written to out/extract_lora.json

By Eckart-Young, U_r S_r V_r^T is the rank-r matrix nearest the delta (Frobenius), and what it keeps of the delta's
energy (squared Frobenius norm) is sum of the top r squared singular values / sum of all of them: the module's
*explained share*. The adapter is written as PEFT writes one (adapter_config.json, adapter_model.safetensors), at
scale 1 (lora_alpha = r) with sqrt(S_r) on each side (B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T), in float32, so that
`peft.PeftModel.from_pretrained(base, out)` adds B @ A = the truncated delta to every targeted module; it is plain LoRA
on Linear layers, so it joins a LoRA merge or a LoRA-MoE as a trained adapter does (combine/inputs.py LoraAdapter).

Which modules (docs/methods.md#extract-lora): by default the family's LoRA targets (Llama's seven linear layers, a
fused family's own: Phi-3's qkv_proj and gate_up_proj, adapted whole, as training adapts them), so that an extracted
adapter targets what knowstack's trained adapters target; `all`: every linear layer, the output layer too where it is
not tied. What is not extracted and differs from the base (the embedding, a tied output layer, norms, biases, linear
layers not targeted) is not in the adapter: its share of the whole delta's energy is reported, per kind and per
tensor. Embeddings are never extracted: a LoRA of an embedding (PEFT's lora_embedding_A/B) or a full copy of it
(modules_to_save, mergekit's default) is not plain LoRA, which knowstack's merges and mixtures read.

The base and the model are checked to fit (combine/compatibility.py) before any tensor is read; then one tensor of
each is read at a time (the factors kept are r x (m + n) per module).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.combine.compatibility import check_compatible
from knowstack.combine.inputs import FullModel, common_tie
from knowstack.combine.lora_sum import save_adapter
from knowstack.config import LLAMA_LINEAR
from knowstack.errors import KnowstackError
from knowstack.modeling.families import INPUT_EMBEDDING, OUTPUT_EMBEDDING, checked_lora_targets
from knowstack.progress import step_bar

EXTRACT_FILE = "extract_lora.json"
ALL_LINEAR = "all"
DEFAULT_TARGETS: tuple[str, ...] = LLAMA_LINEAR  # training's default LoRA targets (config.py LoraConfig)


def extract_lora(base: str | Path, model: str | Path, out: str | Path, *, rank: int,
                 target_modules: Sequence[str] | None = None, base_name: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """The PEFT LoRA adapter whose delta per targeted module is the rank-`rank` truncated SVD of (model - base),
    written to `out` with its model card and EXTRACT_FILE; returns that record (explained shares per module and
    overall, what differs and is not extracted). target_modules: Llama's linear layer names (the family's modules
    that hold them are adapted) or ["all"] (every linear layer); default the family's LoRA targets. base_name:
    what the adapter names as its base (base_model_name_or_path; default `base` as given)."""
    check_rank(rank)
    base_model, tuned = FullModel(Path(base).expanduser()), FullModel(Path(model).expanduser())
    tied = common_tie([base_model, tuned])
    check_compatible(base_model, [tuned])
    targets = target_weights(base_model, list(target_modules or DEFAULT_TARGETS))
    out = Path(out).expanduser()
    if out.resolve() in {base_model.path.resolve(), tuned.path.resolve()}:
        raise KnowstackError("the output dir is one of the inputs (it would be replaced)", path=out)
    base_label = base_name if base_name is not None else str(base)
    with atomic_dir(out) as tmp:
        factors, record = _extract(base_model, tuned, targets, rank, progress)
        tensors = {f"base_model.model.{name.removesuffix('.weight')}.lora_{side}.weight": matrix
                   for name, (a, b) in factors.items() for side, matrix in (("A", a), ("B", b))}
        ranks = {name.removesuffix(".weight"): a.shape[0] for name, (a, _) in factors.items()}
        save_adapter(tmp, tensors, ranks, False, base_label)
        record = {"base": base_label, "model": str(model), "rank": rank, "tied": tied,
                  "target_modules": list(target_modules or DEFAULT_TARGETS), **record}
        atomic_write_json(tmp / EXTRACT_FILE, record)
        _write_card(tmp, base_label, model, record)
    return record


def check_rank(rank: object, field: str = "rank") -> None:
    """A rank is a whole number of at least 1 (one error naming `field`)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise KnowstackError(f"the rank must be a whole number of at least 1, not {rank!r}", field=field)


def target_weights(base: FullModel, names: Sequence[str]) -> list[str]:
    """The weights extracted, in the base's order: every linear layer's (a matrix, not the input embedding) for
    ["all"]; otherwise those of the modules `names` name (Llama's names resolved to the family's, matched as PEFT
    matches a list of names: the whole module name or its last dotted parts), one error naming any that names none."""
    linear = [name for name in base.order() if name.endswith(".weight") and name != INPUT_EMBEDDING
              and len(base.specs[name].shape) == 2 and base.specs[name].torch_dtype.is_floating_point]
    if list(names) == [ALL_LINEAR]:
        return linear
    if ALL_LINEAR in names:
        raise KnowstackError(f"'{ALL_LINEAR}' stands alone: give it or module names", field="target_modules")
    if any(name.split(".")[-1] == INPUT_EMBEDDING.split(".")[-2] for name in names):
        raise KnowstackError("embeddings are not extracted: a LoRA of an embedding is not plain LoRA on a linear "
                             "layer, which knowstack's merges and mixtures read", field="target_modules")
    modules = {name.removesuffix(".weight") for name in linear}
    layers = sorted({module.rpartition(".")[2] for module in modules})
    # the names came from the option, not from the base's files: no path, so the command names its option
    targets = checked_lora_targets(base.config.get("model_type"), list(names), modules, layers, field="target_modules")
    return [name for name in linear if _matches(name.removesuffix(".weight"), targets)]


def _matches(module: str, targets: Sequence[str]) -> bool:
    return any(module == target or module.endswith("." + target) for target in targets)


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, singular values) of `delta`'s rank-min(rank, its size) truncation, B @ A = U_r S_r V_r^T, with sqrt(S_r)
    on each side (their magnitudes balanced, as a trained LoRA's are), A and B in float32; every singular value
    returned (float64), not only r. The SVD is taken in float64, on the GPU where there is one: the top-r subspace
    of a float32 SVD is off by ~1e-7 x s_1 / (s_r - s_r+1), and a fine-tune's singular values can lie close."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    u, s, vh = torch.linalg.svd(delta.to(device, torch.float64), full_matrices=False)
    kept = min(rank, s.shape[0])
    root = s[:kept].sqrt()
    a, b = root[:, None] * vh[:kept], u[:, :kept] * root[None, :]
    return a.float().cpu().contiguous(), b.float().cpu().contiguous(), s.cpu()


def kind_of(name: str, shape: Sequence[int], tied: bool) -> str:
    """What a tensor that is not extracted is, in the report's words."""
    if name == INPUT_EMBEDDING:
        return "embedding (and the tied output layer)" if tied else "embedding"
    if name == OUTPUT_EMBEDDING:
        return "output layer"
    if name.endswith(".bias"):
        return "bias"
    if len(shape) == 1:
        return "norm"
    return "linear, not targeted" if len(shape) == 2 else "other"


def _extract(base: FullModel, tuned: FullModel, targets: list[str], rank: int,
             progress: bool) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Each weight's delta, one at a time: the targets' (A, B) and explained energy, every other tensor's energy."""
    wanted = set(targets)
    tied = base.tied and tuned.tied
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules: dict[str, dict[str, Any]] = {}
    left_out: dict[str, dict[str, Any]] = {}
    for name in step_bar(base.order(), "extract-lora", unit="tensor", disable=not progress):
        raw = base.read(name)
        if not raw.is_floating_point():
            continue  # integer buffers: nothing a LoRA (or a fine-tune) changes
        delta = tuned.read(name).double().sub_(raw.double())  # exact: the difference of two float32s fits a float64
        energy = float(delta.square().sum())
        if name in wanted:
            a, b, singular = truncated_svd(delta, rank)
            kept = float(singular[: a.shape[0]].square().sum())
            total = float(singular.square().sum())
            factors[name] = (a, b)
            modules[name.removesuffix(".weight")] = {
                "rank": a.shape[0], "energy": energy,
                "explained": kept / total if total > 0 else 1.0,  # no delta: nothing left to explain
            }
        elif energy > 0:
            left_out[name] = {"kind": kind_of(name, base.specs[name].shape, tied), "energy": energy}
        del delta
    return factors, _shares(modules, left_out)


def _shares(modules: dict[str, dict[str, Any]], left_out: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The record's numbers: each module's explained share; overall, of the extracted modules' delta and of the whole
    delta (every tensor that differs); the share of the whole delta in what is not extracted, by kind."""
    target_energy = sum(m["energy"] for m in modules.values())
    kept = sum(m["energy"] * m["explained"] for m in modules.values())
    whole = target_energy + sum(t["energy"] for t in left_out.values())
    by_kind: dict[str, float] = {}
    for tensor in left_out.values():
        tensor["share"] = tensor["energy"] / whole
        by_kind[tensor["kind"]] = by_kind.get(tensor["kind"], 0.0) + tensor["share"]
    return {
        "explained": kept / target_energy if target_energy > 0 else 1.0,
        "explained_of_whole_delta": kept / whole if whole > 0 else 1.0,
        "extracted_share": target_energy / whole if whole > 0 else 1.0,
        "not_extracted": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "modules": modules,
        "not_extracted_tensors": left_out,
    }


def _write_card(tmp: Path, base: str, model: str | Path, record: dict[str, Any]) -> None:
    from knowstack.modelcard import ModelCardInfo, hub_name, model_input, write_model_card

    settings = {key: record[key] for key in ("rank", "target_modules", "explained", "explained_of_whole_delta",
                                             "extracted_share", "not_extracted")}
    lines = ["## Explained share", "", "Explained share of each module's delta energy (squared Frobenius norm) at its rank:", "",
             "| module | rank | explained |", "|---|---|---|"]
    lines += [f"| `{name}` | {m['rank']} | {m['explained']:.4f} |" for name, m in record["modules"].items()]
    write_model_card(tmp, ModelCardInfo(
        title=f"LoRA of rank {record['rank']} extracted from {hub_name(model)}", base_model=hub_name(base),
        relation="adapter", library_name="peft", method="extract-lora (truncated SVD of the fine-tune's delta)",
        settings=settings, inputs=[model_input(base, "base model"), model_input(model, "fine-tune")],
        sections=lines, scores_note=f"Not scored; the explained shares per module are in {EXTRACT_FILE}.",
        how_to_load="peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)",
        tags=["lora", "extract-lora"]))
