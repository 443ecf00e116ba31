"""--out of a dir a command writes whole: a new or empty dir; a non-empty one is refused (exit 2, one line naming it
and --overwrite) before any compute unless --overwrite is given; an input, or a dir inside or holding one, is
refused even with --overwrite. One check (validate.py check_out_dir) for train, merge, extract-lora, statistics,
mix, build-world and export."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_registry import make_adapter, make_task

from knowstack.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("out-dirs")
    task = make_task(root / "tasks", "Stance", n=4)
    registry = root / "registry"
    assert main(["registry", "init", str(registry), "--base", str(tiny_model_dir)]) == 0
    return {"model": tiny_model_dir, "task": task, "adapter": make_adapter(tiny_model_dir, root / "adapter", seed=1),
            "registry": registry}


COMMANDS = {
    "train": "train --model {model} --task {task} --lr 1e-3 --max-steps 1 --batch-size 2 --micro-batch-size 2",
    "merge": "merge --method average --models {model} {model}",
    "extract-lora": "extract-lora --base {model} --model {model} --rank 2",
    "statistics": "statistics {model} --train-data {task}/train.json --kind gram --examples 2",
    "mix": "mix --base {model} --models {adapter} {adapter}",
    "build-world": "build-world --preset test",
    "export": "export {registry} base",
}


def argv(command: str, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*COMMANDS[command].format(**{k: str(v) for k, v in inputs.items()}).split(), "--out", str(out), *extra]


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_non_empty_out_dir_is_refused_before_any_compute(command: str, inputs: dict[str, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's own file")
    capsys.readouterr()
    assert main(argv(command, inputs, out)) == 2
    err = one_error(capsys)
    assert str(out) in err and "--overwrite" in err and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing replaced, nothing added


@pytest.mark.parametrize("command", ["train", "merge", "extract-lora", "statistics", "mix", "export"])
def test_an_input_is_never_the_out_dir_even_with_overwrite(command: str, inputs: dict[str, Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    source = inputs["registry"] if command == "export" else inputs["adapter"] if command == "mix" else inputs["model"]
    before = sorted(p.name for p in source.iterdir())
    capsys.readouterr()
    assert main(argv(command, inputs, source, "--overwrite")) == 2
    err = one_error(capsys)
    assert f"is the input {source}" in err and "--out" in err
    assert sorted(p.name for p in source.iterdir()) == before


def test_an_out_dir_inside_or_holding_an_input_is_refused(inputs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    inside = inputs["model"] / "merged"
    assert main(argv("merge", inputs, inside, "--overwrite")) == 2
    assert f"is inside the input {inputs['model']}" in one_error(capsys) and not inside.exists()
    holder = inputs["task"].parent
    assert main(argv("train", inputs, holder, "--overwrite")) == 2
    assert f"holds the input {inputs['task']}" in one_error(capsys) and inputs["task"].is_dir()


def test_overwrite_replaces_a_non_empty_dir_and_an_empty_one_needs_none(inputs: dict[str, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    assert main(argv("merge", inputs, out)) == 0  # empty: as good as new
    assert (out / "config.json").is_file()
    (out / "notes.txt").write_text("left over")
    assert main(argv("merge", inputs, out, "--overwrite")) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    exported = tmp_path / "exported"
    assert main(argv("export", inputs, exported)) == 0
    assert main(argv("export", inputs, exported, "--overwrite")) == 0
    assert (exported / "knowstack-export.json").is_file()


def test_an_out_path_that_is_a_file_is_refused(inputs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "file"
    out.write_text("not a dir")
    assert main(argv("merge", inputs, out, "--overwrite")) == 2
    assert "is not a directory" in one_error(capsys) and out.read_text() == "not a dir"


API_CALLS = {
    "train": lambda api, i, out: api.train(i["model"], i["task"], out, lr=1e-3, max_steps=1, batch_size=2,
                                           micro_batch_size=2),
    "merge": lambda api, i, out: api.merge("average", [i["model"], i["model"]], out),
    "statistics": lambda api, i, out: api.statistics(i["model"], i["task"] / "train.json", out, kinds=("gram",),
                                                     examples=2),
    "mix": lambda api, i, out: api.mix(i["model"], [i["adapter"], i["adapter"]], out, router="random"),
}


@pytest.mark.parametrize("call", list(API_CALLS))
def test_the_api_never_writes_over_an_input(call: str, inputs: dict[str, Path]) -> None:
    """The API replaces a non-empty out (it has no --overwrite), but never one of its inputs: train(out=model)
    would delete the model it trains."""
    from knowstack import api
    from knowstack.errors import KnowstackError

    source = inputs["adapter"] if call == "mix" else inputs["model"]
    before = sorted(p.name for p in source.iterdir())
    with pytest.raises(KnowstackError, match=f"is the input {source}"):
        API_CALLS[call](api, inputs, source)
    assert sorted(p.name for p in source.iterdir()) == before


def test_a_study_never_fills_a_dir_that_is_not_a_study_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A study's --out is new, empty or a study dir it resumes (test_study.py resumes one); a user's other dir is
    refused before any step, nothing written into it."""
    from knowstack.config import CONFIG_DIR

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own file")
    capsys.readouterr()
    assert main(["study", str(CONFIG_DIR / "builtin-quick.yaml"), "--out", str(mine)]) == 2
    err = one_error(capsys)
    assert str(mine) in err and "not a study dir" in err and "--out" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
