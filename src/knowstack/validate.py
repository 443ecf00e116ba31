"""Every input a command or a study will read, checked before any compute, every problem listed at once.

Each `check_*` function reads one kind of input and returns the `Problem`s it found (an empty list
when the input is good); nothing here trains, evaluates or writes to an output dir. A command
gathers the problems of all its inputs and calls `raise_problems`, so a user fixes everything in one
go instead of finding a bad task file hours into a study. The checks read what the steps will read
(the same readers and helpers where they exist: data/formats.py, modeling/streaming.py,
train/launch.py, evaluate/old_knowledge.py) and refuse what the steps would refuse, pickled weights
included, which are named but never opened.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Problem, InputProblems and raise_problems live in errors.py, so that checks below this layer (combine's
# compatibility checks) list problems the same way; they are re-exported here, where commands find them.
from knowstack.errors import InputProblems as InputProblems
from knowstack.errors import KnowstackError
from knowstack.errors import Problem as Problem
from knowstack.errors import raise_problems as raise_problems

# At most this many problems are listed per file: a 100k-item file with one field misnamed is one mistake.
MAX_PER_FILE = 5
# Fields of each split of each task format (data/formats.py reads the same ones).
SPLIT_FIELDS: dict[tuple[str, str], tuple[str, str]] = {
    **{("trace", split): ("prompt", "answer") for split in ("train", "eval", "test")},
    ("math", "train"): ("query", "response"),
    ("math", "eval"): ("question", "answer"),
    ("math", "test"): ("question", "answer"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def problems_of(call: Callable[[], Any]) -> list[Problem]:
    """A check written as code that raises KnowstackError (an existing reader), as a list of problems."""
    try:
        call()
    except InputProblems as err:
        return err.problems
    except KnowstackError as err:
        return [Problem(None, str(err))]
    return []


def _capped(problems: list[Problem], path: str) -> list[Problem]:
    if len(problems) <= MAX_PER_FILE:
        return problems
    return [*problems[:MAX_PER_FILE], Problem(path, f"... and {len(problems) - MAX_PER_FILE} more problems like these")]


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# --- list files: task splits, prompt files -------------------------------------------------------
def read_list_file(path: str | Path) -> tuple[list[Any] | None, list[Problem]]:
    """A JSON list, or JSON Lines (a .jsonl file, one value per line), as data/formats.read_records reads
    it; None and the problems when it cannot be read. Every bad line of a JSON Lines file is listed."""
    path = Path(path).expanduser()
    where = str(path)
    if not path.exists():
        return None, [Problem(where, "file not found")]
    if not path.is_file():
        return None, [Problem(where, "not a file")]
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        return None, [Problem(where, f"not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8")]
    except OSError as err:
        return None, [Problem(where, f"cannot read: {err.strerror or err}")]
    if not text.strip():
        return None, [Problem(where, "empty file: expected a JSON list of objects" if path.suffix != ".jsonl"
                              else "empty file: expected JSON Lines, one object per line")]
    if path.suffix == ".jsonl":
        return _json_lines(text, where)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if _json_lines(text, where)[0] is not None:
            hint = " (it reads as JSON Lines: name the file .jsonl)"
        return None, [Problem(where, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno}){hint}")]
    if not isinstance(records, list):
        return None, [Problem(where, f"expected a JSON list of objects, found {_json_type(records)}")]
    return records, []


def _json_lines(text: str, where: str) -> tuple[list[Any] | None, list[Problem]]:
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            problems.append(Problem(where, f"line {number}: not valid JSON ({err.msg} at column {err.colno})"))
    return (None, _capped(problems, where)) if problems else (records, [])


def check_items(path: str | Path, records: list[Any], fields: Sequence[str],
                check_item: Callable[[dict[str, Any]], Problem | None] | None = None) -> list[Problem]:
    """Each item an object whose `fields` are strings; `check_item` may refuse an item for another reason."""
    where = str(Path(path).expanduser())
    if not records:
        return [Problem(where, "no items: the list is empty")]
    problems = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            problems.append(Problem(where, f"expected an object, found {_json_type(record)}", item=index))
            continue
        for name in fields:
            if name not in record:
                problems.append(Problem(where, "missing", field=name, item=index))
            elif not isinstance(record[name], str):
                problems.append(Problem(where, f"expected a string, found {_json_type(record[name])}",
                                        field=name, item=index))
        if check_item is not None and all(isinstance(record.get(name), str) for name in fields):
            found = check_item(record)
            if found is not None:
                problems.append(Problem(where, found.message, field=found.field, item=index))
    return _capped(problems, where)


def _gsm8k_answer(record: dict[str, Any]) -> Problem | None:
    from knowstack.data.formats import gsm8k_final_answer

    try:
        gsm8k_final_answer(record["answer"])
    except ValueError as err:
        return Problem(None, str(err), field="answer")
    return None


def check_split_file(path: str | Path, task_format: str = "trace", split: str = "train") -> list[Problem]:
    """One split of a task: its file readable and every item of the format's fields (GSM8K answers end
    in '#### N')."""
    records, problems = read_list_file(path)
    if records is None:
        return problems
    fields = SPLIT_FIELDS[(task_format, split)]
    gsm8k = task_format == "math" and split != "train"
    return check_items(path, records, fields, _gsm8k_answer if gsm8k else None)


def check_prompt_file(path: str | Path) -> list[Problem]:
    """A file of prompts (`mix --prompts`): a list of strings or of objects with a string "prompt"."""
    records, problems = read_list_file(path)
    if records is None:
        return problems
    objects = [record for record in records if not isinstance(record, str)]
    if records and not objects:
        return []
    return check_items(path, [r if not isinstance(r, str) else {"prompt": r} for r in records], ("prompt",))


# --- tasks ---------------------------------------------------------------------------------------
def _split_path(task_dir: Path, split: str) -> Path | None:
    for suffix in (".json", ".jsonl"):
        if (task_dir / f"{split}{suffix}").is_file():
            return task_dir / f"{split}{suffix}"
    return None


def check_task_dir(path: str | Path, task_format: str = "trace", *, required: Sequence[str] = ("train", "test"),
                   optional: Sequence[str] = ("eval",)) -> list[Problem]:
    """A TRACE-layout task dir (train/eval/test .json or .jsonl): the `required` splits present, and every
    split there is (of `required` and `optional`) readable, item by item."""
    task_dir = Path(path).expanduser()
    if not task_dir.is_dir():
        return [Problem(str(task_dir), "task directory not found" if not task_dir.exists() else "not a directory "
                        "(a task is a dir of train.json, eval.json, test.json)")]
    problems = []
    for split in (*required, *optional):
        file = _split_path(task_dir, split)
        if file is None:
            if split in required:
                problems.append(Problem(str(task_dir), f"task directory has no {split}.json (or {split}.jsonl)"))
            continue
        problems += check_split_file(file, task_format, split)
    return problems


def check_task_config(cfg: Any, *, splits: Sequence[str] = ("train", "test"), field: str = "tasks") -> list[Problem]:
    """A task of a study config (config.TaskConfig): its dir and/or its train/eval/test files."""
    explicit = {"train": cfg.train_file, "eval": cfg.eval_file, "test": cfg.test_file}
    problems = []
    if cfg.path is not None:
        dir_splits = [s for s in splits if explicit[s] is None]
        optional = [] if cfg.eval_file is not None else ["eval"]
        problems += check_task_dir(cfg.path, cfg.format, required=dir_splits, optional=optional)
    for split, file in explicit.items():
        if file is not None and (split in splits or split == "eval"):
            found = check_split_file(file, cfg.format, split)
            problems += [p if p.message != "file not found" else
                         Problem(p.path, f"task '{cfg.name}': file not found", field=f"{field}.{split}_file")
                         for p in found]
    return problems


# --- weights -------------------------------------------------------------------------------------
def check_safetensors_file(path: str | Path) -> list[Problem]:
    """A safetensors file whose header reads and whose size is exactly what the header says (a cut-off copy
    or download is caught here, not as a library traceback in the middle of a step)."""
    from knowstack.modeling.streaming import read_header

    path = Path(path)
    try:
        header = read_header(path)
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except KnowstackError as err:
        return [Problem(None, str(err))]
    except (OSError, struct.error, TypeError, KeyError, IndexError, AttributeError) as err:
        return [Problem(str(path), f"not a readable safetensors file: {err!r}")]
    expected = 8 + length + max(ends, default=0)
    actual = path.stat().st_size
    if actual < expected:
        return [Problem(str(path), f"truncated: {actual} bytes, its header describes {expected} (copy or download "
                                   "it again)")]
    if actual > expected:  # safetensors refuses a file its tensors do not exactly cover
        return [Problem(str(path), f"{actual - expected} bytes past the end of its tensors (a damaged copy?)")]
    return []


def _pickled(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)


def _is_local(path: str | Path, what: str) -> tuple[bool, list[Problem]]:
    """Whether the path is a local one (else a hub id, resolved when loaded), and a problem if it is
    local but missing: the same rule as loading (modelio)."""
    from knowstack.modelio import check_exists

    problems = problems_of(lambda: check_exists(path, what))
    return (not problems and Path(str(path)).expanduser().exists()), problems


def has_tokenizer_files(folder: Path) -> bool:
    """Whether `folder` holds any file a tokenizer is loaded from (modelio.TOKENIZER_LOAD_FILES)."""
    from knowstack.modelio import TOKENIZER_LOAD_FILES

    return any((folder / name).is_file() for name in TOKENIZER_LOAD_FILES)


def check_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> list[Problem]:
    """The tokenizer loads as the steps load it (AutoTokenizer)."""
    local, problems = _is_local(path, "tokenizer")
    if not local:
        return problems
    folder = Path(str(path)).expanduser()
    if folder.is_dir() and not has_tokenizer_files(folder):
        from knowstack.modelio import TOKENIZER_LOAD_FILES

        return [Problem(str(folder), f"no tokenizer ({' or '.join(TOKENIZER_LOAD_FILES[:2])}): save the tokenizer with "
                                     "the model, or name its dir (base.tokenizer in a study config)")]
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(Path(str(path)).expanduser()), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure of the library to load it is the input's problem
        return [Problem(str(path), f"the tokenizer does not load: {error_line(err)}")]
    return []


def check_pad_token(model: str | Path, tokenizer: str | Path | None = None, *,
                    trust_remote_code: bool = False) -> list[Problem]:
    """training.add_pad_token on this base: refused before the study where the `[PAD]` resize would cut the model's
    token rows (modelio.pad_token_refusal); a base whose tokenizer has a pad token is left as it is. A hub id passes
    (checked when loaded), and so does a dir without tokenizer files (a dry run's config-only base: a run names what
    it lacks), so that a dry run refuses what the run would."""
    source = tokenizer or model
    if not (_is_local(model, "model")[0] and _is_local(source, "tokenizer")[0]):
        return []
    folder = Path(str(source)).expanduser()
    if folder.is_dir() and not has_tokenizer_files(folder):
        return []
    from transformers import AutoConfig, AutoTokenizer

    from knowstack.modelio import pad_token_refusal

    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        config = AutoConfig.from_pretrained(str(Path(str(model)).expanduser()), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - check_model_dir and check_tokenizer report what does not load
        return []
    if loaded.pad_token is not None:
        return []
    refusal = pad_token_refusal(loaded, config.get_text_config().vocab_size)
    return [] if refusal is None else [Problem(str(source), refusal, field="training.add_pad_token")]


def error_line(err: BaseException) -> str:
    """A library's error as one line (messages are never wrapped), at most 300 characters."""
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def missing_model_files(folder: Path) -> list[str]:
    """What a local model dir with a config.json lacks that only running it needs: 'weights' where it holds no
    weight file at all (no safetensors, index or pickled file), 'tokenizer' where it holds no tokenizer file.
    A dir lacking its weights is a config-only model: enough to plan a study (`study --dry-run`), not to run it."""
    from knowstack.modeling.streaming import INDEX_FILE

    if not (folder / "config.json").is_file():
        return []
    missing = []
    if not (any(folder.glob("*.safetensors")) or (folder / INDEX_FILE).exists() or _pickled(folder)):
        missing.append("weights")
    if not has_tokenizer_files(folder):
        missing.append("tokenizer")
    return missing


