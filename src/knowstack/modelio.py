"""Loading and saving models in Hugging Face formats: one place that decides how weights travel.

Weights are read with safetensors only (`use_safetensors=True`), remote code is off unless the
user turns it on, and every save goes to a temporary directory that is renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from knowstack.atomic import atomic_dir
from knowstack.errors import KnowstackError
from knowstack.modeling.streaming import MAX_SHARD_BYTES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from knowstack.modelcard import ModelCardInfo


# The files a tokenizer is loaded from (fast, sentencepiece, BPE, WordPiece): any one of them shows that a dir has a
# tokenizer (validate.has_tokenizer_files). The first two are those a check names when a dir has none.
TOKENIZER_LOAD_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                        "spiece.model", "merges.txt")
# Files besides the config and the weights that make an output a model users load and chat with: the tokenizer's
# (those above, and what goes beside them), the chat template (transformers 5 writes chat_template.jinja, older
# checkpoints keep it in tokenizer_config.json) and generation_config.json; carried from the base into every output
# dir (copy_model_files), so that an output has a tokenizer wherever its base has one.
TOKENIZER_FILES = (*TOKENIZER_LOAD_FILES, "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
# What an output's floating tensors may be written in (--dtype); "auto": as the base's.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def check_exists(path: str | Path, what: str) -> None:
    # A hub id (org/name) is passed through to transformers; a local-looking path must exist. "world/base"
    # looks like a hub id, but not when "world" is a dir here: then it is a mistyped local path.
    text = str(path)
    looks_local = (text.startswith((".", "/", "~")) or Path(text).exists() or text.count("/") != 1
                   or Path(text.split("/")[0]).is_dir())
    if looks_local and not Path(text).expanduser().exists():
        raise KnowstackError(f"{what} not found", path=path)


def load_tokenizer(model_path: str | Path, *, trust_remote_code: bool = False,
                   pad_from_eos: bool = True) -> PreTrainedTokenizerBase:
    """The model's tokenizer; one without a pad token pads with eos (pad_from_eos), which packed training never
    reads (a padded batch masks it)."""
    from transformers import AutoTokenizer  # here: the file list and dtype helpers below need no transformers

    check_exists(model_path, "model")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and pad_from_eos:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The pad token the paper's scripts add to a tokenizer without one (RhuiDih/cl do_finetuning.py L25, L277-282).
PAD_TOKEN = "[PAD]"


def add_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """What the paper's `smart_tokenizer_and_embedding_resize` does (RhuiDih/cl do_finetuning.py L27-47), where the
    tokenizer has no pad token: `[PAD]` added as its pad token, the model resized to len(tokenizer) token rows
    (`resize_token_embeddings`: the input embedding, and the output layer with it, tied or not), each added row of
    both set to the mean of the rows before it. The mean is taken in float32 and stored in the weights' dtype (the
    paper's bf16 mean); the installed transformers' own init of the new rows is overwritten, so its version does
    not matter. Returns whether the tokenizer had no pad token (nothing changes where it has one); refuses a
    tokenizer shorter than the model's rows, which the resize would cut."""
    if tokenizer.pad_token is not None:
        return False
    rows = model.get_input_embeddings().weight.shape[0]
    refusal = pad_token_refusal(tokenizer, rows)
    if refusal is not None:
        raise KnowstackError(refusal, path=getattr(model.config, "_name_or_path", None) or None)
    added = tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if added:
        with torch.no_grad():
            layers = [model.get_input_embeddings(), model.get_output_embeddings()]
            for weight in {id(layer.weight): layer.weight for layer in layers if layer is not None}.values():
                weight[-added:] = weight[:-added].float().mean(dim=0, keepdim=True).to(weight.dtype)
    return True


