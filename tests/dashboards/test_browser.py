"""The report and the live dashboard in a real browser: Debian's chromium, headless, driven by Selenium.

Nothing may be fetched from outside: the report's page is cut off from the network entirely, the
dashboard's may reach 127.0.0.1 only, and every request the browser made is checked against that.
"""

import io
import json
import os
import shutil

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from sam3_engine.dashboards.report import write_report
from sam3_engine.engine.catalog import named_query
from tests.dashboards.conftest import HOSTILE, serving
from tests.helpers import rows

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (.ci/run): there, a missing browser is a failure, not a skip
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # no name resolves: nothing outside is reachable
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _network(driver, offline: bool) -> None:
    driver.execute_cdp_cmd("Network.enable", {})
    conditions = {"offline": offline, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", conditions)


def _open(driver, url: str) -> None:
    driver.get_log("browser")  # reading the logs empties them: what follows is this page's
    driver.get_log("performance")
    driver.get(url)


def _requested(driver) -> list[str]:
    entries = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [entry["params"]["request"]["url"] for entry in entries if entry["method"] == "Network.requestWillBeSent"]


def _console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _plots_drawn(driver, at_least: int) -> int:
    """Waits until Plotly has drawn ``at_least`` figures as SVG in the page; returns how many it drew."""
    count = "return document.querySelectorAll('.js-plotly-plot .main-svg').length"
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(count) >= at_least)
    return driver.execute_script(count)


def _not_blank(driver) -> bool:
    picture = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    return len(picture.getcolors(1 << 24)) > 100  # plots, tables and text: far more than a blank or error page's few colours


def _no_dialog(driver) -> bool:
    try:
        driver.switch_to.alert.dismiss()
    except NoAlertPresentException:
        return True
    return False


def _visible_rows(driver) -> list[str]:
    script = "return Array.from(document.querySelectorAll('#coverage tbody tr')).filter(r => r.style.display !== 'none')"
    return [row.find_element(By.CSS_SELECTOR, 'td[data-column="phrase"]').text for row in driver.execute_script(script)]


def test_the_report_renders_offline_and_shows_the_sqls_numbers(browser, quickstart, tmp_path):
    run_dir, _ = quickstart
    write_report(str(run_dir), str(tmp_path / "report.html"))
    _network(browser, offline=True)
    try:
        _open(browser, (tmp_path / "report.html").as_uri())
        assert _plots_drawn(browser, 4) >= 4
        assert _console_errors(browser) == []
        assert {url.split(":", 1)[0] for url in _requested(browser)} <= {"file", "data"}
        assert _not_blank(browser)
        coverage = {row["phrase"]: row for row in rows(run_dir, named_query("concept_coverage"), {"verifier": None})}
        assert sorted(_visible_rows(browser)) == sorted(coverage)
        traces = browser.execute_script("return document.getElementById('presence').data.map(t => [t.name, t.x, t.y])")
        assert {name for name, _, _ in traces} == {"present", "uncertain", "absent"}
        for verdict, phrases, counts in traces:  # the plotted bars are the SQL's counts, concept by concept
            assert phrases and all(coverage[p][f"{verdict}_pairs"] == n for p, n in zip(phrases, counts, strict=True))
        needle = sorted(coverage)[0][:3]
        browser.find_element(By.ID, "filter").send_keys(needle)
        assert sorted(_visible_rows(browser)) == sorted(
            p for p, row in coverage.items() if needle.lower() in f"{p} {row['parent'] or ''}".lower()
        )
        browser.find_element(By.ID, "filter").clear()
        browser.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")
        Select(browser.find_element(By.ID, "origin")).select_by_value("caption_images")
        assert sorted(_visible_rows(browser)) == sorted(p for p, row in coverage.items() if row["caption_images"] > 0)
    finally:
        _network(browser, offline=False)


def test_hostile_phrases_stay_text_in_the_report(browser, hostile_run, tmp_path):
    run_dir, _ = hostile_run
    write_report(str(run_dir), str(tmp_path / "report.html"))
    _open(browser, (tmp_path / "report.html").as_uri())
    _plots_drawn(browser, 4)
    assert _no_dialog(browser)
    assert set(HOSTILE) <= set(_visible_rows(browser))  # shown as the text they are
    labels = browser.execute_script("return Array.from(document.querySelectorAll('#presence text')).map(t => t.textContent)")
    assert set(HOSTILE) <= set(labels)  # in the chart too, quotes and all (not &quot;)
    assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert _console_errors(browser) == []


def test_the_dashboard_serves_the_views_and_a_gallery_page_with_every_picture(browser, quickstart):
    run_dir, _ = quickstart
    coverage = {row["phrase"]: row for row in rows(run_dir, named_query("concept_coverage"), {"verifier": None})}
    with serving(run_dir) as base:
        _open(browser, base + "/")
        assert _plots_drawn(browser, 4) >= 4
        assert _console_errors(browser) == []
        assert _not_blank(browser)
        assert sorted(_visible_rows(browser)) == sorted(coverage)
        phrase = max(coverage, key=lambda p: (coverage[p]["masks"], p))
        link = browser.find_element(By.LINK_TEXT, phrase)
        assert _requested(browser) and all(url.startswith(base) for url in _requested(browser))
        link.click()
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)"))
        pictures = browser.execute_script("return Array.from(document.images).map(i => i.naturalWidth)")
        assert pictures and all(width > 0 for width in pictures)  # every tile arrived and decoded
        assert browser.find_element(By.CSS_SELECTOR, "#gallery h3").text == phrase
        assert _console_errors(browser) == []
        assert all(url.startswith(base) for url in _requested(browser))
        assert _not_blank(browser)


def test_hostile_phrases_stay_text_in_the_dashboard(browser, hostile_run):
    run_dir, renamed = hostile_run
    with serving(run_dir) as base:
        _open(browser, base + "/")
        _plots_drawn(browser, 4)
        assert _no_dialog(browser) and set(HOSTILE) <= set(_visible_rows(browser))
        for phrase in renamed.values():
            _open(browser, base + "/")
            browser.find_element(By.LINK_TEXT, phrase).click()
            WebDriverWait(browser, 60).until(lambda d: d.execute_script("return Array.from(document.images).every(i => i.complete)"))
            assert _no_dialog(browser) and browser.find_element(By.CSS_SELECTOR, "#gallery h3").text == phrase
            assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
            assert _console_errors(browser) == []