def check_model_dir(path: str | Path, *, tokenizer: str | Path | bool = True, trust_remote_code: bool = False,
                    config_only: bool = False, adapter_hint: str | None = None) -> list[Problem]:
    """A HF model dir: config.json that transformers reads, safetensors weights that are whole (pickled
    weights are refused by name, never opened), and its tokenizer (or `tokenizer`, a path) loadable.
    A hub id passes: it is resolved when it is loaded. config_only: a dir with no weights passes, and without
    a tokenizer too (a plan reads the config alone); otherwise such a dir is one problem naming what it lacks.
    An adapter dir given as the model is one problem saying so; adapter_hint: how the command takes it instead
    ('--model BASE --adapter {path}')."""
    local, problems = _is_local(path, "model")
    if not local:
        given = not isinstance(tokenizer, bool)
        return problems + (check_tokenizer(tokenizer, trust_remote_code=trust_remote_code) if given else [])
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return [Problem(str(folder), "not a model dir (a file; a model is a dir of config.json and safetensors)")]
    adapter = adapter_kind(folder)
    if adapter is not None and not (folder / "config.json").is_file():
        how = f": give {adapter_hint.format(path=folder)}" if adapter_hint else ", loaded on its base model"
        return [Problem(str(folder), f"not a model dir but {adapter}{how}")]
    problems = _check_model_config(folder, trust_remote_code)
    missing = missing_model_files(folder)
    if "weights" not in missing:
        problems += _check_weights(folder)
    elif not config_only:
        problems.append(_config_only_problem(folder, [m for m in missing if m == "weights" or tokenizer is True]))
    if tokenizer is True and not ("weights" in missing and "tokenizer" in missing):
        problems += check_tokenizer(folder, trust_remote_code=trust_remote_code)
    elif tokenizer and tokenizer is not True:
        problems += check_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    return problems


