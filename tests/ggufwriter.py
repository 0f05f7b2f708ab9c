"""Tiny real GGUF files for tests, written with the `gguf` package (never with our own reader's
code, so the reader is checked against an independent writer)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

# Quantized tensors as (ggml type, bytes per block, elements per block), from the gguf package.
QUANTIZED = [gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0,
             gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K,
             gguf.GGMLQuantizationType.MXFP4, gguf.GGMLQuantizationType.IQ4_XS]


def _quantized(qtype: gguf.GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return np.zeros((rows, cols // block * size), dtype=np.uint8)


def write_model(path: Path, *, n_layer: int = 2, n_embd: int = 256, n_head: int = 4,
                n_head_kv: int = 2, n_vocab: int = 512, n_ctx_train: int = 4096,
                qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0,
                alignment: int | None = None, tied: bool = False,
                block_count: int | None = None, per_layer_kv: bool = False,
                arch: str = "llama", deepstack: int | None = None) -> Path:
    """A llama-architecture model GGUF with the tensor shapes its metadata implies; `tied`
    leaves out output.weight (the output reuses token_embd); `block_count` overrides the
    header's layer count (the tensors stay those of `n_layer`); `per_layer_kv` writes
    head_count_kv as one value per layer, as hybrid models do; `arch` names the architecture
    (e.g. "qwen3vl", with `deepstack` as its n_deepstack_layers)."""
    w = gguf.GGUFWriter(path, arch)
    layers = n_layer if block_count is None else block_count
    if layers < 1 << 32:
        w.add_block_count(layers)  # u32, as llama.cpp expects
    else:
        w.add_uint64(f"{arch}.block_count", layers)
    if deepstack is not None:
        w.add_uint32(f"{arch}.n_deepstack_layers", deepstack)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_embd * 2)
    w.add_head_count(n_head)
    w.add_head_count_kv([n_head_kv] * n_layer if per_layer_kv else n_head_kv)
    w.add_vocab_size(n_vocab)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(n_vocab)])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    head_dim = n_embd // n_head
    w.add_tensor("token_embd.weight", _quantized(qtype, n_vocab, n_embd), raw_dtype=qtype)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", _quantized(qtype, n_embd, n_embd), raw_dtype=qtype)
        kv = _quantized(qtype, n_head_kv * head_dim, n_embd)
        w.add_tensor(f"blk.{i}.attn_k.weight", kv, raw_dtype=qtype)
        w.add_tensor(f"blk.{i}.attn_v.weight", kv, raw_dtype=qtype)
        w.add_tensor(f"blk.{i}.ffn_up.weight", _quantized(qtype, n_embd * 2, n_embd),
                     raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((n_vocab, n_embd), dtype=np.float16))
    _finish(w)
    return path


def write_mmproj(path: Path, *, n_embd: int = 256, deepstack: int = 0,
                 projector: str = "qwen3vl_merger") -> Path:
    """A tiny vision projector that llama-server's clip loader accepts (with --no-warmup), laid
    out as clip.cpp reads a Qwen-VL merger: clip.* keys, a 2-block vision tower of width 32, the
    merger mm.0 / mm.2 whose output (mm.2.bias) is `n_embd` long, and `deepstack` deepstack
    layers (v.deepstack.N.*, N below the tower's block count)."""
    width, ff, blocks, merged = 32, 64, max(2, deepstack), 4 * 32  # spatial merge 2x2
    w = gguf.GGUFWriter(path, "clip")
    w.add_type("mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.use_gelu", True)
    w.add_string("clip.projector_type", projector)
    for key, value in {"embedding_length": width, "feed_forward_length": ff,
                       "block_count": blocks, "projection_dim": n_embd,
                       "attention.head_count": 2, "image_size": 64, "patch_size": 16,
                       "spatial_merge_size": 2}.items():
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def add(name: str, *shape: int) -> None:  # numpy order: the last dimension is ne[0]
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))

    add("v.patch_embd.weight", width, 3, 16, 16)
    add("v.patch_embd.weight.1", width, 3, 16, 16)
    add("v.patch_embd.bias", width)
    add("v.position_embd.weight", 16, width)
    for i in range(blocks):
        for name, shape in (("attn_qkv.weight", (3 * width, width)), ("attn_qkv.bias", (3 * width,)),
                            ("attn_out.weight", (width, width)), ("attn_out.bias", (width,)),
                            ("ln1.weight", (width,)), ("ln1.bias", (width,)),
                            ("ln2.weight", (width,)), ("ln2.bias", (width,)),
                            ("ffn_up.weight", (ff, width)), ("ffn_up.bias", (ff,)),
                            ("ffn_down.weight", (width, ff)), ("ffn_down.bias", (width,))):
            add(f"v.blk.{i}.{name}", *shape)
    for i in range(deepstack):
        for name, shape in (("norm.weight", (merged,)), ("norm.bias", (merged,)),
                            ("fc1.weight", (merged, merged)), ("fc1.bias", (merged,)),
                            ("fc2.weight", (n_embd, merged)), ("fc2.bias", (n_embd,))):
            add(f"v.deepstack.{i}.{name}", *shape)
    add("v.post_ln.weight", width)
    add("v.post_ln.bias", width)
    add("mm.0.weight", merged, merged)
    add("mm.0.bias", merged)
    add("mm.2.weight", n_embd, merged)
    add("mm.2.bias", n_embd)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Crafted files, byte by byte, for the reader's bounds: headers that claim what no real model
# does. Zero bytes read as empty strings, empty u8 arrays or u8 zeros, so a long run of them is
# written as a hole (a sparse file: cheap to make, and read back as zeros).
U8, U32, U64, STRING, ARRAY = 0, 4, 10, 8, 9


def raw_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def raw_kv(key: str, kind: int, payload: bytes) -> bytes:
    return raw_string(key) + struct.pack("<I", kind) + payload


def raw_array(item_type: int, length: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, length) + items


def raw_tensor(name: str, dims: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (raw_string(name) + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def write_raw(path: Path, kvs: Sequence[bytes], tensors: Sequence[bytes] = (), *,
              n_kv: int | None = None, n_tensors: int | None = None, hole: int = 0,
              after: bytes = b"") -> Path:
    """A GGUF v3 header with these key/values and tensor infos (counts as given, or the real
    ones), then `hole` zero bytes (sparse) and `after`."""
    with path.open("wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                      len(kvs) if n_kv is None else n_kv))
        for kv in kvs:
            f.write(kv)
        for t in tensors:
            f.write(t)
        f.seek(hole, 1)
        f.write(after)
        f.truncate()
    return path
