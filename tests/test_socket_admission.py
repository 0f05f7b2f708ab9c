"""Who may hold a control connection (`mi50d.control.admission.Admission`), as a table: per-uid
limits, the slots kept for root and the daemon's own uid, and release."""

from __future__ import annotations

from mi50d.control.admission import Admission


def _fill(adm: Admission, uid: int, n: int) -> None:
    for _ in range(n):
        assert adm.refusal(uid) is None
        adm.admit(uid)


def test_one_uid_is_held_to_its_limit_and_others_still_get_in() -> None:
    adm = Admission(limit=12, reserved=4, per_uid=3, privileged=frozenset({0}))
    _fill(adm, 1000, 3)
    assert adm.refusal(1000) == ("too many clients for uid 1000 (limit 3); close some "
                                 "mi50ctl logs -f")
    _fill(adm, 1001, 3)  # another user is not locked out
    assert adm.refusal(1002) is None  # 6 of the 8 shared slots are taken
    adm.admit(1002)
    assert adm.total == 7


def test_users_together_cannot_take_the_reserved_slots() -> None:
    adm = Admission(limit=10, reserved=4, per_uid=3, privileged=frozenset({0, 999}))
    _fill(adm, 1000, 3)
    _fill(adm, 1001, 3)
    refusal = adm.refusal(1002)
    assert refusal == ("too many clients (6; users other than root may hold 6); close some "
                       "mi50ctl logs -f")
    _fill(adm, 0, 2)  # root and the daemon's own uid get the reserved slots
    _fill(adm, 999, 2)
    assert adm.refusal(0) == "too many clients (10, limit 10); close some mi50ctl logs -f"


def test_release_frees_the_slot_of_that_uid() -> None:
    adm = Admission(limit=10, reserved=4, per_uid=2, privileged=frozenset({0}))
    _fill(adm, 1000, 2)
    assert adm.refusal(1000) is not None
    adm.release(1000)
    assert adm.refusal(1000) is None
    adm.release(1000)
    assert adm.total == 0 and not adm.held  # nothing left over for a uid that left
