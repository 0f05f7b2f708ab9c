"""A `mi50ctl start` overtaken by another client's `stop` ends at once and says so, instead of
reporting a failure of the instance."""

from __future__ import annotations

import json
import subprocess

from tests.ctlsupport import MI50CTL, WAIT_S, fake_instance, running_daemon, wait_until
from tests.support import free_port


def test_a_start_overtaken_by_a_stop_says_superseded() -> None:
    slow = fake_instance(free_port(), env={"FAKE_LOAD_S": "120"})
    with running_daemon({}, {"a": slow}) as d:
        with subprocess.Popen([MI50CTL, "--socket", str(d.socket), "start", "a"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as start:

            def loading() -> bool:
                status = json.loads(d.ctl("status", "--json").stdout)
                return any(i["name"] == "a" and i["state"] == "starting"
                           for i in status["instances"])

            wait_until(loading, "a loading")
            assert d.ctl("stop", "a").returncode == 0
            out, err = start.communicate(timeout=WAIT_S)
        assert start.returncode == 1, (out, err)
        assert "Error: a: start superseded by a later stop; now stopp" in err  # -ing or -ed
