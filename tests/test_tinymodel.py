"""mi50d.llama.tinymodel: deterministic bytes, the tokenizer copied from the vocab file, the size knob."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from gguf import GGUFReader

from mi50d.llama import tinymodel


@pytest.fixture(scope="module")
def vocab(llama_source: Path) -> Path:
    return llama_source / tinymodel.VOCAB_FILE


def test_same_seed_same_bytes(tmp_path: Path, vocab: Path) -> None:
    a = tinymodel.write(tmp_path / "a.gguf", vocab)
    b = tinymodel.write(tmp_path / "b.gguf", vocab)
    c = tinymodel.write(tmp_path / "c.gguf", vocab, tinymodel.TinyModel(seed=1))
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]


def test_metadata_and_tokenizer(tmp_path: Path, vocab: Path) -> None:
    model = tinymodel.TinyModel(n_layer=3, n_embd=32, n_head=2, n_ctx=256)
    fields = GGUFReader(tinymodel.write(tmp_path / "m.gguf", vocab, model)).fields
    source = GGUFReader(vocab).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == 3
    assert fields["llama.embedding_length"].contents() == 32
    assert fields["llama.context_length"].contents() == 256
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id"):
        assert fields[key].contents() == source[key].contents(), key
    tensors = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert {"token_embd.weight", "output.weight", "blk.2.ffn_down.weight"} <= tensors


def test_size_knob(tmp_path: Path, vocab: Path) -> None:
    path = tinymodel.write(tmp_path / "big.gguf", vocab, tinymodel.TinyModel(size_mb=24))
    assert 23 * 2**20 < path.stat().st_size < 26 * 2**20


def test_cached_reuses_the_file(tmp_path: Path, vocab: Path) -> None:
    first = tinymodel.cached(tmp_path, vocab)
    stamp = first.stat().st_mtime_ns
    assert tinymodel.cached(tmp_path, vocab) == first
    assert first.stat().st_mtime_ns == stamp
    other = tinymodel.cached(tmp_path, vocab, tinymodel.TinyModel(seed=7))
    assert other != first and other.is_file()


def test_not_a_vocab_file(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "empty.gguf", "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"not a vocab GGUF, it has no tokenizer\.ggml\.model"):
        tinymodel.write(tmp_path / "m.gguf", tmp_path / "empty.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.gguf"]
