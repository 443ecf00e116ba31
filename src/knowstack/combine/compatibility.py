"""Compatibility before combining: every input of a merge, a mixture (FFT-MoE, LoRA-MoE), a registry contribution
or compose is checked against the base before any tensor is read beyond the safetensors headers (mergekit's most
reported failure is a merge of models of other bases, vocabularies or chat templates that loads and is wrong).

    check_compatible(base, [model1, adapter2])     # one error listing every input's first difference

For each input the checks run in this order and stop at its first difference, which is named with the input's file,
its value there and the base's (and the base's file):
- a full model: its config (architecture first: model_type, architectures; then vocab_size; then any other field),
  its tensor names and shapes (as FullModel.names() presents them), its tokenizer, its chat template;
- a LoRA adapter: the config of the model it says it was trained from (base_model_name_or_path, where that is a
  local dir), the modules it targets and their shapes, its tokenizer and chat template (where it has them).
Every input is checked and all problems are listed at once (errors.raise_problems: exit 2 from the CLI).

What counts as a difference (docs/methods.md#compatibility-before-combining):
- configs are compared as transformers reads them (a config saved by an older transformers, e.g. rope_theta and
  rope_scaling, equals the same config saved now, rope_parameters), less IGNORED_CONFIG_KEYS;
- a tokenizer is compared file by file where both dirs have the file: tokenizer.json as the tokenizers library
  reads it (less truncation and padding), tokenizer.model by its sha256, vocab.json / merges.txt / vocab.txt by
  content; tokenizer_config.json and special_tokens_map.json field by field where both state the field, less the
  fields that say nothing about how a text becomes ids (UNCOMPARED_TOKENIZER_FIELDS);
- chat templates (chat_template.jinja, additional_chat_templates/, chat_template.json, tokenizer_config.json's
  chat_template) by exact text, each template the input has;
- an input without tokenizer files or chat template (most Hub adapters, a model saved without its tokenizer) has
  nothing of them to compare: its config and tensors decide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from knowstack.combine.inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FullModel, LoraAdapter, read_json
from knowstack.errors import KnowstackError, Problem, raise_problems
from knowstack.hashing import known_sha256

Input = FullModel | LoraAdapter
CONFIG_FILE = "config.json"
# config.json fields that say nothing about the network the weights make: where the checkpoint came from and how it
# was saved (dtype: a bfloat16 fine-tune of a float32 base is its fine-tune, and the output's dtype is the base's or
# --dtype), how it runs. tie_word_embeddings: whether the head is tied shows in the tensors the checkpoint holds
# (FullModel.names()), which are compared next.
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                                 "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
                                 "tie_word_embeddings"})
# Compared first, in this order: the architecture, then the vocabulary; then every other field, by name.
FIRST_CONFIG_KEYS = ("model_type", "architectures", "vocab_size")
CONFIG_REASONS = {"model_type": "another architecture", "architectures": "another architecture",
                  "vocab_size": "another vocabulary"}

# Files that hold a tokenizer's vocabulary (and merges), in the order compared.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# tokenizer_config.json fields that say nothing about how a text becomes ids: the class and backend that read it,
# where it was loaded from, lengths and padding, the chat template (compared on its own), and the pad token (padding
# is masked out, and knowstack's trainer saves pad = eos for a tokenizer that has none).
UNCOMPARED_TOKENIZER_FIELDS = frozenset({
    "tokenizer_class", "backend", "name_or_path", "is_local", "local_files_only", "_commit_hash", "auto_map",
    "processor_class", "model_max_length", "max_length", "padding_side", "truncation_side", "model_input_names",
    "chat_template", "pad_token", "pad_token_id", "tokenizer_file", "vocab_file", "merges_file", "use_fast",
})
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATES_DIR = "additional_chat_templates"
DEFAULT_TEMPLATE = "default"
SHOWN_CHARS = 80  # a value in a message is cut to this many characters
CONTEXT_CHARS = 20  # the characters shown on each side of where two texts first differ


class _Absent:
    def __repr__(self) -> str:
        return "nothing"


ABSENT: Any = _Absent()  # a field, item or template one side has not


def check_compatible(reference: FullModel, inputs: Sequence[Input], *, name: str = "the base") -> None:
    """One error listing each input's first difference from `reference` (named `name` in the messages), if any."""
    raise_problems(compatibility_problems(reference, inputs, name=name))


