"""Every command on every family users bring: train FFT and LoRA, an average and a TIES merge, FFT-MoE and
LoRA-MoE, generation and lm-eval evaluation, and a registry contribute + compose, on tiny random checkpoints of
nine families saved as the Hub saves them (tests/families.py).

Each family runs every feature and fails once at the end, naming each feature that failed and why, so one run
shows the whole matrix. With KNOWSTACK_FAMILIES_JSON set, the outcomes are written there as JSON
(scripts/docs_numbers.py --families turns them into the table of docs/families.md).
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from families import FAMILIES, build_family
from safetensors import safe_open
from test_registry import write_mc_task
from transformers import AutoConfig, AutoModelForCausalLM

from knowstack import api
from knowstack.errors import KnowstackError
from knowstack.modeling.families import family_of

TRACE = Path(__file__).parent / "fixtures" / "trace"
TINY = {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "max_length": 128, "lr": 1e-3}
FEATURES = ("train-fft", "train-lora", "merge-average", "merge-ties", "moe-fft", "moe-lora", "eval", "lm-eval",
            "contribute", "compose")
OUTCOMES: dict[str, dict[str, dict[str, Any]]] = {}


def weight_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            names.update(handle.keys())
    return names


def loads_and_runs(folder: Path) -> str:
    """The dir loads with AutoModelForCausalLM and gives finite logits; returns its class name."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logits = model(torch.tensor([[1, 5, 9, 12, 40]])).logits
    assert torch.isfinite(logits).all(), f"{folder}: non-finite logits"
    return type(model).__name__


class Matrix:
    """One family's run of every feature: each outcome recorded, the failures listed together at the end."""

    def __init__(self, family: str):
        self.family = family
        self.outcomes: dict[str, dict[str, Any]] = {}

    def run(self, feature: str, action: Callable[[], dict[str, Any] | None]) -> bool:
        try:
            detail = action() or {}
        except KnowstackError as err:
            self.outcomes[feature] = {"outcome": "failed", "error": str(err)}
            return False
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - every failure is listed, with its last lines
            self.outcomes[feature] = {"outcome": "failed", "error": traceback.format_exc(limit=-3)}
            return False
        self.outcomes[feature] = {"outcome": detail.pop("outcome", "works"), **detail}
        return True

    def skip_after(self, feature: str, needs: str) -> None:
        self.outcomes[feature] = {"outcome": "failed", "error": f"not run: {needs} failed"}

    def failures(self) -> list[str]:
        return [f"{self.family} {feature}: {o.get('error')}" for feature, o in self.outcomes.items()
                if o["outcome"] == "failed"]


