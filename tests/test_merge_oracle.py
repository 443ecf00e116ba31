"""Every merge method mergekit also has, against mergekit 0.1.5 on the same inputs (slow: mergekit runs in its own
venv, made by benchmarks/merge.py's install_mergekit on first use; pytest -m slow).

- deterministic methods: whole tiny random Llama checkpoints (a base and three perturbed fine-tunes, and LoRA
  adapters, which mergekit gets as PEFT's merge_and_unload of each adapter into the base), merged by
  `mergekit-yaml` and by knowstack's streamed merge, every tensor compared;
- random methods (della, della-linear, and dare / ties-dare, whose mergekit counterparts rescale differently):
  a tensor at a time, with the same draws (mergekit draws from torch's global generator seeded s, knowstack from
  a generator seeded s, in the same order), through mergekit's own merge function in its venv.

The largest absolute difference of each method is printed (pytest -s) and bounded by TOLERANCE.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed
from conftest import load_script
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from knowstack.combine.merge import merge_models
from knowstack.combine.merges import MergeOptions, get_method
from knowstack.modeling.streaming import SafetensorsReader

pytestmark = pytest.mark.slow

TOLERANCE = 2e-6  # float32 rounding of sums in another order, on weights of magnitude ~0.1-1
# the settings of every comparison (knowstack's option names); weights for the methods that read them
OPTIONS = {"density": 0.3, "gamma": 0.05, "lambda": 0.8, "t": 0.3, "epsilon": 0.1, "max_iter": 10, "tol": 1e-5}
WEIGHTS = [1.0, 0.5, 2.0]


# benchmarks/merge.py, the one place that installs mergekit and writes its configs
BENCH = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "merge.py", "merge_benchmark")


@pytest.fixture(scope="session")
def mergekit() -> Path:
    exe, problem = BENCH.install_mergekit(BENCH.DEFAULT_VENV)
    if exe is None:
        if any(word in problem for word in BENCH.UNREACHABLE):
            reason = f"SKIPPED LOUDLY: mergekit 0.1.5 cannot be installed because pip cannot reach PyPI:\n{problem}"
            warnings.warn(reason, stacklevel=1)
            pytest.skip(reason)
        pytest.fail(problem)
    return exe


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Three fine-tunes (full models) and three LoRA adapters of the tiny base, and each adapter merged into the
    base by PEFT (what mergekit merges in their place)."""
    root = tmp_path_factory.mktemp("oracle")
    models = [perturbed(tiny_model_dir, root / f"ft{i}", seed=10 + i, scale=0.02) for i in range(3)]
    adapters, merged = [], []
    for i in range(3):
        torch.manual_seed(20 + i)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"],
                                                      init_lora_weights=False))
        peft_model.save_pretrained(root / f"lora{i}")
        adapters.append(root / f"lora{i}")
        peft_model.merge_and_unload().save_pretrained(root / f"lora{i}-merged")
        merged.append(root / f"lora{i}-merged")
    return {"fft": models, "lora": adapters, "lora-merged": merged}


def _weights(method: str, n: int) -> list[float] | None:
    # karcher: mergekit weighs the models equally; slerp and model-stock read no weights
    return WEIGHTS[:n] if get_method(method).weighted and method != "karcher" else None


def _max_difference(ours: Path, theirs: Path) -> float:
    a, b = SafetensorsReader.from_dir(ours), SafetensorsReader.from_dir(theirs)
    assert set(a.specs) == set(b.specs)
    return max(float((a.read(name).float() - b.read(name).float()).abs().max()) for name in a.names())


DETERMINISTIC = [m for m in BENCH.DETERMINISTIC if m not in ("dare", "ties-dare")]


