"""The /ui dashboard in Debian's headless Chromium (Selenium, system chromedriver): it
lists the versions, follows YAML edits without a reload, shows config errors as text and
the usage per consumer (names as text)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.stack import Stack, infer, ninety_ten

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not Path(binary).exists():
            pytest.fail(f"{binary} is missing: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="infergate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_repository, envoy_binary) -> Iterator[Stack]:
    with ninety_ten(tmp_path_factory.mktemp("dashboard"), model_repository) as s:
        yield s


def texts(driver: webdriver.Chrome, attribute: str) -> dict[str, str]:
    """{attribute value: text} of the elements with `attribute`, read in one go (the page
    re-renders every second, so element references go stale)."""
    return driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll(`[${arguments[0]}]`)]"
        ".map(e => [e.getAttribute(arguments[0]), e.textContent]))",
        attribute,
    )


def weights(driver: webdriver.Chrome) -> dict[str, str]:
    return texts(driver, "data-weight")


def test_dashboard_lists_versions_follows_edits_and_shows_errors(stack, browser):
    browser.get(f"http://127.0.0.1:{stack.admin}/ui")
    wait = WebDriverWait(browser, 10, poll_frequency=0.05)
    wait.until(lambda d: weights(d).get("iris/v2"))
    assert texts(browser, "data-version") == {"iris/v1": "v1", "iris/v2": "v2"}
    assert weights(browser) == {"iris/v1": "90 (90%)", "iris/v2": "10 (10%)"}
    marker = browser.execute_script("window.notReloaded = true; return window.notReloaded")
    assert marker is True

    stack.route({"v1": 40, "v2": 60})
    WebDriverWait(browser, 2, poll_frequency=0.05).until(
        lambda d: weights(d) == {"iris/v1": "40 (40%)", "iris/v2": "60 (60%)"}
    )

    good = stack.config.read_text()
    stack.write(good + '  "<b>bold</b>": {versions: {}}\n')
    error = browser.find_element(By.ID, "config-error")
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: error.is_displayed())
    assert "<b>bold</b>" in error.text  # shown as text, not markup
    assert "routing.yaml:" in error.text  # with its file position
    assert browser.find_elements(By.CSS_SELECTOR, "#config-error b") == []
    assert weights(browser) == {"iris/v1": "40 (40%)", "iris/v2": "60 (60%)"}
    assert browser.execute_script("return window.notReloaded") is True


def test_dashboard_shows_usage_per_consumer(stack, browser):
    browser.get(f"http://127.0.0.1:{stack.admin}/ui")
    eve = "<i>eve</i>"  # the header is the client's to choose: shown as text
    for consumer, path in [("alice", "iris"), ("alice", "iris"), (eve, "iris"), (eve, "nosuch")]:
        infer(stack.listen, f"/v2/models/{path}/infer", {"x-infergate-consumer": consumer})
    want = {
        "alice/iris/requests": "2",
        "alice/iris/ok": "2",
        "alice/iris/total": "2",
        f"{eve}/iris/ok": "1",
        f"{eve}/nosuch/client_error": "1",
        f"{eve}/nosuch/ok": "0",
    }
    WebDriverWait(browser, 10, poll_frequency=0.05).until(
        lambda d: want.items() <= texts(d, "data-usage").items()
    )
    table = browser.find_element(By.ID, "consumers")
    assert "429 quota" in table.text and eve in table.text
    assert browser.find_elements(By.CSS_SELECTOR, "#consumers i") == []
