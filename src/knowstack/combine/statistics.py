"""Statistics of a contributor's data that the data-informed merges read, computed where the data is and shared
instead of it: RegMean's Gram matrices and Fisher merging's diagonal Fisher.

    compute_statistics(model_dir, train_examples, out)                  # a one-round model (FFT)
    compute_statistics(adapter_dir, train_examples, out, base=base_dir)  # a LoRA adapter on its base

- gram: for every linear layer (torch.nn.Linear, weight out x in) whose weight is one of the model's own tensors,
  G = X^T X over the layer's inputs X (tokens x in) at every non-pad token of the examples, in float64; the token
  count is recorded, and a merge reads the mean G / tokens (as RegMean's and FusionBench's code do, so that each
  contributor weighs the same whatever the size of its data).
- fisher: the empirical diagonal Fisher, F = (1/N) sum_n (d log p(answer_n | prompt_n) / d theta)^2 per entry, the
  log-likelihood of the answer tokens (and eos) that training's loss is taken on, one example at a time (a squared
  gradient of a batch is not the sum of the examples' squares). For a full model over every parameter tensor.

For a LoRA adapter both are taken for the weights it targets, on the base with the adapter merged in: the Gram of
the module's input (what both the base layer and the adapter read), and the Fisher of the effective weight W0 + s B A
(the gradient of the adapted layer with respect to its weight), so that the merges work on the adapters' deltas,
as every other delta-space merge does (the Fisher of the factors A and B would weigh entries of matrices whose
bases are not aligned across adapters, and a merge of factors is not a merge of deltas).

The examples are the first `max_examples` of the training split, tokenized as training tokenizes them
(data/batches.py: prompt + answer + eos, an overlong prompt's middle cut). A statistics dir holds one
safetensors file per kind and statistics.json: per kind, its file's sha256, the examples and tokens it was taken
on; and the model, the base and the examples' hash.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knowstack.atomic import atomic_dir, atomic_write_json
from knowstack.combine.inputs import FullModel, LoraAdapter, open_input
from knowstack.config import MergeConfig, TrainingConfig
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.hashing import file_sha256

STATISTICS_FILE = "statistics.json"
KINDS = ("gram", "fisher")
STATISTICS_VERSION = 1
BATCH_SIZE = 8  # examples per forward pass while taking Gram matrices
_MERGE, _RECIPE = MergeConfig(), TrainingConfig()  # the declared defaults: statistics_examples, max_length


def compute_statistics(model: str | Path, examples: Sequence[Example], out: str | Path, *,
                       base: str | Path | None = None, kinds: Sequence[str] = KINDS, max_examples: int = _MERGE.statistics_examples,
                       max_length: int = _RECIPE.max_length, tokenizer: str | Path | None = None,
                       trust_remote_code: bool = False) -> Path:
    """The statistics `kinds` of `model` (a model dir, or a LoRA adapter dir on `base`) on the first
    `max_examples` of `examples`, written atomically to the dir `out`; returns it."""
    from knowstack.data.batches import tokenize_examples
    from knowstack.modelcard import examples_sha256
    from knowstack.modelio import load_model, load_tokenizer, on_gpu_if_it_fits

    kinds = _checked_kinds(kinds)
    source = open_input(model)
    if isinstance(source, LoraAdapter) and base is None:
        raise KnowstackError("statistics of a LoRA adapter need its base model (--base)", path=source.path,
                             field="base")
    used = list(examples)[:max_examples]
    if not used:
        raise KnowstackError("no examples to take statistics on", field="data")
    tokenizer_path = tokenizer or (base if isinstance(source, LoraAdapter) else model)
    tok = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    tokenized = tokenize_examples(tok, used, max_length)
    if not tokenized:
        raise KnowstackError(f"every example's answer is longer than max_length ({max_length} tokens)",
                             field="max_length")
    adapter = source.path if isinstance(source, LoraAdapter) else None
    network = load_model(base if adapter is not None else model, adapter, dtype=torch.float32,
                         merge_adapter=True, trust_remote_code=trust_remote_code)
    # the Fisher needs room for a gradient of every parameter too; the sums stay on the CPU in float64
    network = on_gpu_if_it_fits(network, headroom=2.5 if "fisher" in kinds else 1.5)
    wanted = _wanted_weights(network, source)
    record: dict[str, Any] = {
        "version": STATISTICS_VERSION, "model": str(model), "base": str(base) if base is not None else None,
        "input": source.kind, "max_length": max_length, "examples_sha256": examples_sha256(
            (ex.prompt, ex.answer) for ex in used), "statistics": {},
    }
    out = Path(out).expanduser()
    with atomic_dir(out) as tmp:
        for kind in kinds:
            tensors, tokens = (gram_matrices(network, tokenized, wanted, tok.pad_token_id) if kind == "gram"
                               else diagonal_fisher(network, tokenized, wanted))
            record["statistics"][kind] = _save(tmp, kind, tensors, examples=len(tokenized), tokens=tokens)
        atomic_write_json(tmp / STATISTICS_FILE, record)
    return out


def _checked_kinds(kinds: Sequence[str]) -> list[str]:
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise KnowstackError(f"unknown statistics kind '{unknown[0] if unknown else ''}'; choose from "
                             f"{', '.join(KINDS)}", field="kinds")
    return list(dict.fromkeys(kinds))


def _wanted_weights(network: torch.nn.Module, source: FullModel | LoraAdapter) -> set[str]:
    """The parameter tensors statistics are taken for: all of a full model's that it presents (an output layer equal to
    the embedding is the embedding: combine/inputs.py), the targeted weights of an adapter."""
    names = {name for name, _ in network.named_parameters()}
    if isinstance(source, FullModel):
        return names & source.names()
    missing = sorted(source.names() - names)
    if missing:
        raise KnowstackError(f"adapter targets '{missing[0]}', which the base has not", path=source.path)
    return source.names()


def _save(folder: Path, kind: str, tensors: dict[str, torch.Tensor], *, examples: int, tokens: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    path = folder / f"{kind}.safetensors"
    save_file({name: t.float().contiguous() for name, t in tensors.items()}, str(path))
    return {"file": path.name, "sha256": file_sha256(path), "examples": examples, "tokens": tokens}


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def gram_matrices(network: torch.nn.Module, tokenized: Sequence[Any], wanted: set[str], pad_token_id: int,
                  batch_size: int = BATCH_SIZE) -> tuple[dict[str, torch.Tensor], int]:
    """{weight name: X^T X} over the non-pad tokens of `tokenized`, for every torch.nn.Linear whose weight is in
    `wanted` (a tied output layer's weight is the embedding's, not a tensor of its own: it gets none), and the
    number of tokens."""
    from knowstack.data.batches import pad

    linears = {f"{name}.weight": module for name, module in network.named_modules()
               if isinstance(module, torch.nn.Linear) and f"{name}.weight" in wanted}
    grams: dict[str, torch.Tensor] = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64)
                                      for name, m in linears.items()}
    mask: list[torch.Tensor] = []  # the current batch's non-pad positions, read by the hooks

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0][mask[0]].double()
            grams[name] += (x.T @ x).cpu()
        return record

    device = next(network.parameters()).device
    tokens = 0
    with _hooks(linears, hook), torch.no_grad():
        for batch in _batches(tokenized, batch_size):
            inputs = pad(batch, pad_token_id)
            mask[:] = [inputs["attention_mask"].bool().to(device)]
            tokens += int(inputs["attention_mask"].sum())
            network(input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device),
                    use_cache=False)
    return grams, tokens


@contextlib.contextmanager
def _hooks(modules: dict[str, torch.nn.Module], hook: Any) -> Iterator[None]:
    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def diagonal_fisher(network: torch.nn.Module, tokenized: Sequence[Any], wanted: set[str]
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """{parameter name: mean over examples of the squared gradient of the answer's log-likelihood} for the
    parameters in `wanted`, one example per backward pass, and the number of answer tokens."""
    from knowstack.data.batches import pad
    from knowstack.modeling.loss import answer_loss_sum

    params = {name: p for name, p in network.named_parameters() if name in wanted}
    for name, p in network.named_parameters():
        p.requires_grad_(name in params)
    fisher = {name: torch.zeros_like(p, dtype=torch.float64, device="cpu") for name, p in params.items()}
    device = next(network.parameters()).device
    tokens = 0
    for example in tokenized:
        network.zero_grad(set_to_none=True)
        inputs = {k: v.to(device) for k, v in pad([example], 0).items()}
        answer_loss_sum(network, inputs).backward()  # -log p(answer | prompt): its gradient squared is the same
        tokens += example.answer_tokens
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().double().cpu().square()
    network.zero_grad(set_to_none=True)
    return {name: f.div_(len(tokenized)) for name, f in fisher.items()}, tokens


@dataclass
class Statistics:
    """One contributor's statistics of one kind, read one tensor at a time (a merge's input beside a model)."""

    path: Path
    kind: str
    record: dict[str, Any]

    def __post_init__(self) -> None:
        from knowstack.modeling.streaming import SafetensorsReader

        entry = self.record["statistics"][self.kind]
        self.tokens = int(entry["tokens"])
        self.reader = SafetensorsReader([self.path / entry["file"]])

    def names(self) -> set[str]:
        return set(self.reader.specs)

    def tensor(self, name: str) -> torch.Tensor | None:
        """What a merge reads for the weight `name`: the mean Gram G / tokens, or the Fisher; None if none."""
        if name not in self.reader.specs:
            return None
        value = self.reader.read(name).double()
        return value.div_(self.tokens) if self.kind == "gram" else value


def read_record(path: str | Path) -> dict[str, Any]:
    """A statistics dir's statistics.json; one clear error naming the dir where it is not one."""
    record_path = Path(path).expanduser() / STATISTICS_FILE
    if not record_path.is_file():
        raise KnowstackError(f"not a statistics dir (no {STATISTICS_FILE}); make one with `knowstack statistics`",
                             path=record_path.parent)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(record.get("statistics"), dict):
            raise ValueError("no 'statistics' mapping")
    except (ValueError, AttributeError) as err:
        raise KnowstackError(f"cannot read: {err}", path=record_path) from None
    return record