def pad_token_refusal(tokenizer: PreTrainedTokenizerBase, rows: int) -> str | None:
    """Why add_pad_token cannot grow a model of `rows` token rows with this tokenizer (it has no pad token), or None:
    with `[PAD]` it is shorter than the rows (e.g. a vocabulary padded to a multiple of 64 or 128), and the paper's
    resize to the tokenizer's length would cut rows that are the model's."""
    with_pad = len(tokenizer) + (PAD_TOKEN not in tokenizer.get_vocab())
    if with_pad >= rows:
        return None
    return (f"the tokenizer has {with_pad} tokens with {PAD_TOKEN}, the model {rows} token rows: the paper's resize to "
            "the tokenizer's length would cut rows; give a base whose tokenizer covers its embeddings, or leave "
            "training.add_pad_token off")


def write_padded_base(model_path: str | Path, out_dir: Path, *, tokenizer_path: str | Path | None = None,
                      trust_remote_code: bool = False) -> dict[str, Any]:
    """The base as the paper's scripts load it (add_pad_token), saved as a model dir in its own dtype with the
    grown tokenizer. A local base whose tokenizer has a pad token is not changed: its weights are hard-linked, not
    loaded nor copied (link_base). Returns what was done."""
    tokenizer = load_tokenizer(tokenizer_path or model_path, trust_remote_code=trust_remote_code, pad_from_eos=False)
    folder = Path(str(model_path)).expanduser()
    if tokenizer.pad_token is not None and folder.is_dir():
        rows = link_base(folder, tokenizer, out_dir, trust_remote_code=trust_remote_code)
        return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id, "added": False,
                "rows_before": rows, "rows": rows}
    model = load_model(model_path, dtype="auto", trust_remote_code=trust_remote_code)
    rows = model.get_input_embeddings().weight.shape[0]
    added = add_pad_token(model, tokenizer)
    save_model(model, tokenizer, out_dir)
    return {"pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id, "added": added,
            "rows_before": rows, "rows": model.get_input_embeddings().weight.shape[0]}


def link_base(folder: Path, tokenizer: PreTrainedTokenizerBase, out_dir: Path, *,
              trust_remote_code: bool = False) -> int:
    """A model dir of the base in `folder` with `tokenizer`, its weights unchanged: the tokenizer saved as save_model
    saves it, then the base's config, generation_config, safetensors (index and shards) and code files hard-linked
    beside it (atomic.link_or_copy: copied only across file systems), so an 8B base costs no 16 GB copy. Returns its
    token rows (the config's vocab_size)."""
    from transformers import AutoConfig

    from knowstack.atomic import link_or_copy
    from knowstack.modeling.streaming import INDEX_FILE, weight_files

    rows = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code).get_text_config().vocab_size
    files = [*weight_files(folder), folder / INDEX_FILE, folder / "config.json", folder / "generation_config.json",
             *folder.glob("*.py")]  # remote code that config.json names (trust_remote_code)
    with atomic_dir(Path(out_dir)) as tmp:
        tokenizer.save_pretrained(tmp)  # first: a name it writes is never a link, so nothing writes into the base
        for source in files:
            if source.is_file() and not (tmp / source.name).exists():
                link_or_copy(source, tmp / source.name)
    return rows


