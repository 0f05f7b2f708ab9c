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
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO, TypeAlias

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

# Metadata value types: id -> struct format of a scalar (8 = string, 9 = array are special).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this keep only their length (tokenizer vocabularies have 150k entries).
KEEP_ARRAY_ITEMS = 64
MAX_STRING = 64 << 20
MAX_DIMS = 8

class GGUFError(Exception):
    """The file is not a usable GGUF; the message says why in one line."""


@dataclass(frozen=True)
class ArrayInfo:
    """A long metadata array, kept as its element type and length only."""

    item_type: int
    length: int


Value: TypeAlias = "int | float | bool | str | list[Value] | ArrayInfo"


@dataclass(frozen=True)
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
    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError(f"file ends inside the header at byte {self.f.tell()} "
                            f"(file is {self.size} bytes): truncated")
        return data

    def scalar(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]
        return value

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING or n > self.size:
            raise GGUFError(f"string length {n} at byte {self.f.tell() - 8} is impossible: corrupt")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0) -> Value:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY and depth < 4:
            item_type, length = self.u32(), self.u64()
            if length > self.size:
                raise GGUFError(f"array length {length} is impossible: corrupt")
            items = [self.value(item_type, depth + 1) for _ in range(length)]
            if length > KEEP_ARRAY_ITEMS:
                return ArrayInfo(item_type, length)
            return items
        raise GGUFError(f"unknown metadata value type {kind} at byte {self.f.tell() - 4}: corrupt")


_CACHE: dict[tuple[str, int, int, int, int], GGUFInfo] = {}
_CACHE_SIZE = 64


def read_gguf(path: Path) -> GGUFInfo:
    """Read and validate `path`'s header; raise GGUFError (OSError for I/O) if it is not usable.

    A good result is remembered by (path, device, inode, size, mtime): preflight runs before every
    start, respawns included, and decoding a 150k-token vocabulary costs ~100 ms each time. A file
    that changes in any of those gets read again; errors are never remembered.
    """
    with path.open("rb", buffering=1 << 20) as f:
        st = os.fstat(f.fileno())
        key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        info = _parse(_Reader(f, st.st_size), path)
    if info.data_end > info.file_size:
        missing = info.data_end - info.file_size
        raise GGUFError(f"truncated: tensor data ends at byte {info.data_end} but the file has "
                        f"{info.file_size} ({missing} bytes missing; an interrupted download "
                        "or copy?)")
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    _CACHE[key] = info
    return info


def _parse(r: _Reader, path: Path) -> GGUFInfo:
    magic = r.f.read(4)
    if magic != MAGIC:
        raise GGUFError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    version = r.u32()
    if version not in VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > r.size or n_kv > r.size:
        raise GGUFError(f"header claims {n_tensors} tensors and {n_kv} keys: corrupt")
    metadata: dict[str, Value] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.u32())
    tensors = tuple(_tensor_info(r) for _ in range(n_tensors))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment = {alignment!r} is not a power of two: corrupt")
    for t in tensors:
        if t.offset % alignment:
            raise GGUFError(f"tensor {t.name} offset {t.offset} is not aligned to {alignment}")
    pos = r.f.tell()
    data_offset = (pos + alignment - 1) // alignment * alignment
    return GGUFInfo(path, version, metadata, tensors, alignment, data_offset, r.size)


def _tensor_info(r: _Reader) -> TensorInfo:
    name = r.string()
    n_dims = r.u32()
    if n_dims > MAX_DIMS:
        raise GGUFError(f"tensor {name} has {n_dims} dimensions: corrupt")
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
