"""A registry at a URL fsspec reaches: the same commands give the same records and weights as a local registry;
the append-only log keeps concurrent writers from losing or doubling anything (8 processes on file://, a
stale writer, a store that cannot create exclusively); tampering is refused on read, remote or cached; and
the whole cycle runs against an S3 server (moto) through s3fs, as it would against AWS."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from test_compose import tensors
from test_registry import flip_last_byte, make_adapter, make_finetune, make_task, write_mc_task

from knowstack.cli import main
from knowstack.errors import KnowstackError
from knowstack.evaluate import new_knowledge
from knowstack.registry import Registry, init_registry
from knowstack.registry import records as records_module
from knowstack.registry.compose import METHODS, ComposeOptions, compose
from knowstack.registry.contribute import contribute
from knowstack.registry.core import cache_dir


def comparable(records: list[dict]) -> list[dict]:
    """Records without what differs between two registries by construction (ids, times, the base's source)."""
    out = []
    for record in records:
        record = {k: v for k, v in record.items() if k not in ("id", "created_at")}
        record["scores"] = [{k: v for k, v in s.items() if k != "measured_at"} for s in record["scores"]]
        out.append(record)
    return out


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNOWSTACK_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def inputs(tmp_path: Path, tiny_model_dir: Path) -> dict[str, Path]:
    write_mc_task(tmp_path / "old")
    return {"old": tmp_path / "old", "adapter": make_adapter(tiny_model_dir, tmp_path / "a1", seed=1),
            "finetune": make_finetune(tiny_model_dir, tmp_path / "ft", seed=3),
            "stance": make_task(tmp_path / "tasks", "Stance"), "quiz": make_task(tmp_path / "tasks", "Quiz")}


def build(root: str | Path, base: Path, inputs: dict[str, Path]) -> dict:
    """The same history on any registry: init with old knowledge, two contributions, one TIES version."""
    init_registry(root, base, old_tasks=["ks_toy"], include_path=inputs["old"])
    contribute(root, "stance", adapter=inputs["adapter"], task=inputs["stance"], keep_data=True)
    contribute(root, "quiz-ft", model=inputs["finetune"], task=inputs["quiz"])
    return compose(root, "merge-ties", options=ComposeOptions(density=0.5), gate_old=100.0, gate_task=100.0)


def test_a_remote_registry_records_what_a_local_one_does(tmp_path: Path, tiny_model_dir: Path,
                                                          inputs: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    url = f"memory://reg-{uuid.uuid4().hex}"
    remote_v1, local_v1 = build(url, tiny_model_dir, inputs), build(tmp_path / "local", tiny_model_dir, inputs)
    with Registry.open(url) as remote, Registry.open(tmp_path / "local") as local:
        for mine, theirs in zip(comparable(remote.versions()), comparable(local.versions()), strict=True):
            assert mine == theirs
        assert remote_v1["files"] == local_v1["files"]  # the same bytes, so the same object ids
        with remote.view("v1") as a, local.view("v1") as b:
            mine, theirs = tensors(a), tensors(b)
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert remote.verify() == local.verify()
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    log = sorted(fs.ls(f"{root}/log", detail=False))
    assert [p.rsplit("/", 1)[-1] for p in log] == [f"{i:08d}.json" for i in range(1, 6)]
    # one entry per write: init, two contributions, the base's scores on their tasks (one evaluation), the version
    assert [json.loads(fs.cat_file(p))["op"] for p in log] == ["init", "version", "version", "scores", "version"]
    assert not list((tmp_path / "cache").rglob(".compose/*"))  # the build is gone once recorded
    # the commands a user runs take the URL like a path
    assert main(["registry", "list", url]) == 0 and "stance" in capsys.readouterr().out
    assert main(["log", url]) == 0 and "v1" in capsys.readouterr().out
    assert main(["export", url, "v1", "--out", str(tmp_path / "exported")]) == 0
    with Registry.open(tmp_path / "local") as local, local.view("v1") as b:
        assert tensors(tmp_path / "exported").keys() == tensors(b).keys()
    assert main(["advise", url]) == 0
    # a file no record points to (as a failed contribution leaves): kept while young, then collected
    (tmp_path / "orphan.bin").write_bytes(b"left behind")
    with Registry.open(url) as reg:
        orphan, _ = reg.store.put_file(tmp_path / "orphan.bin")
        assert reg.collect_garbage() == []
        assert [stored.name for stored in reg.collect_garbage(grace_seconds=0)] == [orphan]
        assert not fs.exists(f"{root}/objects/{orphan[:2]}/{orphan}") and reg.verify() > 0


def test_a_remote_compose_that_dies_midway_resumes_from_its_local_work_dir(
        tiny_model_dir: Path, inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://reg-{uuid.uuid4().hex}"
    init_registry(url, tiny_model_dir, old_tasks=["ks_toy"], include_path=inputs["old"])
    contribute(url, "stance", adapter=inputs["adapter"], task=inputs["stance"])
    contribute(url, "quiz-ft", model=inputs["finetune"], task=inputs["quiz"])
    real_score, calls = new_knowledge.evaluate_task, []  # what the study's evaluation step scores a task with

    def dies_on_the_candidates_second_task(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2 + 2:  # the base on the 2 new tasks first, then the candidate's 2nd task
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(new_knowledge, "evaluate_task", dies_on_the_candidates_second_task)
    with pytest.raises(KeyboardInterrupt):
        compose(url, "merge-ties", options=ComposeOptions(density=0.5))
    with Registry.open(url) as reg:
        assert [r["name"] for r in reg.versions()] == ["base", "stance", "quiz-ft"]
        assert {s["task"] for s in reg.base()["scores"]} == {"ks_toy", "Stance", "Quiz"}  # recorded as measured
    [work] = [p for p in (cache_dir(url) / ".compose").iterdir() if p.is_dir()]
    assert (work / "model" / "config.json").is_file()
    assert len(list((work / "eval" / "artifacts" / ".partial").glob("*/new-*.json"))) == 1

    def must_not_rebuild(build: object) -> None:
        raise AssertionError("the finished build was redone")

    monkeypatch.setitem(METHODS, "merge-ties", dataclasses.replace(METHODS["merge-ties"], build=must_not_rebuild))
    monkeypatch.setattr(new_knowledge, "evaluate_task", real_score)
    said: list[str] = []
    record = compose(url, "merge-ties", options=ComposeOptions(density=0.5), say=said.append)
    assert any("built before, kept" in m for m in said) and record["name"] == "v1" and not work.exists()


def test_tampering_is_refused_at_the_store_and_in_the_cache(tmp_path: Path, tiny_model_dir: Path,
                                                            inputs: dict[str, Path]) -> None:
    url = f"memory://reg-{uuid.uuid4().hex}"
    init_registry(url, tiny_model_dir)
    record = contribute(url, "victim", adapter=inputs["adapter"], task=inputs["stance"])
    sha = record["files"]["adapter_model.safetensors"]
    fs, remote = fsspec.filesystem("memory"), f"{url.removeprefix('memory://')}/objects/{sha[:2]}/{sha}"
    good = fs.cat_file(remote)
    cached = cache_dir(url) / "objects" / sha[:2] / sha
    flip_last_byte(cached)  # a cached copy edited on this machine
    with Registry.open(url) as reg, pytest.raises(KnowstackError, match="tampered") as caught:
        reg.verify(["victim"])
    assert str(cached) in str(caught.value)
    cached.unlink()
    fs.pipe_file(remote, good[:-1] + bytes([good[-1] ^ 0xFF]))  # the stored object edited at the store
    with Registry.open(url) as reg, pytest.raises(KnowstackError, match="tampered") as caught:
        reg.verify(["victim"])
    assert f"{url}/objects/{sha[:2]}/{sha}" in str(caught.value) and not cached.exists()
    fs.pipe_file(remote, good)
    with Registry.open(url) as reg:
        assert reg.verify(["victim"]) == len(record["files"]) + 2  # its files, its eval and test splits
    with Registry.open(url) as reg, reg.view("victim"):
        assert cached.is_file()  # reading fills the cache again
    fs.pipe_file(remote, good[:-1] + bytes([good[-1] ^ 0xFF]))  # verify checks the store, not the good cached copy
    assert main(["registry", "verify", url, "victim"]) == 2


def test_a_stale_writer_replays_and_never_doubles_a_name(tiny_model_dir: Path, inputs: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"memory://reg-{uuid.uuid4().hex}"
    init_registry(url, tiny_model_dir)
    with Registry.open(url) as slow, Registry.open(url) as fast:
        slow.versions()
        first = contribute(url, "first", adapter=inputs["adapter"], task=inputs["stance"])
        assert fast.name_taken("first")
        # `slow` misses the entry `first` wrote (as if it had listed the log just before): its claim of the same
        # log number fails, it replays, and then sees the name is taken
        refresh, calls = records_module.LogRecords.refresh, []

        def stale_once(self: records_module.LogRecords) -> None:
            calls.append(self)
            if len(calls) > 1:
                refresh(self)

        monkeypatch.setattr(records_module.LogRecords, "refresh", stale_once)
        twin = {**{k: first[k] for k in ("kind", "method", "files", "content_hash")}, "objects": {}}
        from knowstack.registry.db import NewVersion

        with pytest.raises(KnowstackError, match="'first' is taken"):
            slow.record(NewVersion(name="first", **twin))
        calls.clear()
        slow.record(NewVersion(name="second", **twin))  # a free name lands, at the next number
        monkeypatch.setattr(records_module.LogRecords, "refresh", refresh)
        assert [r["name"] for r in fast.versions()] == ["base", "first", "second"]


class OverwritingMemoryFileSystem(MemoryFileSystem):
    """A store that takes mode "xb" as "wb", as some fsspec backends do: the log would silently lose entries."""

    protocol = "sloppymem"
    store: dict = {}
    pseudo_dirs = [""]

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> object:
        return super()._open(path, mode.replace("x", "w"), **kwargs)


def test_a_store_without_exclusive_creation_is_refused(tiny_model_dir: Path) -> None:
    fsspec.register_implementation("sloppymem", OverwritingMemoryFileSystem, clobber=True)
    with pytest.raises(KnowstackError, match="does not refuse a second exclusive creation"):
        init_registry("sloppymem://reg", tiny_model_dir)


def test_init_refuses_an_existing_registry_and_foreign_files_and_a_broken_log(tiny_model_dir: Path) -> None:
    url = f"memory://reg-{uuid.uuid4().hex}"
    init_registry(url, tiny_model_dir)
    with pytest.raises(KnowstackError, match="already exists"):
        init_registry(url, tiny_model_dir)
    fs, root = fsspec.filesystem("memory"), url.removeprefix("memory://")
    other = f"memory://other-{uuid.uuid4().hex}"
    fs.pipe_file(f"{other.removeprefix('memory://')}/notes.txt", b"mine")
    with pytest.raises(KnowstackError, match=r"not a registry's \(notes.txt\)"):
        init_registry(other, tiny_model_dir)
    with pytest.raises(KnowstackError, match="not a registry"):
        Registry.open(other)
    fs.pipe_file(f"{root}/log/00000003.json", b"{}")  # entry 2 missing
    with pytest.raises(KnowstackError, match="gap: 00000002.json is missing"):
        Registry.open(url)
    fs.pipe_file(f"{root}/log/00000002.json", b'{"op": "version", "at": "now", "version": {"name": 1}}')
    with pytest.raises(KnowstackError, match="00000002.json: malformed registry log entry"):
        Registry.open(url)


def test_an_unreachable_registry_url_is_one_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["registry", "list", "nosuchproto://team/reg"]) == 2
    assert "cannot open this registry URL" in capsys.readouterr().err
    assert main(["log", f"memory://missing-{uuid.uuid4().hex}"]) == 2
    assert "not a registry" in capsys.readouterr().err
    # a store that fails (here: the first log entry is a directory, unreadable) is named, with no traceback
    broken = tmp_path / "broken"
    (broken / "log" / "00000001.json").mkdir(parents=True)
    assert main(["registry", "list", f"file://{broken}"]) == 2
    err = "".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert f"file://{broken}:theregistry'sstorefailed" in err


def test_eight_contributors_at_once_on_a_shared_file_url(tmp_path: Path, tiny_model_dir: Path,
                                                         inputs: dict[str, Path]) -> None:
    """Four distinct names and four processes racing for one name: the four and exactly one of the rest land."""
    url = f"file://{tmp_path / 'shared' / 'reg'}"
    init_registry(url, tiny_model_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    names = [f"crowd-{i}" for i in range(4)] + ["same"] * 4
    procs = [subprocess.Popen(
        [sys.executable, "-m", "knowstack.cli", "contribute", url, "--name", name, "--adapter",
         str(inputs["adapter"]), "--task", str(inputs["stance"]), "--author", f"user{i}", "--eval-batch-size", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, name in enumerate(names)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    codes = [proc.returncode for proc in procs]
    assert codes[:4] == [0] * 4, errors
    assert sorted(codes[4:]) == [0, 2, 2, 2], errors
    assert all("'same' is taken" in err for err, code in zip(errors[4:], codes[4:], strict=True) if code)
    with Registry.open(url) as reg:
        records = reg.versions()
        assert sorted(r["name"] for r in records) == sorted(["base", "same", *names[:4]])
        assert reg.verify() > 0 and all(r["scores"] for r in records if r["name"] != "base")
    log = sorted((tmp_path / "shared" / "reg" / "log").iterdir())
    assert [p.name for p in log] == [f"{i:08d}.json" for i in range(1, 7)]
    assert all(json.loads(p.read_text())["op"] in ("init", "version") for p in log)


WRITER = """
import sys
from knowstack.registry import Registry
url, who, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Registry.open(url) as reg:
    for i in range(count):
        reg.add_scores("base", [{"task": f"{who}-{i}", "kind": "new", "metric": "accuracy", "value": i / count}])
"""


def test_the_log_loses_nothing_under_contention(tmp_path: Path, tiny_model_dir: Path) -> None:
    """8 processes appending 25 entries each as fast as they can, all racing for the same next log numbers."""
    url = f"file://{tmp_path / 'reg'}"
    init_registry(url, tiny_model_dir)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, f"w{w}", "25"], stderr=subprocess.PIPE, text=True)
             for w in range(8)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, errors
    with Registry.open(url) as reg:
        tasks = {s["task"] for s in reg.base()["scores"]}
    assert tasks == {f"w{w}-{i}" for w in range(8) for i in range(25)}
    assert len(list((tmp_path / "reg" / "log").glob("*.json"))) == 1 + 8 * 25


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, str]]:
    """An S3 endpoint (moto's server) with a bucket; the env points s3fs at it, in this process and in children."""
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("team-bucket")
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_registry_on_s3(s3: dict[str, str], tmp_path: Path, tiny_model_dir: Path, inputs: dict[str, Path],
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Through s3fs against an S3 server: init, three contributors at once, a compose, export, verify."""
    url = "s3://team-bucket/models/reg"
    v1_local = build(tmp_path / "local", tiny_model_dir, inputs)
    init_registry(url, tiny_model_dir, old_tasks=["ks_toy"], include_path=inputs["old"])
    env = {**os.environ, **s3, "OMP_NUM_THREADS": "1"}
    args = [("stance", ["--adapter", str(inputs["adapter"]), "--task", str(inputs["stance"]), "--keep-data"]),
            ("quiz-ft", ["--model", str(inputs["finetune"]), "--task", str(inputs["quiz"])]),
            ("other", ["--adapter", str(inputs["adapter"]), "--task", str(inputs["quiz"])])]
    procs = [subprocess.Popen([sys.executable, "-m", "knowstack.cli", "contribute", url, "--name", name, *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, extra in args]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    v1 = compose(url, "merge-ties", contributions=["stance", "quiz-ft"], options=ComposeOptions(density=0.5),
                 gate_old=100.0, gate_task=100.0)
    assert v1["files"] == v1_local["files"]  # the same weights as the local registry's v1
    assert main(["export", url, "v1", "--out", str(tmp_path / "exported")]) == 0
    with Registry.open(url) as reg:
        assert sorted(r["name"] for r in reg.versions()) == ["base", "other", "quiz-ft", "stance", "v1"]
        assert reg.verify() > 0
    assert main(["registry", "gc", url, "--grace-hours", "0"]) == 0
    assert "0 unreferenced files" in capsys.readouterr().out
