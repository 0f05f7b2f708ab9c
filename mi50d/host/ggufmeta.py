"""A small GGUF reader of our own: header, key/value metadata and tensor infos, never tensor data.

Why not the `gguf` package: it needs numpy and memory-maps the whole file, and the daemon must stay
light; preflight only needs the first kilobytes to megabytes (the tokenizer arrays) of a file that
may be 20 GB. This module owns turning a path into a `GGUFInfo` or one `GGUFError` whose message
says what is wrong (bad magic, unsupported version, truncated file, ...).

File layout (little-endian): magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata
count, the metadata (string key, u32 value type, value), the tensor infos (string name, u32 n_dims,
u64 dims..., u32 ggml type, u64 offset relative to the data section), then padding to
`general.alignment` (default 32) where the data section starts.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# ggml type id -> (name, elements per block, bytes per block), from the block structs in
# ggml-common.h. A tensor's first dimension must be a whole number of blocks.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# Metadata value types: id -> struct of a scalar (8 = string, 9 = array are special).
_SCALARS = {k: struct.Struct(f) for k, f in {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d"}.items()}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# Bounds. The reader's memory and work follow these constants, never a header value or the file's
# size: a crafted file costs at most about MAX_KEPT + MAX_TENSORS tensor infos of memory and
# MAX_WALK small steps, whatever it claims.
MAX_KV = 16_384  # real models have ~50 keys
MAX_KEY = 65_535  # the GGUF spec's limit on a key's length
MAX_KEYS_BYTES = 1 << 20  # all keys together
MAX_TENSORS = 32_768  # a 671B MoE has ~1,100; llama.cpp merges experts into one tensor per layer
MAX_NAME = 63  # ggml's GGML_MAX_NAME (64) includes the terminating NUL
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DEPTH = 4  # arrays of arrays of ...
KEEP_STRING = 1 << 20  # longer string values keep their length only (chat templates are ~10 KB)
KEEP_ARRAY_ITEMS = 64  # arrays of strings or arrays longer than this keep their length only
KEEP_NUMBERS = 1024  # numeric arrays (per-layer values; llama.cpp allows 512 layers)
MAX_KEPT = 8 << 20  # bytes of values kept, per file; past it values keep their length only
MAX_WALK = 4 << 20  # array items stepped over one at a time (a 262k vocabulary is 262k steps)
_ITEM_COST = 32  # what one kept array item costs in Python, roughly (object + list slot)
_CHUNK = 1 << 20  # read size

class GGUFError(Exception):
    """The file is not a usable GGUF; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """A long metadata array, kept as its element type and length only."""

    item_type: int
    length: int


@dataclass(frozen=True, slots=True)
class LongString:
    """A string value longer than KEEP_STRING, kept as its length only."""

    length: int


