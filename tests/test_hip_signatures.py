"""ROCm failure signatures: what the real HIP build prints (fixtures marked REAL, with the command
that produced them) and what only a GPU can produce (marked RECORDED, copied from reports).

The fixtures are tests/fixtures/rocm-signatures/*.txt (format: tests/systemd/rocm_signatures.py).
Every fixture must diagnose to the codes its header expects. When the HIP build is at hand
(by default; MI50D_TEST_HIP=0 turns it off; see tests/test_hip_build.py), every REAL case is run again
in the sid ROCm root and must print the same signature lines; `scripts/record-rocm-signatures.py`
rewrites the REAL fixtures from such a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mi50d.host.diagnose import diagnose, diagnose_line
from tests.conftest import free_port
from tests.systemd import hip_build
from tests.systemd import rocm_signatures as sigs

REPO = Path(__file__).resolve().parents[1]
FIXTURES = {f.name: f for f in sigs.fixtures()}


def test_every_fixture_says_where_it_comes_from() -> None:
    assert FIXTURES
    for fixture in FIXTURES.values():
        assert fixture.origin in ("REAL", "RECORDED"), fixture.name
        assert fixture.command and fixture.produced, fixture.name
        assert fixture.lines, fixture.name
    real = {n for n, f in FIXTURES.items() if f.origin == "REAL"}
    assert real == {c.name for c in sigs.CASES}, "every case has its REAL fixture, and only they"
    assert all(n.startswith("recorded-") for n, f in FIXTURES.items() if f.origin == "RECORDED")


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_diagnoses_as_expected(name: str) -> None:
    fixture = FIXTURES[name]
    assert tuple(d.code for d in diagnose(fixture.lines, expects_gpu=True)) == fixture.expect


def test_the_real_no_device_cases_are_degraded_only_for_gpu_instances() -> None:
    for name in ("no-gpu-serve", "no-gpu-list-devices"):
        lines = FIXTURES[name].lines
        assert [d.degraded for d in diagnose(lines, expects_gpu=True)] == [True]
        assert diagnose(lines, expects_gpu=False) == []


def _signature_lines(lines: tuple[str, ...] | list[str]) -> list[str]:
    return [line for line in lines if diagnose_line(line) is not None]


@pytest.mark.hip
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", sigs.CASES, ids=[c.name for c in sigs.CASES])
def test_real_case_prints_what_its_fixture_holds(hip: hip_build.HipBuild, case: sigs.Case,
                                                 llama_source: Path, tiny_model: Path,
                                                 tmp_path: Path) -> None:
    live = sigs.run(case, hip, llama_source, REPO, tiny_model, free_port(), tmp_path)
    fixture = FIXTURES[case.name]
    assert tuple(d.code for d in diagnose(live)) == fixture.expect, "\n".join(live[:60])
    assert _signature_lines(live) == _signature_lines(fixture.lines), "\n".join(live[:60])