def _check_weights(folder: Path) -> list[Problem]:
    from knowstack.modeling.streaming import INDEX_FILE, weight_files

    files: list[Path] = []
    pickled = _pickled(folder)
    problems = problems_of(lambda: files.extend(weight_files(folder)))
    safetensors = any(folder.glob("*.safetensors")) or (folder / INDEX_FILE).exists()
    if problems and pickled and not safetensors:
        problems = [Problem(str(folder), f"only pickled weights ({', '.join(pickled)}): knowstack reads "
                                         "safetensors only and never unpickles; save the model with "
                                         "save_pretrained(..., safe_serialization=True)")]
    for file in files:
        problems += check_safetensors_file(file)
    return problems


def _config_only_problem(folder: Path, missing: list[str]) -> Problem:
    from knowstack.modeling.streaming import INDEX_FILE, SINGLE_FILE

    lacks = " and no ".join("weights" if m == "weights" else "tokenizer" for m in missing)
    return Problem(str(folder), f"a config-only model: config.json but no {lacks} ({SINGLE_FILE} or {INDEX_FILE} "
                                f"and its shards{', tokenizer.json' if 'tokenizer' in missing else ''}); a dry run "
                                "(study --dry-run) plans from the config alone, a run needs the "
                                f"{' and '.join(missing)}: download the model into this dir")


