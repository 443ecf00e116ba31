"""Safetensors checkpoints read tensor by tensor and written shard by shard, never a whole model.

Reading: a model dir's shards are indexed from their headers (8-byte length + JSON, the format's
own layout) and each tensor's bytes are read on demand: `read` with plain file reads into a tensor of its
own (for a tensor its caller changes in place: a copy-on-write map of the file, as `safe_open` gives, would
take a page fault and a copy per page it changes), `view` as a map of the tensor's bytes alone, without a
copy, for a tensor that is only read (the map goes with the tensor: no mapping of a whole input stays
resident between tensors). Reading a file front to back can hash it on the way (`hash_files`), so that the
merge's model card does not read every input a second time to hash it: a read's blocks as they are read, a
view's bytes on a worker thread while the caller computes (`wait_for_hashes`). Pickled checkpoints (`*.bin`,
`*.pt`) are never read.

Writing: every output tensor's name, dtype and shape are known before any is computed (they are
the base's), so each shard's header is written first and each tensor's bytes are appended as soon
as it is merged: no shard is ever held in memory. Shards go into the caller's temporary dir, named
like `save_pretrained`'s (`model-00001-of-00002.safetensors` + `model.safetensors.index.json`).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import torch

from knowstack.errors import KnowstackError
from knowstack.hashing import remember_sha256

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The largest shard any knowstack output is written in (merges, MoEs, trained and merged models alike): the Hub's
# long-standing 5 GB. Below it save_pretrained writes one model.safetensors, ShardedWriter one shard and its index.
MAX_SHARD_BYTES = 5 * 2**30

# safetensors dtype names <-> torch dtypes (the ones a causal LM checkpoint holds)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
READ_BLOCK = 8 << 20  # bytes read (and hashed) at a time: a block is still in the CPU's cache when it is hashed
# bytes of viewed tensors waiting for the hashing thread at most: a view waits beyond it, so that the maps
# the hashing holds on to add little to the process's memory
HASH_BACKLOG = 64 << 20


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
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """The header and where the data starts (8 + the header's length)."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError("header larger than 100 MB")
            return json.loads(handle.read(length)), 8 + length
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
    """The tensors of one or more safetensors files, by name, in file order. hash_files: hash each file whose
    tensors are read front to back in its order, as they are read (hashing.remember_sha256), for
    hashing.known_sha256."""

    def __init__(self, files: list[Path], hash_files: bool = False):
        self.specs: dict[str, TensorSpec] = {}
        self.data_start: dict[Path, int] = {}
        self.hash_files = hash_files
        self._hashing: dict[Path, _RunningHash | None] = {}  # None: read out of order, not hashed
        for file in files:
            header, self.data_start[file] = _read_header(file)
            end = 0
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in DTYPES:
                    raise KnowstackError(f"tensor '{name}' has unsupported dtype {entry['dtype']}", path=file)
                if name in self.specs:
                    raise KnowstackError(f"tensor '{name}' is in two shards", path=file)
                spec = TensorSpec(name, entry["dtype"], tuple(entry["shape"]), file, entry["data_offsets"][0])
                if entry["data_offsets"][1] - spec.offset != spec.nbytes:
                    raise KnowstackError(f"tensor '{name}' has {entry['data_offsets'][1] - spec.offset} bytes for "
                                         f"{spec.nbytes} of its dtype and shape: not a valid safetensors file",
                                         path=file)
                self.specs[name] = spec
                end = max(end, entry["data_offsets"][1])
            size = file.stat().st_size
            if self.data_start[file] + end != size:
                raise KnowstackError(f"{size} bytes where the header says {self.data_start[file] + end}: "
                                     "a truncated or not a valid safetensors file", path=file)

    @classmethod
    def from_dir(cls, model_dir: Path, hash_files: bool = False) -> SafetensorsReader:
        return cls(weight_files(model_dir), hash_files)

    def names(self) -> list[str]:
        """Names in the order their bytes lie on disk, so a full pass reads each file front to back."""
        order = {file: i for i, file in enumerate(dict.fromkeys(s.file for s in self.specs.values()))}
        return sorted(self.specs, key=lambda n: (order[self.specs[n].file], self.specs[n].offset))

    def read(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        tensor = torch.empty(spec.shape, dtype=spec.torch_dtype)
        # a file handle per read (cheap: no mapping, only a seek), so no reader holds files open
        with spec.file.open("rb", buffering=0) as handle:
            running = self._running_hash(spec, handle)
            handle.seek(self.data_start[spec.file] + spec.offset)
            _read_into(handle, tensor, spec, running)
        if running is not None:
            running.done_with(spec.nbytes)
        return tensor

    def view(self, name: str) -> torch.Tensor:
        """The tensor's bytes mapped from its file, not copied: for a tensor that is only read (a private map: a
        write would copy the page it changes, never reach the file). The map lives as long as the tensor (and
        the hashing of its bytes, where the file is hashed); like read(), it hashes a file viewed in order."""
        spec = self.specs[name]
        if spec.nbytes == 0:
            return self.read(name)
        start = self.data_start[spec.file] + spec.offset
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        with spec.file.open("rb", buffering=0) as handle:
            running = self._running_hash(spec, handle)
            try:
                mapped = mmap.mmap(handle.fileno(), start - aligned + spec.nbytes, flags=mmap.MAP_PRIVATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
            except (OSError, ValueError):
                return self.read(name)  # a file system that cannot map files: the plain read (hashed the same)
        tensor = torch.frombuffer(mapped, dtype=spec.torch_dtype, count=math.prod(spec.shape),
                                  offset=start - aligned).view(spec.shape)
        if running is not None:
            _hash_later(running, memoryview(mapped)[start - aligned:], spec.nbytes)
        return tensor

    def read_start(self, name: str, count: int) -> torch.Tensor:
        """The first `count` elements of a tensor (flattened), without reading the rest: a cheap first look before
        a whole read. Not hashed."""
        spec = self.specs[name]
        part = replace(spec, shape=(min(count, math.prod(spec.shape)),))
        tensor = torch.empty(part.shape, dtype=spec.torch_dtype)
        with spec.file.open("rb", buffering=0) as handle:
            handle.seek(self.data_start[spec.file] + spec.offset)
            _read_into(handle, tensor, part, None)
        return tensor

    def _running_hash(self, spec: TensorSpec, handle: BinaryIO) -> _RunningHash | None:
        """The file's hash so far if this tensor's bytes come next in it (started at its first tensor); None
        (and no further hashing of the file) once a read breaks the file's order."""
        if not self.hash_files:
            return None
        running = self._hashing.get(spec.file)
        if running is None and spec.offset == 0 and spec.file not in self._hashing:
            running = self._hashing[spec.file] = _RunningHash(spec.file)
            running.update(memoryview(handle.read(self.data_start[spec.file])))
            running.position = self.data_start[spec.file]
        if running is not None and running.position != self.data_start[spec.file] + spec.offset:
            self._hashing[spec.file] = running = None
        return running


class _RunningHash:
    """sha256 of a file's bytes read so far, in order; remembered (hashing.remember_sha256) when complete.
    position: where the next tensor's bytes must start (advanced as a tensor is read or its hashing queued)."""

    def __init__(self, file: Path):
        self.file = file
        self.stat = os.stat(file)  # before its first byte is read
        self.digest = hashlib.sha256()
        self.position = 0

    def update(self, block: memoryview) -> None:
        self.digest.update(block)

    def done_with(self, nbytes: int) -> None:
        self.position += nbytes
        self.remember_if_complete(self.position)

    def remember_if_complete(self, hashed: int) -> None:
        if hashed == self.stat.st_size:
            remember_sha256(self.file, self.digest.hexdigest(), self.stat)


# views whose bytes wait for the hashing thread: (the job, its bytes)
_HASH_QUEUE: deque[tuple[Future, int]] = deque()


def _hash_later(running: _RunningHash, data: memoryview, nbytes: int) -> None:
    """Hash a viewed tensor's bytes on the hashing thread (the one reads hash their blocks on, so that a file's
    bytes are hashed in order), after at most HASH_BACKLOG bytes of other views still waiting."""
    running.position += nbytes
    hashed = running.position

    def job() -> None:
        running.update(data)
        data.release()
        running.remember_if_complete(hashed)

    while _HASH_QUEUE and sum(n for _, n in _HASH_QUEUE) + nbytes > HASH_BACKLOG:
        _HASH_QUEUE.popleft()[0].result()
    _HASH_QUEUE.append((_InBackground.pool("hash").submit(job), nbytes))


def wait_for_hashes() -> None:
    """Every file hash being taken from viewed tensors is complete (or raised its error)."""
    while _HASH_QUEUE:
        _HASH_QUEUE.popleft()[0].result()


def _read_into(handle: BinaryIO, tensor: torch.Tensor, spec: TensorSpec, running: _RunningHash | None) -> None:
    """The tensor's bytes, read a block at a time (each block hashed while it is in the cache, if hashing)."""
    if spec.nbytes == 0:
        return
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    done = 0
    hashing: _InBackground | None = None  # a block is hashed while the next one is read (both release the GIL)
    while done < spec.nbytes:
        block = view[done:done + READ_BLOCK]
        got = handle.readinto(block)
        if not got:
            raise KnowstackError(f"tensor '{spec.name}' ends past the end of the file (truncated?)", path=spec.file)
        if running is not None:
            if hashing is not None:
                hashing.join()
            hashing = _InBackground("hash", running.update, block[:got])
        done += got
    if hashing is not None:
        hashing.join()


class _InBackground:
    """fn(arg) on a worker thread of `pool` (one per kind of work, kept for the process: no thread started per
    block); join() waits for it and raises what it raised."""

    _pools: dict[str, ThreadPoolExecutor] = {}

    def __init__(self, pool: str, fn: Callable[[memoryview], object], arg: memoryview):
        self._future = self.pool(pool).submit(fn, arg)

    @classmethod
    def pool(cls, name: str) -> ThreadPoolExecutor:
        if name not in cls._pools:
            cls._pools[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"knowstack-{name}")
        return cls._pools[name]

    def join(self) -> None:
        self._future.result()


class ShardedWriter:
    """Writes tensors, in a fixed announced order, into shards of at most `max_shard_bytes`. Each tensor's bytes are
    written in a thread while the caller computes the next one (at most one tensor in flight): a tensor given to
    write() must not change until the next write() or close()."""

    def __init__(self, out_dir: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = MAX_SHARD_BYTES):
        if sys.byteorder != "little":
            raise KnowstackError("safetensors files are little-endian; this machine is not")
        self.out_dir = out_dir
        self.shards = _plan_shards(specs, max_shard_bytes)
        self.expected = [spec for shard in self.shards for spec in shard]
        self._next = 0
        self._handle: BinaryIO | None = None
        self._shard = -1
        self._shard_end = 0  # index of the first tensor past the open shard
        self._writing: _InBackground | None = None

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{len(self.shards):05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self.expected[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise AssertionError(f"writer expected {want_name} {want_dtype} {want_shape}, got {name}")
        data = tensor.detach().contiguous().reshape(-1)
        self._wait()
        if self._next == self._shard_end:
            self._open_next_shard()
        assert self._handle is not None
        self._writing = _InBackground("write", self._handle.write, memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def _wait(self) -> None:
        """The tensor in flight is written (its error raised here)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.join()

    def close(self) -> dict:
        """Finish the last shard and write the index; returns the index."""
        if self._next != len(self.expected):
            raise AssertionError(f"writer got {self._next} of {len(self.expected)} tensors")
        self._wait()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        weight_map = {name: self.shard_name(i) for i, shard in enumerate(self.shards) for name, _, _ in shard}
        total = sum(_nbytes(dtype, shape) for _, dtype, shape in self.expected)
        parameters = sum(math.prod(shape) for _, _, shape in self.expected)
        # the metadata save_pretrained writes (transformers 5): bytes and parameters of all shards together
        index = {"metadata": {"total_parameters": parameters, "total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}
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
