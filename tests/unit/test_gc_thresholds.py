"""The `reactor` command's garbage collector thresholds (reactor.runtime.tune_gc)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from reactor.cli import main as cli
from reactor.runtime import GC_THRESHOLDS, PYTHON_GC_THRESHOLDS, tune_gc


@pytest.fixture(autouse=True)
def thresholds_restored() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def test_pythons_own_thresholds_are_raised() -> None:
    gc.set_threshold(*PYTHON_GC_THRESHOLDS)
    assert tune_gc()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] > 10 * PYTHON_GC_THRESHOLDS[0]


def test_thresholds_the_process_set_itself_are_kept() -> None:
    gc.set_threshold(1000, 5, 5)
    assert not tune_gc()
    assert gc.get_threshold() == (1000, 5, 5)


def test_the_reactor_command_raises_them_before_it_runs_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.set_threshold(*PYTHON_GC_THRESHOLDS)
    seen: list[tuple[int, int, int]] = []
    monkeypatch.setattr(cli, "app", lambda: seen.append(gc.get_threshold()))
    cli.main()
    assert seen == [GC_THRESHOLDS]


def test_a_fresh_interpreter_starts_with_pythons_thresholds() -> None:
    """What `tune_gc` compares with is what Python starts with (it would otherwise never raise them)."""
    printed = subprocess.run(
        [sys.executable, "-c", "import gc; print(gc.get_threshold())"], capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() == str(PYTHON_GC_THRESHOLDS)
