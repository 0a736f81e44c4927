"""The dashboard's rollout section in headless Chromium: phase, step, weight and each
decision, as text."""

from __future__ import annotations

import asyncio

from selenium.webdriver.support.ui import WebDriverWait

from tests.test_dashboard import browser as browser  # the module-scoped Chromium fixture
from tests.test_dashboard import texts
from tests.test_rollout_service import ROUTING, started


async def test_dashboard_shows_the_rollout_and_its_decisions(tmp_path, browser):
    (tmp_path / "routing.yaml").write_text(ROUTING)
    plane = await started(tmp_path)
    try:
        await asyncio.to_thread(browser.get, f"http://127.0.0.1:{plane.admin_address[1]}/ui")

        def shown(driver) -> bool:  # the first hold decision, with its reason
            return "0 of 100 canary requests" in section(driver)

        await asyncio.to_thread(WebDriverWait(browser, 15, poll_frequency=0.1).until, shown)
        assert texts(browser, "data-rollout-weight") == {"iris": "10%"}
        assert texts(browser, "data-rollout-phase") == {"iris": "progressing"}
        page = section(browser)
        assert "Rollout of iris: v2 over v1" in page and "1 of 2 [10, 50]" in page
        assert "start" in page and "hold" in page  # the decisions, newest first
        plane.rollout_action("iris", "abort")
        await asyncio.to_thread(
            WebDriverWait(browser, 5, poll_frequency=0.1).until,
            lambda d: texts(d, "data-rollout-phase") == {"iris": "rolled_back"},
        )
        assert texts(browser, "data-rollout-weight") == {"iris": "0%"}
        assert "aborted by the operator" in section(browser)
    finally:
        await plane.stop()


def section(driver) -> str:
    return driver.execute_script("return document.getElementById('rollouts').textContent")
