"""The collaborative registry: init records the base, contributions are checked, stored once, scored and
listed; bad input is one clear error; tampered objects are refused on read; 8 contributors at once all land."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from knowstack.builtin.pretrain import ModelShape, make_model
from knowstack.cli import main
from knowstack.errors import KnowstackError
from knowstack.registry import Registry, init_registry
from knowstack.registry.contribute import contribute


def make_task(root: Path, name: str = "Stance", n: int = 3, metric: str | None = "accuracy") -> Path:
    """A TRACE-layout task dir; its metric (if any) in the knowstack-task.json a user writes beside the splits."""
    task = root / name
    task.mkdir(parents=True)
    for split in ("train", "eval", "test"):
        items = [{"prompt": f"{name} {split} question {i}:", "answer": " yes"} for i in range(n)]
        (task / f"{split}.json").write_text(json.dumps(items))
    if metric is not None:
        (task / "knowstack-task.json").write_text(json.dumps({"metric": metric}))
    return task


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def make_finetune(model_dir: Path, out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_mc_task(root: Path) -> None:
    """A tiny lm-eval multiple-choice task in the harness's own YAML format."""
    root.mkdir()
    docs = [{"question": f"Item {i} goes with", "choices": ["add", "Japan"], "answer": i % 2} for i in range(4)]
    (root / "ks_toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "ks_toy.yaml").write_text(
        "task: ks_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: ks_toy.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    """A registry on the tiny base, two adapters, a fine-tune and a task, shared by the tests below."""
    root = tmp_path_factory.mktemp("registry-work")
    init_registry(root / "reg", tiny_model_dir)
    return {"root": root, "reg": root / "reg", "task": make_task(root),
            "adapter1": make_adapter(tiny_model_dir, root / "adapter1", seed=1),
            "adapter2": make_adapter(tiny_model_dir, root / "adapter2", seed=2),
            "finetune": make_finetune(tiny_model_dir, root / "finetune", seed=3)}


def flip_last_byte(path: Path) -> None:
    path.chmod(0o644)  # objects are stored read-only
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def objects_on_disk(reg: Path) -> list[Path]:
    return sorted(p for p in (reg / "objects").rglob("*") if p.is_file())


def test_init_records_the_base_hash_and_old_knowledge(tmp_path: Path, tiny_model_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    write_mc_task(tmp_path / "old")
    base = init_registry(tmp_path / "reg", tiny_model_dir, old_tasks=["ks_toy"], include_path=tmp_path / "old")
    files = {name: hashlib.sha256((tiny_model_dir / name).read_bytes()).hexdigest()
             for name in ("config.json", "model.safetensors")}
    expected = hashlib.sha256("".join(f"{n}\t{files[n]}\n" for n in sorted(files)).encode()).hexdigest()
    assert base["content_hash"] == expected and base["kind"] == "base" and base["status"] == "released"
    assert base["files"]["model.safetensors"] == files["model.safetensors"]
    assert base["settings"]["architecture"]["hidden_size"] == 64
    assert set(base["settings"]["old_knowledge"]["files"]) == {"ks_toy.jsonl", "ks_toy.yaml"}
    [score] = base["scores"]
    assert (score["task"], score["kind"], score["metric"]) == ("ks_toy", "old", "acc") and 0 <= score["value"] <= 1
    conn = sqlite3.connect(tmp_path / "reg" / "registry.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with Registry.open(tmp_path / "reg") as reg:
        assert reg.verify() == len(objects_on_disk(tmp_path / "reg"))
    # init over an existing registry: refused, and the registry is untouched
    before = (tmp_path / "reg" / "registry.sqlite").read_bytes()
    with pytest.raises(KnowstackError, match="already exists"):
        init_registry(tmp_path / "reg", tiny_model_dir)
    assert main(["registry", "init", str(tmp_path / "reg"), "--base", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(tmp_path / "reg") in err and "Traceback" not in err
    assert (tmp_path / "reg" / "registry.sqlite").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".reg.init-")]


def test_contribute_an_adapter_and_a_full_model_and_list_them(work: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = work["root"] / "train.yaml"
    config.write_text("lr: 0.001\nepochs: 1\n")
    record = contribute(work["reg"], "stance-lora", adapter=work["adapter1"], task=work["task"], author="ann",
                        training_config=config)
    assert record["kind"] == "adapter" and record["parents"] == ["base"] and record["status"] == "released"
    assert set(record["task_files"]) == {"eval", "test"} and record["keep_data"] is False
    assert record["training_config"]["file"] == "train.yaml"
    [score] = record["scores"]
    assert (score["task"], score["metric"], score["n"]) == ("Stance", "accuracy", 3) and 0 <= score["value"] <= 1
    assert main(["contribute", str(work["reg"]), "--name", "stance-fft", "--model", str(work["finetune"]),
                 "--task", str(work["task"]), "--keep-data", "--author", "bob"]) == 0
    with Registry.open(work["reg"]) as reg:
        full = reg.version("stance-fft")
        assert full["kind"] == "model" and set(full["task_files"]) == {"train", "eval", "test"}
        assert full["keep_data"] is True and 0 <= full["scores"][0]["value"] <= 1
        assert reg.verify(["stance-lora", "stance-fft"]) > 0
    capsys.readouterr()
    assert main(["registry", "list", str(work["reg"])]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  stance-")}
    assert lines["stance-lora"][1:4] == ["adapter", "Stance", "accuracy"] and lines["stance-lora"][5:7] == ["no", "ann"]
    assert lines["stance-fft"][1] == "model" and lines["stance-fft"][5:7] == ["yes", "bob"]
    assert 0 <= float(lines["stance-fft"][4]) <= 1 and lines["stance-lora"][7] == record["content_hash"][:12]
    assert out.startswith(f"registry: {work['reg']}") and "contributions: " in out


def test_weights_are_stored_once(work: dict[str, Path]) -> None:
    first = contribute(work["reg"], "once-a", adapter=work["adapter2"], task=work["task"])
    count = len(objects_on_disk(work["reg"]))
    second = contribute(work["reg"], "once-b", adapter=work["adapter2"], task=work["task"])
    assert first["files"] == second["files"] and first["content_hash"] == second["content_hash"]
    assert len(objects_on_disk(work["reg"])) == count  # nothing new: weights, config and task all known
    sha = second["files"]["adapter_model.safetensors"]
    assert [p.name for p in objects_on_disk(work["reg"])].count(sha) == 1
    with pytest.raises(KnowstackError, match="'once-a' is taken"):
        contribute(work["reg"], "once-a", adapter=work["adapter1"], task=work["task"])


def test_bad_contributions_are_refused_and_leave_no_record(
        work: dict[str, Path], tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Registry.open(work["reg"]) as reg:
        before = [r["name"] for r in reg.versions()]
    for bad in ("../x", "a/b", "..", "", ".hidden", "x" * 65):
        with pytest.raises(KnowstackError, match="invalid name"):
            contribute(work["reg"], bad, adapter=work["adapter1"], task=work["task"])
    assert main(["contribute", str(work["reg"]), "--name", "../x", "--adapter", str(work["adapter1"]),
                 "--task", str(work["task"])]) == 2
    assert "invalid name" in capsys.readouterr().err
    # an adapter of another base: its claimed base's config differs, and (claim removed) its shapes do not fit
    other = tmp_path / "other-base"
    make_model(AutoTokenizer.from_pretrained(str(tiny_model_dir)), ModelShape(hidden=32, layers=2, heads=4,
               kv_heads=2, intermediate=64, context=256), seed=5).save_pretrained(other)
    foreign = make_adapter(other, tmp_path / "foreign", seed=4)
    with pytest.raises(KnowstackError, match="whose config differs from the registry.s base at "):
        contribute(work["reg"], "foreign", adapter=foreign, task=work["task"])
    sibling = tmp_path / "sibling-base"  # same architecture, other weights: only the hash tells them apart
    make_model(AutoTokenizer.from_pretrained(str(tiny_model_dir)), ModelShape(hidden=64, layers=2, heads=4,
               kv_heads=2, intermediate=128, context=256), seed=7).save_pretrained(sibling)
    with pytest.raises(KnowstackError, match="are not the registry's base"):
        contribute(work["reg"], "sibling", adapter=make_adapter(sibling, tmp_path / "sibling", seed=6),
                   task=work["task"])
    config = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/away"}))
    with pytest.raises(KnowstackError, match="not this adapter's base"):
        contribute(work["reg"], "foreign", adapter=foreign, task=work["task"])
    # pickled weights only: refused without being read
    pickled = tmp_path / "pickled-adapter"
    pickled.mkdir()
    shutil.copy(work["adapter1"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(KnowstackError, match="pickled"):
        contribute(work["reg"], "pickled", adapter=pickled, task=work["task"])
    pickled_model = tmp_path / "pickled-model"
    pickled_model.mkdir()
    shutil.copy(work["finetune"] / "config.json", pickled_model)
    (pickled_model / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(KnowstackError, match="never unpickles"):
        contribute(work["reg"], "pickled-model", model=pickled_model, task=work["task"])
    with pytest.raises(KnowstackError, match="no test.json"):
        contribute(work["reg"], "no-task", adapter=work["adapter1"], task=tmp_path)
    with Registry.open(work["reg"]) as reg:
        assert [r["name"] for r in reg.versions()] == before


def test_a_tampered_object_is_refused_on_read(tiny_model_dir: Path, work: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, tiny_model_dir)
    record = contribute(reg_dir, "victim", adapter=work["adapter1"], task=work["task"])
    target = reg_dir / "objects" / record["files"]["adapter_model.safetensors"][:2] / record["files"][
        "adapter_model.safetensors"]
    flip_last_byte(target)
    with Registry.open(reg_dir) as reg, pytest.raises(KnowstackError, match="tampered") as caught:
        reg.verify()
    assert str(target) in str(caught.value)
    with Registry.open(reg_dir) as reg, pytest.raises(KnowstackError, match="tampered"), reg.view("victim"):
        pass
    assert main(["registry", "verify", str(reg_dir)]) == 2
    assert str(target) in "".join(capsys.readouterr().err.split())  # the console wraps long lines
    # a tampered base is refused before a contribution is checked or scored against it
    with Registry.open(reg_dir) as reg:
        base_weights = reg.store.path(reg.base()["files"]["model.safetensors"])
    flip_last_byte(base_weights)
    with pytest.raises(KnowstackError, match=re.escape(str(base_weights))):
        contribute(reg_dir, "after-tamper", adapter=work["adapter2"], task=work["task"])


def test_eight_contributors_at_once(work: dict[str, Path], tmp_path: Path, tiny_model_dir: Path) -> None:
    reg_dir = tmp_path / "reg"
    init_registry(reg_dir, tiny_model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "knowstack.cli", "contribute", str(reg_dir), "--name", f"crowd-{i}",
         "--adapter", str(work["adapter1" if i % 2 else "adapter2"]), "--task", str(work["task"]),
         "--author", f"user{i}", "--eval-batch-size", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(8)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, errors
    with Registry.open(reg_dir) as reg:
        crowd = [r for r in reg.versions() if r["name"].startswith("crowd-")]
        assert sorted(r["name"] for r in crowd) == [f"crowd-{i}" for i in range(8)]
        for record in crowd:
            assert reg.verify([record["name"]]) > 0 and 0 <= record["scores"][0]["value"] <= 1
        weights = {r["files"]["adapter_model.safetensors"] for r in crowd}
    assert len(weights) == 2  # two distinct adapters, each stored once
    names = [p.name for p in objects_on_disk(reg_dir)]
    assert all(names.count(sha) == 1 for sha in weights)
    assert not [p for p in (reg_dir / "objects").rglob(".*tmp-*")]  # no temporary file left behind
