"""Model merging: each method against a direct computation and PEFT's merge utilities, the streamed
merge of real checkpoints (full models and LoRA adapters), clear errors, the CLI and the study plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import pytest
import torch
from checkpoints import perturbed
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from knowstack.cli import main
from knowstack.combine.merge import merge_models
from knowstack.combine.merges import MERGE_METHOD_OPTIONS, METHODS, MergeOptions, blocks, get_method
from knowstack.config import MergeMethodName, parse_config
from knowstack.errors import KnowstackError
from knowstack.study.plan import build_plan

SHAPE = (48, 40)


def run(name: str, tensors: list[torch.Tensor], weights: list[float], seed: int | None = None,
        **options: float) -> torch.Tensor:
    """A method on copies (methods work in place on what they are given)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return get_method(name).fn([t.clone() for t in tensors], torch.tensor(weights, dtype=torch.float64),
                               MergeOptions(**options), generator)


def random_taus(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=gen) for _ in range(n)]


# --- the methods against direct computation -------------------------------------------------------
def direct_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[torch.argsort(tau.abs().flatten(), descending=True)[:k]] = True
    return tau * keep.view(tau.shape)


def direct_disjoint_mean(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(taus).double()
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * taus[0].dim())
    elected = torch.where((stacked * w).sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == elected).double()
    return ((stacked * w * agree).sum(0) / (w * agree).sum(0).clamp_min(1e-300)).float()


def direct_dare(taus: list[torch.Tensor], p: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [t * torch.bernoulli(torch.full_like(t, 1 - p), generator=gen) / (1 - p) for t in taus]


def test_registry_matches_the_config_schema() -> None:
    assert list(METHODS) == list(get_args(MergeMethodName)) == list(MERGE_METHOD_OPTIONS)
    for name, method in METHODS.items():
        assert ("seed" in MERGE_METHOD_OPTIONS[name]) == method.random


def test_average_and_task_average_direct() -> None:
    taus, w = random_taus(), [1.0, 2.0, 3.0]
    expected = sum(wi * t.double() for wi, t in zip(w, taus, strict=True)) / 6
    torch.testing.assert_close(run("average", taus, w), expected.float())
    torch.testing.assert_close(run("task-average", taus, w, lam=0.7), (0.7 * expected).float())


def test_ties_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    taus, w = random_taus(4), [1.0, 0.5, 2.0, 1.0]
    expected = 1.3 * direct_disjoint_mean([direct_trim(t, 0.3) for t in taus], w)
    torch.testing.assert_close(run("ties", taus, w, density=0.3, lam=1.3), expected)
    monkeypatch.setattr(blocks, "CHUNK", 7)  # slices that do not divide the tensor
    torch.testing.assert_close(run("ties", taus, w, density=0.3, lam=1.3), expected)
    kept = run("ties", taus[:1], [1.0], density=0.3)
    assert int((kept != 0).sum()) == int(0.3 * taus[0].numel())  # the top 30% by magnitude, no more


def test_dare_and_ties_dare_direct() -> None:
    taus, w = random_taus(), [1.0, 3.0, 2.0]
    dropped = direct_dare(taus, 0.6, seed=5)
    expected = sum(wi * t.double() for wi, t in zip(w, dropped, strict=True)) / 6
    torch.testing.assert_close(run("dare", taus, w, seed=5, drop_rate=0.6, lam=2.0), (2 * expected).float())
    expected = direct_disjoint_mean(dropped, w)
    torch.testing.assert_close(run("ties-dare", taus, w, seed=5, drop_rate=0.6), expected)
    assert not torch.equal(run("dare", taus, w, seed=6, drop_rate=0.6), run("dare", taus, w, seed=5, drop_rate=0.6))


def test_sign_election_edge_cases() -> None:
    a = torch.tensor([[1.0, -2.0, 0.0]])
    merged = run("ties", [a, -a], [1.0, 1.0], density=1.0)
    assert torch.equal(merged, torch.tensor([[1.0, 2.0, 0.0]]))  # a mass of exactly 0 elects +; none agree: 0
    assert torch.equal(run("ties", [a, torch.zeros_like(a)], [1.0, 1.0], density=1.0), a)  # zeros don't vote


# --- the methods against PEFT's merge utilities (equal weights: the semantics match) ----------------
def test_ties_matches_peft() -> None:
    taus = random_taus(3, seed=1)
    peft = merge_utils.ties([t.clone() for t in taus], torch.ones(3), density=0.4, majority_sign_method="total")
    torch.testing.assert_close(run("ties", taus, [1.0] * 3, density=0.4), peft)


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_dare_matches_peft(density: float) -> None:
    taus = random_taus(3, seed=2)
    torch.manual_seed(11)  # PEFT draws from the global generator, in the same order
    peft_linear = merge_utils.dare_linear([t.clone() for t in taus], torch.full((3,), 1 / 3), density=density)
    torch.manual_seed(11)
    peft_ties = merge_utils.dare_ties([t.clone() for t in taus], torch.ones(3), density=density)
    ours_linear = run("dare", taus, [1.0] * 3, seed=11, drop_rate=1 - density)
    ours_ties = run("ties-dare", taus, [1.0] * 3, seed=11, drop_rate=1 - density)
    torch.testing.assert_close(ours_linear, peft_linear)
    torch.testing.assert_close(ours_ties, peft_ties)


# --- streamed merges of real checkpoints ----------------------------------------------------------
def merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / shard), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    assert set(tensors) == set(index["weight_map"])
    return tensors


