"""The page at / in a real headless Chromium whose microphone plays real speech from ../shared/eval."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import ARTIFACTS, EVAL_DIR, manifest, start_server, wer

CHROMIUM = Path("/usr/bin/chromium")
SPEECH = "en_librispeech_dev-clean_2412-153948-0000.wav"  # 11.7 s

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


def launch(playwright, wav: Path):
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            "--no-sandbox",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop",
            "--autoplay-policy=no-user-gesture-required",
            # This machine has no network: keep Chromium from trying.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-gpu",
        ],
    )


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    manifest()  # skips when the eval set is missing
    with sync_playwright() as playwright:
        chromium = launch(playwright, EVAL_DIR / SPEECH)
        yield chromium
        chromium.close()


def test_speaking_into_the_page_shows_partials_then_the_final(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.wait_for_selector("#status[data-state=connected]", timeout=30_000)
    assert page.locator("#language option").all_inner_texts() == ["auto-detect", "en"]
    assert page.locator('#task option[value="translate"]').is_disabled()  # tiny.en cannot translate
    assert not page.is_visible("#key-form"), "no key is asked for when the server needs none"

    page.click("#talk")
    started = time.monotonic()
    assert page.get_attribute("#talk", "aria-pressed") == "true"
    page.wait_for_function("document.getElementById('committed').textContent.length > 0", timeout=8_000)
    seen_while_speaking = page.inner_text("#live")
    page.wait_for_timeout(max(0, 5_000 - (time.monotonic() - started) * 1000))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-mid-utterance.png"), full_page=True)
    shutil.copy(ARTIFACTS / "web-mid-utterance.png", tmp_path / "web-mid-utterance.png")
    page.wait_for_timeout(max(0, 12_500 - (time.monotonic() - started) * 1000))
    page.click("#talk")

    page.wait_for_selector("#history li", timeout=20_000)
    final = page.inner_text("#history li .final")
    latency = page.inner_text("#history li .latency")
    assert seen_while_speaking.strip(), "partials must show while the user speaks"
    assert wer(manifest()[SPEECH]["text"], final) <= 0.15, final
    assert re.fullmatch(r"final in \d+ ms", latency)
    assert page.inner_text("#live").strip() == "", "the final replaces the live text"
    assert page.inner_text("#error") == ""


def test_space_bar_is_push_to_talk(server, browser):
    page = browser.new_page()
    page.goto(server.base_url + "/")
    page.wait_for_selector("#status[data-state=connected]", timeout=30_000)
    page.keyboard.down("Space")
    page.wait_for_function("document.getElementById('talk').getAttribute('aria-pressed') === 'true'")
    page.wait_for_timeout(3_000)
    page.keyboard.up("Space")
    page.wait_for_selector("#history li", timeout=20_000)
    assert page.get_attribute("#talk", "aria-pressed") == "false"
    assert page.inner_text("#history li .final").strip()


def test_the_page_asks_for_the_api_key_and_then_connects(browser, tmp_path):
    with start_server({"API_KEY": "letmein"}, tmp_path) as locked:
        page = browser.new_page()
        page.goto(locked.base_url + "/")
        page.wait_for_selector("#key-form", state="visible", timeout=30_000)
        assert "API key" in page.inner_text("#error")
        page.fill("#key", "letmein")
        page.click("#key-form button")
        page.wait_for_selector("#status[data-state=connected]", timeout=30_000)
        assert not page.is_visible("#key-form")
        page.wait_for_timeout(1_000)  # a wrong key would be closed with 1008 right after opening
        assert page.get_attribute("#status", "data-state") == "connected"
        assert page.inner_text("#error") == ""
