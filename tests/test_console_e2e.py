"""The web console in a real headless browser (Debian's chromium, driven by Playwright): a streamed playground
answer appears and equals the API's, and the fleet view lists the running worker. Skipped where no chromium is
installed (`scripts/install.sh test` installs it where it may)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")


def test_the_playground_streams_an_answer_and_the_fleet_view_lists_the_worker(served: Server,
                                                                               tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    expected = served.client().chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=12, temperature=0)
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{served.base_url}/console?prompt=Hello%20there&temperature=0&max_tokens=12")
            page.wait_for_selector("#answer[data-done='1']", timeout=30_000)
            assert page.inner_text("#answer") == expected.choices[0].message.content != ""
            assert page.inner_text("#usage").endswith("12 generated")
            page.wait_for_selector("#workers tbody tr", timeout=10_000)
            worker = page.inner_text("#workers tbody tr").split("\t")
            assert worker[1:4] == ["chat", served.model, "native"]
            assert served.model in page.inner_text("#queues tbody")
            page.screenshot(path=str(tmp_path / "console.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "console.png").stat().st_size > 10_000