def open_statistics(path: str | Path, kind: str, *, verify: bool = True) -> Statistics:
    """A statistics dir's `kind`, checked (present, its file's content hash); one clear error naming the dir."""
    path = Path(path).expanduser()
    record = read_record(path)
    entry = record["statistics"].get(kind)
    if entry is not None and not isinstance(entry, dict):
        raise KnowstackError(f"'{kind}' is not an object", path=path / STATISTICS_FILE, field=kind)
    if entry is None:
        have = ", ".join(record.get("statistics", {})) or "none"
        raise KnowstackError(f"has no '{kind}' statistics (it has: {have}); compute them with `knowstack statistics "
                             f"--kind {kind}`", path=path, field=kind)
    weights = path / str(entry.get("file", ""))
    if not weights.is_file():
        raise KnowstackError(f"'{kind}' statistics file {entry.get('file')!r} is missing", path=path)
    if verify and file_sha256(weights) != entry.get("sha256"):
        raise KnowstackError(f"'{kind}' statistics file does not match the sha256 {STATISTICS_FILE} records",
                             path=weights)
    return Statistics(path, kind, record)


def check_statistics(statistics: Statistics, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the statistics is one of the model's weights, with the shape its kind has for it: a Gram
    is in x in for a weight out x in, a Fisher is the weight's shape."""
    for name in sorted(statistics.names()):
        if name not in shapes:
            raise KnowstackError(f"'{statistics.kind}' statistics for '{name}', which the model has not: these are "
                                 "another model's statistics", path=statistics.path)
        shape = tuple(statistics.reader.specs[name].shape)
        wanted = (shapes[name][-1],) * 2 if statistics.kind == "gram" else tuple(shapes[name])
        if shape != wanted:
            raise KnowstackError(f"'{statistics.kind}' statistics for '{name}' are {list(shape)}, the model's weight "
                                 f"needs {list(wanted)}", path=statistics.path)