def _check_model_config(folder: Path, trust_remote_code: bool) -> list[Problem]:
    config = folder / "config.json"
    if not config.is_file():
        return [Problem(str(folder), "not a model dir (no config.json)")]
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - the library's refusal, reported as the input's problem
        return [Problem(str(config), f"not a model config transformers reads: {error_line(err)}")]
    return []


def adapter_kind(folder: Path) -> str | None:
    """What kind of adapter dir `folder` is, in words ('a PEFT LoRA adapter (adapter_config.json)'), or None."""
    from knowstack.combine.inputs import ADAPTER_CONFIG
    from knowstack.modeling.lora_moe import CONFIG_FILE as LORA_MOE_CONFIG

    if (folder / LORA_MOE_CONFIG).is_file():
        return f"a LoRA-MoE ({LORA_MOE_CONFIG})"
    if (folder / ADAPTER_CONFIG).is_file():
        return f"a PEFT LoRA adapter ({ADAPTER_CONFIG})"
    return None


def check_adapter_dir(path: str | Path) -> list[Problem]:
    """A PEFT adapter dir (adapter_config.json + adapter_model.safetensors), or a LoRA-MoE dir."""
    from knowstack.combine.inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from knowstack.modeling.lora_moe import CONFIG_FILE as LORA_MOE_CONFIG

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return [Problem(str(folder), "adapter dir not found" if not folder.exists() else "not an adapter dir")]
    if (folder / LORA_MOE_CONFIG).is_file():
        problems = _check_json_object(folder / LORA_MOE_CONFIG)
        for file in sorted(folder.glob("*.safetensors")):
            problems += check_safetensors_file(file)
        return problems
    if not (folder / ADAPTER_CONFIG).is_file():
        return [Problem(str(folder), f"not a PEFT adapter dir (no {ADAPTER_CONFIG})")]
    problems = _check_json_object(folder / ADAPTER_CONFIG)
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        problems += check_safetensors_file(weights)
    else:
        pickled = _pickled(folder)
        hint = f": only pickled weights ({', '.join(pickled)}), never unpickled" if pickled else ""
        problems.append(Problem(str(folder), f"no {ADAPTER_WEIGHTS}{hint}"))
    return problems