@pytest.fixture(scope="module")
def finetunes(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("finetunes")
    return [perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.02) for i in range(3)]


def test_streamed_merge_loads_and_equals_direct(tiny_model_dir: Path, finetunes: list[Path], tmp_path: Path) -> None:
    out = merge_models("ties", finetunes, tmp_path / "ties", base=tiny_model_dir, weights=[1, 2, 1],
                       options=MergeOptions(density=0.5, lam=0.9), max_shard_bytes=150_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert (out / "tokenizer.json").is_file() and json.loads((out / "merge.json").read_text())["method"] == "ties"
    base = load_file(tiny_model_dir / "model.safetensors")
    models = [load_file(m / "model.safetensors") for m in finetunes]
    got = merged_tensors(out)
    for name, b in base.items():
        taus = [direct_trim(m[name] - b, 0.5) for m in models]
        torch.testing.assert_close(got[name], b + 0.9 * direct_disjoint_mean(taus, [1, 2, 1]))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, LlamaForCausalLM)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight.data, got["model.layers.1.mlp.down_proj.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


# (the methods that read statistics of each model's data: tests/test_statistics_merges.py)
@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].min_models == 1 and not METHODS[m].statistics))
def test_merging_one_model_gives_that_model(method: str, tiny_model_dir: Path, finetunes: list[Path],
                                            tmp_path: Path) -> None:
    out = merge_models(method, finetunes[:1], tmp_path / method, base=tiny_model_dir,
                       options=MergeOptions(density=1.0, drop_rate=0.0))
    expected = load_file(finetunes[0] / "model.safetensors")
    for name, tensor in merged_tensors(out).items():
        # theta - base + base: exact for the plain average, one rounding away for the others
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6 if METHODS[method].uses_base else 0)


def test_average_of_identical_models_is_the_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = merge_models("average", [tiny_model_dir] * 3, tmp_path / "avg")  # no base needed
    expected = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in merged_tensors(out).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=0)


def make_adapter(model_dir: Path, out: Path, seed: int, **config: object) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                "init_lora_weights": False, **config}  # random B: a delta that is not zero
    peft_model = get_peft_model(model, LoraConfig(**settings))
    peft_model.save_pretrained(out)
    return out