@pytest.mark.parametrize("kind", ["fft", "lora"])
@pytest.mark.parametrize("method", DETERMINISTIC)
def test_equals_mergekit(method: str, kind: str, mergekit: Path, tiny_model_dir: Path,
                         inputs: dict[str, list[Path]], tmp_path: Path) -> None:
    n = 2 if method == "slerp" else 3
    if method == "multislerp" and kind == "lora":
        # the weights adapters leave alone have zero task vectors everywhere: mergekit's multislerp raises for
        # three such (their unit vectors "cancel"), falls back to the linear mean for two; knowstack keeps the base
        n = 2
    ours_in = inputs[kind][:n]
    theirs_in = inputs["lora-merged" if kind == "lora" else kind][:n]
    weights = _weights(method, n)
    options = MergeOptions.from_settings({k: v for k, v in OPTIONS.items() if k in get_method(method).options})
    ours = merge_models(method, ours_in, tmp_path / "ours", base=tiny_model_dir, weights=weights, options=options)
    config = tmp_path / "mergekit.yml"
    config.write_text(BENCH.mergekit_config(method, tiny_model_dir, theirs_in, weights, OPTIONS))
    result = subprocess.run([str(mergekit), str(config), str(tmp_path / "theirs"), "--no-copy-tokenizer", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = _max_difference(ours, tmp_path / "theirs")
    print(f"\n{method} ({kind}) vs mergekit {json.loads(config.read_text())['merge_method']}: max|diff| {worst:.2e}")
    assert worst <= TOLERANCE


# --- random methods: the same draws, a tensor at a time -------------------------------------------
# run in mergekit's venv: its merge function on the tensors in IN, after torch.manual_seed(seed), into OUT
MERGEKIT_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
spec = json.loads(sys.argv[1])
tensors = load_file(spec["in"])
out = {}
for name in spec["names"]:
    parts = [tensors[f"{name}/base"]] + [tensors[f"{name}/{i}"] for i in range(spec["models"])]
    group = TensorGroup.from_tensors(parts, base_index=0)
    ids = range(1, spec["models"] + 1)
    params = {"int8_mask": False, "lambda": spec["lambda"], "normalize": spec["normalize"],
              "rescale": spec["rescale"], "weight": {i: w for i, w in zip(ids, spec["weights"])},
              "density": {i: spec["density"] for i in ids}}
    if "epsilon" in spec:
        params["epsilon"] = {i: spec["epsilon"] for i in ids}
    torch.manual_seed(spec["seed"])
    out[name] = registry.get(spec["method"]).merge_group(group, **params).contiguous()
save_file(out, spec["out"])
"""

# knowstack method: (mergekit method, its normalize and rescale, knowstack's result times this = mergekit's)
RANDOM = {
    "della": ("della", True, True, lambda o: 1.0),
    "della-linear": ("della_linear", False, True, lambda o: 1.0),
    # mergekit's DARE with rescale off keeps the same entries unscaled: knowstack's x (1-p) (its 1/(1-p) undone)
    "dare": ("dare_linear", True, False, lambda o: 1 - o.drop_rate),
    "ties-dare": ("dare_ties", True, False, lambda o: 1 - o.drop_rate),
}


@pytest.mark.parametrize("method", list(RANDOM))
def test_random_methods_equal_mergekit_with_the_same_draws(method: str, mergekit: Path, tmp_path: Path) -> None:
    name, normalize, rescale, factor = RANDOM[method]
    options = MergeOptions(density=0.4, drop_rate=0.6, epsilon=0.2, lam=0.9)
    weights = [1.0, 0.5, 2.0] if normalize or method == "della-linear" else [1.0, 1.0, 1.0]
    gen = torch.Generator().manual_seed(0)
    shapes = {"matrix": (48, 40), "vector": (64,)}
    tensors: dict[str, torch.Tensor] = {}
    for tensor_name, shape in shapes.items():
        base = torch.randn(shape, generator=gen)
        tensors[f"{tensor_name}/base"] = base
        for i in range(3):
            tensors[f"{tensor_name}/{i}"] = base + 0.05 * torch.randn(shape, generator=gen)
    save_file(tensors, str(tmp_path / "in.safetensors"))
    density = options.density if method.startswith("della") else 1 - options.drop_rate
    spec = {"in": str(tmp_path / "in.safetensors"), "out": str(tmp_path / "out.safetensors"), "names": list(shapes),
            "models": 3, "method": name, "normalize": normalize, "rescale": rescale, "weights": weights,
            "density": density, "lambda": options.lam, "seed": 7}
    if method.startswith("della"):
        spec["epsilon"] = options.epsilon
    python = mergekit.parent / "python"
    result = subprocess.run([str(python), "-c", MERGEKIT_SCRIPT, json.dumps(spec)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(tmp_path / "out.safetensors")
    worst = 0.0
    for tensor_name in shapes:
        base = tensors[f"{tensor_name}/base"]
        taus = [tensors[f"{tensor_name}/{i}"] - base for i in range(3)]
        merged = get_method(method).fn(taus, torch.tensor(weights, dtype=torch.float64), options,
                                       torch.Generator().manual_seed(7))
        worst = max(worst, float((base + merged * factor(options) - theirs[tensor_name]).abs().max()))
    print(f"\n{method} vs mergekit {name} (same draws): max|diff| {worst:.2e}")
    assert worst <= TOLERANCE
