"""The package layout's rules, read from the source with `ast`: every module of mi50d has a rank,
imports point only to lower ranks (or within the module's own package), leaves import only
leaves, there is no import cycle between modules, and mi50ctl's module-level imports of mi50d are
the protocol module alone (so `mi50ctl status` stays cheap to start)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lower number = higher up. A module may import a module of a greater rank, or one of its own
# package. New packages must be placed here, which is the point: their place is decided once.
RANKS: dict[str, int] = {
    "mi50d.cli": 0,
    "mi50d.daemon": 1,
    "mi50d.control": 2,
    "mi50d.metrics": 2,
    "mi50d.gateway": 2,
    "mi50d.engine": 3,
    "mi50d.llama": 3,
    "mi50d.host": 4,
    "mi50d.systemd": 4,
}
LEAVES = frozenset({"mi50d", "mi50d.config", "mi50d.configtypes", "mi50d.control.protocol",
                    "mi50d.host.checks"})
LEAF_RANK = 9


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted((ROOT / "mi50d").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path, known: dict[str, Path], *, top_level_only: bool = False) -> set[str]:
    """The mi50d modules `path` imports, anywhere in the file (or only at module level)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "mi50d")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "mi50d":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
    return out


def package_of(module: str) -> str:
    for prefix in sorted(RANKS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{module} has no rank: add its package to RANKS in {__file__}")


def rank(module: str) -> int:
    return LEAF_RANK if module in LEAVES else RANKS[package_of(module)]


def test_every_module_has_a_rank() -> None:
    for module in modules():
        rank(module)


def test_imports_point_down() -> None:
    known = modules()
    wrong: list[str] = []
    for module, path in known.items():
        for target in imports_of(path, known):
            if target == module or target not in known:
                continue
            same_package = (module not in LEAVES and target not in LEAVES
                            and package_of(module) == package_of(target))
            if module in LEAVES and target not in LEAVES:
                wrong.append(f"{module} (a leaf) imports {target}")
            elif not same_package and rank(target) <= rank(module) and target not in LEAVES:
                wrong.append(f"{module} (rank {rank(module)}) imports {target} (rank {rank(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    known = modules()
    graph = {m: {t for t in imports_of(p, known) if t in known and t != m} for m, p in known.items()}
    # A package's __init__ is imported on the way to any of its modules; the edges above already
    # name the module itself, so the graph is of modules as written.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_mi50ctl_imports_only_the_protocol_at_module_level() -> None:
    known = modules()
    for path in sorted((ROOT / "mi50ctl").glob("*.py")):
        assert imports_of(path, known, top_level_only=True) <= {"mi50d.control.protocol"}, path.name


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from mi50d.daemon import serve\nfrom mi50d.host import kfd\n")
    known = modules()
    assert imports_of(bad, known) == {"mi50d.daemon", "mi50d.host.kfd"}
    assert rank("mi50d.daemon") < rank("mi50d.engine.instance") < rank("mi50d.host.kfd")


def test_every_package_is_packaged() -> None:
    """pyproject lists packages explicitly; a subpackage left out would be missing from the .deb."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for top in ("mi50d", "mi50ctl") for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk == listed