def peft_merged(model_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter))
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_lora_delta_average_matches_peft_merge_and_unload(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = make_adapter(tiny_model_dir, tmp_path / "a1", seed=1)
    rs = make_adapter(tiny_model_dir, tmp_path / "a2", seed=2, use_rslora=True, alpha_pattern={"down_proj": 2})
    for adapter in (plain, rs):
        got = merged_tensors(merge_models("average", [adapter], tmp_path / f"m-{adapter.name}", base=tiny_model_dir))
        for name, tensor in peft_merged(tiny_model_dir, adapter).items():
            if name in got:  # lm_head is tied/untied per config; compare what both hold
                torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)
    base = load_file(tiny_model_dir / "model.safetensors")
    one, two = peft_merged(tiny_model_dir, plain), peft_merged(tiny_model_dir, rs)
    got = merged_tensors(merge_models("task-average", [plain, rs], tmp_path / "both", base=tiny_model_dir,
                                      weights=[3, 1], options=MergeOptions(lam=2.0)))
    for name, b in base.items():
        expected = b + 2.0 * (3 * (one[name] - b) + (two[name] - b)) / 4
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)


def test_linear_lora_merges_are_also_an_exact_peft_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = make_adapter(tiny_model_dir, tmp_path / "a1", seed=1)
    rs = make_adapter(tiny_model_dir, tmp_path / "a2", seed=2, use_rslora=True, alpha_pattern={"down_proj": 2})
    other = make_adapter(tiny_model_dir, tmp_path / "a3", seed=3, r=2, target_modules=["k_proj", "q_proj"])
    out = merge_models("task-average", [plain, rs, other], tmp_path / "merged", base=tiny_model_dir,
                       weights=[3, 1, 2], options=MergeOptions(lam=1.5))
    assert json.loads((out / "merge.json").read_text())["adapter"] == "adapter"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # q_proj is in all three (4 + 4 + 2), v_proj and down_proj in two (8), k_proj in one (2)
    assert config["r"] == 8 and config["rank_pattern"] == {
        name: 10 if "q_proj" in name else 2 for name in config["target_modules"] if "q_proj" in name or "k_proj" in name}
    via_adapter = peft_merged(tiny_model_dir, out / "adapter")
    full = merged_tensors(out)
    for name, tensor in full.items():
        torch.testing.assert_close(via_adapter[name], tensor, rtol=0, atol=1e-5)
    ties = merge_models("ties", [plain, rs], tmp_path / "ties", base=tiny_model_dir)
    assert not (ties / "adapter").exists() and json.loads((ties / "merge.json").read_text())["adapter"] is None


def test_same_merge_same_bits(tiny_model_dir: Path, finetunes: list[Path], tmp_path: Path) -> None:
    kwargs = {"base": tiny_model_dir, "options": MergeOptions(drop_rate=0.5), "seed": 3}
    a = merged_tensors(merge_models("ties-dare", finetunes, tmp_path / "a", **kwargs))
    b = merged_tensors(merge_models("ties-dare", finetunes, tmp_path / "b", max_shard_bytes=100_000, **kwargs))
    c = merged_tensors(merge_models("ties-dare", finetunes, tmp_path / "c", **{**kwargs, "seed": 4}))
    assert all(torch.equal(a[k], b[k]) for k in a)  # sharding does not change the draws
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- clear errors ---------------------------------------------------------------------------------
def expect_error(match: str, out: Path, *args: object, **kwargs: object) -> None:
    with pytest.raises(KnowstackError, match=match):
        merge_models(*args, out, **kwargs)  # type: ignore[misc]
    assert not out.exists()


