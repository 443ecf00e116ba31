"""Training: answer-only labels, packing without cross-contamination, FFT/LoRA runs, merge, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer
from safetensors.torch import load_file
from tokenizers import processors
from transformers import AutoModelForCausalLM

from knowstack.data.batches import IGNORE, batch_order, count_steps, pack, pad, tokenize_examples
from knowstack.data.formats import Example
from knowstack.errors import KnowstackError
from knowstack.modeling import attention
from knowstack.modeling.loss import answer_loss_sum
from knowstack.modelio import load_model, load_tokenizer
from knowstack.train import SUMMARY_FILE, TrainSettings, merge_adapter, train

EXAMPLES = [
    Example(f"Question: what is {i} plus {i + 1}? Answer:", f" {2 * i + 1}. The answer is: {2 * i + 1}")
    for i in range(24)
] + [Example("The official currency of Japan is", " the yen."), Example("def add(a, b):\n", "    return a + b\n")]

FAST = {"lr": 1e-3, "batch_size": 8, "micro_batch_size": 4, "max_length": 64}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(path).glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def _mean_answer_loss(model: torch.nn.Module, tokenizer, examples: list[Example]) -> float:
    tokenized = tokenize_examples(tokenizer, examples, 64)
    with torch.no_grad():
        total = answer_loss_sum(model.eval(), pack(tokenized))
    return float(total) / sum(ex.answer_tokens for ex in tokenized)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def fft_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fft"
    train(tiny_model_dir, EXAMPLES, out, TrainSettings(finetune="fft", epochs=4, **FAST))
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lora"
    train(tiny_model_dir, EXAMPLES, out, TrainSettings(finetune="lora", epochs=2, lora_dropout=0.0, **FAST))
    return out


# --- tokenization and batches ----------------------------------------------------------------------
def test_labels_cover_answer_and_eos_only(tokenizer) -> None:
    example = EXAMPLES[3]
    [tokenized] = tokenize_examples(tokenizer, [example], 512)
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    # The boundary is exact: prompt ids, then answer ids, then eos (this tokenizer adds no bos).
    assert list(tokenized.input_ids) == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert list(tokenized.labels) == [IGNORE] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert tokenized.answer_tokens == len(answer_ids) + 1


def test_bos_added_when_the_tokenizer_adds_one() -> None:
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tokenizer.bos_token_id)]
    )
    [tokenized] = tokenize_examples(tokenizer, [EXAMPLES[0]], 512)
    assert tokenized.input_ids[0] == tokenizer.bos_token_id
    assert tokenized.input_ids.count(tokenizer.bos_token_id) == 1  # not again before the answer
    assert tokenized.labels[0] == IGNORE


def test_an_overlong_prompt_loses_its_middle_not_its_answer(tokenizer) -> None:
    answer_ids = tokenizer(EXAMPLES[0].answer, add_special_tokens=False)["input_ids"]
    limit = len(answer_ids) + 4  # tests/test_truncation.py has the details
    [tokenized] = tokenize_examples(tokenizer, [EXAMPLES[0]], limit)
    assert len(tokenized) == limit and tokenized.answer_tokens == len(answer_ids) + 1


def test_packed_logits_and_loss_equal_per_example(tiny_model_dir: Path, tokenizer) -> None:
    model = load_model(tiny_model_dir, dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    tokenized = tokenize_examples(tokenizer, EXAMPLES[:5], 64)
    packed = pack(tokenized)
    assert "attention_mask" not in packed
    with torch.no_grad():
        flat = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([ex.input_ids])).logits[0] for ex in tokenized]
        torch.testing.assert_close(flat, torch.cat(alone), rtol=1e-5, atol=1e-5)
        per_example = sum(float(answer_loss_sum(model, pack([ex]))) for ex in tokenized)
        assert float(answer_loss_sum(model, packed)) == pytest.approx(per_example, rel=1e-5)
        padded = answer_loss_sum(model, pad(tokenized, tokenizer.pad_token_id))
        assert float(padded) == pytest.approx(per_example, rel=1e-5)
        # knowstack's per-example attention for packed rows gives the same logits without the mask.
        model.set_attn_implementation(attention.NAME)
        segmented = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False)
        torch.testing.assert_close(segmented.logits[0], torch.cat(alone), rtol=1e-5, atol=1e-5)
        model.set_attn_implementation("sdpa")
        # Control: the same row with positions that do not restart lets examples see each other.
        leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        assert abs(float(answer_loss_sum(model, leaky)) - per_example) > 1e-2


def test_batch_order_is_seeded_and_counts_steps() -> None:
    assert batch_order(10, 4, 2, None, seed=1) == batch_order(10, 4, 2, None, seed=1)
    assert batch_order(10, 4, 2, None, seed=1) != batch_order(10, 4, 2, None, seed=2)
    plan = batch_order(10, 4, 2, None, seed=0)
    assert len(plan) == count_steps(10, 4, 2, None) == 5 and [len(b) for b in plan] == [4, 4, 4, 4, 4]
    first, second = sum(plan, [])[:10], sum(plan, [])[10:]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second  # reshuffled per epoch
    assert len(batch_order(10, 4, 1, None, seed=0)) == 3  # ceil(10 / 4), last batch smaller
    assert len(batch_order(10, 4, 1, 7, seed=0)) == 7  # max_steps wins


def test_settings_validate_and_round_trip() -> None:
    settings = TrainSettings(finetune="lora", lr=1e-4, target_modules=["q_proj", "v_proj"])
    assert settings.target_modules == ("q_proj", "v_proj")
    assert TrainSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    with pytest.raises(KnowstackError, match="finetune"):
        TrainSettings(finetune="qlora")
    with pytest.raises(KnowstackError, match="schedule"):
        TrainSettings(schedule="step")


# --- runs ------------------------------------------------------------------------------------------
def test_fft_writes_a_trained_full_model(fft_run: Path, tiny_model_dir: Path, tokenizer) -> None:
    summary = json.loads((fft_run / SUMMARY_FILE).read_text())
    assert summary["steps"] == 13 and summary["examples"] == 4 * len(EXAMPLES)
    assert len(summary["loss_curve"]) == 13 and summary["tokens_per_second"] > 0
    assert summary["answer_tokens"] < summary["total_tokens"]
    before, after = _weights(tiny_model_dir), _weights(fft_run)
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    trained = AutoModelForCausalLM.from_pretrained(fft_run)
    base = load_model(tiny_model_dir, dtype=torch.float32)
    assert _mean_answer_loss(trained, tokenizer, EXAMPLES) < _mean_answer_loss(base, tokenizer, EXAMPLES) - 0.5
    assert (fft_run / "tokenizer_config.json").is_file()
    assert attention.NAME not in (fft_run / "config.json").read_text()  # training-only attention not saved
    assert trained.config._attn_implementation == "sdpa"


def test_lora_writes_an_adapter_and_leaves_the_base(lora_run: Path, tiny_model_dir: Path, tokenizer) -> None:
    from peft import PeftModel

    assert {"adapter_model.safetensors", "adapter_config.json", SUMMARY_FILE} <= {p.name for p in lora_run.iterdir()}
    assert not (lora_run / "model.safetensors").exists()
    adapter = load_file(str(lora_run / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    base_weights = _weights(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype=torch.float32), str(lora_run))
    for name, value in peft_model.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if key in base_weights:
            assert torch.equal(value, base_weights[key]), key
    base = load_model(tiny_model_dir, dtype=torch.float32)
    assert _mean_answer_loss(peft_model, tokenizer, EXAMPLES) < _mean_answer_loss(base, tokenizer, EXAMPLES)


def test_merged_adapter_gives_base_plus_adapter_logits(lora_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    merged_dir = merge_adapter(tiny_model_dir, lora_run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    stacked = PeftModel.from_pretrained(load_model(tiny_model_dir, dtype=torch.float32), str(lora_run)).eval()
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, stacked(ids).logits, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in _weights(merged_dir))


@pytest.mark.parametrize("finetune", ["fft", "lora"])
def test_same_seed_gives_identical_weights(finetune: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = TrainSettings(finetune=finetune, max_steps=3, **FAST)
    train(tiny_model_dir, EXAMPLES, tmp_path / "a", settings)
    train(tiny_model_dir, EXAMPLES, tmp_path / "b", settings)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(tiny_model_dir, EXAMPLES, tmp_path / "c", TrainSettings(finetune=finetune, max_steps=3, seed=1, **FAST))
    c = _weights(tmp_path / "c")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_accumulation_and_packing_do_not_change_the_update(tiny_model_dir: Path, tmp_path: Path) -> None:
    common = {"finetune": "fft", "lr": 1e-3, "batch_size": 16, "max_steps": 2, "max_length": 64}
    runs = {
        "16x1": TrainSettings(micro_batch_size=16, **common),
        "4x4": TrainSettings(micro_batch_size=4, **common),
        "4x4-padded": TrainSettings(micro_batch_size=4, pack=False, **common),
    }
    weights = {}
    for name, settings in runs.items():
        summary = train(tiny_model_dir, EXAMPLES, tmp_path / name, settings)
        weights[name] = (_weights(tmp_path / name), summary["loss_curve"])
    reference, ref_curve = weights["16x1"]
    for name in ("4x4", "4x4-padded"):
        other, curve = weights[name]
        assert curve == pytest.approx(ref_curve, rel=1e-5)
        # Adam divides by sqrt(v): where a gradient is tiny, float noise in it moves the update a
        # little, so the bound is 1% of one step's size (lr), not bitwise.
        for key in reference:
            torch.testing.assert_close(other[key], reference[key], rtol=0, atol=1e-5, msg=f"{name}: {key}")


def test_extra_loss_hook_is_added_and_recorded(tiny_model_dir: Path, tmp_path: Path) -> None:
    calls = []

    def shrink_lora_a(model: torch.nn.Module) -> torch.Tensor:
        calls.append(1)
        return sum(p.pow(2).sum() for n, p in model.named_parameters() if "lora_A" in n)

    settings = TrainSettings(finetune="lora", max_steps=3, **FAST)
    plain = train(tiny_model_dir, EXAMPLES, tmp_path / "plain", settings)
    hooked = train(tiny_model_dir, EXAMPLES, tmp_path / "hooked", settings, extra_loss=shrink_lora_a)
    assert len(calls) == 3 and len(hooked["extra_loss_curve"]) == 3 and "extra_loss_curve" not in plain
    assert hooked["extra_loss_curve"][-1] < hooked["extra_loss_curve"][0]


def test_lora_continues_from_an_adapter(lora_run: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = TrainSettings(finetune="lora", max_steps=1, **FAST)
    summary = train(tiny_model_dir, EXAMPLES, tmp_path / "more", settings, adapter_init=lora_run)
    assert summary["adapter_init"] == str(lora_run)
    start, end = load_file(str(lora_run / "adapter_model.safetensors")), _weights(tmp_path / "more")
    assert start.keys() == end.keys() and not all(torch.equal(start[k], end[k]) for k in start)


def test_no_examples_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KnowstackError, match="no training examples"):
        train(tiny_model_dir, [], tmp_path / "x", TrainSettings())


def test_segment_attention_gradients_are_the_per_slice_ones_bit_for_bit() -> None:
    # attention.py splits the row instead of slicing it per segment (a faster backward); the numbers must be
    # exactly those of one causal SDPA per sliced segment, forward and backward, so trained weights do not move.
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 17, 1, 9, 30]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    shape = (1, 2, sum(lengths), 8)  # batch, heads, tokens, head dim
    tensors = [torch.randn(shape, generator=generator) for _ in range(3)]
    upstream = torch.randn(1, sum(lengths), 2, 8, generator=generator)
    module = torch.nn.Module()
    module.num_key_value_groups = 1

    def grads(attend) -> list[torch.Tensor]:
        q, k, v = (t.clone().requires_grad_(True) for t in tensors)
        out = attend(q, k, v)
        out.backward(upstream)
        return [out.detach(), q.grad, k.grad, v.grad]

    def per_slice(q, k, v):
        bounds = attention.segment_bounds(position_ids)
        parts = [torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                                  is_causal=True) for s, e in bounds]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous()

    ours = grads(lambda q, k, v: attention.segment_attention_forward(module, q, k, v, None,
                                                                     position_ids=position_ids)[0])
    reference = grads(per_slice)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
