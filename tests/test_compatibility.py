"""Compatibility before combining (combine/compatibility.py): merge, mix (FFT-MoE and LoRA-MoE), contribute and compose
check every input against the base before any tensor is read, name each input's first difference (the file, its value
there and the base's), list every input's at once, exit 2 from the CLI with nothing written; and inputs that can be
combined still are, a Hub-saved base with its fine-tune saved by knowstack's trainer included.

The checkpoints are tiny random ones of tests/families.py, as users have them: the base an untied Llama 3.1 (sharded,
bf16, tokenizer, chat template), the inputs its fine-tunes and adapters saved as the trainer saves them (the tokenizer
beside), each bad one changed in one thing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import SHARD, build_family, family_config
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from test_registry import make_task
from transformers import AutoModelForCausalLM

from knowstack.cli import main
from knowstack.combine.compatibility import ABSENT, compatibility_problems, json_difference
from knowstack.combine.inputs import FullModel, open_input
from knowstack.modeling import streaming
from knowstack.modelio import load_tokenizer
from knowstack.registry import Registry, init_registry

BASE_FAMILY = "llama3.1"  # untied Llama: the family every command works on today, FFT-MoE (Mixtral) included
MERGE_RULE = 10  # the merge rule of the changed tokenizer, swapped with the next one


def finetune(base: Path, out: Path, seed: int) -> Path:
    """A full fine-tune as knowstack's trainer saves one: the weights moved a little, the base's tokenizer loaded
    (pad = eos where it has none) and saved beside them."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(out, max_shard_size=SHARD)  # sharded with an index, as the base
    load_tokenizer(base).save_pretrained(out)
    return out


def adapter(base: Path, out: Path, seed: int, *, tokenizer: bool = True, extra_token: str | None = None) -> Path:
    """A PEFT LoRA adapter of `base` (q_proj, v_proj), with the tokenizer beside it as the trainer saves it, or none
    (as most Hub adapters); extra_token: one token added to that tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    if tokenizer:
        saved = load_tokenizer(base)
        if extra_token is not None:
            saved.add_tokens([extra_token])
        saved.save_pretrained(out)
    return out


def copy_of(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    return out


def with_merge_rules_swapped(source: Path, out: Path) -> Path:
    """The same vocabulary, one merge rule changed: rules MERGE_RULE and MERGE_RULE + 1 trade places."""
    copy_of(source, out)
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    merges[MERGE_RULE], merges[MERGE_RULE + 1] = merges[MERGE_RULE + 1], merges[MERGE_RULE]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def with_template(source: Path, out: Path, template: str) -> Path:
    copy_of(source, out)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / streaming.INDEX_FILE).read_text())["weight_map"][name]


def with_norm_reshaped(source: Path, out: Path) -> Path:
    """model.norm.weight of another length in its shard; config and everything else as they were."""
    copy_of(source, out)
    shard = shard_of(out, "model.norm.weight")
    tensors = load_file(shard)
    tensors["model.norm.weight"] = torch.ones(32, dtype=tensors["model.norm.weight"].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    return out


def with_vocab(source: Path, out: Path, vocab_size: int) -> Path:
    """A model of the base's family and shape with another vocabulary size, the base's tokenizer files beside."""
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(family_config(BASE_FAMILY, vocab_size), dtype=torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(source / name, out / name)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compatibility")
    base = build_family(BASE_FAMILY, root / "base")
    ft1 = finetune(base, root / "ft1", seed=1)
    template = (base / "chat_template.jinja").read_text(encoding="utf-8")
    qwen3 = build_family("qwen3", root / "qwen3")
    return {
        "base": base, "ft1": ft1, "ft2": finetune(base, root / "ft2", seed=2),
        "qwen3": qwen3,
        "vocab": with_vocab(base, root / "vocab", 384),
        "merges": with_merge_rules_swapped(ft1, root / "merges"),
        "template": with_template(ft1, root / "template", template.replace("<|assistant|> ", "<|assistant|>")),
        "shape": with_norm_reshaped(ft1, root / "shape"),
        "a1": adapter(base, root / "a1", seed=1), "a2": adapter(base, root / "a2", seed=2),
        "a-hub": adapter(base, root / "a-hub", seed=3, tokenizer=False),
        "a-token": adapter(base, root / "a-token", seed=4, extra_token="<|tool|>"),
        "a-template": with_template(adapter(base, root / "a-t", seed=5), root / "a-template",
                                    template.replace("m['content']", "m.content")),
        "a-qwen3": adapter(qwen3, root / "a-qwen3", seed=6),
    }


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def problem_lines(err: str, count: int) -> list[str]:
    """The problems the one error lists (one line each), after checking there are `count` and no traceback."""
    assert "Traceback" not in err and err.count("error:") == 1, err
    if count == 1:
        return [err.removeprefix("error: ").strip()]
    assert f"{count} problems with the inputs; nothing was run" in err, err
    return [line.removeprefix("  - ") for line in err.splitlines()[1:]]


def expect(lines: list[str], *parts: str) -> None:
    assert any(all(part in line for part in parts) for line in lines), (parts, lines)


@pytest.fixture()
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor read fails the test: the checks read headers, configs and tokenizer files only."""
    def refuse(self: object, name: str) -> None:
        raise AssertionError(f"tensor '{name}' was read before the inputs were checked")

    monkeypatch.setattr(streaming.SafetensorsReader, "read", refuse)


