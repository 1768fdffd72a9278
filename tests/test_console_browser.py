"""The console in a real browser: Debian's headless Chromium, driven through its chromium-driver by Selenium,
against a live gateway and the simulator on loopback.

Screenshots of each page are saved as test artifacts (``PROXY_TEST_ARTIFACTS``, else a temporary folder, named
in the output); with ``PROXY_UPDATE_SCREENSHOTS=1`` they also replace the README's pictures in ``docs/``.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, TEXT_PATH, Gateway, auth, wait_for_status
from tests.console_client import ConsoleClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.sqlite_only  # one real browser run is enough: the handler tests cover both backends


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[Path]:
    folder = Path(os.environ.get("PROXY_TEST_ARTIFACTS") or tempfile.mkdtemp(prefix="console-screens-"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    print(f"console screenshots: {folder}")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium and chromium-driver here (Debian's packages; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                     "--autoplay-policy=no-user-gesture-required", "--disable-gpu"):
        options.add_argument(argument)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def _wait(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - an element not there yet: look again
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "the page never showed what was waited for"
        time.sleep(0.05)


def _errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def _shoot(driver: Any, artifacts: Path, name: str) -> None:
    driver.save_screenshot(str(artifacts / f"console-{name}.png"))
    if os.environ.get("PROXY_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(artifacts / f"console-{name}.png", ROOT / "docs" / f"console-{name}.png")


def _session(driver: Any, link: str, artifacts: Path) -> dict[str, Any]:
    """Everything a person does in the console, in one browser; what the test checks afterwards."""
    try:
        return _visit(driver, link, artifacts)
    except AssertionError as failure:  # say where the browser was and what it logged
        driver.save_screenshot(str(artifacts / "console-failure.png"))
        raise AssertionError(f"{failure} at {driver.current_url}; browser log: {driver.get_log('browser')}; "
                             f"screenshot: {artifacts / 'console-failure.png'}") from None


def _visit(driver: Any, link: str, artifacts: Path) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    seen: dict[str, Any] = {}
    driver.get(link)
    _wait(lambda: driver.find_element(By.CSS_SELECTOR, 'tr[data-team="design"]'))
    seen["overview_row"] = driver.find_element(By.CSS_SELECTOR, 'tr[data-team="design"]').text
    _shoot(driver, artifacts, "overview")

    driver.find_element(By.ID, "q").send_keys("res")  # filtered in place as one types (htmx), the URL kept
    _wait(lambda: [row.get_attribute("data-team") for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-team]")]
          == ["research"])
    seen["filtered_url"] = _wait(lambda: "q=res" in driver.current_url and driver.current_url)
    driver.find_element(By.LINK_TEXT, "Overview").click()
    _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "tr[data-team]")) == 3)

    driver.find_element(By.LINK_TEXT, "design").click()
    _wait(lambda: driver.find_element(By.CSS_SELECTOR, ".plot canvas"))  # uPlot drew the chart
    budget = driver.find_element(By.ID, "f-budget_usd")
    budget.clear()
    budget.send_keys("75")
    driver.find_element(By.CSS_SELECTOR, "#settings button[type=submit]").click()
    _wait(lambda: driver.find_element(By.ID, "notice").text == "Settings saved.")
    seen["limit"] = driver.find_element(By.ID, "limit").text

    driver.find_element(By.ID, "f-topup_amount_usd").send_keys("5")
    driver.find_element(By.ID, "f-topup_reason").send_keys("browser launch week")
    driver.find_element(By.CSS_SELECTOR, "#topup button[type=submit]").click()
    _wait(lambda: "Top-up of $5.00 recorded" in driver.find_element(By.ID, "notice").text)
    seen["credit"] = driver.find_element(By.ID, "credit").text
    seen["ledger_top"] = driver.find_element(By.CSS_SELECTOR, "table.entries tbody tr").text
    _wait(lambda: driver.find_element(By.CSS_SELECTOR, ".plot canvas"))  # drawn again after the in-place update
    _shoot(driver, artifacts, "team")

    driver.find_element(By.ID, "csv").click()
    seen["csv"] = _wait(lambda: [path for path in driver.downloads.glob("*.csv")])[0]

    driver.find_element(By.LINK_TEXT, "Jobs").click()
    _wait(lambda: driver.find_element(By.CSS_SELECTOR, "table.jobs tr[data-handle]"))
    _shoot(driver, artifacts, "jobs")

    driver.find_element(By.LINK_TEXT, "Gallery").click()
    video = _wait(lambda: driver.find_element(By.CSS_SELECTOR, "li.tile video"))
    seen["video"] = _wait(lambda: driver.execute_script(
        "const v = arguments[0]; return v.readyState >= 1 ? [v.readyState, v.videoWidth, v.videoHeight, v.duration] "
        ": null;", video))
    _shoot(driver, artifacts, "gallery")
    seen["errors"] = _errors(driver)
    return seen


async def test_the_console_in_a_real_browser(start_gateway, browser, artifacts: Path) -> None:
    gateway: Gateway = await start_gateway(teams={"design": 50_000_000, "research": 50_000_000, "ads": 1_000_000})
    shots = (("design", "alice", 6, "a lighthouse at dusk, waves crashing"), ("design", "bob", 10, "a fox in fresh snow"),
             ("research", "rhea", 6, "a time-lapse of a city at night"), ("ads", "ari", 10, "a sneaker turning slowly"))
    for team, user, duration, prompt in shots:
        code, body, _ = await gateway.submit(TEXT_PATH, {"prompt": prompt, "duration": duration},
                                             headers=auth(team=team, user=user))
        assert code == 202
        await wait_for_status(gateway, body["request_id"], {"COMPLETED"}, headers=auth(team=team, user=user))
    assert (await gateway.submit(TEXT_PATH, {"prompt": "one more", "duration": 10}, headers=auth(team="ads")))[0] == 402
    async with ConsoleClient(gateway) as person:
        link = await person.link(user="browser-admin")

    seen = await asyncio.to_thread(_session, browser, link, artifacts)

    assert "$1.12" in seen["overview_row"]  # 0.42 + 0.70 spent
    assert seen["filtered_url"].endswith("/console/?q=res&sort=name&dir=asc")
    assert seen["limit"] == "$75.00"
    assert gateway.sql("SELECT budget_limit_micros FROM teams WHERE name = 'design'") == [(75_000_000,)]
    assert seen["credit"] == "$5.00"
    assert "topup" in seen["ledger_top"] and "browser-admin" in seen["ledger_top"] and "browser launch week" in seen["ledger_top"]
    rows = list(csv.DictReader(io.StringIO(seen["csv"].read_text())))
    expected = gateway.sql("SELECT id, kind FROM ledger WHERE team = 'design' ORDER BY id DESC")
    assert [(int(row["id"]), row["kind"]) for row in rows] == [(int(i), kind) for i, kind in expected]
    assert rows[0]["credit_delta_usd"] == "5.00" and rows[0]["actor"] == "browser-admin"
    ready, width, height, duration = seen["video"]
    assert ready >= 1 and (width, height) == (1280, 720) and round(duration) in (6, 10)
    assert seen["errors"] == [], seen["errors"]  # CSP violations and script errors are logged as SEVERE
    for name in ("overview", "team", "jobs", "gallery"):
        assert (artifacts / f"console-{name}.png").stat().st_size > 10_000