def load_model(
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    merge_adapter: bool = True,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a HF model dir (or hub id), with a PEFT adapter (or a LoRA-MoE dir) applied on top."""
    from transformers import AutoModelForCausalLM

    check_exists(model_path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except RuntimeError as err:  # transformers: "... mismatched sizes ...", its report logged, not raised
        if "mismatch" not in str(err):
            raise
        raise KnowstackError(_misfit_message(Path(model_path), trust_remote_code), path=model_path) from None
    if adapter_path is not None and (Path(adapter_path) / "lora_moe.json").is_file():
        # A LoRA-MoE dir: its adapters are routed per token, so there is nothing to merge.
        from knowstack.modeling.lora_moe import apply_lora_moe

        model = apply_lora_moe(model, adapter_path)
    elif adapter_path is not None:
        from peft import PeftModel

        check_exists(adapter_path, "adapter")
        model = PeftModel.from_pretrained(model, str(adapter_path))
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    return model


def _misfit_message(folder: Path, trust_remote_code: bool = False) -> str:
    """What is wrong when a model dir's config.json does not fit its weights: the tensors whose shapes differ
    between the weights and the model config.json builds (on the meta device: no memory), first ones named."""
    from knowstack.modeling.streaming import SafetensorsReader

    try:
        built = meta_model(folder, trust_remote_code)
        expected = {name: tuple(tensor.shape) for name, tensor in built.state_dict().items()}
        specs = SafetensorsReader.from_dir(folder).specs
    except Exception:  # noqa: BLE001 - the names are a help; the message stands without them (a hub id)
        expected, specs = {}, {}
    differ = [f"{name} is {list(spec.shape)} in the weights, {list(expected[name])} by config.json"
              for name, spec in specs.items() if name in expected and tuple(spec.shape) != expected[name]]
    more = f" (and {len(differ) - 2} more)" if len(differ) > 2 else ""
    shown = "; ".join(differ[:2]) + more if differ else "tensor shapes differ"
    return (f"config.json does not fit the weights: {shown}; give the config.json these weights were saved with "
            "(or the model dir this config.json belongs to)")


def meta_model(folder: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model config.json of `folder` builds, on the meta device: its modules and shapes, no memory, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_modules(folder: str | Path) -> dict[str, tuple[int, int]]:
    """The Linear modules of the model in `folder`, {name: (out_features, in_features)}, in the model's own module
    order (the order PEFT injects adapters in)."""
    return {name: (module.out_features, module.in_features) for name, module in meta_model(folder).named_modules()
            if isinstance(module, torch.nn.Linear)}


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path,
               card: ModelCardInfo | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Save a full model (safetensors, sharded with an index above max_shard_bytes; a tied model without its
    output layer), its generation_config, tokenizer and chat template, and its model card atomically."""
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if card is not None:
            from knowstack.modelcard import write_model_card

            write_model_card(tmp, card)
    return Path(out_dir)


def on_gpu_if_it_fits(model: PreTrainedModel, headroom: float = 1.5) -> PreTrainedModel:
    """Evaluation on this process's GPU (a Ray task's, or this machine's) when `headroom` x the model's weights fit
    in its free memory (the default: half as much again for activations); otherwise on the CPU, where models are
    loaded. Generation and lm-eval follow the model's device."""
    if not torch.cuda.is_available():
        return model
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info()
    return model.to("cuda") if headroom * size < free else model


def output_dtype(name: str) -> torch.dtype | None:
    """The dtype named by a --dtype choice (DTYPE_CHOICES); None for "auto" (each tensor as the base's)."""
    if name not in DTYPE_CHOICES:
        raise KnowstackError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, not {name!r}", field="dtype")
    return None if name == "auto" else getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the name config.json's dtype holds."""
    return str(dtype).removeprefix("torch.")


def copy_model_files(source: Path, dest: Path) -> None:
    """The base's tokenizer files, chat template and generation_config (those it has) into an output dir."""
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(dest) / name)  # not copy2: the output's mode is the umask's


def with_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json's fields for weights written in `dtype`: `dtype` (transformers 5's name), and `torch_dtype` where
    the config has it (older checkpoints; older transformers read only that one, and take the weights' dtype where
    it is absent)."""
    updated = {**config, "dtype": dtype_name(dtype)}
    if "torch_dtype" in config:
        updated["torch_dtype"] = dtype_name(dtype)
    return updated


def write_config(folder: Path, config: dict[str, Any]) -> None:
    """config.json as save_pretrained writes it (sorted keys, two-space indent)."""
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite folder/config.json's dtype fields (with_dtype) where they do not name `dtype`: save_pretrained
    records the dtype of the model in memory, which is not the one written when a state dict was cast."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if with_dtype(config, dtype) != config:
        write_config(folder, with_dtype(config, dtype))