def test_merge_names_each_inputs_first_difference_before_reading_a_tensor(
        made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_tensor_reads: None) -> None:
    out = tmp_path / "merged"
    inputs = [made[name] for name in ("ft1", "qwen3", "vocab", "merges", "template", "shape", "a-token")]
    code, err = run(["merge", "--method", "ties", "--base", made["base"], "--models", *inputs, "--out", out], capsys)
    assert code == 2, err
    lines = problem_lines(err, 6)
    base = made["base"]
    expect(lines, f"{made['qwen3']}/config.json", "field 'model_type'", "'qwen3' here, 'llama' in the base",
           f"({base}/config.json)", "another architecture")
    expect(lines, f"{made['vocab']}/config.json", "field 'vocab_size'", "384 here,", "in the base", "another vocabulary")
    expect(lines, f"{made['merges']}/tokenizer.json", f"field 'model.merges[{MERGE_RULE}]'", "in the base",
           f"({base}/tokenizer.json)", "another tokenizer")
    expect(lines, f"{made['template']}/chat_template.jinja", "line 2, column", "<|assistant|>{% endif %}' here",
           "<|assistant|> {% endif %}' in the base", "another chat template")
    expect(lines, f"{shard_of(made['shape'], 'model.norm.weight')}", "tensor 'model.norm.weight' has shape [32] here, "
           "[64] in the base", "another network")
    expect(lines, f"{made['a-token']}/tokenizer.json", "field 'added_tokens[", "'<|tool|>'", "nothing in the base",
           "another tokenizer")
    assert not any(str(made["ft1"]) + "/" in line or line.endswith(str(made["ft1"])) for line in lines)
    assert not out.exists()


def test_inputs_that_can_be_combined_are(made: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # fine-tunes and adapters saved by the trainer (tokenizer beside), and a Hub adapter without one
    models = [made["ft1"], made["ft2"], made["a1"], made["a-hub"]]
    code, err = run(["merge", "--method", "ties", "--base", made["base"], "--models", *models,
                     "--out", tmp_path / "merged"], capsys)
    assert code == 0, err
    # without --base, the first model is the reference, and the messages say so
    code, err = run(["merge", "--method", "average", "--models", made["ft1"], made["template"],
                     "--out", tmp_path / "x"], capsys)
    assert code == 2 and "in the first model" in err, err


def hub_saved(source: Path, out: Path) -> Path:
    """`source` as an older transformers saved it on the Hub: config.json with rope_theta + rope_scaling and
    torch_dtype, tokenizer.json with merges as "a b" strings, special_tokens_map.json, tokenizer_config.json with
    added_tokens_decoder and the chat template inside (no chat_template.jinja)."""
    copy_of(source, out)
    config = json.loads((out / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=config.pop("dtype"),
                  transformers_version="4.45.0")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["model"]["merges"] = [" ".join(rule) for rule in tokenizer["model"]["merges"]]
    tokenizer["model"].pop("ignore_merges", None)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, indent=2, ensure_ascii=False), encoding="utf-8")
    template = (out / "chat_template.jinja").read_text(encoding="utf-8")
    (out / "chat_template.jinja").unlink()
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tokenizer["added_tokens"]}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": "<|bos|>", "eos_token": "<|eos|>", "chat_template": template,
        "clean_up_tokenization_spaces": True, "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}))
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<|bos|>", **token},
                                                             "eos_token": {"content": "<|eos|>", **token}}))
    return out


def test_a_hub_saved_base_and_its_finetune_saved_here_are_one_base(made: dict[str, Path], tmp_path: Path) -> None:
    hub = hub_saved(made["base"], tmp_path / "hub")
    tuned = finetune(hub, tmp_path / "tuned", seed=7)  # transformers 5 writes every one of those files otherwise
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hub / name).read_bytes() != (tuned / name).read_bytes()
    assert not (tuned / "special_tokens_map.json").exists() and (tuned / "chat_template.jinja").is_file()
    assert compatibility_problems(FullModel(hub), [FullModel(tuned), open_input(adapter(hub, tmp_path / "a", 8))]) == []
    # and the other way round: what differs is still found through the re-saved files
    changed = with_merge_rules_swapped(tuned, tmp_path / "changed")
    [problem] = compatibility_problems(FullModel(hub), [FullModel(changed)])
    assert problem.path == str(changed / "tokenizer.json") and problem.field == f"model.merges[{MERGE_RULE}]"


