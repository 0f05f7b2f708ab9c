"""Tiny llama-architecture GGUF models with random weights, for tests, the demo and benchmarks.

The tokenizer (tokens, scores, token types, special ids) comes from a vocab-only GGUF such as
llama.cpp's `models/ggml-vocab-llama-spm.gguf`, so llama-server loads the file and answers chat
completions (with gibberish). The same parameters and seed always give the same bytes.
Needs `gguf` and numpy (the `test` extra), imported lazily: the daemon never imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Bump when the bytes written for the same parameters change, so cached files are regenerated.
GENERATOR_VERSION = 1
VOCAB_FILE = Path("models/ggml-vocab-llama-spm.gguf")
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                   "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                   "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                   "tokenizer.ggml.add_eos_token")


@dataclass(frozen=True)
class TinyModel:
    """The shape of a model. `size_mb`, when set, widens the feed-forward layers until the file
    is about that big, for benchmarks that need a load that takes seconds."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_ff: int = 128
    n_ctx: int = 512
    seed: int = 0
    size_mb: int | None = None

    def feed_forward(self, n_vocab: int) -> int:
        if self.size_mb is None:
            return self.n_ff
        fixed = 2 * n_vocab * self.n_embd * 2 + self.n_layer * 4 * self.n_embd**2 * 2
        per_ff = self.n_layer * 3 * self.n_embd * 2  # gate, up, down in f16
        n_ff = max(self.n_ff, (self.size_mb * 2**20 - fixed) // per_ff)
        return -(-n_ff // 64) * 64

    def key(self, vocab: Path) -> str:
        """Identifies the file `write` produces: parameters, vocab content, generator version."""
        vocab_hash = hashlib.sha256(vocab.read_bytes()).hexdigest()
        text = json.dumps([asdict(self), vocab_hash, GENERATOR_VERSION], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tokenizer(vocab: Path) -> dict[str, Any]:
    stat = vocab.stat()
    return dict(_read_tokenizer(vocab, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_tokenizer(vocab: Path, mtime_ns: int, size: int) -> dict[str, Any]:
    """Decoding 32000 tokens takes a second; the (path, mtime, size) key keeps reuse honest."""
    from gguf import GGUFReader

    fields = GGUFReader(vocab).fields
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in fields]
    if missing:
        raise ValueError(f"{vocab}: not a vocab GGUF, it has no {', '.join(missing)}")
    return {k: fields[k].contents() for k in _TOKENIZER_KEYS if k in fields}


def write(path: Path, vocab: Path, model: TinyModel = TinyModel()) -> Path:
    """Write the model to `path` (atomically: a temporary file, then a rename)."""
    import gguf
    import numpy as np

    tok = _tokenizer(vocab)
    n_vocab = len(tok["tokenizer.ggml.tokens"])
    n_embd, n_ff = model.n_embd, model.feed_forward(n_vocab)
    rng = np.random.default_rng(model.seed)

    def weight(*shape: int) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("mi50d tiny test model")
    w.add_block_count(model.n_layer)
    w.add_context_length(model.n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(model.n_head)
    w.add_head_count_kv(model.n_head)
    w.add_rope_dimension_count(n_embd // model.n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model(tok.pop("tokenizer.ggml.model"))
    for key, value in tok.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    w.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for i in range(model.n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, n_embd))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.rename(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cached(cache_dir: Path, vocab: Path, model: TinyModel = TinyModel()) -> Path:
    """The model's file under `cache_dir`, written on first use; named by `TinyModel.key`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"tiny-{model.n_layer}x{model.n_embd}-{model.key(vocab)}.gguf"
    return path if path.is_file() else write(path, vocab, model)
