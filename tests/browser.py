"""A real headless browser for the web page's tests: Debian's ``chromium`` driven by ``chromedriver`` through
selenium, and helpers that read the page's state.

:func:`chrome` skips the calling test, saying why, only where no browser is installed (``.ci/run`` installs
``chromium`` and ``chromium-driver``). Screenshots go to ``$EXO_STABLE_SCREENSHOTS`` (README's, in
``docs/screenshots/``, are made with ``EXO_STABLE_SCREENSHOTS=docs/screenshots``).
Opts out of assert rewriting (PYTEST_DONT_REWRITE): test modules import it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# README's screenshots are refreshed with EXO_STABLE_SCREENSHOTS=docs/screenshots; otherwise they go to a
# temporary directory, so that running the tests leaves the checkout as it was.
SCREENSHOTS = Path(os.environ.get("EXO_STABLE_SCREENSHOTS") or Path(tempfile.gettempdir()) / "exo-stable-screenshots")
DESKTOP = (1280, 860)
PHONE = (390, 844)
CONVERSATIONS = "exo-stable.conversations.v1"


def _binary(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@contextmanager
def chrome(size: tuple[int, int] = DESKTOP) -> Iterator[Any]:
    """A headless Chromium, closed on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (it is in the dev extra: pip install -e '.[dev]')")
    browser = _binary("chromium", "chromium-browser", "google-chrome")
    driver_path = _binary("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no headless browser here: install Debian's chromium and chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        f"--window-size={size[0]},{size[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The tests preload OpenBLAS for the engine (LD_PRELOAD); the browser must not inherit it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(driver_path, env=env), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Callable[[Any], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition(driver)`` until it is truthy (returned) or the deadline passes (TimeoutError naming it)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)
    except TimeoutException as exc:
        raise TimeoutError(f"waited {timeout_s:.0f}s for {what}; page: {page_text(driver)[:1500]}") from exc


def page_text(driver: Any) -> str:
    return str(driver.execute_script("return document.body.innerText"))


def conversations(driver: Any) -> list[dict[str, Any]]:
    """The conversations the page keeps in localStorage (what a reload finds)."""
    raw = driver.execute_script(f"return localStorage.getItem({json.dumps(CONVERSATIONS)})")
    return list(json.loads(raw or "[]"))


def active_messages(driver: Any) -> list[dict[str, Any]]:
    active = driver.execute_script("return localStorage.getItem('exo-stable.active')")
    found = [c for c in conversations(driver) if c["id"] == active]
    return list(found[0]["messages"]) if found else []


def streamed_text(driver: Any) -> str:
    """The text of the last answer on the page so far (its markdown source, as streamed)."""
    return str(
        driver.execute_script(
            "const raws = document.querySelectorAll('article.assistant .raw');"
            "return raws.length ? raws[raws.length - 1].textContent : '';"
        )
    )


def generating(driver: Any) -> bool:
    return not bool(driver.execute_script("return document.getElementById('stop').hidden"))


def wait_answer(driver: Any, timeout_s: float) -> dict[str, Any]:
    """Wait until no answer is being generated and the last one's trace has its finish reason; that answer."""

    def done(d: Any) -> dict[str, Any] | None:
        if generating(d):
            return None
        last = active_messages(d)[-1]
        trace = last.get("meta", {}).get("trace") or {}
        return last if last["role"] == "assistant" and trace.get("finish_reason") else None

    return dict(wait(driver, done, timeout_s, "the answer and its trace"))


def set_settings(driver: Any, **values: object) -> None:
    """Fill the open conversation's settings form (it is saved on input)."""
    driver.execute_script(
        """
        const form = document.getElementById('settings-form');
        document.getElementById('settings').open = true;
        for (const [name, value] of Object.entries(arguments[0])) form.elements[name].value = String(value);
        form.dispatchEvent(new Event('input', {bubbles: true}));
        """,
        values,
    )


def send(driver: Any, text: str) -> None:
    box = driver.find_element("id", "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def screenshot(driver: Any, name: str, size: tuple[int, int] | None = None) -> Path:
    if size is not None:
        driver.set_window_size(*size)
        wait(driver, lambda d: d.execute_script("return window.innerWidth") <= size[0], 10, "the resize")
    # Two animation frames: the layout for the new size has been drawn.
    driver.execute_async_script("const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def console_errors(driver: Any) -> list[str]:
    """Severe console messages, except the 401s the page answers by asking for the key."""
    return [
        str(e["message"])
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "401" not in str(e["message"])
    ]
