"""mi50d.host.ggufmeta against files written by the independent `gguf` package."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest

from mi50d.host.ggufmeta import GGML_TYPES, GGUFError, read_gguf
from tests.ggufwriter import QUANTIZED, write_mmproj, write_model


def test_type_table_matches_the_gguf_package() -> None:
    # gguf-py lists Q8_1 as 40 bytes; ggml's block_q8_1 is 2 halves + 32 int8 = 36 (static_assert
    # in ggml-common.h). Q8_1 is a runtime-only type that never appears in files.
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        if qtype == gguf.GGMLQuantizationType.Q8_1:
            continue
        name, our_block, our_size = GGML_TYPES[int(qtype)]
        assert (name, our_block, our_size) == (qtype.name, block, size)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_reads_model_and_tensor_sizes_fill_the_file(tmp_path: Path,
                                                     qtype: gguf.GGMLQuantizationType) -> None:
    path = write_model(tmp_path / "m.gguf", qtype=qtype)
    info = read_gguf(path)
    reference = gguf.GGUFReader(path)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.arch_int("block_count") == 2
    assert not info.is_mmproj
    assert info.data_offset == reference.data_offset
    by_name = {t.name: t for t in info.tensors}
    for t in reference.tensors:
        ours = by_name[t.name]
        assert ours.nbytes == t.n_bytes, t.name
        assert info.data_offset + ours.offset == t.data_offset
        assert ours.type_name == qtype.name or t.name.endswith(("norm.weight", "output.weight"))
    # the writer pads the last tensor to the alignment and nothing follows
    assert info.file_size - info.data_end < info.alignment


def test_long_arrays_keep_their_length_only(tmp_path: Path) -> None:
    info = read_gguf(write_model(tmp_path / "m.gguf", n_vocab=512))
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert not isinstance(tokens, list)
    assert getattr(tokens, "length", None) == 512


def test_custom_alignment_moves_the_data_section(tmp_path: Path) -> None:
    info = read_gguf(write_model(tmp_path / "m.gguf", alignment=256))
    assert info.alignment == 256
    assert info.data_offset % 256 == 0
    assert info.data_offset == gguf.GGUFReader(info.path).data_offset


def test_truncated_copy_is_refused_with_the_missing_byte_count(tmp_path: Path) -> None:
    full = write_model(tmp_path / "m.gguf")
    size = full.stat().st_size
    cut = tmp_path / "cut.gguf"
    shutil.copyfile(full, cut)
    with cut.open("r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(GGUFError, match=r"truncated: .* bytes missing"):
        read_gguf(cut)


def test_file_cut_inside_the_header_is_truncated_too(tmp_path: Path) -> None:
    full = write_model(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:300])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(cut)


def test_not_gguf_and_wrong_version(tmp_path: Path) -> None:
    html = tmp_path / "model.gguf"
    html.write_bytes(b"<!DOCTYPE html><html>Hugging Face login page</html>")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(html)
    good = write_model(tmp_path / "m.gguf").read_bytes()
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(good[:4] + (1).to_bytes(4, "little") + good[8:])
    with pytest.raises(GGUFError, match="version 1 is not supported"):
        read_gguf(v1)


def test_unknown_tensor_type_is_named(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", n_layer=1)
    data = bytearray(path.read_bytes())
    info = read_gguf(path)
    # patch the type field of the first tensor info (right after its name and dims)
    name = info.tensors[0].name.encode()
    at = data.index(name) + len(name) + 4 + 8 * len(info.tensors[0].dims)
    data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="ggml type 99"):
        read_gguf(path)


def test_mmproj_is_recognised(tmp_path: Path) -> None:
    info = read_gguf(write_mmproj(tmp_path / "mmproj-F16.gguf"))
    assert info.is_mmproj
    assert info.metadata["general.type"] == "mmproj"
    assert info.tensor_bytes == 64 * 48 * 2 + 128 * 64 * 4


def test_unchanged_file_is_read_once_and_a_changed_one_again(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    first = read_gguf(path)
    assert read_gguf(path) is first  # remembered: same path, inode, size and mtime
    with path.open("r+b") as f:  # truncated in place: same inode, new size
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(path)
