"""`mi50ctl check` and `doctor` answer for the service account, not the caller: run by a non-root
group member against a real root mi50d whose instances run as `daemon`, a model only the caller
can read is reported unreadable (mi50d checks it as `daemon`); a local check says it ran as the
caller; `--socket` is the socket `doctor` looks at."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

from tests.ctlsupport import (
    AS_ROOT,
    WAIT_S,
    Daemon,
    fake_instance,
    mi50ctl,
    running_daemon,
    short_dir,
    start_daemon,
)
from tests.ggufwriter import write_model
from tests.support import free_port, write_config

NOBODY = 65534


def _private_model(workdir: Path) -> Path:
    """A GGUF that `nobody` can read and the `daemon` account cannot (its directory is 0700)."""
    os.chmod(workdir, 0o755)
    models = workdir / "models"
    models.mkdir(mode=0o700)
    model = write_model(models / "m.gguf")
    for path in (models, model):
        os.chown(path, NOBODY, NOBODY)
    return model


def _instance(model: Path | None = None) -> dict[str, object]:
    inst = fake_instance(free_port(), n_gpu_layers=0, llama_server="/bin/true")
    if model is not None:
        inst["model"] = str(model)
    return inst


def _statuses(doc: dict[str, object], key: str = "checks") -> dict[str, str]:
    checks = doc[key]
    assert isinstance(checks, list)
    return {c["name"]: c["status"] for c in checks}


@AS_ROOT
def test_check_and_doctor_ask_mi50d_which_checks_as_the_service_account() -> None:
    workdir = short_dir()
    model = _private_model(workdir)
    config = write_config(workdir / "cfg", {"preflight": False, "user": "daemon",
                                            "socket_group": "nogroup"},  # nobody's: a member
                          {"a": _instance(model)})
    d = start_daemon(config, workdir)
    try:
        _asked_and_local(d, model)
    finally:
        d.close()


def _asked_and_local(d: Daemon, model: Path) -> None:
    remote = d.ctl("check", "a", user="nobody")
    assert remote.returncode == 1, remote.stdout + remote.stderr
    lines = remote.stdout.splitlines()
    assert lines[0] == "Instance a"
    assert any(line.startswith("  ✗ model") and f"daemon cannot read {model}: Permission "
               "denied" in line for line in lines), lines
    assert lines[-1] == f"(checked by mi50d, pid {d.proc.pid}, as daemon)"
    assert remote.stderr == ""

    as_json = json.loads(d.ctl("check", "a", "--json", user="nobody").stdout)
    assert as_json["checked_by"] == {"where": "mi50d", "pid": d.proc.pid,
                                     "account": "daemon", "note": None}
    assert _statuses(as_json)["model"] == "fail"

    # Checked here, as the caller: green, and it says why that may not be the truth.
    here = d.ctl("check", "a", "--local", "--config-dir", str(d.config), "--json",
                 user="nobody")
    assert here.returncode == 0, here.stdout + here.stderr
    doc = json.loads(here.stdout)
    assert _statuses(doc)["model"] == "ok"
    assert doc["checked_by"]["where"] == "here" and doc["checked_by"]["account"] == "nobody"
    assert doc["checked_by"]["note"].startswith(
        f"checked here as nobody (uid {NOBODY}), not as the service account daemon: file "
        "and device access may differ (--local)")

    doctor = d.ctl("doctor", "--json", user="nobody")
    report = json.loads(doctor.stdout)
    assert doctor.returncode == 1
    assert report["checked_by"]["account"] == "daemon"
    assert {c["name"]: c["status"] for c in report["instances"]["a"]}["model"] == "fail"
    daemon_check = next(c for c in report["host"] if c["name"] == "daemon")
    assert daemon_check["message"] == f"mi50d answers on {d.socket}"

    unknown = d.ctl("check", "nope", user="nobody")
    assert unknown.returncode == 4 and "no instance 'nope'" in unknown.stderr
    assert "Traceback" not in d.log_text()
    assert d.stop() == 0

    # mi50d gone: checked here, as the caller, and the note says why.
    alone = d.ctl("check", "a", "--config-dir", str(d.config), user="nobody")
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert alone.stdout.splitlines()[-1] == "(checked here as nobody)"
    assert alone.stderr.strip().startswith(f"mi50ctl: note: checked here as nobody (uid {NOBODY})"
                                           ", not as the service account daemon")
    assert f"mi50d is not running (no socket at {d.socket})" in alone.stderr


def test_doctor_here_looks_at_the_socket_given() -> None:
    with running_daemon({}, {"a": _instance()}) as d:
        here = mi50ctl("--socket", str(d.socket), "doctor", "--local", "--json",
                       "--config-dir", str(d.config))
        report = json.loads(here.stdout)
        daemon_check = next(c for c in report["host"] if c["name"] == "daemon")
        assert daemon_check == {"name": "daemon", "status": "ok", "fix": None, "data": {},
                                "message": f"mi50d answers on {d.socket}"}
        assert report["checked_by"]["where"] == "here"


def test_check_of_a_broken_configuration_is_78_without_a_traceback() -> None:
    with running_daemon({}, {"a": _instance()}) as d:
        (d.config / "a.toml").write_text('model = "/dev/null"\nport = 70000\n')
        for extra in ((), ("--local",)):
            broken = d.ctl("check", "a", *extra, "--config-dir", str(d.config))
            assert broken.returncode == 78, (extra, broken.stderr)
            assert "a.toml: port: Input should be less than or equal to 65535" in broken.stderr
            assert "Traceback" not in broken.stderr


def test_check_of_inputs_that_break_the_checks_is_one_line_not_a_traceback() -> None:
    # Each passed `--check-config` on the landed code and raised inside the checks. Once the
    # configuration rejects them, `check` says so with 78; until then, one failed line (1).
    bad = {
        "nul-env": 'env = { A = "x\\u0000y" }\n',
        "eq-key": 'env = { "A=B" = "x" }\n',
        "long-host": f'host = "{"a" * 70}.example"\n',
    }
    with running_daemon({}, {"a": _instance()}) as d:
        base = (d.config / "a.toml").read_text()
        for port, (name, line) in enumerate(bad.items(), start=free_port()):
            (d.config / f"{name}.toml").write_text(
                base.replace("\nport = ", f"\nport = {port}\n# was ") + line)
        for name in bad:
            for extra in ((), ("--local", "--config-dir", str(d.config))):
                result = d.ctl("check", name, *extra)
                assert result.returncode in (1, 78), (name, extra, result.stderr)
                assert "Traceback" not in result.stdout + result.stderr, (name, extra)
                text = (result.stdout + result.stderr).strip().splitlines()
                assert text and all(len(line) < 400 for line in text), (name, extra, text)
        (d.config / "nul-env.toml").unlink()
        (d.config / "eq-key.toml").unlink()
        (d.config / "long-host.toml").unlink()
        after = d.ctl("check", "a")  # and mi50d still answers (/dev/null is no GGUF: 1)
        assert after.returncode == 1
        assert after.stdout.splitlines()[-1].startswith("(checked by mi50d, pid ")
        assert d.proc.poll() is None


def test_an_older_mi50d_without_check_leads_to_a_local_check() -> None:
    # A new command is no new protocol version: an older mi50d answers unknown_command.
    workdir = short_dir()
    config = write_config(workdir / "cfg", {}, {"a": _instance()})
    path = workdir / "old.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(WAIT_S)

        def answer() -> None:
            conn, _ = listener.accept()
            with conn, conn.makefile("rb") as lines:
                request = json.loads(lines.readline())
                conn.sendall(json.dumps({"v": 1, "id": request["id"], "ok": False, "error": {
                    "code": "unknown_command", "message": "unknown command 'check'; known: "
                    "status, start, stop, restart, reload, logs"}}).encode() + b"\n")

        peer = threading.Thread(target=answer)
        peer.start()
        result = mi50ctl("--socket", str(path), "check", "a", "--json",
                         "--config-dir", str(config))
        peer.join()
    doc = json.loads(result.stdout)
    assert doc["checked_by"]["where"] == "here"
    assert {c["name"] for c in doc["checks"]} >= {"binary", "model", "port"}
