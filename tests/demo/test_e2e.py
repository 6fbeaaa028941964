"""End to end: the demo under waitress, driven by headless Chromium.

Needs the Debian packages ``chromium`` and ``chromium-driver``.  Skipped
without them, except in CI (``CI=true``), where a missing browser fails.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import sessioncache_demo as demo

from .conftest import demo_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IN_CI = os.environ.get("CI") == "true"
#: Seconds any single wait may take (a wait ends as soon as its condition holds; Chromium on a loaded machine is slow).
TIMEOUT = 60


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the end-to-end test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def webdriver_module():
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    _need(webdriver is not None, "selenium is not installed (pip install -e '.[testing]')")
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    _need(not missing, f"{', '.join(missing)} missing: apt-get install chromium chromium-driver")
    return webdriver


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """The demo served by waitress on 127.0.0.1, on a port of the system's choosing."""
    import waitress

    app = demo.main({}, **demo_settings(tmp_path_factory.mktemp("e2e") / "demo.sqlite"))
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=2)
    thread = threading.Thread(target=server.run, name="demo-waitress", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(TIMEOUT)
        demo.engine_of(app.registry).dispose()


@pytest.fixture
def browser(webdriver_module, tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver_module.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver_module.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(TIMEOUT)
    driver.set_script_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def test_rename_in_the_browser_shows_in_the_list(browser, server_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT)
    # Fill the cache with the list page first, so that only invalidation
    # can make the new name appear.
    browser.get(f"{server_url}/people?page=2")
    old_name = browser.find_element(By.CSS_SELECTOR, "#person-30 a.name").text
    browser.get(f"{server_url}/people?page=2")
    assert browser.find_element(By.ID, "sql-count").text == "0"

    browser.get(f"{server_url}/people/30/edit")
    field = wait.until(expected_conditions.presence_of_element_located((By.ID, "name")))
    assert field.get_attribute("value") == old_name
    field.clear()
    field.send_keys("Grace Brewster Hopper")
    browser.find_element(By.ID, "save").click()

    wait.until(expected_conditions.url_contains("/people?page=2#person-30"))
    row = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#person-30 a.name")))
    assert row.text == "Grace Brewster Hopper"
    assert old_name not in browser.find_element(By.CSS_SELECTOR, "table.people").text


def test_bad_name_in_the_browser_shows_the_error(browser, server_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT)
    browser.get(f"{server_url}/people/31/edit")
    field = wait.until(expected_conditions.presence_of_element_located((By.ID, "name")))
    old_name = field.get_attribute("value")
    field.clear()
    field.send_keys("   ")  # passes the browser's "required" check, not the server's
    browser.find_element(By.ID, "save").click()
    error = wait.until(expected_conditions.presence_of_element_located((By.ID, "name-error")))
    assert error.text == "Please enter a name."
    browser.get(f"{server_url}/people/31")
    assert browser.find_element(By.ID, "person-name").text == old_name
