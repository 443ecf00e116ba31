"""RegMean and Fisher merging from contributed statistics: each method against its closed form / formula on
hand-made tensors, the statistics of a tiny model against a direct computation (hooks, autograd), the merge of
models with their statistics end to end (full models and LoRA adapters), and the clear errors of missing or
mismatched statistics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import perturbed
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_merge import merged_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowstack.combine.merge import merge_models
from knowstack.combine.merges import MergeOptions, get_method
from knowstack.combine.statistics import compute_statistics
from knowstack.config import load_config, parse_config
from knowstack.data.batches import tokenize_examples
from knowstack.data.formats import Example, load_trace_split
from knowstack.errors import KnowstackError
from knowstack.registry.compose import ComposeOptions
from knowstack.study.plan import build_plan

EXAMPLES = [Example(prompt=f"Question: what is {a} plus {b}? Answer:", answer=f" {a + b}")
            for a, b in [(3, 4), (1, 2), (2, 5), (4, 4), (6, 1), (7, 3), (5, 8), (9, 2), (2, 2), (8, 6)]]
SPLITS = [EXAMPLES[:6], EXAMPLES[4:]]  # each contributor's own data


def _run(name: str, tensors: list[torch.Tensor], stats: list[torch.Tensor], weights: list[float],
         **options: float) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return get_method(name).fn([t.clone() for t in tensors], w, MergeOptions(**options), None,
                               [s.clone() for s in stats])


# --- the methods on hand-made tensors ------------------------------------------------------------------------
def test_regmean_is_the_least_squares_merge_of_the_stacked_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes, weights = [40, 25, 60], [1.0, 2.0, 0.5]
    inputs = [torch.randn(n, 6, generator=gen, dtype=torch.float64) for n in sizes]
    layers = [torch.randn(4, 6, generator=gen) for _ in sizes]  # out x in, as torch.nn.Linear
    grams = [x.T @ x / len(x) for x in inputs]  # what a merge reads: the mean Gram
    merged = _run("regmean", layers, grams, weights, regmean_alpha=1.0)
    # min_W sum_i w_i / n_i ||X_i W^T - X_i W_i^T||^2, solved directly on the stacked, scaled inputs
    scale = [(w / n) ** 0.5 for w, n in zip(weights, sizes, strict=True)]
    stacked = torch.cat([s * x for s, x in zip(scale, inputs, strict=True)])
    targets = torch.cat([s * x @ layer.double().T for s, x, layer in zip(scale, inputs, layers, strict=True)])
    expected = torch.linalg.lstsq(stacked, targets).solution.T
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)
    # alpha < 1: the same closed form on Grams whose off-diagonal entries are scaled by alpha
    reduced = [0.6 * g + 0.4 * torch.diag(torch.diagonal(g)) for g in grams]
    closed = sum(w * layer.double() @ g for w, layer, g in zip(weights, layers, reduced, strict=True)) @ torch.inverse(
        sum(w * g for w, g in zip(weights, reduced, strict=True)))
    torch.testing.assert_close(_run("regmean", layers, grams, weights, regmean_alpha=0.6).double(), closed,
                               rtol=1e-5, atol=1e-5)
    # alpha = 0: per input feature, the Gram's diagonal weighs each model's column
    diagonal = _run("regmean", layers, grams, weights, regmean_alpha=0.0)
    d = torch.stack([w * torch.diagonal(g) for w, g in zip(weights, grams, strict=True)])
    columns = sum(di * layer.double() for di, layer in zip(d, layers, strict=True)) / d.sum(0)
    torch.testing.assert_close(diagonal.double(), columns, rtol=1e-5, atol=1e-5)


def test_fisher_is_the_fisher_weighted_average_per_entry() -> None:
    gen = torch.Generator().manual_seed(1)
    thetas = [torch.randn(3, 5, generator=gen) for _ in range(3)]
    fishers = [torch.rand(3, 5, generator=gen) for _ in range(3)]
    fishers[0][0, 0] = 0.0  # an entry one model's data never moves
    weights, floor = [1.0, 3.0, 2.0], 1e-3
    merged = _run("fisher", thetas, fishers, weights, fisher_floor=floor)
    for r in range(3):
        for c in range(5):
            num = sum(w * (f[r, c].item() + floor) * t[r, c].item()
                      for w, f, t in zip(weights, fishers, thetas, strict=True))
            den = sum(w * (f[r, c].item() + floor) for w, f in zip(weights, fishers, strict=True))
            assert merged[r, c].item() == pytest.approx(num / den, rel=1e-5, abs=1e-6)
    same = [torch.full((3, 5), 0.7)] * 3
    average = sum(w * t for w, t in zip(weights, thetas, strict=True)) / sum(weights)
    torch.testing.assert_close(_run("fisher", thetas, same, weights), average, rtol=1e-6, atol=1e-6)


# --- the statistics of a tiny model against a direct computation ---------------------------------------------
def _tokenized(model_dir: Path, examples: list[Example]) -> list:
    return tokenize_examples(AutoTokenizer.from_pretrained(model_dir), examples, 64)


def test_gram_statistics_equal_hooks_on_a_direct_forward(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = compute_statistics(tiny_model_dir, EXAMPLES, tmp_path / "stats", kinds=["gram"], max_examples=4,
                             max_length=64)
    record = json.loads((out / "statistics.json").read_text())
    grams = load_file(out / "gram.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenized = _tokenized(tiny_model_dir, EXAMPLES[:4])
    direct: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            def keep(_m, inputs, _o, name=name):  # one example at a time: no padding to leave out
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                direct[f"{name}.weight"] = direct.get(f"{name}.weight", 0) + x.T @ x
            module.register_forward_hook(keep)
    with torch.no_grad():
        for ex in tokenized:
            model(input_ids=torch.tensor([ex.input_ids]))
    assert set(grams) == set(direct) and len(grams) == 2 * 7 + 1  # every linear layer and the output layer
    for name, gram in grams.items():
        torch.testing.assert_close(gram.double(), direct[name], rtol=1e-4, atol=1e-3)
    entry = record["statistics"]["gram"]
    assert entry["tokens"] == sum(len(ex) for ex in tokenized) and entry["examples"] == 4
    assert record["input"] == "fft" and len(entry["sha256"]) == 64


def test_fisher_statistics_equal_autograd_on_one_example(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = compute_statistics(tiny_model_dir, EXAMPLES, tmp_path / "stats", kinds=["fisher"], max_examples=1,
                             max_length=64)
    fisher = load_file(out / "fisher.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    (ex,) = _tokenized(tiny_model_dir, EXAMPLES[:1])
    logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0].log_softmax(-1)
    answer = [(pos - 1, token) for pos, token in enumerate(ex.labels) if pos > 0 and token != -100]
    log_likelihood = sum(logits[pos, token] for pos, token in answer)
    names = [name for name, _ in model.named_parameters()]
    grads = torch.autograd.grad(log_likelihood, [p for _, p in model.named_parameters()])
    assert set(fisher) == set(names)
    for name, grad in zip(names, grads, strict=True):
        torch.testing.assert_close(fisher[name], grad.square(), rtol=1e-4, atol=1e-9)
    assert json.loads((out / "statistics.json").read_text())["statistics"]["fisher"]["tokens"] == len(answer)


# --- merges of models with their statistics ------------------------------------------------------------------
@pytest.fixture(scope="module")
def contributors(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """Two one-round stand-ins, each with both statistics on its own data."""
    root = tmp_path_factory.mktemp("contributors")
    made = []
    for i, data in enumerate(SPLITS):
        model = perturbed(tiny_model_dir, root / f"m{i}", seed=i, scale=0.05,
                          copy=("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
        made.append((model, compute_statistics(model, data, root / f"s{i}", max_length=64)))
    return made


def test_regmean_merge_solves_each_layer_on_the_contributors_inputs(contributors: list[tuple[Path, Path]],
                                                                     tmp_path: Path) -> None:
    models, stats = [m for m, _ in contributors], [s for _, s in contributors]
    out = merge_models("regmean", models, tmp_path / "merged", options=MergeOptions(regmean_alpha=1.0),
                       statistics=stats, weights=[1.0, 2.0])
    merged = merged_tensors(out)
    name = "model.layers.1.self_attn.q_proj.weight"  # 64 inputs (normed: a well-conditioned Gram), ~140 tokens each
    stacked, targets = [], []
    for (model_dir, _), data, w in zip(contributors, SPLITS, [1.0, 2.0], strict=True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        layer = model.get_submodule(name.removesuffix(".weight"))
        seen: list[torch.Tensor] = []
        handle = layer.register_forward_hook(
            lambda _m, i, _o, seen=seen: seen.append(i[0].reshape(-1, i[0].shape[-1])))
        with torch.no_grad():
            for ex in _tokenized(model_dir, data):
                model(input_ids=torch.tensor([ex.input_ids]))
        handle.remove()
        x = torch.cat(seen).double()
        stacked.append((w / len(x)) ** 0.5 * x)
        targets.append((w / len(x)) ** 0.5 * x @ layer.weight.double().T)
    expected = torch.linalg.lstsq(torch.cat(stacked), torch.cat(targets)).solution.T
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-3, atol=1e-4)
    # the layer's outputs on the contributors' inputs are the least-squares fit: no better weight exists
    residual = torch.cat(stacked) @ merged[name].double().T - torch.cat(targets)
    assert torch.linalg.norm(torch.cat(stacked).T @ residual) < 1e-3 * torch.linalg.norm(torch.cat(targets))
    # tensors without a Gram (norms, embeddings) are the weighted average
    one, two = (load_file(m / "model.safetensors") for m in models)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(merged[norm], (one[norm] + 2 * two[norm]) / 3)
    record = json.loads((out / "merge.json").read_text())
    assert record["regmean_alpha"] == 1.0 and record["statistics"] == [str(s) for s in stats]


def test_fisher_merge_with_equal_statistics_is_the_average(contributors: list[tuple[Path, Path]],
                                                           tmp_path: Path) -> None:
    models, (_, s0) = [m for m, _ in contributors], contributors[0]
    fisher = merge_models("fisher", models, tmp_path / "fisher", statistics=[s0, s0])
    average = merge_models("average", models, tmp_path / "average")
    for name, tensor in merged_tensors(fisher).items():
        torch.testing.assert_close(tensor, merged_tensors(average)[name], rtol=1e-5, atol=1e-6)
    own = merged_tensors(merge_models("fisher", models, tmp_path / "own", statistics=[s for _, s in contributors]))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(own[name], merged_tensors(average)[name])  # each model's own Fisher moves it


def _adapter(base: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def test_adapters_merge_their_deltas_with_the_statistics_of_the_adapted_model(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    adapters = [_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i) for i in range(2)]
    stats = [compute_statistics(a, EXAMPLES[i:i + 3], tmp_path / f"s{i}", base=tiny_model_dir, max_length=64)
             for i, a in enumerate(adapters)]
    grams = [load_file(s / "gram.safetensors") for s in stats]
    assert set(grams[0]) == {f"model.layers.{i}.{m}.weight" for i in range(2)
                             for m in ("self_attn.q_proj", "mlp.down_proj")}  # the weights the adapter targets
    assert set(load_file(stats[0] / "fisher.safetensors")) == set(grams[0])
    out = merge_models("regmean", adapters, tmp_path / "regmean", base=tiny_model_dir, statistics=stats,
                       options=MergeOptions(regmean_alpha=1.0))
    merged, base = merged_tensors(out), load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    fulls = []
    for adapter in adapters:
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
        model.load_adapter(adapter, adapter_name="default")
        fulls.append(model.merge_and_unload().state_dict()[name].double())
    g = [gram[name].double() / json.loads((s / "statistics.json").read_text())["statistics"]["gram"]["tokens"]
         for gram, s in zip(grams, stats, strict=True)]
    expected = (fulls[0] @ g[0] + fulls[1] @ g[1]) @ torch.inverse(g[0] + g[1])
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"])
    fisher = merged_tensors(merge_models("fisher", adapters, tmp_path / "fisher", base=tiny_model_dir,
                                         statistics=stats))
    assert torch.equal(fisher["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


# --- bad inputs ------------------------------------------------------------------------------------------------
def test_missing_or_mismatched_statistics_are_one_clear_error(contributors: list[tuple[Path, Path]],
                                                              tiny_model_dir: Path, tmp_path: Path) -> None:
    models, stats = [m for m, _ in contributors], [s for _, s in contributors]
    with pytest.raises(KnowstackError, match=rf"needs the gram statistics of every model.*got 1 for 2 models: none "
                                             rf"for {models[1]}"):
        merge_models("regmean", models, tmp_path / "out", statistics=stats[:1])
    with pytest.raises(KnowstackError, match="not a statistics dir"):
        merge_models("fisher", models, tmp_path / "out", statistics=[stats[0], models[1]])
    only_gram = compute_statistics(models[0], EXAMPLES, tmp_path / "g", kinds=["gram"], max_length=64)
    with pytest.raises(KnowstackError, match=r"has no 'fisher' statistics \(it has: gram\)"):
        merge_models("fisher", models, tmp_path / "out", statistics=[only_gram, stats[1]])
    with pytest.raises(KnowstackError, match="reads no statistics"):
        merge_models("average", models, tmp_path / "out", statistics=stats)
    adapter = _adapter(tiny_model_dir, tmp_path / "a", seed=0)
    lora_stats = compute_statistics(adapter, EXAMPLES, tmp_path / "ls", base=tiny_model_dir, kinds=["fisher"],
                                    max_length=64)
    with pytest.raises(KnowstackError, match="every model needs statistics of the same weights"):
        merge_models("fisher", [models[0], adapter], tmp_path / "out", base=tiny_model_dir,
                     statistics=[stats[0], lora_stats])
    with pytest.raises(KnowstackError, match="need its base model"):
        compute_statistics(adapter, EXAMPLES, tmp_path / "nobase")
    assert not (tmp_path / "out").exists()  # nothing half-written


# --- studies: a statistics step per one-round model, feeding the merge --------------------------------------------
def _study(tmp_path: Path, model: Path, merge: dict) -> Path:
    from test_registry import make_task, write_mc_task

    write_mc_task(tmp_path / "old")
    tasks = [{"name": name, "path": str(make_task(tmp_path / "tasks", name, n=4)), "metric": "accuracy"}
             for name in ("Stance", "Notes")]
    config = {"name": "datamerge", "base": {"model": str(model)}, "tasks": tasks,
              "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(tmp_path / "old")},
              "training": {"lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "max_length": 32,
                           "lora": {"r": 2, "alpha": 4}},
              "evaluation": {"batch_size": 4, "max_new_tokens": {"accuracy": 4}},
              "methods": {"merge": merge}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_plan_computes_each_models_statistics_once_for_its_merges(tmp_path: Path, tiny_model_dir: Path) -> None:
    merge = {"finetune": ["fft", "lora"], "methods": ["average", "regmean", "fisher"], "statistics_examples": 3}
    plan = build_plan(load_config(_study(tmp_path, tiny_model_dir, merge)))
    statistics = [s for s in plan.steps.values() if s.kind == "statistics"]
    assert sorted(s.label for s in statistics) == sorted(f"{kind}-{finetune}-{task}" for kind in ("gram", "fisher")
                                                         for finetune in ("fft", "lora") for task in ("Stance", "Notes"))
    trains = {s.key: s for s in plan.steps.values() if s.kind == "train"}
    for step in statistics:
        assert step.params["examples"] == 3 and step.params["max_length"] == 32
        (made_by,) = [trains[key] for key in step.deps if key in trains]  # its own task's one-round model
        assert made_by.params["task"]["name"] == step.params["task"]["name"]
    merges = {s.label: s for s in plan.steps.values() if s.kind == "merge"}
    assert merges["regmean-fft"].params["options"] == {"regmean_alpha": 0.6}
    assert "statistics" not in merges["average-fft"].params  # a merge without data keeps its key
    assert all(ref[1:].split("/")[0] in merges["fisher-lora"].deps for ref in merges["fisher-lora"].params["statistics"])
    raw = yaml.safe_load((tmp_path / "study.yaml").read_text())
    raw["methods"] = {"continual-merge": {"finetune": ["fft"], "methods": ["regmean"]}}
    with pytest.raises(KnowstackError, match=r"field 'methods\.continual-merge\.methods'.*reads statistics"):
        build_plan(parse_config(raw))


def test_a_study_merges_with_regmean_and_fisher(tmp_path: Path, tiny_model_dir: Path) -> None:
    from knowstack.study.runner import run_study

    path = _study(tmp_path, tiny_model_dir, {"finetune": ["fft", "lora"], "methods": ["regmean", "fisher"],
                                             "statistics_examples": 4})
    run_study(load_config(path), tmp_path / "run", console=None)
    rows = {row["model"] for row in csv.DictReader((tmp_path / "run" / "results.csv").open())}
    assert {f"merge-{m}-{f}" for m in ("regmean", "fisher") for f in ("fft", "lora")} <= rows
    for record in (tmp_path / "run" / "artifacts").glob("merge-*/merge.json"):
        merged = json.loads(record.read_text())
        assert len(merged["statistics"]) == 2 and all(Path(p, "statistics.json").is_file()
                                                      for p in merged["statistics"])


# --- the registry: statistics contributed beside the weights, read by compose merge-regmean / merge-fisher ------
def test_a_regmean_version_is_the_regmean_merge_of_the_contributed_statistics(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    from test_registry import make_adapter, make_task, write_mc_task

    from knowstack.registry import Registry, init_registry
    from knowstack.registry.compose import compose
    from knowstack.registry.contribute import contribute

    write_mc_task(tmp_path / "old")
    reg = tmp_path / "reg"
    init_registry(reg, tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old")
    adapters, stats = [], []
    for i, name in enumerate(["Stance", "Notes"], start=1):
        adapters.append(make_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i))
        task = make_task(tmp_path / "tasks", name)
        # the contributor's own statistics, on its own training data, which it does not hand in
        stats.append(compute_statistics(adapters[-1], load_trace_split(task / "train.json"), tmp_path / f"s{i}",
                                        base=tiny_model_dir, kinds=["gram"], max_length=64))
        contribute(reg, name.lower(), adapter=adapters[-1], task=task, statistics=stats[-1] if i == 1 else None)
    with pytest.raises(KnowstackError, match=r"reads each contribution's gram statistics, and notes were contributed "
                                             r"without them"):
        compose(reg, "merge-regmean")
    contribute(reg, "notes2", adapter=adapters[1], task=make_task(tmp_path / "more", "Notes2"), statistics=stats[1])
    record = compose(reg, "merge-regmean", contributions=["stance", "notes2"],
                     options=ComposeOptions(regmean_alpha=0.8))
    assert record["settings"]["options"] == {"regmean_alpha": 0.8}
    direct = merge_models("regmean", adapters, tmp_path / "direct", base=tiny_model_dir, statistics=stats,
                          options=MergeOptions(regmean_alpha=0.8))
    with Registry.open(reg) as opened, opened.view(record["name"]) as stored:
        mine, theirs = merged_tensors(stored), merged_tensors(direct)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        opened.collect_garbage(grace_seconds=0)
        stance = opened.version("stance")
        # weights (2 files), test split, and the statistics (statistics.json, gram.safetensors): kept, verified
        assert len(stance["settings"]["statistics"]) == 2
        assert opened.verify(["stance"]) == len(stance["files"]) + len(stance["task_files"]) + 2
    with pytest.raises(KnowstackError, match=r"not a statistics dir"):
        contribute(reg, "bad", adapter=adapters[0], task=make_task(tmp_path / "bad", "Bad"),
                   statistics=tmp_path / "nowhere")
    with pytest.raises(KnowstackError, match=r"merge-fisher' reads each contribution's fisher statistics"):
        compose(reg, "merge-fisher", contributions=["stance", "notes2"])


def test_the_builtin_test_preset_plans_statistics_for_its_tasks(tmp_path: Path) -> None:
    from test_study import tiny_study

    path = tiny_study(tmp_path, {"merge": {"finetune": ["lora"], "methods": ["regmean", "fisher"]}})
    plan = build_plan(load_config(path))
    statistics = [s for s in plan.steps.values() if s.kind == "statistics"]
    tasks = plan.task_names
    assert len(tasks) >= 2 and sorted(s.label for s in statistics) == sorted(
        f"{kind}-lora-{task}" for kind in ("gram", "fisher") for task in tasks)
    assert {s.params["examples"] for s in statistics} == {256}  # config.py's declared default


def test_the_commands_compute_statistics_and_merge_with_them(contributors: list[tuple[Path, Path]], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from knowstack.cli import main

    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"prompt": ex.prompt, "answer": ex.answer} for ex in SPLITS[0]]))
    (model, given), (other, other_stats) = contributors
    assert main(["statistics", str(model), "--train-data", str(data), "--examples", "6", "--max-length", "64",
                 "--out", str(tmp_path / "stats")]) == 0
    assert "gram: 6 examples" in capsys.readouterr().out
    for kind in ("gram", "fisher"):  # the same data, the same statistics as the fixture's (from the API)
        ours, theirs = load_file(tmp_path / "stats" / f"{kind}.safetensors"), load_file(given / f"{kind}.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert main(["merge", "--method", "regmean", "--models", str(model), str(other), "--statistics",
                 str(tmp_path / "stats"), str(other_stats), "--regmean-alpha", "0.9", "--out", str(tmp_path / "m")]) == 0
    direct = merge_models("regmean", [model, other], tmp_path / "direct", statistics=[given, other_stats],
                          options=MergeOptions(regmean_alpha=0.9))
    mine, theirs = merged_tensors(tmp_path / "m"), merged_tensors(direct)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
