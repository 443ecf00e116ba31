"""Tiny random checkpoints of the model families users bring, saved as the Hub saves them (a helper module, not
collected as tests).

Each family is built from its own transformers config class with the dimensions shrunk and every quirk kept
(RoPE scaling, tied embeddings, attention biases, q/k norms, sliding windows, soft-capping, fused projections,
post-norms), in bfloat16, as sharded safetensors with an index, with a real small BPE tokenizer, a chat
template and a generation_config beside the weights.

    build_family("qwen3", out_dir)         # one checkpoint
    FAMILIES                               # the names, in a stable order
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

TEXT = (
    "def add(a, b):\n    return a + b\n"
    "The official currency of Japan is the yen. France is in Europe. Le Japon est en Asie. "
    "Question: what is 3 plus 4? Answer: 7. The answer is: 7\n"
    "Below is an instruction that describes a task. ### Instruction: ### Response:\n"
    "<|user|> hello <|assistant|> hi there. Summarize the meeting notes: the council approved the budget.\n"
) * 20

# Shrunk dimensions shared by every family (each family keeps its own quirks on top).
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 64, 2, 4, 2, 16, 128
SHARD = "60KB"  # small enough that every tiny checkpoint is several shards with an index

# A ChatML-like template: every family ships one; its exact text is what compatibility checks hash.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")

# model_type and the config fields that make each family what it is (besides the shrunk dimensions).
SPECS: dict[str, dict[str, Any]] = {
    # Llama 3.1: RoPE scaled the llama3 way, untied.
    "llama3.1": {"model_type": "llama", "tie_word_embeddings": False,
                 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}},
    # Llama 3.2 (1B/3B): the same RoPE scaling and tied embeddings.
    "llama3.2": {"model_type": "llama", "tie_word_embeddings": True,
                 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64}},
    # Mistral: a sliding window (short here, so that it acts on the tests' sequences).
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False, "sliding_window": 16},
    # Qwen2/2.5: attention biases (q, k, v), tied in the small sizes.
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
    # Qwen3: q/k RMS norms, an explicit head_dim, tied in the small sizes.
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True},
    # Gemma 2: GeGLU, attention and final logit soft-capping, alternating sliding windows, scaled embeddings,
    # pre- and post-norms, tied.
    "gemma2": {"model_type": "gemma2", "tie_word_embeddings": True, "sliding_window": 16,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16},
    # Gemma 3 (text): q/k norms, local and global RoPE, a sliding pattern, tied.
    "gemma3": {"model_type": "gemma3_text", "tie_word_embeddings": True, "sliding_window": 16,
               "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "full_attention"]},
    # Phi-3: fused qkv_proj and gate_up_proj, untied.
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False},
    # OLMo-2: post-norms (after attention and MLP), q/k norms over the whole projection, untied.
    "olmo2": {"model_type": "olmo2", "tie_word_embeddings": False},
}
FAMILIES = tuple(SPECS)
TIED = tuple(name for name, spec in SPECS.items() if spec["tie_word_embeddings"])


def build_tokenizer(family: str, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE with bos/eos/pad, adding bos as Llama 3 and Gemma do, and a chat template."""
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                        pad_token="<|pad|>", model_max_length=2048)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def family_tokenizer(family: str, out: Path) -> Any:
    """The tokenizer as the family's own tokenizer class loads and saves it (a Qwen2 dir's tokenizer becomes a
    Qwen2Tokenizer, which adds its <|endoftext|>), as a Hub checkpoint's is: saved once more by any tool, its files
    stay the same."""
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    built = build_tokenizer(family)
    built.save_pretrained(out)
    family_config(family, len(built)).save_pretrained(out)  # AutoTokenizer picks the class from config.json's model_type
    return AutoTokenizer.from_pretrained(out)


def family_config(family: str, vocab_size: int) -> Any:
    spec = dict(SPECS[family])
    model_type = spec.pop("model_type")
    fields: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }
    if model_type != "phi3":  # Phi-3's head size is hidden / heads, nothing else
        fields["head_dim"] = HEAD_DIM
    fields.update(spec)
    return AutoConfig.for_model(model_type, **fields)


def build_family(family: str, out: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random-initialised checkpoint of `family` saved to `out` as the Hub saves one: `dtype` weights in
    sharded safetensors with model.safetensors.index.json, config.json, generation_config.json, tokenizer files
    and its chat template."""
    out = Path(out)
    tokenizer = family_tokenizer(family, out)
    config = family_config(family, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights of a trained model's size, so that logits and merges are not degenerate
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.08)
            elif "norm" in name and family.startswith("gemma"):
                param.normal_(0.0, 0.1)  # Gemma's norms scale by (1 + w)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.02)
    model = model.to(dtype)
    model.save_pretrained(out, max_shard_size=SHARD)
    tokenizer.save_pretrained(out)
    return out