def test_mix_fft_checks_every_model_before_building_a_router(made: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "moe"
    code, err = run(["mix", "--base", made["base"], "--models", made["ft1"], made["template"], made["vocab"],
                     "--router", "uniform", "--top-k", "3", "--out", out], capsys)
    assert code == 2, err
    lines = problem_lines(err, 2)
    expect(lines, f"{made['template']}/chat_template.jinja", "another chat template")
    expect(lines, f"{made['vocab']}/config.json", "field 'vocab_size'", "another vocabulary")
    assert not out.exists()
    code, err = run(["mix", "--base", made["base"], "--models", made["ft1"], made["ft2"], "--router", "uniform",
                     "--top-k", "2", "--out", out], capsys)
    assert code == 0 and (out / "config.json").is_file(), err


def test_mix_lora_checks_every_adapter(made: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora-moe"
    code, err = run(["mix", "--base", made["base"], "--models", made["a1"], made["a-token"], made["a-template"],
                     made["a-qwen3"], "--router", "uniform", "--top-k", "4", "--out", out], capsys)
    assert code == 2, err
    lines = problem_lines(err, 3)
    expect(lines, f"{made['a-token']}/tokenizer.json", "'<|tool|>'", "another tokenizer")
    expect(lines, f"{made['a-template']}/chat_template.jinja", "line 1, column", "m.content", "another chat template")
    expect(lines, f"{made['a-qwen3']}/adapter_config.json", "field 'base_model_name_or_path'",
           f"trained from {made['qwen3']}", "model_type: 'qwen3' there, 'llama' in the base",
           "the base is not this adapter's base")
    assert not out.exists()
    code, err = run(["mix", "--base", made["base"], "--models", made["a1"], made["a2"], made["a-hub"],
                     "--router", "uniform", "--top-k", "3", "--out", out], capsys)
    assert code == 0 and (out / "lora_moe.json").is_file(), err


def registry_state(reg: Path) -> tuple[list[str], list[str]]:
    with Registry.open(reg) as opened:
        names = [r["name"] for r in opened.versions()]
    objects = sorted(p.name for p in (reg / "objects").rglob("*") if p.is_file())
    return names, objects


def test_contribute_and_compose_check_against_the_registrys_base(
        made: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "reg"
    init_registry(reg, made["base"])
    task = make_task(tmp_path / "tasks", "Stance", n=2)
    before = registry_state(reg)
    for flag, name, parts in (("--model", "template", ("chat_template.jinja", "another chat template")),
                              ("--model", "vocab", ("config.json", "field 'vocab_size'")),
                              ("--adapter", "a-token", ("tokenizer.json", "'<|tool|>'", "another tokenizer"))):
        code, err = run(["contribute", reg, "--name", name, flag, made[name], "--task", task], capsys)
        assert code == 2, err
        expect(problem_lines(err, 1), f"{made[name]}/{parts[0]}", "in the registry's base", *parts[1:])
        # the base as the user gave it to `registry init`, not the temporary view of its stored copy
        assert "knowstack-view-" not in err and f"registry's base ({made['base'].resolve()}" in err, err
        assert registry_state(reg) == before  # nothing stored, nothing recorded
    assert run(["contribute", reg, "--name", "good", "--model", made["ft1"], "--task", task, "--eval-batch-size", "2"],
               capsys)[0] == 0
    # a registry whose contributions were checked with fewer checks: compose finds what they let through
    from knowstack.registry import contribute as contribute_module

    with monkeypatch.context() as patched:
        patched.setattr(contribute_module, "check_compatible", lambda *args, **kwargs: None)
        assert run(["contribute", reg, "--name", "wide", "--model", made["vocab"], "--task", task,
                    "--eval-batch-size", "2"], capsys)[0] == 0
    before = registry_state(reg)
    code, err = run(["compose", reg, "--method", "merge-average"], capsys)
    assert code == 2, err
    expect(problem_lines(err, 1), "views/wide/config.json", "field 'vocab_size'", "in the registry's base",
           "another vocabulary")
    assert registry_state(reg) == before
    assert not [p for p in (reg / ".compose").iterdir() if p.is_dir()]  # the work dir is gone
    code, err = run(["compose", reg, "--method", "merge-average", "--contributions", "good"], capsys)
    assert code == 0, err


def test_json_difference_names_the_first_place() -> None:
    ours = {"model": {"vocab": {"a": 0, "b c": 1}, "merges": [["a", "b"], ["b", "c"]]}, "added_tokens": [{"id": 0}]}
    assert json_difference(ours, ours) == ("", ours, ours)
    theirs = json.loads(json.dumps(ours))
    theirs["added_tokens"].append({"id": 1})
    assert json_difference(ours, theirs) == ("added_tokens[1]", ABSENT, {"id": 1})
    theirs["model"]["merges"][1] = ["c", "b"]  # a merge rule is shown whole; our keys' order comes first
    assert json_difference(ours, theirs) == ("model.merges[1]", ["b", "c"], ["c", "b"])
    theirs["model"]["vocab"]["b c"] = 2  # a short object of scalars too
    assert json_difference(ours, theirs) == ("model.vocab", {"a": 0, "b c": 1}, {"a": 0, "b c": 2})
    vocab = {f"token {i}": i for i in range(40)}  # a long one is taken apart
    assert json_difference({"vocab": vocab}, {"vocab": {**vocab, "token 7": 70}}) == ("vocab['token 7']", 7, 70)
