"""Random-weight llama-architecture GGUFs of realistic shapes, for measuring llama.cpp's GPU buffers.

Run on the GPU machine with llama.cpp's own gguf-py on PYTHONPATH (the `gguf` package is not
installed there):

    PYTHONPATH=llama.cpp/gguf-py python3 genmodel.py OUT_DIR VOCAB_DIR [NAME ...]

The tokenizer (every `tokenizer.*` key, BPE merges included) is copied from one of llama.cpp's
vocab-only GGUFs in VOCAB_DIR, so llama-server loads the file. The weights are a random pool tiled
over each tensor: the values do not matter for buffer sizes, and tiling keeps 5 GB files quick to
write. For each model it also writes NAME.header (the file's bytes up to the tensor data) and
NAME.json (shape and file size), so the estimate can be computed elsewhere on the same header.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: str  # file name in VOCAB_DIR
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int  # written as key_length/value_length when n_head * head_dim != n_embd
    qtype: str  # "F16" or "Q8_0"
    n_ctx_train: int = 131072


SHAPES = {s.name: s for s in (
    # Llama-3.2-3B-like (28 layers there): GQA 3.
    Shape("l3b", "ggml-vocab-llama-spm.gguf", 14, 3072, 24, 8, 8192, 128, "F16"),
    # Qwen2.5-32B-like (64 layers there): GQA 5, 152k vocab.
    Shape("q32", "ggml-vocab-qwen2.gguf", 8, 5120, 40, 8, 27648, 128, "Q8_0"),
    # Qwen3-32B-like (64 layers there): GQA 8, and n_head * head_dim = 8192 != n_embd.
    Shape("q3", "ggml-vocab-qwen2.gguf", 6, 5120, 64, 8, 25600, 128, "Q8_0"),
)}

_POOL_SIZE = 1 << 24
_Q8_SCALE = np.array([2.0**-14], dtype=np.float16).view(np.uint8)  # every Q8_0 block's scale


@functools.lru_cache(maxsize=2)
def _tokenizer(vocab: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, sub_type) of every tokenizer.* key; reading a 152k vocab takes seconds."""
    fields = gguf.GGUFReader(vocab).fields
    array = gguf.GGUFValueType.ARRAY
    return [(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == array else None)
            for key, f in fields.items() if key.startswith("tokenizer.")]


def _copy_tokenizer(w: gguf.GGUFWriter, vocab: Path) -> int:
    n_vocab = 0
    for key, value, vtype, sub_type in _tokenizer(vocab):
        w.add_key_value(key, value, vtype, sub_type=sub_type)
        n_vocab = len(value) if key == "tokenizer.ggml.tokens" else n_vocab
    return n_vocab


class _Weights:
    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.f16 = (rng.standard_normal(_POOL_SIZE, dtype=np.float32) * 0.02).astype(np.float16)
        self.i8 = rng.integers(-127, 128, _POOL_SIZE, dtype=np.int8).view(np.uint8)
        self.offset = 0

    def _tile(self, pool: Any, n: int) -> Any:
        self.offset = (self.offset + 7919) % _POOL_SIZE
        return np.resize(np.roll(pool, self.offset), n)

    def matrix(self, qtype: str, rows: int, cols: int) -> tuple[Any, Any]:
        """(array, raw_dtype) for a rows x cols matrix (cols is the contiguous dimension)."""
        if qtype == "F16":
            return self._tile(self.f16, rows * cols).reshape(rows, cols), None
        blocks = rows * cols // 32
        data = np.empty((blocks, 34), dtype=np.uint8)
        data[:, :2] = _Q8_SCALE
        data[:, 2:] = self._tile(self.i8, blocks * 32).reshape(blocks, 32)
        return data.reshape(rows, cols // 32 * 34), gguf.GGMLQuantizationType.Q8_0


def write(shape: Shape, out: Path, vocab_dir: Path) -> dict[str, Any]:
    start = time.monotonic()
    path = out / f"{shape.name}.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"mi50d vram probe {shape.name}")
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    if shape.n_head * shape.head_dim != shape.n_embd:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if shape.qtype == "F16"
                    else gguf.LlamaFileType.MOSTLY_Q8_0)
    n_vocab = _copy_tokenizer(w, vocab_dir / shape.vocab)
    w.add_vocab_size(n_vocab)
    weights = _Weights(seed=len(shape.name))
    q_dim, kv_dim = shape.n_head * shape.head_dim, shape.n_head_kv * shape.head_dim

    tensor_bytes = 0

    def matrix(name: str, rows: int, cols: int) -> None:
        nonlocal tensor_bytes
        data, raw = weights.matrix(shape.qtype, rows, cols)
        w.add_tensor(name, data, raw_dtype=raw)
        tensor_bytes += data.nbytes

    def norm(name: str) -> None:
        nonlocal tensor_bytes
        w.add_tensor(name, np.ones(shape.n_embd, dtype=np.float32))
        tensor_bytes += 4 * shape.n_embd

    matrix("token_embd.weight", n_vocab, shape.n_embd)
    for i in range(shape.n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", q_dim, shape.n_embd)
        matrix(f"blk.{i}.attn_k.weight", kv_dim, shape.n_embd)
        matrix(f"blk.{i}.attn_v.weight", kv_dim, shape.n_embd)
        matrix(f"blk.{i}.attn_output.weight", shape.n_embd, q_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_up.weight", shape.n_ff, shape.n_embd)
        matrix(f"blk.{i}.ffn_down.weight", shape.n_embd, shape.n_ff)
    norm("output_norm.weight")
    matrix("output.weight", n_vocab, shape.n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # The data section holds every tensor (each padded to the alignment), so this prefix holds at
    # least the whole header: enough for a GGUF reader given a sparse file of the same size.
    size = path.stat().st_size
    with path.open("rb") as f:
        (out / f"{shape.name}.header").write_bytes(f.read(size - tensor_bytes))
    info = {**asdict(shape), "n_vocab": n_vocab, "file_bytes": size,
            "header_bytes": size - tensor_bytes, "seconds": round(time.monotonic() - start, 1)}
    (out / f"{shape.name}.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str]) -> int:
    out, vocab_dir = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name in argv[2:] or list(SHAPES):
        if not (out / f"{name}.json").is_file():
            print(json.dumps(write(SHAPES[name], out, vocab_dir)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
