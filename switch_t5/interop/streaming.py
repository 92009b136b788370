"""Chunked tensor copies under a memory budget: sources, sinks and the copy plan.

A conversion is a `Plan`: target tensors (name, shape, dtype) and pieces that fill them from
source tensors (`Copy`, optionally transposing the last two axes and placing the piece at a
leading index, e.g. expert e of a stacked [experts, embed, mlp] kernel), constants (`Const`,
small tensors such as a fresh router) and zeros (`Zeros`, padding rows and optimizer state).
`run_plan` moves every piece in chunks of at most `budget_bytes / 16` (a chunk exists as read,
transposed, cast and encoded copies at once, plus TensorStore's buffers), so the peak memory of
a conversion is bounded by the budget whatever the checkpoint size: switch-c-2048's
[2048, 2080, 6144] expert kernels are copied one expert slice (or part of one) at a time.

Sources read a region `tensor[index]` (index: ints and `slice`s with explicit bounds):
`SafetensorsSource` (HF safetensors, single or sharded with an index file; reads byte runs with
`readinto`, no memory map), `ZarrSource` (TensorStore zarr arrays: T5X and orbax checkpoints),
`MemorySource` (numpy arrays). Sinks write regions: `SafetensorsSink` (preallocated files
written with `pwrite`), `ZarrSink` (TensorStore zarr), `MemorySink`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from switch_t5 import errors

DEFAULT_BUDGET_BYTES = 1 << 30  # 1 GiB
# A chunk's bytes are at most budget / 16: it is alive as read, transposed and cast copies plus
# TensorStore's encode buffers at the same time.
_CHUNK_FRACTION = 16


def fix_malloc_mmap_threshold(threshold: int = 1 << 16) -> bool:
    """Makes glibc serve every allocation above `threshold` with its own mmap.

    glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), after which
    chunk-sized buffers come from the heap and their pages are kept: the resident memory of a
    streamed conversion then grows far beyond what is alive. Measured on a 64 MiB tensor with a
    16 MiB budget and 4 MiB chunks: +104 MiB RSS without this, +21 MiB with it. Returns False
    off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


Index = tuple[int | slice, ...]

_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# Regions and chunks.
# ---------------------------------------------------------------------------------------------


def _bounds(shape: Sequence[int], index: Index) -> list[tuple[int, int]]:
    """(start, stop) per axis of `index` (ints and bounded slices; missing axes are full)."""
    out = []
    for axis, size in enumerate(shape):
        item = index[axis] if axis < len(index) else slice(0, size)
        if isinstance(item, slice):
            start = 0 if item.start is None else item.start
            stop = size if item.stop is None else item.stop
            if item.step not in (None, 1) or not 0 <= start <= stop <= size:
                raise ValueError(f"region {index} is not a unit-step box inside shape {shape}")
            out.append((start, stop))
        else:
            if not 0 <= item < size:
                raise IndexError(f"index {item} outside axis {axis} of shape {shape}")
            out.append((int(item), int(item) + 1))
    return out


def region_shape(shape: Sequence[int], index: Index) -> tuple[int, ...]:
    """The shape of `tensor[index]` (ints drop their axis)."""
    bounds = _bounds(shape, index)
    keep = [not isinstance(index[a], int) if a < len(index) else True for a in range(len(shape))]
    return tuple(e - s for (s, e), k in zip(bounds, keep) if k)


def byte_runs(shape: Sequence[int], itemsize: int, index: Index) -> Iterator[tuple[int, int]]:
    """(byte offset, byte length) of the C-order contiguous runs of `tensor[index]`, in order."""
    bounds = _bounds(shape, index)
    n = len(shape)
    # Axes after `split` are covered fully, so each run spans them and a range of `split`.
    split = n - 1
    while split > 0 and bounds[split] == (0, shape[split]):
        split -= 1
    if n == 0:
        yield 0, itemsize
        return
    strides = [int(np.prod(shape[a + 1 :])) for a in range(n)]
    start, stop = bounds[split]
    length = (stop - start) * strides[split] * itemsize
    if length == 0:
        return
    for lead in itertools.product(*(range(s, e) for s, e in bounds[:split])):
        offset = sum(i * strides[a] for a, i in enumerate(lead)) + start * strides[split]
        yield offset * itemsize, length


