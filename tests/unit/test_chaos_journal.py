"""The fleet chaos test's reading of a host journal: runs of each version across boots, overlaps and restarts."""

from __future__ import annotations

import json

import pytest

from tests.chaos import journal

pytestmark = pytest.mark.unit

SERVICE = "svc"


def entry(at_s: float, unit: str, message: str, boot: str = "boot-1", pid: str = "1") -> dict[str, str]:
    return {
        "__REALTIME_TIMESTAMP": str(int(at_s * 1_000_000)),
        "_BOOT_ID": boot,
        "_PID": pid,
        "UNIT": f"{SERVICE}@{unit}.service",
        "MESSAGE_ID": message,
    }


def test_a_clean_upgrade_is_two_runs_one_after_the_other() -> None:
    spans = journal.spans(
        [
            entry(1, "1.0.0", journal.STARTED),
            entry(5, "1.0.0", journal.STOPPED),
            entry(6, "2.0.0", journal.STARTED),
        ],
        SERVICE,
    )

    assert [(s.version, s.start_us, s.end_us) for s in spans] == [
        ("1.0.0", 1_000_000, 5_000_000),
        ("2.0.0", 6_000_000, None),
    ]
    assert journal.overlaps(spans) == []
    assert journal.starts(spans) == {"1.0.0": 1, "2.0.0": 1}


def test_two_versions_running_at_once_is_an_overlap() -> None:
    spans = journal.spans(
        [entry(1, "1.0.0", journal.STARTED), entry(2, "2.0.0", journal.STARTED), entry(3, "1.0.0", journal.FAILED)],
        SERVICE,
    )

    assert [(first.version, second.version) for first, second in journal.overlaps(spans)] == [("1.0.0", "2.0.0")]


def test_a_run_cut_short_by_a_power_off_ends_with_its_boot_and_the_next_boot_starts_afresh() -> None:
    spans = journal.spans(
        [
            entry(1, "1.0.0", journal.STARTED, boot="a"),
            entry(2, "1.0.0", journal.STOPPED, boot="a"),
            entry(3, "2.0.0", journal.STARTED, boot="a"),  # the power goes: no stop is logged
            entry(9, "1.0.0", journal.STARTED, boot="b"),
        ],
        SERVICE,
    )

    assert [(s.version, s.boot, s.end_us) for s in spans] == [
        ("1.0.0", "a", 2_000_000),
        ("2.0.0", "a", 3_000_000),
        ("1.0.0", "b", None),
    ]
    assert journal.overlaps(spans) == []
    assert journal.starts(spans) == {"1.0.0": 2, "2.0.0": 1}


def test_only_pid_1_speaks_for_a_unit_and_other_services_are_ignored() -> None:
    other = entry(2, "1.0.0", journal.STARTED) | {"UNIT": "other@1.0.0.service"}
    spans = journal.spans([entry(1, "2.0.0", journal.STARTED, pid="4242"), other], SERVICE)

    assert spans == []


def test_journalctl_json_lines_are_read_and_garbage_skipped() -> None:
    text = json.dumps(entry(1, "1.0.0", journal.STARTED)) + "\n-- No entries --\n[1]\n"

    assert journal.entries(text) == [entry(1, "1.0.0", journal.STARTED)]