def compatibility_problems(reference: FullModel, inputs: Sequence[Input], *, name: str = "the base") -> list[Problem]:
    """Each input's first difference from `reference`, in the inputs' order; an empty list when all can be combined."""
    ref = Reference(reference, name)
    found = (first_difference(ref, model) for model in inputs)
    return [problem for problem in found if problem is not None]


class Reference:
    """The model every input is compared with, each of its parts read once however many inputs there are."""

    def __init__(self, model: FullModel, name: str):
        self.model, self.name = model, name

    @property
    def path(self) -> Path:
        return self.model.path

    @cached_property
    def config(self) -> dict[str, Any]:
        return model_config(self.model.path)

    @cached_property
    def raw_config(self) -> dict[str, Any]:
        return read_json(self.model.path / CONFIG_FILE)

    @cached_property
    def tokenizer(self) -> dict[str, tuple[Any, Path]]:
        return tokenizer_parts(self.model.path)

    @cached_property
    def templates(self) -> dict[str, tuple[str, Path]]:
        return chat_templates(self.model.path)


def first_difference(ref: Reference, model: Input) -> Problem | None:
    """The first thing in which `model` differs from the reference, as a problem naming its file; None if none."""
    checks: tuple[Callable[[Reference, Any], Problem | None], ...] = (
        (_config, _tensors, _tokenizer, _chat_template) if isinstance(model, FullModel)
        else (_claimed_base, _targets, _tokenizer, _chat_template))
    for check in checks:
        try:
            problem = check(ref, model)
        except KnowstackError as err:  # a file of the input that cannot be read is its problem
            return Problem(None, str(err))
        if problem is not None:
            return problem
    return None


# --- configs ---------------------------------------------------------------------------------------------------
def model_config(folder: Path) -> dict[str, Any]:
    """config.json as transformers reads it, so that a config saved by an older transformers equals the same config
    saved now; as written where transformers does not know the model type (remote code is never run)."""
    raw = read_json(folder / CONFIG_FILE)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False).to_dict()
    except Exception:  # noqa: BLE001 - an unknown or remote-code type: the file as written is what there is to compare
        return raw


