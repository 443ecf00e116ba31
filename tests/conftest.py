"""Shared fixtures: a tiny random Llama with a real BPE tokenizer, built once per test session.

The tests run on knowstack's kernel path: importing knowstack (below) sets, before torch's first matrix product,
MKL_CBWR=AVX2,STRICT unless it is set (knowstack/kernels.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import knowstack  # noqa: F401  (it sets MKL's mode; MKL reads it at its first product, after any import)
from knowstack.builtin.pretrain import ModelShape, make_model

TEXT = (
    "def add(a, b):\n    return a + b\n"
    "The official currency of Japan is the yen. France is in Europe. "
    "Question: what is 3 plus 4? Answer: 7. The answer is: 7\n"
    "Below is an instruction that describes a task. ### Instruction: ### Response:\n"
) * 20


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """A script of the checkout (benchmarks/*.py, scripts/*.py) as a module, executed afresh and registered in
    sys.modules under `name` (default: the file's stem), where its dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    shape = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, context=256)
    return make_model(tokenizer, shape, seed)


@pytest.fixture(scope="session", autouse=True)
def shared_step_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's shared step cache (study/shared_cache.py): one per session, never the user's (~/.cache), so a
    warm cache there hides no failure here. Studies of one session share it, as studies on one machine do: a test
    that counts the steps a study computes gives that study a cache of its own (`isolated_cache`) or turns it off."""
    root = tmp_path_factory.mktemp("shared-step-cache")
    os.environ["KNOWSTACK_CACHE"] = str(root)  # in os.environ: the CLI's subprocesses inherit it
    return root


@pytest.fixture
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shared step cache of this test's own, empty."""
    root = tmp_path_factory.mktemp("own-step-cache")
    monkeypatch.setenv("KNOWSTACK_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved HF model dir (safetensors + tokenizer) of a random 2-layer Llama."""
    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
