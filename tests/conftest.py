"""Shared pytest configuration, and the time budget of the notebooks.

Loaded automatically for ``pytest tests/`` and explicitly (``-p tests.conftest``) for the nbval
runs over ``chapters/`` (``make nbval``, ``make test-nb``), where it:

* keeps progress bars out of the re-executed outputs (the kernels inherit the environment);
* under another seed (``BNBOOK_SEED`` other than 0, ``make test-robust``) compares no output at
  all: the stored outputs are the draw of seed 0, and only the asserts speak for another draw;
* sums the time nbval spends on each notebook (kernel start, every cell, shutdown), prints a table,
  and fails the run, loudly, when a notebook takes more than 1.5x its budget (60 s) or all of them
  together more than 1.5x the book's (8 minutes). The budgets are for a 2-core machine; override
  with BNBOOK_NB_BUDGET / BNBOOK_BOOK_BUDGET (seconds) when measuring somewhere else.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest

# Notebook kernels started by nbval inherit these: no progress bars, no interactive extras.
for _name, _value in {
    "BNBOOK_QUIET": "1",
    "BNBOOK_EXECUTE": "1",
    "TQDM_DISABLE": "1",
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}.items():
    os.environ.setdefault(_name, _value)

NB_BUDGET = float(os.environ.get("BNBOOK_NB_BUDGET", 60))
BOOK_BUDGET = float(os.environ.get("BNBOOK_BOOK_BUDGET", 8 * 60))
TOLERANCE = 1.5

_durations: dict[str, float] = defaultdict(float)


def pytest_collection_modifyitems(session, config, items) -> None:
    if os.environ.get("BNBOOK_SEED", "0").strip() in ("", "0"):
        return
    for item in items:
        options = getattr(item, "options", None)
        if isinstance(options, dict) and "check" in options:  # an nbval cell
            options["check"] = False


def _notebook_of(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    return path if path.endswith(".ipynb") else None


def pytest_runtest_logreport(report) -> None:
    # Under pytest-xdist the controller receives every worker's reports through this hook.
    notebook = _notebook_of(report.nodeid)
    if notebook is not None:
        _durations[notebook] += report.duration


def _over_budget() -> tuple[list[str], float]:
    total = sum(_durations.values())
    slow = [nb for nb, t in _durations.items() if t > TOLERANCE * NB_BUDGET]
    return slow, total


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    if not _durations or hasattr(session.config, "workerinput"):
        return
    slow, total = _over_budget()
    if (slow or total > TOLERANCE * BOOK_BUDGET) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _durations or hasattr(config, "workerinput"):
        return
    tr = terminalreporter
    slow, total = _over_budget()
    tr.section("notebook execution time (nbval: kernel start + every cell)")
    width = max(len(nb) for nb in _durations)
    tr.write_line(f"{'notebook':<{width}}  {'seconds':>8}  budget {NB_BUDGET:.0f} s")
    for nb in sorted(_durations):
        t = _durations[nb]
        flag = ""
        if t > TOLERANCE * NB_BUDGET:
            flag = f"FAIL: over {TOLERANCE}x the budget"
        elif t > NB_BUDGET:
            flag = "over budget (fails past 1.5x)"
        tr.write_line(f"{nb:<{width}}  {t:8.1f}  {flag}")
    tr.write_line(
        f"{'total':<{width}}  {total:8.1f}  budget {BOOK_BUDGET:.0f} s"
        + ("  FAIL: over 1.5x the budget" if total > TOLERANCE * BOOK_BUDGET else "")
    )
    if slow or total > TOLERANCE * BOOK_BUDGET:
        tr.write_line("")
        tr.write_line(
            "!" * 30 + " TIME BUDGET EXCEEDED: the run fails. Make the slow notebooks faster "
            "(smaller experiments; the full-scale run behind FULL = False). " + "!" * 30,
            red=True,
            bold=True,
        )
