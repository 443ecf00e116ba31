"""Loading and saving models in Hugging Face formats: one place that decides how weights travel.

Weights are read with safetensors only (`use_safetensors=True`), remote code is off unless the
user turns it on, and every save goes to a temporary directory that is renamed when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from knowstack.atomic import atomic_dir
from knowstack.errors import KnowstackError

if TYPE_CHECKING:
    from knowstack.modelcard import ModelCardInfo


def check_exists(path: str | Path, what: str) -> None:
    # A hub id (org/name) is passed through to transformers; a local-looking path must exist. "world/base"
    # looks like a hub id, but not when "world" is a dir here: then it is a mistyped local path.
    text = str(path)
    looks_local = (text.startswith((".", "/", "~")) or Path(text).exists() or text.count("/") != 1
                   or Path(text.split("/")[0]).is_dir())
    if looks_local and not Path(text).expanduser().exists():
        raise KnowstackError(f"{what} not found", path=path)


def load_tokenizer(model_path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_exists(model_path, "model")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    merge_adapter: bool = True,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a HF model dir (or hub id), with a PEFT adapter (or a LoRA-MoE dir) applied on top."""
    check_exists(model_path, "model")
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
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


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path,
               card: ModelCardInfo | None = None) -> Path:
    """Save a full model (safetensors), its tokenizer and its model card atomically."""
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
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