Value: TypeAlias = "int | float | bool | str | list[Value] | ArrayInfo | LongString"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def nbytes(self) -> int:
        _, block, size = GGML_TYPES[self.ggml_type]
        return (self.dims[0] // block) * size * prod(self.dims[1:]) if self.dims else size


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    metadata: Mapping[str, Value]
    tensors: tuple[TensorInfo, ...]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def is_mmproj(self) -> bool:
        """A multimodal projector (`--mmproj`) rather than a language model."""
        if self.metadata.get("general.type") == "mmproj":
            return True
        return any(k.startswith("clip.") for k in self.metadata)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def data_end(self) -> int:
        """Where the last tensor's data ends; a complete file is at least this long."""
        ends = [t.offset + t.nbytes for t in self.tensors]
        return self.data_offset + max(ends, default=0)

    def arch_value(self, key: str) -> Value | None:
        """`<architecture>.<key>`, e.g. arch_value("block_count")."""
        return self.metadata.get(f"{self.architecture}.{key}")

    def arch_int(self, key: str) -> int | None:
        value = self.arch_value(key)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        return value


class _Reader:
    """Reads the header through its own bounded buffer, so that skipping a long array or string
    costs a seek (or advancing within the buffer), not a read of its bytes."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.pos = 0  # in buf
        self.base = 0  # file offset of buf[0]
        self.keys_left = MAX_KEYS_BYTES
        self.kept_left = MAX_KEPT
        self.walk_left = MAX_WALK

    def tell(self) -> int:
        return self.base + self.pos

    def _truncated(self) -> GGUFError:
        return GGUFError(f"file ends inside the header at byte {min(self.tell(), self.size)} "
                         f"(file is {self.size} bytes): truncated")

    def _fill(self, n: int) -> None:
        if len(self.buf) - self.pos >= n:
            return
        rest = self.buf[self.pos:]
        more = self.f.read(max(_CHUNK, n) - len(rest))
        self.base += self.pos
        self.buf, self.pos = rest + more, 0
        if len(self.buf) < n:
            raise self._truncated()

    def take(self, n: int) -> bytes:
        self._fill(n)
        data = self.buf[self.pos:self.pos + n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        target = self.tell() + n
        if target > self.size:
            self.pos = len(self.buf)
            raise self._truncated()
        if n <= len(self.buf) - self.pos:
            self.pos += n
        else:
            self.f.seek(target)
            self.buf, self.pos, self.base = b"", 0, target

    def unpack(self, st: struct.Struct) -> Any:
        self._fill(st.size)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def u32(self) -> int:
        return int(self.unpack(_U32))

    def u64(self) -> int:
        return int(self.unpack(_U64))

    def key(self) -> str:
        at = self.tell()
        n = self.u64()
        if n > MAX_KEY or n > self.keys_left:
            raise GGUFError(f"metadata key of {n} bytes at byte {at} (GGUF allows {MAX_KEY}, "
                            f"mi50d reads {MAX_KEYS_BYTES >> 10} KiB of keys): corrupt")
        self.keys_left -= n
        return self.take(n).decode("utf-8", errors="replace")

    def string(self) -> str | LongString:
        n = self.u64()
        if n > KEEP_STRING or n + _ITEM_COST > self.kept_left:
            self.skip(n)
            return LongString(n)
        self.kept_left -= n + _ITEM_COST
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> Value:
        if kind in _SCALARS:
            self.kept_left -= _ITEM_COST
            value: Value = self.unpack(_SCALARS[kind])
            return value
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY and depth < MAX_DEPTH:
            return self.array(depth)
        raise self._unknown(kind)

    def _unknown(self, kind: int) -> GGUFError:
        if kind == _ARRAY:
            return GGUFError(f"arrays nested deeper than {MAX_DEPTH} at byte {self.tell()}: "
                             "corrupt")
        return GGUFError(f"unknown metadata value type {kind} at byte {self.tell() - 4}: corrupt")

    def array(self, depth: int) -> Value:
        item_type, length = self.u32(), self.u64()
        scalar = _SCALARS.get(item_type)
        keep = KEEP_NUMBERS if scalar else KEEP_ARRAY_ITEMS
        if length <= keep and length * _ITEM_COST <= self.kept_left:
            return [self.value(item_type, depth + 1) for _ in range(length)]
        self._skip_items(item_type, length, depth)
        return ArrayInfo(item_type, length)

    def _skip_items(self, item_type: int, length: int, depth: int) -> None:
        scalar = _SCALARS.get(item_type)
        if scalar is not None:
            self.skip(length * scalar.size)
            return
        if item_type not in (_STRING, _ARRAY) or (item_type == _ARRAY and depth + 1 >= MAX_DEPTH):
            raise self._unknown(item_type)
        # each item takes at least 8 bytes (a string's length, an array's header)
        if length * 8 > self.size - self.tell():
            raise GGUFError(f"array of {length} items at byte {self.tell()} is longer than "
                            "the file: corrupt")
        if length > self.walk_left:
            raise GGUFError(f"metadata arrays hold more than {MAX_WALK} strings or arrays in "
                            "all, more than any model has: corrupt")
        self.walk_left -= length
        for _ in range(length):
            if item_type == _STRING:
                self.skip(self.u64())
            else:
                inner, n = self.u32(), self.u64()
                self._skip_items(inner, n, depth + 1)


_CACHE: dict[tuple[str, int, int, int, int], GGUFInfo] = {}
_CACHE_SIZE = 64
_CACHE_TENSORS = 8192
_CACHE_KEPT = 1 << 20


def read_gguf(path: Path) -> GGUFInfo:
    """Read and validate `path`'s header; raise GGUFError (OSError for I/O) if it is not usable.

    A good result is remembered by (path, device, inode, size, mtime): preflight runs before every
    start, respawns included, and decoding a 150k-token vocabulary costs ~100 ms each time. A file
    that changes in any of those gets read again; errors are never remembered.
    """
    # O_NONBLOCK: opening a FIFO for reading would wait for a writer
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError("not a regular file (a directory, FIFO or device)")
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        reader = _Reader(f, st.st_size)
        info = _parse(reader, path)
    if info.data_end > info.file_size:
        missing = info.data_end - info.file_size
        raise GGUFError(f"truncated: tensor data ends at byte {info.data_end} but the file has "
                        f"{info.file_size} ({missing} bytes missing; an interrupted download "
                        "or copy?)")
    if len(info.tensors) > _CACHE_TENSORS or reader.kept_left < MAX_KEPT - _CACHE_KEPT:
        return info  # only headers of a real model's size are remembered
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    _CACHE[key] = info
    return info


def _parse(r: _Reader, path: Path) -> GGUFInfo:
    magic = r.f.read(4)
    if magic != MAGIC:
        raise GGUFError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    r.base = 4
    version = r.u32()
    if version not in VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFError(f"header claims {n_tensors} tensors and {n_kv} keys (mi50d reads at "
                        f"most {MAX_TENSORS} and {MAX_KV}): corrupt")
    metadata: dict[str, Value] = {}
    for _ in range(n_kv):
        key = r.key()
        metadata[key] = r.value(r.u32())
    tensors = tuple(_tensor_info(r) for _ in range(n_tensors))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment = {alignment!r} is not a power of two: corrupt")
    for t in tensors:
        if t.offset % alignment:
            raise GGUFError(f"tensor {t.name} offset {t.offset} is not aligned to {alignment}")
    pos = r.tell()
    # like gguf.cpp: the padding before the data section is there only when there is data
    data_offset = (pos + alignment - 1) // alignment * alignment if tensors else pos
    return GGUFInfo(path, version, metadata, tensors, alignment, data_offset, r.size)


def _tensor_info(r: _Reader) -> TensorInfo:
    at = r.tell()
    n = r.u64()
    if n > MAX_NAME:
        raise GGUFError(f"tensor name of {n} bytes at byte {at} (ggml allows {MAX_NAME}): "
                        "corrupt")
    name = r.take(n).decode("utf-8", errors="replace")
    n_dims = r.u32()
    if n_dims > MAX_DIMS:
        raise GGUFError(f"tensor {name} has {n_dims} dimensions (ggml allows {MAX_DIMS}): "
                        "corrupt")
    dims = tuple(r.u64() for _ in range(n_dims))
    ggml_type, offset = r.u32(), r.u64()
    if ggml_type not in GGML_TYPES:
        raise GGUFError(f"tensor {name} has ggml type {ggml_type}, unknown to mi50d "
                        "(a newer quantization?); update mi50d or use another quantization")
    block = GGML_TYPES[ggml_type][1]
    if dims and dims[0] % block:
        raise GGUFError(f"tensor {name}: first dimension {dims[0]} is not a multiple of the "
                        f"{GGML_TYPES[ggml_type][0]} block size {block}: corrupt")
    return TensorInfo(name, dims, ggml_type, offset)
