"""Safetensors checkpoints read tensor by tensor and written shard by shard, never a whole model.

Reading: a model dir's shards are indexed from their headers (8-byte length + JSON, the format's
own layout) and each tensor is read on demand through `safe_open`, one handle per read, so no
mapping of a whole input stays resident between tensors. Pickled checkpoints (`*.bin`, `*.pt`)
are never read.

Writing: every output tensor's name, dtype and shape are known before any is computed (they are
the base's), so each shard's header is written first and each tensor's bytes are appended as soon
as it is merged: no shard is ever held in memory. Shards go into the caller's temporary dir, named
like `save_pretrained`'s (`model-00001-of-00002.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from knowstack.errors import KnowstackError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype names <-> torch dtypes (the ones a causal LM checkpoint holds)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # where its bytes start in the file, for reading in file order

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.torch_dtype, self.shape)


def read_header(path: Path) -> dict:
    """A safetensors file's header, without reading any tensor."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError("header larger than 100 MB")
            return json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise KnowstackError(f"not a readable safetensors file: {err}", path=path) from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a HF model dir: the index's shards, or the one model.safetensors."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise KnowstackError(f"not a safetensors index: {err}", path=index) from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        pickled = sorted(p.name for p in model_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" ({', '.join(pickled)} not read: knowstack never unpickles weights)" if pickled else ""
        raise KnowstackError(f"no safetensors weights{hint}", path=model_dir)
    for file in files:
        if not file.is_file():
            raise KnowstackError("shard named in the index is missing", path=file)
    return files


class SafetensorsReader:
    """The tensors of one or more safetensors files, by name, in file order."""

    def __init__(self, files: list[Path]):
        self.specs: dict[str, TensorSpec] = {}
        for file in files:
            header = read_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in DTYPES:
                    raise KnowstackError(f"tensor '{name}' has unsupported dtype {entry['dtype']}", path=file)
                if name in self.specs:
                    raise KnowstackError(f"tensor '{name}' is in two shards", path=file)
                self.specs[name] = TensorSpec(name, entry["dtype"], tuple(entry["shape"]), file,
                                              entry["data_offsets"][0])

    @classmethod
    def from_dir(cls, model_dir: Path) -> SafetensorsReader:
        return cls(weight_files(model_dir))

    def names(self) -> list[str]:
        """Names in the order their bytes lie on disk, so a full pass reads each file front to back."""
        order = {file: i for i, file in enumerate(dict.fromkeys(s.file for s in self.specs.values()))}
        return sorted(self.specs, key=lambda n: (order[self.specs[n].file], self.specs[n].offset))

    def read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        # One handle per read: nothing of the file stays mapped into this process between tensors.
        with safe_open(str(spec.file), framework="pt") as handle:
            return handle.get_tensor(name)


class ShardedWriter:
    """Writes tensors, in a fixed announced order, into shards of at most `max_shard_bytes`."""

    def __init__(self, out_dir: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 5 * 2**30):
        if sys.byteorder != "little":
            raise KnowstackError("safetensors files are little-endian; this machine is not")
        self.out_dir = out_dir
        self.shards = _plan_shards(specs, max_shard_bytes)
        self.expected = [spec for shard in self.shards for spec in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._shard = -1
        self._shard_end = 0  # index of the first tensor past the open shard

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self.expected[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise AssertionError(f"writer expected {want_name} {want_dtype} {want_shape}, got {name}")
        if self._next == self._shard_end:
            self._open_next_shard()
        assert self._handle is not None
        data = tensor.detach().contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> dict:
        """Finish the last shard and write the index; returns the index."""
        if self._next != len(self.expected):
            raise AssertionError(f"writer got {self._next} of {len(self.expected)} tensors")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        weight_map = {name: self.shard_name(i) for i, shard in enumerate(self.shards) for name, _, _ in shard}
        total = sum(_nbytes(dtype, shape) for _, dtype, shape in self.expected)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return index

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard += 1
        shard = self.shards[self._shard]
        self._shard_end = self._next + len(shard)
        self._handle = (self.out_dir / self.shard_name(self._shard)).open("wb")
        self._handle.write(_header_bytes(shard))


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * dtype.itemsize


def _plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = _nbytes(spec[1], spec[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _header_bytes(shard: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in shard:
        end = offset + _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes with trailing spaces
    return struct.pack("<Q", len(encoded)) + encoded


def overwrite_tensors(model_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Writes new values of existing tensors (same dtype and shape) into their bytes in the shards,
    in place: router training changes a few small tensors of a checkpoint that may be very large."""
    reader = SafetensorsReader.from_dir(model_dir)
    for name, tensor in tensors.items():
        spec = reader.specs[name]
        value = tensor.detach().to(spec.torch_dtype).contiguous().cpu()
        if tuple(value.shape) != spec.shape or DTYPE_NAMES[value.dtype] != spec.dtype:
            raise AssertionError(f"{name}: {tuple(value.shape)} does not fit {spec.shape}")
        with spec.file.open("r+b") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            handle.seek(8 + header_length + spec.offset)
            handle.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