def check_weights_dir(path: str | Path) -> list[Problem]:
    """An input of merge / mix / contribute: an adapter dir (it has adapter_config.json) or a model dir."""
    from knowstack.combine.inputs import ADAPTER_CONFIG

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return [Problem(str(folder), "model or adapter dir not found" if not folder.exists() else
                        "not a model or adapter dir (a file)")]
    if (folder / ADAPTER_CONFIG).is_file():
        return check_adapter_dir(folder)
    return check_model_dir(folder, tokenizer=False)


def check_lora_targets(model_dir: str | Path, target_modules: Sequence[str]) -> list[Problem]:
    """The LoRA target modules name modules of the checkpoint (Llama's names resolved to the family's own, as
    training resolves them), read from its weights' names without loading it; a hub id or a dir without readable
    weights passes here (check_model_dir says what is wrong with it)."""
    from knowstack.modeling.families import checked_lora_targets
    from knowstack.modeling.streaming import SafetensorsReader

    folder = Path(str(model_dir)).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        specs = SafetensorsReader.from_dir(folder).specs
    except (OSError, ValueError, KnowstackError):
        return []
    if not isinstance(config, dict):
        return []
    modules = {name.rpartition(".")[0] for name in specs}
    # the layers a target can name: those with a matrix weight (the embedding's included)
    layers = sorted({name.rpartition(".")[0].rpartition(".")[2] for name, spec in specs.items()
                     if name.endswith(".weight") and len(spec.shape) == 2})
    return problems_of(lambda: checked_lora_targets(config.get("model_type"), list(target_modules), modules,
                                                    layers, path=folder))


def _trains_lora(methods: Any) -> bool:
    """Whether any method of a study's `methods` trains a LoRA adapter (O-LoRA always does)."""
    for name in type(methods).model_fields:
        value = getattr(methods, name)
        for method in value if isinstance(value, list) else [value]:
            finetunes = getattr(method, "finetune", None) or getattr(method, "experts", None) or []
            if method is not None and (name == "olora" or "lora" in finetunes):
                return True
    return False


