"""Faults of the machine met mid-run (a full disk, a read-only dir, an unreadable file): one `error:` line naming
the path and what to do, exit 1, nothing half-written, and the study resumes to the same results once fixed.

The faults are injected (tests may run as root, where chmod does not stop a write): the OS's own errors raised
where the OS raises them (a write, a temporary dir's creation, an open)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from safetensors import SafetensorError
from test_registry import make_finetune, make_task, write_mc_task

from knowstack.cli import main
from knowstack.modeling.streaming import ShardedWriter
from knowstack.study import executors
from knowstack.study.executors import execute


def enospc() -> OSError:
    """A full disk's error as a write raises it (no file named); a new one each time: the path it gets named
    with on its way up is its own."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def small_study(tmp_path: Path, base: Path) -> Path:
    """Two fine-tunes of the tiny base and their average: train, merge and eval steps, in seconds."""
    write_mc_task(tmp_path / "old")
    tasks = [{"name": name, "path": str(make_task(tmp_path / "tasks", name, n=4)), "metric": "accuracy"}
             for name in ("Stance", "Notes")]
    config = {
        "name": "faults", "base": {"model": str(base)}, "tasks": tasks,
        "old_knowledge": {"tasks": ["ks_toy"], "include_path": str(tmp_path / "old")},
        "training": {"lr": 1e-3, "max_steps": 1, "batch_size": 2, "micro_batch_size": 2, "max_length": 32},
        "evaluation": {"batch_size": 4, "max_new_tokens": {"accuracy": 2}},
        "methods": {"merge": {"finetune": ["fft"], "methods": ["average"]}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The study run without a fault."""
    tmp = tmp_path_factory.mktemp("faults-reference")
    assert main(["study", str(small_study(tmp, tiny_model_dir)), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def leftovers(out: Path) -> list[str]:
    """Temporary files or dirs of knowstack.atomic left anywhere under `out`."""
    return [str(p) for p in out.rglob("*") if ".tmp-" in p.name]


def fail_on_call(calls: int, error: BaseException, original: Callable[..., Any]) -> Callable[..., Any]:
    """`original`, except that its call number `calls` (from 1) raises `error`."""
    count = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count == calls:
            raise error
        return original(*args, **kwargs)

    return wrapped


@contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """Opening `path` fails as a file without read permission does (chmod 000 does not stop root)."""
    real_open = Path.open

    def refusing(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", refusing)
        yield


def test_a_study_through_faults_then_resumed_gives_the_same_results(
        tmp_path: Path, tiny_model_dir: Path, reference: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config, out = small_study(tmp_path, tiny_model_dir), tmp_path / "run"
    command = ["study", str(config), "--out", str(out)]
    artifacts = out / "artifacts"

    # the disk fills while the first fine-tune's weights are written (safetensors' writer wraps the OS error)
    import transformers.modeling_utils as hf

    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as patch:
        patch.setattr(hf, "safe_save_file", fail_on_call(1, full, hf.safe_save_file))
        assert main(command) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "No space left on device" in line and "free some space" in line
    assert "run the same command again" in line
    assert leftovers(out) == []
    done_before = {p.name for p in artifacts.iterdir()}

    # ... then while the merge writes its shards (the OS error of a write: no file named)
    with monkeypatch.context() as patch:
        patch.setattr(ShardedWriter, "write", fail_on_call(3, enospc(), ShardedWriter.write))
        assert main(command) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(artifacts) in line and "No space left on device" in line
    assert leftovers(out) == []
    assert {p.name for p in artifacts.iterdir()} > done_before  # the fine-tunes were kept

    # ... then a task's test file, read when the study was checked, cannot be read when its evaluation comes
    test_file = tmp_path / "tasks" / "Notes" / "test.json"

    def execute_unreadable(step: Any, ctx: Any) -> Any:
        with unreadable(test_file):
            return execute(step, ctx)

    with monkeypatch.context() as patch:
        patch.setattr(executors, "execute", execute_unreadable)
        assert main(command) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(test_file) in line and "Permission denied" in line
    assert leftovers(out) == []

    assert main(command) == 0
    assert (out / "results.csv").read_text() == (reference / "results.csv").read_text()


def test_a_read_only_study_dir_is_one_line(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    config, out = small_study(tmp_path, tiny_model_dir), tmp_path / "run"
    real_mkdtemp = tempfile.mkdtemp

    def read_only(suffix: Any = None, prefix: Any = None, dir: Any = None) -> str:  # noqa: A002 - tempfile's names
        if dir is not None and Path(dir).is_relative_to(out):  # named as mkdtemp names the dir it could not make
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.path.join(dir, f"{prefix}abc123{suffix or ''}"))
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert main(["study", str(config), "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "Read-only file system" in line and "writable disk" in line and ".tmp-" not in line
    assert str(out / "artifacts") in line and leftovers(out) == []


def test_a_merge_on_a_full_disk_leaves_no_half_written_model(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    models = [make_finetune(tiny_model_dir, tmp_path / f"ft{seed}", seed=seed) for seed in (1, 2)]
    out = tmp_path / "merged"
    monkeypatch.setattr(ShardedWriter, "write", fail_on_call(2, enospc(), ShardedWriter.write))
    assert main(["merge", "--method", "average", "--base", str(tiny_model_dir), "--models", *map(str, models),
                 "--out", str(out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {out}: No space left on device: free some space on that disk (or give another output dir)"
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_fault_in_a_worker_process_is_raised_as_the_same_os_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs > 1: a step's error comes back from its worker as text; a fault comes back as the OSError it was."""
    from knowstack.study.executors import StepOutcome, run_step_task_reporting

    step = SimpleNamespace(key="abc")

    def full(*args: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(executors, "run_step_task", full)
    outcome = run_step_task_reporting(step, None, 1)  # type: ignore[arg-type]
    raised = outcome.exception(step)  # type: ignore[arg-type]
    assert isinstance(raised, OSError) and raised.errno == errno.ENOSPC
    bug = StepOutcome(1.0, "Traceback ...").exception(step)  # type: ignore[arg-type]
    assert not isinstance(bug, OSError) and "step abc failed" in str(bug)


def test_which_errors_are_faults_and_the_path_they_name() -> None:
    from knowstack.errors import fault_message, os_fault

    copy = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/models/base/config.json")
    copy.filename2 = "/runs/x/artifacts/merge-1"  # shutil.copy: source, then destination
    assert fault_message(copy).startswith("/runs/x/artifacts/merge-1: No space left on device: free some space")
    unreadable_file = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/task/test.json")
    assert fault_message(unreadable_file, "/runs/x").startswith("/data/task/test.json: Permission denied: ")
    assert fault_message(enospc(), "/runs/x").startswith("/runs/x: No space left on device")
    # a bug keeps its traceback: a missing file (inputs are checked before the run), anything else
    assert os_fault(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) is None
    assert os_fault(ValueError("shapes differ")) is None and os_fault(RuntimeError("(os error 2)")) is None
