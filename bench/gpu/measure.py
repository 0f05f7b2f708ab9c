"""Start llama-server on generated models and record its GPU buffers and nvidia-smi memory.

Run on the GPU machine (stdlib only; the image has no project venv):

    python3 measure.py SERVER MODEL_DIR RESULT_DIR DEADLINE_EPOCH

For each configuration (model, ctx, flash attention, n_gpu_layers, an optional GPU hog) it starts
`llama-server -m M -ngl N -c CTX -fa F -lv 4` (falling back to `-v` if `-lv 4` prints no buffer
lines), waits for /health, snapshots nvidia-smi at idle, after a 3000-token prompt and, at ctx
32768, after a 32256-token prompt, then stops it with SIGTERM. One CSV row and one log per run;
configurations already in the CSV are skipped, so a second call continues where one stopped.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUFFER = re.compile(r"(?P<func>\w+): +(?P<device>\S+) +(?P<kind>model|KV|compute|output|RS) buffer size "
                    r"= +(?P<mib>[0-9.]+) MiB")
FIELDS = ["config", "model", "ctx", "fa", "ngl", "hog_mib", "verbosity", "rc", "ready_s",
          "gpu_used_before", "free_before_mib", "idle_proc", "idle_gpu", "p3000_proc", "p32k_proc",
          "exit_gpu", "buffers", "notes"]


@dataclass(frozen=True)
class Config:
    model: str
    ctx: int | None
    fa: str | None
    ngl: str | None = "all"
    hog_gib_free: float | None = None  # leave this much free with a tensor held by another process
    extra: tuple[str, ...] = ()  # more llama-server arguments
    env: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        hog = f"-free{self.hog_gib_free}" if self.hog_gib_free is not None else ""
        more = "".join(a.replace("-", "_") for a in self.extra)
        more += "".join(f"_{k}{v}" for k, v in self.env)
        return f"{self.model}-c{self.ctx}-fa{self.fa}-ngl{self.ngl}{hog}{more}"


CONFIGS = [Config(m, c, f) for m in ("l3b", "q32", "q3") for c in (4096, 32768) for f in ("on", "off")]
CONFIGS += [Config(m, 4096, "on", ngl) for m, ngl in (("l3b", "7"), ("q32", "4"), ("q3", "3"))]
# One GPU partly taken by another process: defaults (fit may pick ngl and ctx), then explicit ones.
CONFIGS += [Config("q32", None, None, None, 4.0), Config("q32", 32768, "on", "all", 4.0)]
# Second call (PHASE=2): partial offload, what -ngl N puts where and what op offload adds.
PHASE2 = [Config("q32", 4096, "on", n) for n in ("0", "1", "8", "9")]
PHASE2 += [Config("q32", 4096, "on", "4", extra=("--no-op-offload",)),
           Config("l3b", 4096, "on", "7", extra=("--no-op-offload",)),
           Config("q32", 4096, "off", "4"), Config("q32", 32768, "on", "4"),
           Config("q32", 4096, "on", "4", extra=("-v",), env=(("GGML_SCHED_DEBUG", "2"),))]
# Third call (PHASE=3, a build with -DGGML_CUDA_NO_VMM=ON): the legacy pool that HIP builds use.
PHASE3 = [Config(m, 32768, f) for m in ("q3", "q32") for f in ("off", "on")]


def smi(*query: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                         text=True, check=False).stdout
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpu_used() -> int:
    return int(smi("--query-gpu=memory.used")[0][0])


def proc_mem(pid: int) -> int | None:
    for row in smi("--query-compute-apps=pid,used_memory"):
        if row[0] == str(pid):
            return int(row[1])
    return None


def post(port: int, body: dict[str, Any], timeout: float) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return f"{r.status}"
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read()[:200]!r}"
    except OSError as e:
        return f"error {e}"


def wait_health(port: int, proc: subprocess.Popen[bytes], limit: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if proc.poll() is not None:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.02)
    return None


def hog(free_gib: float) -> tuple[subprocess.Popen[bytes], int]:
    """Another process holding all but `free_gib` of the GPU (torch, plain cudaMalloc)."""
    code = ("import torch,sys,signal\n"
            "f,t=torch.cuda.mem_get_info()\n"
            f"x=torch.empty(int(f-{free_gib}*2**30), dtype=torch.uint8, device='cuda')\n"
            "print('hog', x.numel()>>20, flush=True)\n"
            "signal.pause()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout is not None
    line = p.stdout.readline().decode().split()
    return p, int(line[1]) if len(line) == 2 else -1


def run(server: Path, models: Path, cfg: Config, verbosity: list[str], log: Path, port: int,
        n_vocab: int) -> dict[str, Any]:
    row: dict[str, Any] = {"config": cfg.key, "model": cfg.model, "ctx": cfg.ctx, "fa": cfg.fa,
                           "ngl": cfg.ngl, "verbosity": " ".join(verbosity), "notes": ""}
    hog_proc = None
    if cfg.hog_gib_free is not None:
        hog_proc, row["hog_mib"] = hog(cfg.hog_gib_free)
    row["gpu_used_before"] = gpu_used()
    row["free_before_mib"] = int(smi("--query-gpu=memory.free")[0][0])
    args = [str(server), "-m", str(models / f"{cfg.model}.gguf"), "--host", "127.0.0.1",
            "--port", str(port), *verbosity, *cfg.extra]
    for flag, value in (("-ngl", cfg.ngl), ("-c", cfg.ctx), ("-fa", cfg.fa)):
        if value is not None:
            args += [flag, str(value)]
    row["notes"] = " ".join(args[3:])
    rng = random.Random(cfg.key)
    with log.open("wb") as out:
        out.write((" ".join(args) + "\n").encode())
        out.flush()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **dict(cfg.env)})
        ready = wait_health(port, proc, 180)
        row["ready_s"] = round(ready, 3) if ready is not None else None
        if ready is not None:
            time.sleep(0.5)
            row["idle_proc"], row["idle_gpu"] = proc_mem(proc.pid), gpu_used()
            ids = [rng.randrange(1000, min(n_vocab, 30000)) for _ in range(3000)]
            st = post(port, {"prompt": ids, "n_predict": 4}, 300)
            row["p3000_proc"] = proc_mem(proc.pid)
            row["notes"] += f" | 3000: {st}"
            if cfg.ctx == 32768:
                ids = [rng.randrange(1000, min(n_vocab, 30000)) for _ in range(32256)]
                st = post(port, {"prompt": ids, "n_predict": 4}, 300)
                row["p32k_proc"] = proc_mem(proc.pid)
                row["notes"] += f" | 32256: {st}"
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            row["rc"] = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            row["rc"] = f"killed {proc.wait()}"
    if hog_proc is not None:
        hog_proc.kill()
        hog_proc.wait()
    for _ in range(50):
        if gpu_used() == 0:
            break
        time.sleep(0.1)
    row["exit_gpu"] = gpu_used()
    buffers: list[str] = []
    for line in log.read_text(errors="replace").splitlines():
        m = BUFFER.search(line)
        if m:
            buffers.append(f"{m.group('device')} {m.group('kind')} {m.group('mib')}")
    row["buffers"] = "; ".join(buffers)
    return row


def main(argv: list[str]) -> int:
    server, models, results, deadline = Path(argv[0]), Path(argv[1]), Path(argv[2]), float(argv[3])
    results.mkdir(parents=True, exist_ok=True)
    table = results / "runs.csv"
    done = set()
    if table.is_file():
        with table.open() as f:
            done = {r["config"] for r in csv.DictReader(f)}
    verbosity = ["-lv", "4"]  # the first call found that -lv 4 prints the buffer lines
    state = results / "verbosity.txt"
    if state.is_file():
        verbosity = state.read_text().split()
    configs = {"2": PHASE2, "3": PHASE3}.get(os.environ.get("PHASE", ""), CONFIGS)
    for i, cfg in enumerate(configs):
        if cfg.key in done:
            continue
        if time.time() > deadline - 45:
            print(f"deadline: stopping before {cfg.key}", flush=True)
            break
        n_vocab = json.loads((models / f"{cfg.model}.json").read_text())["n_vocab"]
        log = results / f"{cfg.key}.log"
        t0 = time.monotonic()
        row = run(server, models, cfg, verbosity, log, 18100 + i, n_vocab)
        if not state.is_file():
            # The first run decides: if -lv 4 printed no buffer lines, use -v from here on.
            if "KV buffer" not in log.read_text(errors="replace"):
                (results / "lv4-no-buffers.log").write_bytes(log.read_bytes())
                verbosity = ["-v"]
                row = run(server, models, cfg, verbosity, log, 18100 + i, n_vocab)
            state.write_text(" ".join(verbosity))
        new = not table.is_file()
        with table.open("a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        print(f"{cfg.key}: {time.monotonic() - t0:.1f}s {json.dumps(row)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