def _check_json_object(path: Path) -> list[Problem]:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [Problem(str(path), f"not a readable JSON file: {err}")]
    return [] if isinstance(value, dict) else [Problem(str(path), "expected a JSON object")]


# --- lm-eval tasks, accelerate configs, other files ----------------------------------------------
# data_files lines of an lm-eval task YAML: the local files it reads (evaluate/old_knowledge.py).
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".zst")
_DATA_FILE = re.compile(r"^\s+(?:test|train|validation|data_files)\s*:\s*([^\s#'\"{}\[\]]+)\s*$", re.M)


def check_old_tasks(tasks: Sequence[str], include_path: str | Path | None, *, field: str = "old_knowledge.tasks",
                    include_field: str = "old_knowledge.include_path") -> list[Problem]:
    """lm-eval task names known to lm-eval or to the include path's YAMLs, whose local data files exist."""
    problems: list[Problem] = []
    include = None
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            return [Problem(str(folder), "lm-eval include path not found (a dir of task YAMLs)",
                            field=include_field)]
        problems += _check_task_yamls(folder)
        if problems:
            return problems
        from knowstack.evaluate.old_knowledge import resolve_relative_data_files

        include = str(resolve_relative_data_files(folder))
    if not tasks:
        return problems
    from knowstack.evaluate.old_knowledge import task_manager

    local = set(task_manager(include, include_defaults=False).all_tasks) if include else set()
    unknown = [task for task in tasks if task not in local]
    if unknown:
        stock = stock_task_names()
        unknown = [task for task in unknown if task not in stock]
    where = f" nor in {include_path}" if include_path is not None else ""
    return [Problem(str(include_path) if include_path else None, f"unknown lm-eval task '{name}' (not in "
                    f"lm-eval's tasks{where})", field=field) for name in unknown]