@pytest.fixture(scope="module")
def old_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("families-old") / "old"
    write_mc_task(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def write_outcomes() -> Any:
    yield
    target = os.environ.get("KNOWSTACK_FAMILIES_JSON")
    if target and OUTCOMES:
        import datetime

        import transformers

        record = {"features": list(FEATURES), "families": OUTCOMES, "transformers": transformers.__version__,
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
        Path(target).write_text(json.dumps(record, indent=1) + "\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_on_every_family(family: str, tmp_path: Path, old_tasks: Path) -> None:
    base = build_family(family, tmp_path / "base")
    model_type = AutoConfig.from_pretrained(base).model_type
    tied = bool(AutoConfig.from_pretrained(base).tie_word_embeddings)
    matrix = Matrix(family)
    tasks = {"FOMC": TRACE / "FOMC", "C-STANCE": TRACE / "C-STANCE"}
    out = {name: tmp_path / name for name in ("fft1", "fft2", "lora1", "lora2")}

    def train(finetune: str, names: tuple[str, str]) -> dict[str, Any]:
        for name, task in zip(names, tasks.values(), strict=True):
            api.train(base, task, out[name], finetune=finetune, **TINY)
            assert (out[name] / "README.md").is_file(), "no model card"
        if finetune == "fft":
            extra = weight_names(out[names[0]]) - weight_names(base)
            assert not extra, f"an FFT of the base saves tensors the base has not: {sorted(extra)[:3]}"
            return {"class": loads_and_runs(out[names[0]])}
        adapted = json.loads((out[names[0]] / "adapter_config.json").read_text())["target_modules"]
        return {"targets": sorted(adapted)}

    fft = matrix.run("train-fft", lambda: train("fft", ("fft1", "fft2")))
    lora = matrix.run("train-lora", lambda: train("lora", ("lora1", "lora2")))

    def merge(method: str, inputs: list[Path]) -> dict[str, Any]:
        merged = api.merge(method, inputs, tmp_path / f"merge-{method}", base=base)
        assert (merged / "README.md").is_file(), "no model card"
        assert weight_names(merged) == weight_names(base), "the merge's tensors are not the base's"
        dtype = AutoConfig.from_pretrained(merged).dtype
        assert dtype == torch.bfloat16, f"a bf16 base merged into {dtype}"
        return {"class": loads_and_runs(merged)}

    if fft:
        matrix.run("merge-average", lambda: merge("average", [out["fft1"], out["fft2"]]))
    else:
        matrix.skip_after("merge-average", "train-fft")
    if lora:
        matrix.run("merge-ties", lambda: merge("ties", [out["lora1"], out["lora2"]]))
    else:
        matrix.skip_after("merge-ties", "train-lora")

    def moe_fft() -> dict[str, Any]:
        known = family_of(model_type)
        stock = known.stock_moe.model_type if known is not None and known.stock_moe is not None else None
        if stock is None:  # no stock MoE class fits this family: refused, before any compute
            with pytest.raises(KnowstackError) as refused:
                api.mix(base, [out["fft1"], out["fft2"]], tmp_path / "moe-fft", router="uniform")
            assert not (tmp_path / "moe-fft").exists()
            return {"outcome": "refused", "reason": str(refused.value)}
        api.mix(base, [out["fft1"], out["fft2"]], tmp_path / "moe-fft", router="uniform")
        written = AutoConfig.from_pretrained(tmp_path / "moe-fft").model_type
        assert written == stock, f"an FFT-MoE of {model_type} written as {written}, not {stock}"
        assert bool(AutoConfig.from_pretrained(tmp_path / "moe-fft").tie_word_embeddings) == tied
        return {"class": loads_and_runs(tmp_path / "moe-fft")}

    if fft:
        matrix.run("moe-fft", moe_fft)
    else:
        matrix.skip_after("moe-fft", "train-fft")

    def moe_lora() -> dict[str, Any]:
        prompts = [[ex["prompt"] for ex in json.loads((task / "train.json").read_text())] for task in tasks.values()]
        api.mix(base, [out["lora1"], out["lora2"]], tmp_path / "moe-lora", prompts=prompts, router="prompts")
        scores = api.score(base, tasks["FOMC"], adapter=tmp_path / "moe-lora", limit=2, eval_batch_size=2)
        return {"router": "prompts", "scored": scores.n}

    if lora:
        matrix.run("moe-lora", moe_lora)
    else:
        matrix.skip_after("moe-lora", "train-lora")

    def generation_eval() -> dict[str, Any]:
        for adapter in (None, out["lora1"] if lora else None):
            scores = api.score(base, tasks["FOMC"], adapter=adapter, limit=4, eval_batch_size=2)
            assert scores.n == 4 and set(scores.scores) == {"accuracy"}
        return {}

    matrix.run("eval", generation_eval)
    matrix.run("lm-eval", lambda: {"acc": api.evaluate(base, old_tasks=["ks_toy"], include_path=old_tasks,
                                                      batch_size=2)["ks_toy"]["acc"]})

    registry = tmp_path / "registry"

    def contribute() -> dict[str, Any]:
        api.init_registry(registry, base, old_tasks=["ks_toy"], include_path=old_tasks, eval_batch_size=2)
        for name, adapter in (("fomc", out["lora1"]), ("stance", out["lora2"])):
            api.contribute(registry, name, adapter=adapter, task=tasks["FOMC" if name == "fomc" else "C-STANCE"],
                           batch_size=2)
        if fft:
            api.contribute(registry, "fomc-ft", model=out["fft1"], task=tasks["FOMC"], eval_batch_size=2)
        return {}

    contributed = lora and matrix.run("contribute", contribute)
    if not lora:
        matrix.skip_after("contribute", "train-lora")

    def compose() -> dict[str, Any]:
        record = api.compose(registry, "merge-ties", contributions=["fomc", "stance"],
                             options={"density": 0.5}, gate_old=100.0, gate_task=100.0)
        assert record["kind"] == "model" and record["scores"], record
        return {"version": record["name"]}

    if contributed:
        matrix.run("compose", compose)
    else:
        matrix.skip_after("compose", "contribute")

    OUTCOMES[family] = {"model_type": model_type, "tied": tied, **matrix.outcomes}
    assert not matrix.failures(), "\n".join(matrix.failures())

