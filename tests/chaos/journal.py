"""What a fleet host's journal says ran there: each `<service>@<version>` unit's active spans across boots.

The evidence is systemd's own record (PID 1's job and state messages, kept on the host's disk across power-offs),
read with `journalctl -o json`; never the reactor's store or its state file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

# systemd's catalogue: a start job done ("Started ..."), a stop job done ("Stopped ..."), the unit gone inactive
# by itself ("Deactivated successfully"), the unit failed ("Failed with result ...").
STARTED = "39f53479d3a045ac8e11786248231fbf"
STOPPED = "9d1aaa27d60140bd96365438aad20286"
DEACTIVATED = "7ad2d189f7e94e70a38c781354912448"
FAILED = "d9b373ed55a64feb8242e02dbe79a49c"
ENDED = {STOPPED, DEACTIVATED, FAILED}


@dataclass(frozen=True)
class Span:
    """One run of a unit: from its start to its end (or the end of its boot, or None while it still runs)."""

    version: str
    boot: str
    start_us: int
    end_us: int | None


def entries(text: str) -> list[dict[str, str]]:
    """`journalctl -o json` output, one object per line (lines that are no object are skipped)."""
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found


def spans(journal: Iterable[dict[str, str]], service: str) -> list[Span]:
    """The active spans of `<service>@<version>` units, in the order they started. A span still open when its boot
    ended (a power-off) ends with the last entry of that boot; one open in the current boot has no end."""
    prefix = f"{service}@"
    ordered = sorted(journal, key=lambda entry: int(entry["__REALTIME_TIMESTAMP"]))
    boot_ends: dict[str, int] = {}
    for entry in ordered:
        boot_ends[entry["_BOOT_ID"]] = int(entry["__REALTIME_TIMESTAMP"])
    current_boot = ordered[-1]["_BOOT_ID"] if ordered else None
    open_spans: dict[str, tuple[str, int]] = {}  # unit -> (boot, start)
    found: list[Span] = []

    def close(unit: str, end_us: int | None) -> None:
        boot, start_us = open_spans.pop(unit)
        found.append(Span(version=unit[len(prefix) : -len(".service")], boot=boot, start_us=start_us, end_us=end_us))

    for entry in ordered:
        unit = entry.get("UNIT", "")
        if not (unit.startswith(prefix) and unit.endswith(".service")) or entry.get("_PID") != "1":
            continue
        boot, at = entry["_BOOT_ID"], int(entry["__REALTIME_TIMESTAMP"])
        if unit in open_spans and open_spans[unit][0] != boot:  # its boot ended while it ran
            close(unit, boot_ends[open_spans[unit][0]])
        message = entry.get("MESSAGE_ID", "")
        if message == STARTED and unit not in open_spans:
            open_spans[unit] = (boot, at)
        elif message in ENDED and unit in open_spans:
            close(unit, at)
    for unit, (boot, _) in list(open_spans.items()):
        close(unit, None if boot == current_boot else boot_ends[boot])
    return sorted(found, key=lambda span: span.start_us)


def overlaps(found: Iterable[Span]) -> list[tuple[Span, Span]]:
    """Pairs of spans of different versions that were active at the same time."""
    ordered = sorted(found, key=lambda span: span.start_us)
    pairs = []
    for index, first in enumerate(ordered):
        for second in ordered[index + 1 :]:
            first_end = first.end_us if first.end_us is not None else float("inf")
            if second.start_us < first_end and second.version != first.version:
                pairs.append((first, second))
    return pairs


def starts(found: Iterable[Span]) -> dict[str, int]:
    """How many times each version was started."""
    counted: dict[str, int] = {}
    for span in found:
        counted[span.version] = counted.get(span.version, 0) + 1
    return counted
