"""The suite cannot quietly skip: what a run can reach is said at the top, and CI fails on any skip.

At the top of every run (pytest's report header) one line per optional part says whether it will run: the
PostgreSQL half (``PROXY_TEST_POSTGRES_URL``, else a throwaway cluster of the installed binaries), the browser
tests (Debian's ``chromium`` and ``chromium-driver``) and the Prometheus tests (``prometheus``, ``promtool``); one
that will not says what to install or set. Checked without starting anything.

With ``PROXY_TEST_NO_SKIPS=1`` (``.ci/run`` sets it) a run in which any test was skipped fails, listing each
skip's reason: a CI run that skipped the PostgreSQL half or the browser is not a green run.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.databases import POSTGRES_ENV, POSTGRES_HOW, cluster_problem, server_binaries

NO_SKIPS_ENV = "PROXY_TEST_NO_SKIPS"

_skipped: list[tuple[str, str]] = []


def _postgres_line() -> str:
    url = os.environ.get(POSTGRES_ENV, "").strip()
    if url:
        try:
            import psycopg

            with psycopg.connect(url, autocommit=True, connect_timeout=3) as connection:
                connection.execute("SELECT 1")
        except Exception as error:  # noqa: BLE001 - any failure to connect is the line's news
            return (f"PostgreSQL half: WILL BE SKIPPED, {POSTGRES_ENV} is set but unusable "
                    f"({type(error).__name__}). To run it, {POSTGRES_HOW}")
        return f"PostgreSQL half: runs on {POSTGRES_ENV}"
    problem = cluster_problem()
    if problem is None:
        return f"PostgreSQL half: runs on a throwaway cluster of {server_binaries()}"
    return f"PostgreSQL half: WILL BE SKIPPED, {POSTGRES_ENV} is not set and {problem}. To run it, {POSTGRES_HOW}"


def _tool_line(part: str, tools: dict[str, str]) -> str:
    missing = sorted({package for command, package in tools.items() if shutil.which(command) is None})
    if not missing:
        return f"{part}: run ({', '.join(shutil.which(command) or command for command in tools)})"
    return (f"{part}: WILL BE SKIPPED, not installed: Debian package(s) {', '.join(missing)} "
            f"(apt-get install {' '.join(missing)}; .ci/run installs them)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [_postgres_line(),
             _tool_line("browser tests", {"chromium": "chromium", "chromedriver": "chromium-driver"}),
             _tool_line("Prometheus tests", {"prometheus": "prometheus", "promtool": "prometheus"})]
    if os.environ.get(NO_SKIPS_ENV):
        lines.append(f"{NO_SKIPS_ENV} is set: any skipped test fails the run")
    return lines


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, str(reason).removeprefix("Skipped: ")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.environ.get(NO_SKIPS_ENV) or not _skipped:
        return
    reasons: dict[str, int] = {}
    for _, reason in _skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.section(f"{len(_skipped)} test(s) skipped, and {NO_SKIPS_ENV} forbids it", sep="!", red=True)
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminal.line(f"{count} x {reason}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
