"""mi50d.host.ggufmeta against files written by the independent `gguf` package."""

from __future__ import annotations

import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import gguf
import pytest

from mi50d.host.ggufmeta import (
    GGML_TYPES,
    MAX_DEPTH,
    MAX_KEPT,
    MAX_KV,
    MAX_TENSORS,
    MAX_WALK,
    ArrayInfo,
    GGUFError,
    GGUFInfo,
    LongString,
    read_gguf,
)
from tests.ggufwriter import (
    ARRAY,
    QUANTIZED,
    STRING,
    U8,
    U64,
    raw_array,
    raw_kv,
    raw_string,
    raw_tensor,
    write_mmproj,
    write_model,
    write_raw,
)


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
    reference = gguf.GGUFReader(info.path)
    assert info.tensor_bytes == sum(int(t.n_bytes) for t in reference.tensors)
    assert {t.name: t.dims for t in info.tensors}["mm.2.bias"] == (256,)


def test_unchanged_file_is_read_once_and_a_changed_one_again(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    first = read_gguf(path)
    assert read_gguf(path) is first  # remembered: same path, inode, size and mtime
    with path.open("r+b") as f:  # truncated in place: same inode, new size
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf(path)


# Bounds: crafted headers of ~100 MB must cost a bounded amount of memory (traced Python
# allocations) and of reading (the bytes this process read, from /proc/self/io), whatever
# lengths and counts they claim. 100 MB of zeros read as 100M u8 items, 12.5M empty strings or
# 8M empty arrays, depending on the array header in front of them.
HUNDRED_MB = 100 << 20
PEAK_LIMIT = 64 << 20


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def bounded_read(path: Path) -> tuple[GGUFInfo | GGUFError, int, int]:
    """(the info or the error, peak traced memory, bytes read) of reading `path`."""
    before = bytes_read()
    tracemalloc.start()
    try:
        result: GGUFInfo | GGUFError = read_gguf(path)
    except GGUFError as exc:
        result = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, peak, bytes_read() - before


def test_a_100_mb_numeric_array_is_skipped_not_read(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "u8.gguf", [
        raw_kv("general.architecture", STRING, raw_string("llama")),
        raw_kv("junk", ARRAY, raw_array(U8, HUNDRED_MB))], hole=HUNDRED_MB)
    info, peak, read = bounded_read(path)
    assert isinstance(info, GGUFInfo), info
    assert info.metadata["junk"] == ArrayInfo(U8, HUNDRED_MB)
    assert info.architecture == "llama"
    assert peak < PEAK_LIMIT and read < 4 << 20, (peak, read)


def test_a_100_mb_string_keeps_its_length_only(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "s.gguf", [
        raw_kv("tokenizer.chat_template", STRING, struct.pack("<Q", HUNDRED_MB))],
        hole=HUNDRED_MB)
    info, peak, read = bounded_read(path)
    assert isinstance(info, GGUFInfo), info
    assert info.metadata["tokenizer.chat_template"] == LongString(HUNDRED_MB)
    assert peak < PEAK_LIMIT and read < 4 << 20, (peak, read)


@pytest.mark.parametrize(("item_type", "each"), [(STRING, 8), (ARRAY, 12)], ids=["str", "arr"])
def test_millions_of_tiny_items_are_refused_after_a_bounded_walk(
        tmp_path: Path, item_type: int, each: int) -> None:
    count = HUNDRED_MB // each
    path = write_raw(tmp_path / "many.gguf", [raw_kv("tokenizer.ggml.tokens", ARRAY,
                                                     raw_array(item_type, count))],
                     hole=HUNDRED_MB)
    error, peak, read = bounded_read(path)
    assert isinstance(error, GGUFError)
    assert f"more than {MAX_WALK} strings or arrays" in str(error)
    assert peak < PEAK_LIMIT and read < 4 << 20, (peak, read)  # refused before walking


def test_a_real_sized_vocabulary_is_walked_in_bounded_memory(tmp_path: Path) -> None:
    # 262,144 strings of 16 bytes (Gemma 3's vocabulary size) are stepped over, not kept
    tokens = b"".join(raw_string(b"%016d" % i) for i in range(262_144))
    path = write_raw(tmp_path / "vocab.gguf", [
        raw_kv("tokenizer.ggml.tokens", ARRAY, raw_array(STRING, 262_144, tokens))])
    info, peak, _ = bounded_read(path)
    assert isinstance(info, GGUFInfo), info
    assert info.metadata["tokenizer.ggml.tokens"] == ArrayInfo(STRING, 262_144)
    assert peak < 4 << 20, peak


def test_kept_values_are_bounded_in_all(tmp_path: Path) -> None:
    # 4,000 keys with 1,024 u64 each (32 MB): short numeric arrays are kept until MAX_KEPT is
    # spent, the rest keep their length only
    items = bytes(8 * 1024)
    kvs = [raw_kv(f"k{i}", ARRAY, raw_array(U64, 1024, items)) for i in range(4000)]
    info, peak, _ = bounded_read(write_raw(tmp_path / "kept.gguf", kvs))
    assert isinstance(info, GGUFInfo), info
    kept = [v for v in info.metadata.values() if isinstance(v, list)]
    assert 0 < len(kept) * 1024 * 32 <= MAX_KEPT
    assert info.metadata["k3999"] == ArrayInfo(U64, 1024)
    assert peak < PEAK_LIMIT, peak


def test_nested_arrays_are_bounded_too(tmp_path: Path) -> None:
    # 32 x 32 x 32 arrays of 64 u8 (2M values if all were kept: 8 times MAX_KEPT)
    inner = raw_array(U8, 64, bytes(64))
    for _ in range(3):
        inner = raw_array(ARRAY, 32, inner * 32)
    info, peak, _ = bounded_read(write_raw(tmp_path / "nest.gguf", [raw_kv("n", ARRAY, inner)]))
    assert isinstance(info, GGUFInfo), info
    assert peak < PEAK_LIMIT, peak
    too_deep = raw_array(U8, 0)
    for _ in range(MAX_DEPTH):
        too_deep = raw_array(ARRAY, 1, too_deep)
    error, _, _ = bounded_read(write_raw(tmp_path / "deep.gguf", [raw_kv("d", ARRAY, too_deep)]))
    assert isinstance(error, GGUFError) and "nested deeper" in str(error)


@pytest.mark.parametrize(("n_tensors", "n_kv"), [(1 << 40, 0), (0, 1 << 40),
                                                 (MAX_TENSORS + 1, 0), (0, MAX_KV + 1)])
def test_impossible_counts_are_refused_at_once(tmp_path: Path, n_tensors: int, n_kv: int) -> None:
    path = write_raw(tmp_path / "counts.gguf", [], n_tensors=n_tensors, n_kv=n_kv,
                     hole=HUNDRED_MB)
    error, peak, read = bounded_read(path)
    assert isinstance(error, GGUFError) and "corrupt" in str(error)
    assert peak < 4 << 20 and read < 4 << 20, (peak, read)


def test_long_keys_and_tensor_names_are_refused(tmp_path: Path) -> None:
    key = write_raw(tmp_path / "key.gguf", [struct.pack("<Q", 1 << 40)], n_kv=1)
    with pytest.raises(GGUFError, match="metadata key of 1099511627776 bytes"):
        read_gguf(key)
    name = write_raw(tmp_path / "name.gguf", [], [raw_tensor("x" * 64, (32,))])
    with pytest.raises(GGUFError, match=r"tensor name of 64 bytes .* allows 63"):
        read_gguf(name)
    dims = write_raw(tmp_path / "dims.gguf", [], [raw_tensor("t", (1,) * 5)])
    with pytest.raises(GGUFError, match="5 dimensions"):
        read_gguf(dims)


def test_a_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # nobody writes it: a blocking open would wait forever
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(fifo)
