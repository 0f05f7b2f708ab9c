"""The AMD KFD topology in sysfs: which gfx targets the GPUs present are. Standard library only.

The kernel lists one node per CPU socket and per GPU under
`<sysfs>/class/kfd/kfd/topology/nodes/<n>/properties`, one `key value` pair per line. A GPU node has
`gfx_target_version` = major*10000 + minor*100 + stepping (90006 is gfx906); CPU nodes have 0.
This module owns reading those files; tests point it at recorded fixture trees.
"""

from __future__ import annotations

from pathlib import Path

NODES = Path("class/kfd/kfd/topology/nodes")


def read_properties(path: Path) -> dict[str, int]:
    """One node's `properties` file as {key: value}; lines that are not `key <int>` are skipped."""
    props: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.strip().partition(" ")
        try:
            props[key] = int(value)
        except ValueError:
            continue
    return props


def node_properties(sysfs_root: Path) -> dict[int, dict[str, int]]:
    """Every topology node's properties by node number; empty without a KFD (no amdgpu driver)."""
    nodes: dict[int, dict[str, int]] = {}
    base = sysfs_root / NODES
    if not base.is_dir():
        return nodes
    for node in base.iterdir():
        props = node / "properties"
        if node.name.isdigit() and props.is_file():
            nodes[int(node.name)] = read_properties(props)
    return dict(sorted(nodes.items()))


def gfx_name(version: int) -> str:
    """90006 -> 'gfx906', 90010 -> 'gfx90a', 110001 -> 'gfx1101'."""
    major, rest = divmod(version, 10000)
    minor, step = divmod(rest, 100)
    return f"gfx{major}{minor}{step:x}"


def gfx_targets(sysfs_root: Path) -> list[str]:
    """The distinct gfx targets of the GPUs present, sorted; [] when there are none."""
    versions = {p.get("gfx_target_version", 0) for p in node_properties(sysfs_root).values()}
    return sorted(gfx_name(v) for v in versions if v > 0)