def test_bad_inputs_are_clear_errors(tiny_model_dir: Path, finetunes: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = tmp_path / "other"
    shutil.copytree(finetunes[0], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_parameters": {**config["rope_parameters"],
                                                                                  "rope_theta": 5.0}}))
    expect_error("field 'rope_parameters'.*'rope_theta': 5.0", out, "ties", [finetunes[1], other], base=tiny_model_dir)

    missing = perturbed(tiny_model_dir, tmp_path / "missing", seed=9, scale=0.02)
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, missing / "model.safetensors")
    expect_error("missing tensor 'model.layers.0.mlp.up_proj.weight'", out, "average", [finetunes[0], missing])

    tensors = load_file(finetunes[0] / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    shutil.copytree(finetunes[0], tmp_path / "reshaped")
    save_file(tensors, tmp_path / "reshaped" / "model.safetensors")
    expect_error("'model.norm.weight' has shape", out, "ties", [tmp_path / "reshaped"], base=tiny_model_dir)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    expect_error("never unpickles", out, "average", [pickled])

    expect_error("needs the base", out, "ties", finetunes)
    expect_error("3 weights for 2 models", out, "average", finetunes[:2], weights=[1, 2, 3])
    expect_error("unknown merge method 'nuslerp'", out, "nuslerp", finetunes)
    expect_error("'slerp' merges exactly 2 models, got 3", out, "slerp", finetunes)
    expect_error("'model-stock' reads no per-model weights", out, "model-stock", finetunes, base=tiny_model_dir,
                 weights=[1, 2, 1])
    expect_error("density \\+- epsilon", out, "della", finetunes, base=tiny_model_dir,
                 options=MergeOptions(density=0.1, epsilon=0.15))
    expect_error("not found", out, "average", [tmp_path / "nowhere"])
    with pytest.raises(KnowstackError, match="output dir is one of the inputs"):
        merge_models("ties", finetunes, tiny_model_dir, base=tiny_model_dir)
    with pytest.raises(KnowstackError, match="density"):
        MergeOptions(density=0)


def test_adapter_of_another_base_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    other_base = tmp_path / "other-base"
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    config.intermediate_size = 96
    LlamaForCausalLM(config).save_pretrained(other_base)
    adapter = make_adapter(other_base, tmp_path / "adapter", seed=0)
    expect_error("the base is not this adapter's base", tmp_path / "out", "average", [adapter], base=tiny_model_dir)
    expect_error("LoRA adapters.*needs the base", tmp_path / "out", "average", [adapter])


# --- the CLI --------------------------------------------------------------------------------------
def test_cli_merge(tiny_model_dir: Path, finetunes: list[Path], tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["merge", "--method", "ties-dare", "--base", str(tiny_model_dir), "--models", *map(str, finetunes),
            "--weights", "1", "1", "2", "--drop-rate", "0.3", "--lambda", "0.5", "--seed", "7", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["drop_rate"] == 0.3 and record["lambda"] == 0.5 and record["seed"] == 7
    assert record["weights"] == [1, 1, 2]
    capsys.readouterr()
    assert main(["merge", "--method", "ties", "--models", str(finetunes[0]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "needs the base model (--base)" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


# --- the study: config, plan, executor ------------------------------------------------------------
def study_config(tmp_path: Path, base: Path, merge: dict) -> dict:
    tasks = []
    for name in ("t1", "t2"):
        (tmp_path / name).mkdir()
        for split in ("train", "test"):
            (tmp_path / name / f"{split}.json").write_text(json.dumps([{"prompt": f"{name}?", "answer": " a"}]))
        tasks.append({"name": name, "path": str(tmp_path / name), "metric": "accuracy"})
    return {"name": "m", "base": {"model": str(base)}, "tasks": tasks, "old_knowledge": {"tasks": ["ks_x"]},
            "training": {"lr": 1e-4}, "methods": {"one-round": {"finetune": ["fft", "lora"]}, "merge": merge}}


def test_merge_config_is_validated(tmp_path: Path, tiny_model_dir: Path) -> None:
    raw = study_config(tmp_path, tiny_model_dir, {"methods": ["ties", "nuslerp"]})
    with pytest.raises(KnowstackError, match=r"field 'methods\.merge\.methods\[1\]'"):
        parse_config(raw)
    raw["methods"]["merge"] = {"density": 1.5}
    with pytest.raises(KnowstackError, match=r"field 'methods\.merge\.density'"):
        parse_config(raw)
    raw["methods"]["merge"] = {"lambda": 0.5, "methods": ["ties"]}
    assert parse_config(raw).methods.merge.lam == 0.5


def test_plan_merges_share_the_one_round_train_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    merge = {"finetune": ["fft", "lora"], "methods": ["average", "ties", "ties-dare"], "density": 0.3}
    raw = study_config(tmp_path, tiny_model_dir, merge)
    plan = build_plan(parse_config(raw))
    kinds = [s.kind for s in plan.ordered()]
    assert kinds.count("train") == 4 and kinds.count("merge") == 6  # 2 tasks x 2 finetunes, trained once
    by_name = {e.model: e for e in plan.evaluations}
    assert by_name["merge-ties-lora"].method == "merge" and by_name["merge-average-fft"].finetune == "fft"
    eval_step = plan.steps[by_name["merge-ties-fft"].step]
    merge_step = plan.steps[eval_step.deps[0]]
    one_round = {plan.steps[by_name[f"one-round-fft-{t}"].step].deps[0] for t in ("t1", "t2")}
    assert merge_step.kind == "merge" and set(merge_step.deps) == one_round
    assert merge_step.params["options"] == {"density": 0.3, "lambda": 1.0}
    # a setting a method does not read does not change (and so redo) it
    merge["drop_rate"] = 0.5
    again = {e.model: e.step for e in build_plan(parse_config(raw)).evaluations}
    assert again["merge-average-fft"] == by_name["merge-average-fft"].step
    assert again["merge-ties-dare-fft"] != by_name["merge-ties-dare-fft"].step


def test_merge_step_runs_on_one_round_artifacts(tmp_path: Path, tiny_model_dir: Path, finetunes: list[Path]) -> None:
    from knowstack.study.steps import StudyContext, execute

    merge = {"finetune": ["fft", "lora"], "methods": ["ties"], "density": 0.5}
    config = parse_config(study_config(tmp_path, tiny_model_dir, merge))
    plan = build_plan(config)
    ctx = StudyContext(out=tmp_path / "study", config=config)
    trains = [s for s in plan.ordered() if s.kind == "train"]
    for i, step in enumerate(trains):  # stand-ins for the trained one-round models and adapters
        if step.params["finetune"] == "fft":
            shutil.copytree(finetunes[i % 2], ctx.artifact(step.key))
        else:
            make_adapter(tiny_model_dir, ctx.artifact(step.key), seed=i)
    for step in (s for s in plan.ordered() if s.kind == "merge"):
        out = execute(step, ctx)
        assert (out / "step.json").is_file() and (out / "model.safetensors.index.json").is_file()
        model = AutoModelForCausalLM.from_pretrained(out)
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_report_has_a_merge_section() -> None:
    from knowstack.report.build import render_report
    from knowstack.results import Row

    def rows(model: str, method: str, finetune: str, trained_on: str, a: float, b: float, old: float) -> list[Row]:
        common = {"model": model, "method": method, "finetune": finetune, "stage": None, "trained_on": trained_on}
        return [Row(task="a", kind="new", metric="accuracy", value=a, n=4, **common),
                Row(task="b", kind="new", metric="rouge_l", value=b, n=4, **common),
                Row(task="ks_x", kind="old", metric="acc", value=old, n=None, **common)]

    text = render_report(rows("base", "base", "", "", 0.2, 0.4, 0.8)
                         + rows("one-round-lora-a", "one-round", "lora", "a", 0.6, 0.4, 0.7)
                         + rows("one-round-lora-b", "one-round", "lora", "b", 0.2, 0.8, 0.5)
                         + rows("merge-ties-lora", "merge", "lora", "a+b", 0.3, 0.6, 0.8), title="t", task_order=["a", "b"])
    section = text[text.index("## Semi-cooperative"):]
    # ties-lora: AVE 0.8 (+0%), AVnew 0.45 (+50% from 0.3), AVall 0.5667 (+21%); per task +50%, +50%, +0%
    assert "| merge TIES LoRA | 0.8000 | 0.4500 | 0.5667 |" in section
    assert "| merge TIES LoRA: gain from base | +0% | +50% | +21% |" in section
    assert "| merge TIES LoRA: gain from base | +50% | +50% | +50% |" in section  # Fig. 9: a, b, AVnew
    assert "| merge TIES LoRA: gain from base | +0% | +0% |" in section  # Fig. 10: ks_x, AVE
    # one-round reference: own model per task (0.6, 0.8), old averaged over them (0.6)
    assert "| one-round LoRA | 0.6000 | 0.7000 | 0.6667 |" in section
    assert "| one-round LoRA: gain from base | -25% | +133% |" in section