def config_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The fields in which two configs differ (a null field is one not stated), architecture and vocabulary first,
    then by name."""
    keys = (set(ours) | set(theirs)) - IGNORED_CONFIG_KEYS
    differing = {key for key in keys if ours.get(key) != theirs.get(key)}
    return [key for key in FIRST_CONFIG_KEYS if key in differing] + sorted(differing - set(FIRST_CONFIG_KEYS))


def _config_difference(ref: Reference, theirs: dict[str, Any], here: str = "here") -> tuple[str, str, str] | None:
    """(field, what differs in words, why it matters) for the first differing field, or None."""
    differing = config_differences(ref.config, theirs)
    if not differing:
        return None
    key = differing[0]
    where, our_value, their_value = json_difference(ref.config.get(key, ABSENT), theirs.get(key, ABSENT), key)
    more = f" ({len(differing) - 1} more field{'s' if len(differing) > 2 else ''} differ)" if len(differing) > 1 else ""
    words = f"{_shown(their_value)} {here}, {_shown(our_value)} in {ref.name} ({ref.path / CONFIG_FILE})"
    return where, words, CONFIG_REASONS.get(key, "another network") + more


def _config(ref: Reference, model: FullModel) -> Problem | None:
    if read_json(model.path / CONFIG_FILE) == ref.raw_config:
        return None  # the same file's fields read the same through transformers: no import of it (seconds) needed
    found = _config_difference(ref, model_config(model.path))
    if found is None:
        return None
    where, words, reason = found
    return Problem(str(model.path / CONFIG_FILE), f"{words}: {reason}", field=where)


# --- tensors ---------------------------------------------------------------------------------------------------
def _tensors(ref: Reference, model: FullModel) -> Problem | None:
    ours, theirs = ref.model.names(), model.names()
    order = ref.model.order()  # the base's on-disk order
    missing = [name for name in order if name not in theirs]
    extra = sorted(theirs - ours)
    if missing or extra:
        count = len(missing) + len(extra)
        detail = (f"missing tensor '{missing[0]}', which {ref.name} has" if missing
                  else f"unexpected tensor '{extra[0]}', which {ref.name} has not")
        spec = None if missing else model.specs.get(extra[0])
        where = model.path if spec is None else spec.file
        return Problem(str(where), f"{detail} ({count} tensor name{'s differ' if count > 1 else ' differs'} from "
                                   f"{ref.path}): another network")
    for name in order:
        our_spec, their_spec = ref.model.specs.get(name), model.specs.get(name)
        if our_spec is not None and their_spec is not None and our_spec.shape != their_spec.shape:
            return Problem(str(their_spec.file), f"tensor '{name}' has shape {list(their_spec.shape)} here, "
                                                 f"{list(our_spec.shape)} in {ref.name} ({our_spec.file}): "
                                                 "another network")
    return None


# --- LoRA adapters ---------------------------------------------------------------------------------------------
def _claimed_base(ref: Reference, adapter: LoraAdapter) -> Problem | None:
    """The config of the model the adapter says it was trained from, where that is a local model dir (a hub id, or a
    dir gone since, leaves the targets' shapes to decide)."""
    claimed = adapter.base_model_path()
    folder = Path(claimed).expanduser() if claimed else None
    if folder is None or not (folder / CONFIG_FILE).is_file() or folder.resolve() == ref.path.resolve():
        return None
    found = _config_difference(ref, model_config(folder), here="there")
    if found is None:
        return None
    where, words, _ = found
    return Problem(str(adapter.path / ADAPTER_CONFIG), f"the adapter was trained from {claimed}, whose config differs "
                                                       f"from {ref.name} at {where}: {words}: the base is not this "
                                                       "adapter's base", field="base_model_name_or_path")


def _targets(ref: Reference, adapter: LoraAdapter) -> Problem | None:
    """Every module the adapter targets is a weight of the base, of the shape its A and B make."""
    where = str(adapter.path / ADAPTER_WEIGHTS)
    unknown = sorted(adapter.names() - ref.model.names())
    if unknown:
        return Problem(where, f"the adapter targets '{unknown[0]}', which {ref.name} has not ({ref.path}): the base is "
                              "not this adapter's base")
    for name, (a_name, b_name, _) in sorted(adapter.modules.items()):
        out_features = adapter.reader.specs[b_name].shape[0]
        in_features = adapter.reader.specs[a_name].shape[1]
        spec = ref.model.specs.get(name)
        if spec is None:
            continue
        shape = spec.shape
        if adapter.config.get("fan_in_fan_out"):
            shape = shape[::-1]
        if (out_features, in_features) != tuple(shape):
            return Problem(where, f"the adapter for '{name}' is {out_features}x{in_features} here, "
                                  f"{'x'.join(map(str, shape))} in {ref.name} ({ref.path}): the base is not this "
                                  "adapter's base")
    return None


# --- tokenizers ------------------------------------------------------------------------------------------------
def tokenizer_parts(folder: Path, files: Sequence[str] = VOCABULARY_FILES) -> dict[str, tuple[Any, Path]]:
    """The parts of the tokenizer saved in `folder` that are compared, each as (its comparable content, its file):
    the vocabulary files it has of `files` and its settings (tokenizer_config.json and special_tokens_map.json,
    field by field, as "setting NAME"). Empty for a dir without tokenizer files."""
    readers: dict[str, Callable[[Path], Any]] = {
        "tokenizer.json": _tokenizer_json, "tokenizer.model": known_sha256, "vocab.json": read_json,
        "merges.txt": lambda path: [line for line in _lines(path) if not line.startswith("#version")],
        "vocab.txt": _lines,
    }
    parts = {name: (readers[name](folder / name), folder / name) for name in VOCABULARY_FILES
             if name in files and (folder / name).is_file()}
    for key, (value, path) in tokenizer_settings(folder).items():
        parts[f"setting {key}"] = (value, path)
    return parts


def _tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json as the tokenizers library reads and writes it (so that a file written by an older version equals
    the same tokenizer written now), less truncation and padding (how a batch is cut and padded, not its ids)."""
    from tokenizers import Tokenizer

    try:
        text = Tokenizer.from_file(str(path)).to_str()
    except Exception as err:  # noqa: BLE001 - the library's refusal is the file's problem
        raise KnowstackError(f"not a tokenizer the tokenizers library reads: {' '.join(str(err).split())[:300]}",
                             path=path) from None
    value = json.loads(text)
    for key in ("version", "truncation", "padding"):
        value.pop(key, None)
    return value


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KnowstackError(f"cannot read: {err}", path=path) from None


def _lines(path: Path) -> list[str]:
    return _text(path).rstrip("\n").split("\n")


def tokenizer_settings(folder: Path) -> dict[str, tuple[Any, Path]]:
    """The fields of tokenizer_config.json and special_tokens_map.json that say how a text becomes ids (special tokens
    as their text), each with the file that states it; a null field is not stated."""
    settings: dict[str, tuple[Any, Path]] = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):  # the map's tokens win, as transformers loads them
        path = folder / name
        if not path.is_file():
            continue
        for key, value in read_json(path).items():
            # transformers 5 calls additional_special_tokens extra_special_tokens
            key = "extra_special_tokens" if key == "additional_special_tokens" else key
            if key not in UNCOMPARED_TOKENIZER_FIELDS and value is not None:
                settings[key] = (_token_texts(value), path)
    return settings


def _token_texts(value: Any) -> Any:
    """A special token as its text, whether saved as a string or as an AddedToken's fields (older transformers)."""
    if isinstance(value, dict):
        if isinstance(value.get("content"), str):
            return value["content"]
        return {key: _token_texts(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_token_texts(item) for item in value]
    return value


def _tokenizer(ref: Reference, model: Input) -> Problem | None:
    theirs = tokenizer_parts(model.path, files=[name for name in VOCABULARY_FILES if name in ref.tokenizer])
    for part, (value, path) in theirs.items():
        if part not in ref.tokenizer:
            continue  # a file or field the base has not: nothing to compare it with
        our_value, our_path = ref.tokenizer[part]
        if value == our_value:
            continue
        after = f" ({our_path}): another tokenizer"
        if part == "tokenizer.model":
            return Problem(str(path), f"sha256 {value[:12]} here, {our_value[:12]} in {ref.name}{after}")
        if part in ("merges.txt", "vocab.txt"):
            line, our_line, their_line = _line_difference(our_value, value)
            return Problem(str(path), f"{_shown(their_line)} here, {_shown(our_line)} in {ref.name}{after}",
                           field=f"line {line}")
        key = part.removeprefix("setting ")
        where, our_item, their_item = json_difference(our_value, value, "" if key == part else key)
        return Problem(str(path), f"{_shown(their_item)} here, {_shown(our_item)} in {ref.name}{after}",
                       field=where or None)
    return None


# --- chat templates --------------------------------------------------------------------------------------------
def chat_templates(folder: Path) -> dict[str, tuple[str, Path]]:
    """The chat templates saved in `folder`, by name ("default" for the one template), each with its file: from
    tokenizer_config.json, chat_template.json, chat_template.jinja and additional_chat_templates/*.jinja (the
    later ones win, as transformers loads them)."""
    found: dict[str, tuple[str, Path]] = {}
    for name in (TOKENIZER_CONFIG, CHAT_TEMPLATE_JSON):
        path = folder / name
        if path.is_file():
            value = read_json(path).get("chat_template")
            entries = ([{"name": DEFAULT_TEMPLATE, "template": value}] if isinstance(value, str)
                       else value if isinstance(value, list) else [])
            found.update({entry["name"]: (entry["template"], path) for entry in entries
                          if isinstance(entry, dict) and isinstance(entry.get("template"), str)})
    files = [(DEFAULT_TEMPLATE, folder / CHAT_TEMPLATE_FILE)]
    files += [(path.stem, path) for path in sorted((folder / CHAT_TEMPLATES_DIR).glob("*.jinja"))]
    found.update({name: (_text(path), path) for name, path in files if path.is_file()})
    return found


def _chat_template(ref: Reference, model: Input) -> Problem | None:
    for name, (text, path) in chat_templates(model.path).items():
        field = None if name == DEFAULT_TEMPLATE else name
        if name not in ref.templates:
            return Problem(str(path), f"a chat template here, none{'' if field is None else ' of this name'} in "
                                      f"{ref.name} ({ref.path}): another chat template (the output carries "
                                      f"{ref.name}'s)", field=field)
        our_text, our_path = ref.templates[name]
        if text != our_text:
            return Problem(str(path), f"{_text_difference(our_text, text, ref.name)} ({our_path}): another chat "
                                      "template", field=field)
    return None


# --- naming the first difference -------------------------------------------------------------------------------
def json_difference(ours: Any, theirs: Any, where: str = "") -> tuple[str, Any, Any]:
    """(path, our value, their value) of the first place two JSON values differ (dict keys in our order, then theirs;
    list items by index; ABSENT where one side has nothing); `where` when they are equal or differ as a whole. Values
    short enough to show whole (a merge rule, a special token) are not taken apart."""
    if _whole(ours) and _whole(theirs):
        return where, ours, theirs
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in [*ours, *(key for key in theirs if key not in ours)]:
            a, b = ours.get(key, ABSENT), theirs.get(key, ABSENT)
            if a != b:
                return json_difference(a, b, _joined(where, key))
    elif isinstance(ours, list) and isinstance(theirs, list):
        for index in range(max(len(ours), len(theirs))):
            a = ours[index] if index < len(ours) else ABSENT
            b = theirs[index] if index < len(theirs) else ABSENT
            if a != b:
                return json_difference(a, b, f"{where}[{index}]")
    return where, ours, theirs


def _whole(value: Any) -> bool:
    """A value shown whole rather than taken apart: a scalar, or a short list or object of scalars."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if items is None:
        return True
    return len(repr(value)) <= SHOWN_CHARS and not any(isinstance(item, (dict, list)) for item in items)


def _joined(where: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{key!r}]"


def _line_difference(ours: list[str], theirs: list[str]) -> tuple[int, Any, Any]:
    """(line number from 1, our line, their line) of the first differing line."""
    where, a, b = json_difference(ours, theirs)
    return int(where.strip("[]")) + 1, a, b


def _text_difference(ours: str, theirs: str, name: str) -> str:
    """Where two texts first differ (line and column from 1) and a few characters around it on each side: a template
    is often one long line."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    line = theirs.count("\n", 0, at) + 1
    column = at - (theirs.rfind("\n", 0, at) + 1) + 1
    start = max(at - CONTEXT_CHARS, 0)

    def around(text: str) -> str:
        return ("..." if start else "") + repr(text[start: at + CONTEXT_CHARS]) + ("..." if len(text) > at + CONTEXT_CHARS else "")

    return f"line {line}, column {column}: {around(theirs)} here, {around(ours)} in {name}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
