"""7. Request path: a completion to the endpoint mi50d reports, against the same completion to the
port in the instance's file. mi50d puts nothing in the request path today: the reported endpoint
is the instance's own host:port, so both go to the same llama-server socket, and the ratio shows
only the noise of this machine. Requests alternate between the two, one new connection each."""

from __future__ import annotations

from pathlib import Path

from bench.configs import instance, one_dir
from bench.control import Ctl
from bench.procs import complete, daemon, wait_until
from bench.stats import Row, paired

SECTION = "7 request"


def run(work: Path, model: Path, reps: int, seconds: float) -> list[Row]:
    directory = one_dir(work / "request", model, autostart=True)
    _, _, inst = instance(directory, "tiny")
    configured = f"http://127.0.0.1:{inst.port}"
    with daemon(directory, work) as d:
        d.wait_log("new=running", 1, seconds)
        ctl = Ctl(d.socket)
        ctl.wait_socket(60)
        reported = _endpoint(ctl)
        for _ in range(3):  # warm up the server's first requests
            complete(reported)
        via, direct = [], []
        for rep in range(reps):
            first, second = (reported, configured) if rep % 2 else (configured, reported)
            a, b = complete(first) * 1000, complete(second) * 1000
            via.append(a if first == reported else b)
            direct.append(b if first == reported else a)
    same = "the same socket" if reported == configured else "DIFFERENT sockets"
    row = paired(SECTION, f"completion (8 tokens) to reported endpoint {reported}", "ms", via,
                 direct, f"configured port {inst.port}", goal="nothing in the path")
    # Met by construction when both are one socket; the ratio's distance from 1.00 is noise.
    row.met = reported == configured
    row.notes.append(f"reported endpoint {reported} vs configured {configured}: {same}")
    return [row]


def _endpoint(ctl: Ctl) -> str:
    found: list[str] = []

    def reported() -> bool:
        frame = ctl.request("status", {"name": "tiny"})
        result = frame.get("result")
        if isinstance(result, dict) and result["instances"][0]["state"] == "running":
            found.append(str(result["instances"][0]["endpoint"]))
            return True
        return False

    wait_until(reported, 60, "tiny running in status", 0.05)
    return found[0]
