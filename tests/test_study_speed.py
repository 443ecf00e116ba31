"""benchmarks/study_speed.py's own parts: reading the studies' step records, the ratio table, the identity check and
the config it runs with another preset (the runs themselves are the benchmark's, not the tests')."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study_speed.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


def _step(study: Path, key: str, kind: str, seconds: float) -> None:
    folder = study / "artifacts" / key
    folder.mkdir(parents=True)
    (folder / "step.json").write_text(json.dumps({"key": key, "kind": kind, "params": {}, "cost": {"seconds": seconds}}))


def _study(root: Path, fingerprint: str = "abc", results: str = "model,value\nbase,0.5\n") -> Path:
    root.mkdir()
    _step(root, "world-test-1", "world", 10.0)
    (root / "artifacts" / "world-test-1" / "world.json").write_text(json.dumps({"fingerprint": fingerprint}))
    _step(root, "train-a", "train", 4.0)
    _step(root, "train-b", "train", 6.0)
    _step(root, "eval-a", "eval", 2.5)
    (root / "artifacts" / ".partial").mkdir()  # not a step
    (root / "results.csv").write_text(results)
    (root / "per_example.jsonl").write_text('{"model": "base", "scores": [1, 0]}\n')
    return root


def test_seconds_per_kind_from_the_step_records(bench: ModuleType, tmp_path: Path) -> None:
    seconds, counts = bench.seconds_by_kind(bench.step_records(_study(tmp_path / "s")))
    assert seconds == {"world": 10.0, "train": 10.0, "eval": 2.5}
    assert counts == {"world": 1, "train": 2, "eval": 1}
    assert bench.ordered_kinds({"moe", "eval", "world", "zeta", "train"}) == ["world", "train", "eval", "moe", "zeta"]


def _run(bench: ModuleType, label: str, wall: float, train: float, evals: float) -> object:
    return bench.StudyRun(label, wall, {"train": train, "eval": evals}, {"train": 2, "eval": 3}, (1.0, 1.0, 1.0))


def test_ratio_table_takes_medians_and_shows_the_range(bench: ModuleType) -> None:
    new = [_run(bench, "new", 50, 20, 10), _run(bench, "new", 70, 30, 10), _run(bench, "new", 60, 25, 10)]
    old = [_run(bench, "old", 100, 40, 40), _run(bench, "old", 100, 40, 20), _run(bench, "old", 100, 40, 30)]
    rows = {row[0]: row for row in bench.ratio_table(new, old)}
    assert list(rows) == ["train", "eval", "all steps", bench.WALL]
    kind, steps, new_s, old_s, ratio, spread = rows["train"]
    assert (steps, new_s, old_s, ratio, spread) == (2, 25, 40, 25 / 40, "0.50-0.75")
    assert rows["eval"][4] == pytest.approx(10 / 30) and rows["eval"][5] == "0.25-0.50"
    assert rows["all steps"][1] == 5 and rows["all steps"][2] == 35 and rows["all steps"][3] == 70
    assert rows[bench.WALL][2:5] == (60, 100, 0.6)
    table = bench.format_table(bench.ratio_table(new, old), "new", "old")
    assert "wall (whole study)" in table and "0.60" in table
    one = bench.ratio_table(new[:1], old[:1])
    assert one[0][5] == ""  # one round: no range


def test_identical_studies_have_no_differences(bench: ModuleType, tmp_path: Path) -> None:
    assert bench.differences(_study(tmp_path / "new"), _study(tmp_path / "old")) == []


def test_differences_name_the_fingerprint_and_the_line(bench: ModuleType, tmp_path: Path) -> None:
    new = _study(tmp_path / "new", fingerprint="abc", results="model,value\nbase,0.5\nfft,0.7\n")
    old = _study(tmp_path / "old", fingerprint="abd", results="model,value\nbase,0.5\nfft,0.71\n")
    found = bench.differences(new, old)
    assert found[0] == "world fingerprint: abc vs abd"
    assert any("results.csv line 3" in item and "fft,0.7\n" in item + "\n" and "fft,0.71" in item for item in found)
    (old / "per_example.jsonl").unlink()
    assert "per_example.jsonl: missing in old study" in bench.differences(new, old)


def test_a_results_column_added_since_the_revision_is_allowed_only_empty(bench: ModuleType, tmp_path: Path) -> None:
    old = _study(tmp_path / "old", results="model,value,protocol\nbase,0.5,builtin\n")
    same = _study(tmp_path / "same", results="model,value,gamma,protocol\nbase,0.5,,builtin\n")
    assert bench.differences(same, old) == []
    filled = _study(tmp_path / "filled", results="model,value,gamma,protocol\nbase,0.5,0.1,builtin\n")
    assert bench.differences(filled, old) == ["results.csv line 2: added column gamma = '0.1'"]
    changed = _study(tmp_path / "changed", results="model,value,gamma,protocol\nbase,0.6,,builtin\n")
    assert any("line 2 (on the old columns)" in item for item in bench.differences(changed, old))
    lost = _study(tmp_path / "lost", results="model,gamma\nbase,\n")
    assert bench.differences(lost, old) == ["results.csv: columns value, protocol missing in the new study"]


def test_a_preset_rewrites_only_the_world(bench: ModuleType, tmp_path: Path) -> None:
    source = tmp_path / "quick.yaml"
    source.write_text("name: demo\nbase:\n  builtin: quick\ntasks: builtin\ntraining: {epochs: 3}\n")
    assert bench.study_config(source, None, tmp_path) == source.resolve()
    written = yaml.safe_load(bench.study_config(source, "test", tmp_path).read_text())
    assert written == {"name": "demo-test", "base": {"builtin": "test"}, "tasks": "builtin", "training": {"epochs": 3}}


def test_recorded_runs_pair_new_and_old_in_order(bench: ModuleType, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A cut-off benchmark's finished runs (runs.jsonl) give its table: pairs in order, an unpaired run left out."""
    studies = [_study(tmp_path / name) for name in ("n0", "o0", "n1")]
    for label, wall, study in (("new", 30.0, studies[0]), ("old", 60.0, studies[1]), ("new", 31.0, studies[2])):
        bench.record_run(tmp_path, bench.StudyRun(label, wall, {}, {}, (2.0, 1.0, 0.5), study))
    new, old = bench.recorded_runs(tmp_path)
    assert [r.wall for r in new] == [30.0] and [r.wall for r in old] == [60.0]
    assert new[0].by_kind == {"world": 10.0, "train": 10.0, "eval": 2.5} and new[0].load == (2.0, 1.0, 0.5)
    assert bench.main(["--table", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "results: identical" in out and "0.50" in out


def test_the_outcome_as_json_carries_ratios_runs_and_identity(bench: ModuleType, tmp_path: Path) -> None:
    new = [bench.StudyRun("new", 60.0, {"train": 20.0}, {"train": 2}, (1.0, 1.0, 1.0), _study(tmp_path / "n"))]
    old = [bench.StudyRun("old", 100.0, {"train": 40.0}, {"train": 2}, (2.0, 1.0, 1.0), _study(tmp_path / "o"))]
    target = tmp_path / "out" / "speed.json"
    assert bench.print_comparison(new, old, target, {"config": "c.yaml", "study_args": "--jobs 2"}) == 0
    record = json.loads(target.read_text())
    kinds = {row["kind"]: row for row in record["kinds"]}
    assert kinds[bench.WALL]["ratio"] == pytest.approx(0.6) and kinds["train"]["round_ratios"] == [0.5]
    assert record["identical"] is True and record["differences"] == [] and record["study_args"] == "--jobs 2"
    assert [run["label"] for run in record["runs"]] == ["new", "old"] and record["runs"][1]["load"][0] == 2.0
