"""modeling/streaming.py: the reader gives every tensor exactly as safetensors does (every dtype, shards, empty and
0-d tensors), refuses damaged files with one clear error, and hashes files read front to back so that a merge's
model card need not read its inputs again; the writer's shards load back as written."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from checkpoints import perturbed
from safetensors.torch import load_file, save_file

from knowstack import hashing
from knowstack.combine.inputs import FullModel
from knowstack.combine.merge import merge_models
from knowstack.errors import KnowstackError
from knowstack.modelcard import dir_sha256
from knowstack.modeling import streaming
from knowstack.modeling.streaming import (
    INDEX_FILE,
    READ_BLOCK,
    SafetensorsReader,
    ShardedWriter,
    wait_for_hashes,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(33, 17, generator=gen),
        "bf16": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(9, generator=gen).to(torch.float16),
        "f64": torch.randn(3, 3, generator=gen).double(),
        "i64": torch.arange(11),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        # more than one read block, and not a multiple of it
        "large": torch.randn(READ_BLOCK // 4 + 1001, generator=gen),
    }


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    save_file(_tensors(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_reads_every_tensor_as_safetensors_does(checkpoint: Path) -> None:
    reader = SafetensorsReader.from_dir(checkpoint)
    expected = load_file(checkpoint / "model.safetensors")
    assert set(reader.names()) == set(expected)
    for name in reader.names():
        got = reader.read(name)
        assert got.dtype == expected[name].dtype and got.shape == expected[name].shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected[name].reshape(-1).view(torch.uint8)), name
        assert got.is_contiguous()


def test_reads_sharded_checkpoints_in_file_order(tmp_path: Path) -> None:
    tensors = _tensors()
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate([names[:4], names[4:]]):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update(dict.fromkeys(part, file))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    reader = SafetensorsReader.from_dir(tmp_path)
    order = reader.names()
    files = [reader.specs[n].file.name for n in order]
    assert files == sorted(files)  # one shard after the other
    for file in set(files):
        offsets = [reader.specs[n].offset for n in order if reader.specs[n].file.name == file]
        assert offsets == sorted(offsets)
    for name in names:
        assert torch.equal(reader.read(name).view(-1).view(torch.uint8), tensors[name].reshape(-1).view(torch.uint8))


def test_a_truncated_or_padded_file_is_one_clear_error(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(KnowstackError, match="truncated") as err:
        SafetensorsReader([file])
    assert str(file) in str(err.value)
    file.write_bytes(data + b"\0" * 8)
    with pytest.raises(KnowstackError, match="not a valid safetensors file"):
        SafetensorsReader([file])


def test_a_tensor_whose_bytes_do_not_fit_its_shape_is_refused(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode()
    header += b" " * (-len(header) % 8)
    file = tmp_path / "model.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 20)
    with pytest.raises(KnowstackError, match="'w' has 20 bytes for 24"):
        SafetensorsReader([file])


def _forbid_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(hashing, "file_sha256", refuse)


def test_a_file_read_front_to_back_is_hashed_on_the_way(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = checkpoint / "model.safetensors"
    expected = hashlib.sha256(file.read_bytes()).hexdigest()
    reader = SafetensorsReader([file], hash_files=True)
    for name in reader.names():
        reader.read(name)
    _forbid_reading(monkeypatch)
    assert hashing.known_sha256(file) == expected


def test_a_view_is_the_files_bytes_uncopied_and_changing_it_leaves_the_file_alone(checkpoint: Path) -> None:
    file = checkpoint / "model.safetensors"
    before = file.read_bytes()
    reader = SafetensorsReader.from_dir(checkpoint)
    expected = load_file(file)
    for name in reader.names():
        got = reader.view(name)
        assert got.dtype == expected[name].dtype and got.shape == expected[name].shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected[name].reshape(-1).view(torch.uint8)), name
    large = reader.view("large")
    large.add_(1)  # a private map: the change is this process's copy of the page, never the file's
    assert torch.equal(large, expected["large"] + 1)
    del large
    assert file.read_bytes() == before


def test_a_file_viewed_and_read_in_order_is_hashed_on_a_thread(checkpoint: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    file = checkpoint / "model.safetensors"
    expected = hashlib.sha256(file.read_bytes()).hexdigest()
    monkeypatch.setattr(streaming, "HASH_BACKLOG", 1024)  # views wait for the hashing of earlier ones too
    reader = SafetensorsReader([file], hash_files=True)
    for i, name in enumerate(reader.names()):
        reader.view(name) if i % 3 else reader.read(name)
    wait_for_hashes()
    _forbid_reading(monkeypatch)
    assert hashing.known_sha256(file) == expected


def test_no_hash_is_remembered_for_a_file_read_out_of_order_or_changed(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _tensors()
    out_of_order, changed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, out_of_order)
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, changed)
    reader = SafetensorsReader([out_of_order], hash_files=True)
    for name in reversed(reader.names()):
        reader.read(name)
    other = SafetensorsReader([changed], hash_files=True)
    for name in other.names():
        other.read(name)
    stat = changed.stat()
    changed.write_bytes(changed.read_bytes())  # the same bytes, but written again: they could have been any
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = []
    real = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda path: calls.append(path) or real(path))
    assert hashing.known_sha256(out_of_order) == hashlib.sha256(out_of_order.read_bytes()).hexdigest()
    assert hashing.known_sha256(changed) == hashlib.sha256(changed.read_bytes()).hexdigest()
    assert calls == [out_of_order, changed]


def test_no_hashing_unless_asked(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = checkpoint / "model.safetensors"
    reader = SafetensorsReader([file])
    for name in reader.names():
        reader.read(name)
    calls = []
    real = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda path: calls.append(path) or real(path))
    hashing.known_sha256(file)
    assert calls == [file]


def test_the_writers_shards_load_back_as_written(tmp_path: Path) -> None:
    tensors = _tensors()
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = ShardedWriter(tmp_path, specs, max_shard_bytes=READ_BLOCK // 2)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    index = writer.close()
    assert len(set(index["weight_map"].values())) == 2  # the large tensor alone in a shard
    loaded: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(tmp_path / file))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_a_merge_hashes_its_inputs_for_the_card_as_it_reads_them(tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    models = [perturbed(tiny_model_dir, tmp_path / f"m{i}", seed=i, scale=0.01) for i in range(2)]
    expected = [dir_sha256(m) for m in models]  # read and hashed here, before the merge
    real = hashing.file_sha256

    def no_second_read(path: Path) -> str:
        assert Path(path).suffix != ".safetensors", f"{path} read again to hash it"
        return real(path)

    monkeypatch.setattr(hashing, "file_sha256", no_second_read)
    card = (merge_models("average", models, tmp_path / "merged") / "README.md").read_text()
    assert all(digest is not None and digest in card for digest in expected)


def test_a_file_that_cannot_be_mapped_is_read(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = checkpoint / "model.safetensors"
    expected = hashlib.sha256(file.read_bytes()).hexdigest()

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no mmap here")

    monkeypatch.setattr(streaming.mmap, "mmap", refuse)
    reader = SafetensorsReader([file], hash_files=True)
    for name in reader.names():
        assert torch.equal(reader.view(name).reshape(-1).view(torch.uint8),
                           load_file(file)[name].reshape(-1).view(torch.uint8))
    wait_for_hashes()
    _forbid_reading(monkeypatch)
    assert hashing.known_sha256(file) == expected


def test_a_task_vector_made_from_a_view_has_the_read_ones_bits(tiny_model_dir: Path, tmp_path: Path) -> None:
    # a merge makes all but its last task vector from mapped views (peak memory: the last is read as before)
    model, base = FullModel(perturbed(tiny_model_dir, tmp_path / "m", seed=1, scale=0.01)), FullModel(tiny_model_dir)
    for name in model.specs:
        base_tensor = base.full(name)
        if base_tensor.is_floating_point():
            viewed, read = model.delta(name, base_tensor, view=True), model.delta(name, base_tensor)
            assert viewed.dtype == read.dtype == torch.float32 and torch.equal(viewed, read), name