def chunk_shape(shape: Sequence[int], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """The largest C-order box (ones, then a partial axis, then full axes) under `max_bytes`."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ()
    for axis in range(len(shape)):
        tail = int(np.prod(shape[axis + 1 :])) * itemsize
        if tail <= max_bytes:
            step = max(1, min(shape[axis], max_bytes // max(tail, 1)))
            return (1,) * axis + (step,) + shape[axis + 1 :]
    # Even one element of the last axis is over the budget: one element at a time.
    return (1,) * len(shape)


def chunk_regions(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The boxes of a regular chunk grid, in C order."""
    ranges = [
        [slice(s, min(s + c, n)) for s in range(0, n, c)] if n else [slice(0, 0)]
        for n, c in zip(shape, chunks)
    ]
    yield from itertools.product(*ranges)


# ---------------------------------------------------------------------------------------------
# Sources.
# ---------------------------------------------------------------------------------------------


class Source(Protocol):
    """Named tensors with partial reads."""

    prefers_row_reads: bool

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

    def read(self, name: str, index: Index) -> np.ndarray: ...


def _missing(name: str, where: str, names: Sequence[str]) -> KeyError:
    near = [n for n in names if n.split(".")[-2:] == name.split(".")[-2:]][:3]
    return KeyError(
        f"tensor {name!r} is not in {where}"
        + (f" (similar names: {near})" if near else "")
        + "; the checkpoint does not match the expected architecture"
    )


def read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    """(header dict, byte offset of the data) of one .safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise errors.UserError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise errors.UserError(f"{path}: header of {n} bytes; not a safetensors file")
        header = json.loads(f.read(n))
    return header, 8 + n


class SafetensorsSource:
    """HF safetensors weights: `model.safetensors` or shards listed in `*.index.json`.

    Reads regions as byte runs with `readinto` into a preallocated array (nothing else is held).
    """

    prefers_row_reads = True

    def __init__(self, path: str):
        self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            single = os.path.join(path, "model.safetensors")
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted({os.path.join(path, v) for v in weight_map.values()})
            elif os.path.exists(single):
                files = [single]
            else:
                raise FileNotFoundError(
                    f"no model.safetensors or model.safetensors.index.json in {path}; pass a "
                    "Hugging Face model directory saved with safetensors (save_pretrained's "
                    "default)"
                )
        else:
            files = [path]
        for file in files:
            header, data_start = read_safetensors_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise errors.UserError(
                        f"{file}: tensor {name} has unsupported dtype {info['dtype']}"
                    )
                begin, _ = info["data_offsets"]
                self._entries[name] = (
                    file,
                    _ST_DTYPES[info["dtype"]],
                    tuple(info["shape"]),
                    data_start + begin,
                )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name):
        if name not in self._entries:
            raise _missing(name, "the safetensors files", list(self._entries))
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name)[1]

    def read(self, name: str, index: Index) -> np.ndarray:
        file, dtype, shape, start = self._entry(name)
        out = np.empty(region_shape(shape, index), dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        pos = 0
        with open(file, "rb", buffering=0) as f:
            for offset, length in byte_runs(shape, dtype.itemsize, index):
                f.seek(start + offset)
                got = f.readinto(buf[pos : pos + length])
                if got != length:
                    raise OSError(f"{file}: short read of tensor {name} (truncated file?)")
                pos += length
        return out


def _ts():
    import tensorstore as ts

    return ts


_CONTEXT = None


def ts_context():
    """One TensorStore context with little concurrency: each worker thread buffers whole chunks
    (and keeps its own malloc arena), so fewer threads keep the peak memory near the budget."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = _ts().Context(
            {
                "data_copy_concurrency": {"limit": 1},
                "file_io_concurrency": {"limit": 2},
                "cache_pool": {"total_bytes_limit": 0},
            }
        )
    return _CONTEXT


