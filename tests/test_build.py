"""`mi50ctl build-llama`: the real llama.cpp cpu build serving a chat, the exact hip command line,
missing-tool messages, and that a failed build never moves `current`.

The switching tests build a tiny real cmake project whose `llama-server` only prints a version,
so each build takes a second rather than the minutes llama.cpp needs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mi50d.host import kfd
from mi50d.llama import build
from mi50d.llama import source as llamasrc
from tests.conftest import MI50CTL, free_port

FIXTURE_SYS = Path(__file__).parent / "fixtures/hosts/two-mi50/sys"
WAIT_S = 120.0  # an upper bound for llama-server to load the tiny model, never an expectation

# --- (a) the real llama.cpp build ------------------------------------------------------------


def _get(url: str, body: dict[str, object] | None = None) -> tuple[int | None, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError):
        return None, b""


@pytest.mark.llama
@pytest.mark.timeout(3600)  # a build that is not cached yet takes minutes
def test_cpu_build_serves_chat(llama_server: Path, llama_source: Path, tiny_model: Path) -> None:
    prefix = llama_server.parent.parent.resolve()
    record = json.loads((prefix / "build.json").read_text())
    work = llamasrc.build_root() / "work" / "cpu"
    assert record["configure"] == [
        "cmake", "-S", str(llama_source), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON",
        "-DGGML_RPC=OFF"]
    assert record["tools"] == ["llama-server"]
    assert record["version"].startswith("version: ")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(llama_server), "--model", str(tiny_model), "--host", "127.0.0.1",
                             "--port", str(port), "--ctx-size", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    try:
        codes: list[int | None] = []
        deadline = time.monotonic() + WAIT_S
        while proc.poll() is None and time.monotonic() < deadline:
            status, body = _get(f"{base}/health")
            if status != (codes[-1] if codes else 0):
                codes.append(status)
            if status == 200:
                break
            time.sleep(0.05)
        assert codes[-1:] == [200], f"health went {codes}; exit {proc.poll()}"
        # Before the 200 the server either was not listening yet or answered 503 "Loading model".
        assert set(codes[:-1]) <= {None, 503}
        status, body = _get(f"{base}/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        content = json.loads(body)["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content.strip()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.mark.llama
def test_default_tools_of_this_llama_cpp(llama_source: Path) -> None:
    """rpc-server is called ggml-rpc-server in this llama.cpp, and needs GGML_RPC."""
    tools = build.select_tools(llama_source, ())
    assert tools == ("llama-server", "llama-cli", "llama-bench", "ggml-rpc-server")
    plan = build.plan_build(llama_source, Path("/r"), "cpu", tools, jobs=2)
    assert plan.configure[-1] == "-DGGML_RPC=ON"
    assert build.select_tools(llama_source, ("rpc-server",)) == ("llama-server", "ggml-rpc-server")


# --- (b) the hip plan and its targets --------------------------------------------------------

ROCM = build.HipToolchain(clang_dir=Path("/opt/rocm/lib/llvm/bin"), rocm_path=Path("/opt/rocm"))


def test_hip_plan_for_two_mi50() -> None:
    targets = build.resolve_targets(None, {}, FIXTURE_SYS)
    plan = build.plan_build(Path("/src/llama.cpp"), Path("/var/lib/mi50d/llama"), "hip",
                            ("llama-server",), targets, jobs=2, hip=ROCM)
    assert plan.env == {"HIPCXX": "/opt/rocm/lib/llvm/bin/clang", "HIP_PATH": "/opt/rocm"}
    assert plan.configure == [
        "cmake", "-S", "/src/llama.cpp", "-B", "/var/lib/mi50d/llama/work/hip", "-DGGML_HIP=ON",
        "-DAMDGPU_TARGETS=gfx906", "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_CUDA_FA=ON", "-DGGML_CUDA_FA_ALL_QUANTS=OFF", "-DGGML_CUDA_FORCE_MMQ=OFF",
        "-DGGML_CUDA_FORCE_CUBLAS=OFF", "-DGGML_HIP_NO_VMM=ON", "-DGGML_HIP_GRAPHS=ON",
        "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "-DGGML_RPC=OFF"]
    assert plan.build == ["cmake", "--build", "/var/lib/mi50d/llama/work/hip", "--config",
                          "Release", "-j2", "--target", "llama-server"]


def test_fingerprint_follows_rocm_not_jobs() -> None:
    def plan(jobs: int, rocm: str) -> build.BuildPlan:
        hip = build.HipToolchain(ROCM.clang_dir, ROCM.rocm_path, version=rocm)
        return build.plan_build(Path("/s"), Path("/r"), "hip", ("llama-server",), ("gfx906",),
                                jobs=jobs, hip=hip)
    assert plan(2, "6.3.42134").fingerprint("c") == plan(16, "6.3.42134").fingerprint("c")
    assert plan(2, "6.3.42134").fingerprint("c") != plan(2, "6.4.43482").fingerprint("c")
    assert plan(2, "6.3.42134").fingerprint("c") != plan(2, "6.3.42134").fingerprint("d")


def test_target_precedence(tmp_path: Path) -> None:
    env = {"LLAMACPP_ROCM_ARCH": "gfx908"}
    assert build.resolve_targets("gfx90a,gfx906", env, FIXTURE_SYS) == ("gfx90a", "gfx906")
    assert build.resolve_targets(None, env, FIXTURE_SYS) == ("gfx908",)
    assert build.resolve_targets(None, {}, FIXTURE_SYS) == ("gfx906",)
    assert build.resolve_targets(None, {}, tmp_path) == ("gfx906",)  # no KFD: the MI50's target
    plan = build.plan_build(Path("/s"), Path("/r"), "hip", ("llama-server",),
                            build.resolve_targets("gfx906; gfx1030", {}, tmp_path), hip=ROCM)
    assert "-DAMDGPU_TARGETS=gfx906;gfx1030" in plan.configure


def test_kfd_targets_sorted_unique(tmp_path: Path) -> None:
    for node, version in enumerate([0, 100300, 90006, 90010, 90006]):
        props = tmp_path / kfd.NODES / str(node) / "properties"
        props.parent.mkdir(parents=True)
        props.write_text(f"cpu_cores_count 0\ngfx_target_version {version}\nvendor_id 4098\n")
    assert kfd.gfx_targets(tmp_path) == ["gfx1030", "gfx906", "gfx90a"]
    assert kfd.gfx_targets(FIXTURE_SYS) == ["gfx906"]
    assert kfd.node_properties(FIXTURE_SYS)[1]["simd_count"] == 240


# --- a tiny real cmake project standing in for llama.cpp -------------------------------------

CMAKELISTS = """cmake_minimum_required(VERSION 3.13)
project(fakellama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(llama-server main.c)
"""


def _fake_source(directory: Path, version: str, version_exit: int = 0) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "CMakeLists.txt").write_text(CMAKELISTS)
    (directory / "main.c").write_text(
        "#include <stdio.h>\n#include <string.h>\n"
        "int main(int argc, char **argv) {\n"
        '    if (argc > 1 && strcmp(argv[1], "--version") == 0) {\n'
        f'        fprintf(stderr, "version: {version} (fake)\\n");\n'
        f"        return {version_exit};\n"
        "    }\n    return 0;\n}\n")
    return directory


def _build_llama(source: Path, root: Path, *extra: str,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [MI50CTL, "build-llama", "--backend", "cpu", "--source", str(source),
            "--root", str(root), "-j1", *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


def _error(done: subprocess.CompletedProcess[str]) -> str:
    """The CLI's own message: the last line of stderr (cmake's output comes before it)."""
    assert done.returncode != 0
    return done.stderr.splitlines()[-1]


def _said(done: subprocess.CompletedProcess[str], prefix: str) -> bool:
    return done.returncode == 0 and any(x.startswith(prefix) for x in done.stdout.splitlines())


def _state(root: Path) -> tuple[str | None, list[str]]:
    """(what current points at, the finished builds), and no half-done build is left over."""
    assert not list(root.glob(".partial-*"))
    current = os.readlink(root / "current") if (root / "current").is_symlink() else None
    return current, sorted(p.name for p, _ in build.list_builds(root))


# --- (c) missing tools -----------------------------------------------------------------------


@pytest.mark.parametrize(("missing", "backend", "message"), [
    ("cmake", "cpu", "cmake not found; install it: apt-get install cmake"),
    ("cc", "cpu", "C compiler (cc, gcc or clang) not found; install it: "
                  "apt-get install build-essential"),
    ("c++", "cpu", "C++ compiler (c++, g++ or clang++) not found; install it: "
                   "apt-get install build-essential"),
    ("make", "cpu", "make or ninja not found; install it: apt-get install make"),
    ("hipconfig", "hip", "hipconfig not found on PATH; install ROCm: AMD's packages "
                         "(rocm-hip-sdk, then add /opt/rocm/bin to PATH) or the distribution's "
                         "(apt-get install hipcc libamdhip64-dev libhipblas-dev librocblas-dev)"),
])
def test_missing_tool_is_one_line(tmp_path: Path, missing: str, backend: str,
                                  message: str) -> None:
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("cmake", "cc", "c++", "make"):
        real = shutil.which(tool)
        assert real is not None, f"{tool} is needed to run this test"
        if tool != missing:
            (path / tool).symlink_to(real)
    source = _fake_source(tmp_path / "src", "1")
    done = subprocess.run([MI50CTL, "build-llama", "--backend", backend, "--source", str(source),
                           "--root", str(tmp_path / "root")],
                          capture_output=True, text=True, env={"PATH": str(path)}, check=False)
    assert done.returncode != 0
    assert done.stderr == f"Error: {message}\n"
    assert not (tmp_path / "root" / "current").exists()


def test_ninja_when_make_is_missing(tmp_path: Path) -> None:
    for tool in ("cmake", "cc", "c++", "ninja"):
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} is not installed")
        (tmp_path / tool).symlink_to(real)
    assert build.check_programs("cpu", {"PATH": str(tmp_path)}) == "Ninja"
    (tmp_path / "make").symlink_to(shutil.which("make") or "/usr/bin/make")
    assert build.check_programs("cpu", {"PATH": str(tmp_path)}) is None


# --- (d) current moves only to a build that worked -------------------------------------------


def test_failed_builds_leave_current_alone(tmp_path: Path) -> None:
    root, src = tmp_path / "root", tmp_path / "src"
    first = _build_llama(_fake_source(src, "1"), root)
    assert first.returncode == 0, first.stderr
    current, builds = _state(root)
    assert current is not None and builds == [current]
    assert f'llama_server = "{root}/current/bin/llama-server"' in first.stdout
    good = subprocess.run([str(root / "current/bin/llama-server"), "--version"],
                          capture_output=True, text=True, check=True)
    assert good.stderr == "version: 1 (fake)\n"

    (src / "main.c").write_text("int main(void) { return syntax error; }\n")
    broken = _build_llama(src, root)
    assert _error(broken).startswith("Error: cmake build failed (exit ")
    assert _state(root) == (current, builds)

    _fake_source(src, "2")
    (src / "CMakeLists.txt").write_text(CMAKELISTS + "add_executable(\n")
    unparsable = _build_llama(src, root)
    assert _error(unparsable).startswith("Error: cmake configure failed (exit ")
    assert _state(root) == (current, builds)

    no_version = _build_llama(_fake_source(src, "3", version_exit=3), root)
    assert _error(no_version) == ("Error: the new llama-server does not run `--version`; "
                                  "current build left unchanged")
    assert _state(root) == (current, builds)


def test_cache_hit_force_and_prune(tmp_path: Path) -> None:
    root, src = tmp_path / "root", _fake_source(tmp_path / "src", "1")
    assert _build_llama(src, root).returncode == 0
    first, builds = _state(root)
    assert first is not None

    assert _said(_build_llama(src, root), f"up to date: {first} ")
    assert _state(root) == (first, builds)

    assert _said(_build_llama(src, root, "--force"), "built ")
    second, builds = _state(root)
    assert second is not None and second != first and builds == sorted([first, second])

    _fake_source(src, "2")
    changed = _build_llama(src, root, "--prune", "1")
    assert changed.returncode == 0
    third, builds = _state(root)
    assert third not in (first, second) and builds == [third]
    assert f"pruned {first}" in changed.stdout and f"pruned {second}" in changed.stdout
    record = json.loads((root / str(third) / "build.json").read_text())
    assert record["version"] == "version: 2 (fake)"
    assert record["backend"] == "cpu" and record["source"] == str(src)

    # Back to the first source: its builds are gone, so this builds again rather than reusing.
    _fake_source(src, "1")
    assert _said(_build_llama(src, root), "built ")


def test_one_build_per_root_at_a_time(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = _build_llama(_fake_source(tmp_path / "src", "1"), root)
    assert busy.stderr == f"Error: {root}: another build-llama is running on this root\n"
    assert busy.returncode != 0
    assert _state(root) == (None, [])


def test_not_a_llama_cpp_tree(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text("project(other C)\nadd_executable(other main.c)\n")
    assert _error(_build_llama(tmp_path, tmp_path / "root")) == (
        f"Error: {tmp_path}: defines no llama-server target; is it a llama.cpp checkout?")
    assert _error(_build_llama(_fake_source(tmp_path, "1"), tmp_path / "root", "--tool", "x")) == (
        f"Error: {tmp_path}: this llama.cpp has no target 'x'")