def stock_task_names() -> set[str]:
    """The names of lm-eval's own tasks. Indexing its thousands of YAMLs takes ~10 s, so the names are
    kept in the temp dir per lm-eval version: a dry run checks a config's task names in milliseconds."""
    import tempfile
    from importlib.metadata import version

    from knowstack.atomic import atomic_write_text

    cache = Path(tempfile.gettempdir()) / f"knowstack-lm-eval-task-names-{version('lm_eval')}.json"
    try:
        return set(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    from knowstack.evaluate.old_knowledge import task_manager

    names = sorted(task_manager(None).all_tasks)
    atomic_write_text(cache, json.dumps(names))
    return set(names)


def _check_task_yamls(folder: Path) -> list[Problem]:
    problems = []
    yamls = sorted(folder.rglob("*.yaml"))
    if not yamls:
        return [Problem(str(folder), "no task YAMLs (*.yaml) in the include path")]
    for path in yamls:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(Problem(str(path), f"not UTF-8 text (byte {err.start})"))
            continue
        for value in _DATA_FILE.findall(text):
            # a local file (a path, or a name with a data file's suffix), not a URL, glob or split name
            looks_like_file = "/" in value or Path(value).suffix in DATA_SUFFIXES
            if not looks_like_file or "://" in value or any(c in value for c in "*?"):
                continue
            if not (path.parent / value).exists() and not Path(value).expanduser().exists():
                problems.append(Problem(str(path), f"data file not found: {value}", field="data_files"))
    return problems


KNOWN_DISTRIBUTED = {"NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "FSDP",
                     "DEEPSPEED", "MEGATRON_LM", "XLA", "TPU"}


def check_accelerate_config(value: str | None, *, cpu: bool = False,
                            field: str = "launch.accelerate_config") -> list[Problem]:
    """A shipped accelerate config's name or a YAML file: readable, a mapping, a known distributed_type,
    and not FSDP / DeepSpeed on CPU processes (accelerate would quietly run DDP instead)."""
    if value is None:
        return []
    import yaml

    from knowstack.train.launch import accelerate_config_path, checked_config

    found: list[Path] = []
    problems = problems_of(lambda: found.append(accelerate_config_path(value)))
    if problems:
        return problems
    path = found[0]
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        return [Problem(str(path), f"not a readable YAML file: {err}", field=None)]
    if not isinstance(data, dict):
        return [Problem(str(path), f"expected a YAML mapping of accelerate settings, found {_json_type(data)}")]
    kind = str(data.get("distributed_type", "NO")).upper()
    if kind not in KNOWN_DISTRIBUTED:
        return [Problem(str(path), f"unknown distributed_type '{kind}'", field="distributed_type")]
    return problems_of(lambda: checked_config(value, cpu))


def check_file(path: str | Path, what: str = "file") -> list[Problem]:
    """A file that is read as given (e.g. a training config stored with a contribution): exists, readable."""
    file = Path(path).expanduser()
    if not file.is_file():
        return [Problem(str(file), f"{what} not found" if not file.exists() else f"{what} is not a file")]
    return []


def check_out_dir(out: str | Path, *, overwrite: bool = False, inputs: Sequence[str | Path | None] = (),
                  option: str = "--out") -> list[Problem]:
    """A dir a command writes whole and renames into place, replacing what is there: new or empty, or any dir with
    `overwrite`; never a file, and never one of the command's `inputs`, inside one or holding one, with or
    without `overwrite` (replacing it would delete what is being read). The one check of every such output."""
    target = Path(out).expanduser()
    where = target.resolve()
    for given in inputs:
        source = Path(str(given)).expanduser() if given is not None else None
        if source is None or not source.exists():  # a hub id, or an input whose own check reports it missing
            continue
        read = source.resolve()
        if where == read or read in where.parents or where in read.parents:
            relation = "is" if where == read else "is inside" if read in where.parents else "holds"
            return [Problem(str(target), f"{relation} the input {source}: write the output to another dir "
                                         "(--overwrite never replaces an input)", field=option)]
    if target.exists() and not target.is_dir():
        return [Problem(str(target), "exists and is not a directory: give a new dir", field=option)]
    if target.is_dir() and not overwrite and any(target.iterdir()):
        return [Problem(str(target), "exists and is not empty: give a new dir, or --overwrite to replace it and "
                                     "everything in it", field=option)]
    return []


# What a dir a study ran in holds from its first moment (the runner's lock) or later.
STUDY_DIR_MARKS = (".lock", "config.yaml", "plan.json", "artifacts")


def check_study_out(out: str | Path) -> list[Problem]:
    """A study's --out: new, empty, or a study dir to resume; never another non-empty dir, which the study would
    fill with its artifacts beside the user's own files."""
    target = Path(out).expanduser()
    if target.exists() and not target.is_dir():
        return [Problem(str(target), "exists and is not a directory: give a new dir", field="--out")]
    if not target.is_dir() or not any(target.iterdir()) or any((target / mark).exists() for mark in STUDY_DIR_MARKS):
        return []
    return [Problem(str(target), "exists, is not empty and is not a study dir (none of "
                                 f"{', '.join(STUDY_DIR_MARKS)}): give a new or empty dir, or a study dir to resume",
                    field="--out")]


# --- a whole study -------------------------------------------------------------------------------
def check_study(config: Any, *, dry_run: bool = False) -> list[Problem]:
    """Every input a study (config.StudyConfig) reads that exists before its first step: the base model and
    tokenizer, its own tasks, lm-eval tasks and include path, accelerate configs. The built-in world's
    model and tasks are the study's own first step, so there is nothing of them to check yet. dry_run: the
    plan only, which a config-only base (config.json without weights or tokenizer) is enough for."""
    problems: list[Problem] = []
    base, trust = config.base, config.base.trust_remote_code
    if base.model is not None:
        problems += check_model_dir(base.model, tokenizer=base.tokenizer or True, trust_remote_code=trust,
                                    config_only=dry_run)
        if _trains_lora(config.methods):
            problems += check_lora_targets(base.model, config.training.lora.target_modules)
    elif base.tokenizer is not None:
        problems += check_tokenizer(base.tokenizer, trust_remote_code=trust)
    if isinstance(config.tasks, list):
        for index, task in enumerate(config.tasks):
            problems += check_task_config(task, field=f"tasks[{index}]")
    old = config.old_knowledge
    if not old.tasks:  # old knowledge is what every method is judged on keeping: without it no forgetting is measured
        problems.append(Problem(None, "name at least one lm-eval task (or 'builtin' on the "
                                "built-in world)", field="old_knowledge.tasks"))
    elif old.tasks != "builtin":
        problems += check_old_tasks(list(old.tasks), old.include_path)
    elif old.include_path is not None:
        problems += check_old_tasks([], old.include_path)
    if base.model is not None:
        problems += check_fft_moe_base(base.model, config.methods.moe)
        if config.training.add_pad_token:
            problems += check_pad_token(base.model, base.tokenizer, trust_remote_code=trust)
    problems += check_merge_settings(config.methods)
    launch = config.launch
    problems += check_accelerate_config(launch.accelerate_config, cpu=launch.cpu)
    if launch.lora is not None:
        problems += check_accelerate_config(launch.lora.accelerate_config, cpu=launch.cpu,
                                            field="launch.lora.accelerate_config")
    return problems


def check_merge_settings(methods: Any) -> list[Problem]:
    """A merge setting the config sets (or sweeps) that none of its section's methods reads is a mistake, not a
    no-op (combine/merges/ declares what each method reads): e.g. `density` with only DARE methods, which read
    `drop_rate` (a study's `density` is the TIES family's; only `knowstack merge` reads DARE's as mergekit's)."""
    from knowstack.combine.merges import MERGE_METHOD_OPTIONS

    problems = []
    for name, section in (("merge", methods.merge), ("continual-merge", methods.continual_merge)):
        if section is None:
            continue
        chosen = section.methods if isinstance(section.methods, list) else \
            [m for ms in section.methods.values() for m in ms]
        read = {option for method in chosen for option in MERGE_METHOD_OPTIONS[method]}
        given = {("lambda" if field == "lam" else field) for field in section.model_fields_set}
        given |= set(section.sweep or {})
        for option in sorted(given & {o for options in MERGE_METHOD_OPTIONS.values() for o in options} - read):
            readers = [m for m, options in MERGE_METHOD_OPTIONS.items() if option in options]
            problems.append(Problem(None, f"none of {', '.join(chosen)} reads {option} (read by {', '.join(readers)})",
                                    field=f"methods.{name}.{option}"))
    return problems


def check_fft_moe_base(model: str | Path, section: Any) -> list[Problem]:
    """Each FFT mixture of a study's `methods.moe` (one section or a list) against the base's family: the stock MoE
    class it is written as, or the reason none fits (combine/moe_fft.py), read from the base's config.json
    before any step runs. A base given by hub id is checked when its mixture is built (still before any compute
    of that step). Each problem names the mixture's setting that does not fit (experts, where the base's family has
    no FFT-MoE at all), and no file: the setting is the config's (the CLI names it)."""
    mixtures = section if isinstance(section, list) else [] if section is None else [section]
    folder = Path(str(model)).expanduser()
    fft = [(i, m) for i, m in enumerate(mixtures) if "fft" in m.experts]
    if not fft or not (folder / "config.json").is_file():
        return []
    try:
        base_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        n_layers = int(base_config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # check_model_dir reports an unreadable config
    from knowstack.combine.moe_fft import fft_moe_class

    problems = []
    for index, mixture in fft:
        field = f"methods.moe[{index}]" if isinstance(section, list) else "methods.moe"
        some_layers = mixture.layers is not None and set(mixture.layers) != set(range(n_layers))
        try:
            fft_moe_class(base_config, some_layers=some_layers, base_expert=mixture.base_expert,
                          router_free=mixture.router == "none", router_bias=mixture.router == "base-biased",
                          attention=mixture.attention or ())
        except KnowstackError as err:
            problems.append(Problem(None, err.message, f"{field}.{err.field or 'experts'}"))
    return problems