class ZarrSource:
    """TensorStore arrays by name (T5X `target.*` zarr dirs, orbax zarr or OCDBT arrays).

    A value may also be a numpy array (T5X stores small arrays inline in its msgpack file).
    """

    prefers_row_reads = False

    def __init__(self, specs: Mapping[str, dict[str, Any]]):
        self._specs = dict(specs)
        self._open: dict[str, Any] = {}

    def names(self) -> list[str]:
        return sorted(self._specs)

    def _array(self, name: str):
        if name not in self._specs:
            raise _missing(name, "the checkpoint", list(self._specs))
        if name not in self._open:
            spec = self._specs[name]
            self._open[name] = (
                np.asarray(spec)
                if not isinstance(spec, dict)
                else _ts().open(spec, open=True, context=ts_context()).result()
            )
        return self._open[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        array = self._array(name)
        return array.dtype if isinstance(array, np.ndarray) else np.dtype(array.dtype.numpy_dtype)

    def read(self, name: str, index: Index) -> np.ndarray:
        array = self._array(name)
        if isinstance(array, np.ndarray):
            return np.array(array[tuple(index)])
        return np.asarray(array[tuple(index)].read().result())


class MemorySource:
    """Numpy arrays by name."""

    prefers_row_reads = False

    def __init__(self, arrays: Mapping[str, Any]):
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}

    def names(self) -> list[str]:
        return sorted(self._arrays)

    def _array(self, name):
        if name not in self._arrays:
            raise _missing(name, "the given arrays", list(self._arrays))
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._array(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return self._array(name).dtype

    def read(self, name: str, index: Index) -> np.ndarray:
        return np.array(self._array(name)[tuple(index)])


# ---------------------------------------------------------------------------------------------
# Sinks.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A tensor to write: shape, dtype and the chunk shape its writes use."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None = None


class Sink(Protocol):
    def open(self, targets: Mapping[str, TargetSpec]) -> None: ...

    def write(self, name: str, index: Index, value: np.ndarray) -> None: ...

    def close(self) -> None: ...


class MemorySink:
    """Writes into numpy arrays (`arrays` after `close`)."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def open(self, targets: Mapping[str, TargetSpec]) -> None:
        self.arrays = {k: np.zeros(t.shape, t.dtype) for k, t in targets.items()}

    def write(self, name: str, index: Index, value: np.ndarray) -> None:
        self.arrays[name][tuple(index)] = value

    def close(self) -> None:
        pass


class SafetensorsSink:
    """HF safetensors files, preallocated from the target specs and filled with `pwrite`.

    Tensors go to `model.safetensors`, or to `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`.
    """

    def __init__(self, directory: str, max_shard_bytes: int | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self._where: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}
        self._fds: list[int] = []

    def open(self, targets: Mapping[str, TargetSpec]) -> None:
        os.makedirs(self.directory, exist_ok=True)
        shards: list[list[str]] = [[]]
        size = 0
        for name in sorted(targets):
            t = targets[name]
            if np.dtype(t.dtype) not in _ST_NAMES:
                raise ValueError(f"safetensors cannot store {name} of dtype {t.dtype}")
            nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
            if self.max_shard_bytes and shards[-1] and size + nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        weight_map = {}
        for file, names in zip(files, shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                t = targets[name]
                nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
                header[name] = {
                    "dtype": _ST_NAMES[np.dtype(t.dtype)],
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
                weight_map[name] = file
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it
            fd = os.open(os.path.join(self.directory, file), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            os.ftruncate(fd, 8 + len(raw) + offset)
            self._fds.append(fd)
            for name in names:
                t = targets[name]
                begin = header[name]["data_offsets"][0]
                self._where[name] = (fd, 8 + len(raw) + begin, tuple(t.shape), np.dtype(t.dtype))
        if n > 1:
            total = sum(
                int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in targets.values()
            )
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2
                )

    def write(self, name: str, index: Index, value: np.ndarray) -> None:
        fd, start, shape, dtype = self._where[name]
        data = np.ascontiguousarray(value, dtype).reshape(-1).view(np.uint8)
        pos = 0
        for offset, length in byte_runs(shape, dtype.itemsize, index):
            os.pwrite(fd, memoryview(data[pos : pos + length]), start + offset)
            pos += length
        if pos != data.size:
            raise ValueError(f"write of {value.shape} into {name}{index} has the wrong size")

    def close(self) -> None:
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []


def zarr_spec(path: str, spec: TargetSpec | None = None, compressor: str = "zstd") -> dict:
    """A TensorStore zarr (v2) spec for a local directory; with `spec`, for creating it."""
    out: dict[str, Any] = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
    if spec is not None:
        out["metadata"] = {
            "shape": list(spec.shape),
            "chunks": list(spec.chunks or spec.shape) if spec.shape else [],
            "compressor": {"id": compressor, "level": 1}
            if compressor == "zstd"
            else {"id": compressor},
        }
        out["dtype"] = "bfloat16" if spec.dtype == ml_dtypes.bfloat16 else np.dtype(spec.dtype).name
    return out


class ZarrSink:
    """TensorStore zarr arrays, one directory per tensor under `paths[name]`."""

    def __init__(self, paths: Mapping[str, str], compressor: str = "zstd"):
        self.paths = dict(paths)
        self.compressor = compressor
        self._arrays: dict[str, Any] = {}

    def open(self, targets: Mapping[str, TargetSpec]) -> None:
        ts = _ts()
        for name, t in targets.items():
            spec = zarr_spec(self.paths[name], t, self.compressor)
            # A zarr chunk never spans more than one write (no read-modify-write buffers).
            self._arrays[name] = ts.open(
                spec, create=True, delete_existing=True, context=ts_context()
            ).result()

    def write(self, name: str, index: Index, value: np.ndarray) -> None:
        self._arrays[name][tuple(index)].write(value).result()

    def close(self) -> None:
        self._arrays = {}


# ---------------------------------------------------------------------------------------------
# The plan and its execution.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Copy:
    """dst[dst_lead][:n0, :n1, ...] = cast(src[src_lead][:n0, ...]) (transposed: last two axes).

    Attributes:
      src: source tensor name.
      dst: target tensor name.
      src_lead: leading indices into the source (e.g. (e,) for expert e of a stacked kernel).
      dst_lead: leading indices into the target.
      transpose: swap the two axes of a 2-D piece ([out, in] torch <-> [in, out] flax).
      extent: the piece's extent in source orientation, from 0 on every axis (None = the whole
        source tensor after `src_lead`); used for padded vocabularies.
    """

    src: str
    dst: str
    src_lead: tuple[int, ...] = ()
    dst_lead: tuple[int, ...] = ()
    transpose: bool = False
    extent: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Zeros:
    """dst[region] = 0 (region: a box of slices; None = the whole tensor)."""

    dst: str
    region: tuple[slice, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Const:
    """dst[dst_lead] = value (a small array, e.g. a freshly initialised router)."""

    dst: str
    value: np.ndarray
    dst_lead: tuple[int, ...] = ()


Piece = Copy | Zeros | Const


@dataclasses.dataclass
class Plan:
    """Target tensors and the pieces that fill them (every element exactly once)."""

    targets: dict[str, TargetSpec]
    pieces: list[Piece]


@dataclasses.dataclass
class RunStats:
    """What `run_plan` moved: tensors, bytes written, the largest chunk it held (and, from a
    whole conversion, `notes`: lines for the user, e.g. what was removed or recorded)."""

    tensors: int = 0
    bytes_written: int = 0
    max_chunk_bytes: int = 0
    chunk_budget_bytes: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


def _copy_geometry(piece: Copy, source: Source, chunk_bytes: int, dst_itemsize: int):
    src_shape = source.shape(piece.src)
    lead = len(piece.src_lead)
    inner = tuple(piece.extent) if piece.extent is not None else tuple(src_shape[lead:])
    if piece.transpose and len(inner) != 2:
        raise ValueError(f"transpose needs a 2-D piece; {piece.src} gives {inner}")
    itemsize = max(source.dtype(piece.src).itemsize, dst_itemsize, 4)
    dst_inner = inner[::-1] if piece.transpose else inner
    # Chunk on the side that reads/writes whole rows cheaply: the safetensors source (rows are
    # contiguous bytes), else the target (its zarr chunks then match the writes exactly).
    on_source = source.prefers_row_reads
    chunks = chunk_shape(inner if on_source else dst_inner, itemsize, chunk_bytes)
    dst_chunks = chunks[::-1] if (on_source and piece.transpose) else chunks
    return inner, dst_inner, chunks, on_source, dst_chunks


def plan_chunks(plan: Plan, source: Source | None, budget_bytes: int) -> Plan:
    """Fills in each target's chunk shape from the first piece that writes it."""
    chunk_bytes = max(budget_bytes // _CHUNK_FRACTION, 1)
    targets = dict(plan.targets)
    done = set()
    for piece in plan.pieces:
        if piece.dst in done or not isinstance(piece, Copy):
            continue
        t = targets[piece.dst]
        _, _, _, _, dst_chunks = _copy_geometry(
            piece, source, chunk_bytes, np.dtype(t.dtype).itemsize
        )
        lead = (1,) * len(piece.dst_lead)
        targets[piece.dst] = dataclasses.replace(t, chunks=lead + tuple(dst_chunks))
        done.add(piece.dst)
    for name, t in targets.items():
        if name not in done:
            itemsize = max(np.dtype(t.dtype).itemsize, 4)
            targets[name] = dataclasses.replace(
                t, chunks=chunk_shape(t.shape, itemsize, chunk_bytes)
            )
    return Plan(targets, list(plan.pieces))


def run_plan(
    plan: Plan, source: Source | None, sink: Sink, budget_bytes: int = DEFAULT_BUDGET_BYTES
) -> RunStats:
    """Executes `plan` from `source` into `sink`, holding at most ~budget_bytes at a time.

    Raises:
      ValueError: a piece does not fit its target (names both shapes).
    """
    if budget_bytes < 4096:
        raise errors.UserError(f"budget_bytes={budget_bytes} is too small; use at least 4096")
    fix_malloc_mmap_threshold()
    plan = plan_chunks(plan, source, budget_bytes)
    chunk_bytes = max(budget_bytes // _CHUNK_FRACTION, 1)
    stats = RunStats(tensors=len(plan.targets), chunk_budget_bytes=chunk_bytes)
    sink.open(plan.targets)
    try:
        for piece in plan.pieces:
            t = plan.targets[piece.dst]
            dtype = np.dtype(t.dtype)
            if isinstance(piece, Const):
                value = np.asarray(piece.value, dtype)
                expect = tuple(t.shape[len(piece.dst_lead) :])
                if value.shape != expect:
                    raise ValueError(f"{piece.dst}: constant of shape {value.shape}, need {expect}")
                sink.write(piece.dst, piece.dst_lead, value)
                stats.bytes_written += value.nbytes
                continue
            if isinstance(piece, Zeros):
                region = piece.region or tuple(slice(0, n) for n in t.shape)
                box = [(r.start or 0, r.stop) for r in region]
                shape = tuple(e - s for s, e in box)
                for sub in chunk_regions(
                    shape, chunk_shape(shape, max(dtype.itemsize, 4), chunk_bytes)
                ):
                    idx = tuple(slice(s + r.start, s + r.stop) for (s, _), r in zip(box, sub))
                    zeros = np.zeros(region_shape(t.shape, idx), dtype)
                    sink.write(piece.dst, idx, zeros)
                    stats.bytes_written += zeros.nbytes
                continue
            inner, dst_inner, chunks, on_source, _ = _copy_geometry(
                piece, source, chunk_bytes, dtype.itemsize
            )
            dst_room = tuple(t.shape[len(piece.dst_lead) :])
            if len(dst_room) != len(dst_inner) or any(a > b for a, b in zip(dst_inner, dst_room)):
                raise ValueError(
                    f"{piece.src} {tuple(source.shape(piece.src))} does not fit {piece.dst} "
                    f"{tuple(t.shape)} (piece {dst_inner} at {piece.dst_lead})"
                )
            base = inner if on_source else dst_inner
            for region in chunk_regions(base, chunks):
                if piece.transpose:
                    src_r, dst_r = (region, region[::-1]) if on_source else (region[::-1], region)
                else:
                    src_r = dst_r = region
                value = source.read(piece.src, piece.src_lead + tuple(src_r))
                if piece.transpose:
                    value = value.T
                value = np.ascontiguousarray(value, dtype)
                stats.max_chunk_bytes = max(stats.max_chunk_bytes, value.nbytes)
                sink.write(piece.dst, piece.dst_lead + tuple(dst_r), value)
                stats.bytes_written += value.nbytes
                del value
    finally:
        sink.close()
    return stats


def check_plan_covers(plan: Plan) -> None:
    """Raises ValueError naming targets that no piece writes (they would stay uninitialised)."""
    written = {p.dst for p in plan.pieces}
    missing = sorted(set(plan.targets) - written)
    if missing:
        raise errors.UserError(f"no source for {missing[:5]}{'...' if len(missing) > 5 else ''}")


def nbytes(targets: Mapping[str, TargetSpec]) -> int:
    return int(sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in targets.values()))
