"""The ``kluster`` connection form as users see it: a real api-server, driven by headless Chromium.

Admin → Connections → Add Connection: the type is listed, picking it shows the relabelled standard fields and the
extras with the placeholders and defaults of :mod:`airflow_provider_kluster.connection`; a connection to the
emulator is saved through the form, and the list's "Test Connection" button reports success.

Uses the system browser only (Debian: ``apt-get install chromium chromium-driver``), through selenium with both
paths given explicitly, so selenium-manager never downloads a browser or driver. Without either, or without
selenium, every test here skips and says why. Screenshots go to ``browser-screenshots/`` (git-ignored).

The api-server is the real-scheduler tests' :class:`~tests.scheduler.harness.AirflowCluster` with one component
(SQLite metadata DB in a throwaway ``AIRFLOW_HOME``, on a free loopback port, stopped by PID).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from airflow_provider_kluster.connection import (
    CONN_TYPE,
    HOOK_NAME,
    conn_fields,
    ui_field_behaviour,
)
from airflow_provider_kluster.emulator.server import EmulatorServer
from tests.scheduler.harness import AirflowCluster

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

#: The key the emulator accepts; typed into the form's (masked) password field, never printed.
API_KEY = "kl-browser-SECRET-4d81b2e6"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "browser-screenshots"
#: Seconds an element of the single-page UI may take to appear (two busy cores: the first load is slow).
WAIT = 60
FORM_CONN_ID = "kluster_browser"
PORT_CONN_ID = "kluster_browser_port"


def _system_binary(fixed: str, *names: str) -> str | None:
    """``fixed`` if it is executable, else the first of ``names`` on ``PATH``."""
    if os.access(fixed, os.X_OK):
        return fixed
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _system_binary("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMEDRIVER = _system_binary("/usr/bin/chromedriver", "chromedriver")


def _redact(text: object) -> str:
    """Anything this module prints or raises goes through here: the API key never shows."""
    return str(text).replace(API_KEY, "***")


@pytest.fixture(scope="module")
def selenium_api() -> Any:
    """The selenium package, or a skip saying what is missing."""
    from airflow import __version__ as airflow_version

    if tuple(int(p) for p in airflow_version.split(".")[:2]) < (3, 3):
        # 3.1's form shows no extra fields for kluster (it does not read the provider's conn-fields), and
        # 3.2's UI differs; the form is checked on the newest Airflow, where CI runs `make test`.
        pytest.skip(f"the browser test drives Airflow 3.3's UI; this is Airflow {airflow_version}")
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (it is in the [test] extra)"
    )
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None]
        pytest.skip(
            f"no system {' or '.join(missing)} (Debian: apt-get install chromium chromium-driver; .ci/run does)"
        )
    return webdriver


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[EmulatorServer]:
    server = EmulatorServer(api_key=API_KEY).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_server(selenium_api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowCluster]:
    """A real api-server (everyone is admin: the simple auth manager's all-admins mode), test button enabled."""
    root = tmp_path_factory.mktemp("browser")
    (root / "dags").mkdir()
    cluster = AirflowCluster(
        home=root / "airflow",
        dags_folder=root / "dags",
        components=("api-server",),
        env={"AIRFLOW__CORE__TEST_CONNECTION": "Enabled"},
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def browser(selenium_api: Any) -> Iterator[Any]:
    """Headless system Chromium through the system chromedriver (no selenium-manager lookups)."""
    from selenium.webdriver.chrome.service import Service

    options = selenium_api.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="kluster-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = selenium_api.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class Page:
    """Explicit waits and a few lookups on the React UI (selectors read from Airflow's UI bundle)."""

    def __init__(self, driver: Any) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, WAIT)

    def visible(self, xpath: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait.until(ec.visibility_of_element_located((By.XPATH, xpath)))

    def click(self, xpath: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        element = self.wait.until(ec.element_to_be_clickable((By.XPATH, xpath)))
        element.click()
        return element

    def gone(self, xpath: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        self.wait.until(ec.invisibility_of_element_located((By.XPATH, xpath)))

    def field(self, name: str) -> Any:
        """The dialog's input ``name`` (visible), with its label's text in ``.label_text``."""
        element = self.visible(f"//*[@role='dialog']//*[@name='{name}']")
        # The field's own root holds its label and help text (a label's ``for`` does not always match the id).
        root = element.find_element("xpath", "ancestor::*[@data-scope='field' and @data-part='root'][1]")
        element.label_text = " ".join(root.find_element("tag name", "label").text.replace("*", "").split())
        helpers = root.find_elements("css selector", "[data-part=helper-text]")
        element.helper_text = helpers[0].text.strip() if helpers else ""
        return element

    def retype(self, element: Any, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(text)

    def toast_ids(self) -> set[str]:
        return {
            t.get_attribute("id")
            for t in self.driver.find_elements("css selector", "[data-scope=toast][data-part=root]")
        }

    def new_toast(self, before: set[str]) -> tuple[str, str]:
        """Wait for a toast not in ``before``; return its (title, description)."""

        def appeared(driver: Any) -> Any:
            for toast in driver.find_elements("css selector", "[data-scope=toast][data-part=root]"):
                if toast.get_attribute("id") not in before and toast.is_displayed():
                    return toast
            return None

        toast = self.wait.until(appeared)
        title = toast.find_element("css selector", "[data-part=title]").text.strip()
        description = toast.find_element("css selector", "[data-part=description]").text.strip()
        return title, description

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(exist_ok=True)
        self.driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def _row(conn_id: str) -> str:
    return f"//tr[td[@data-testid='table-cell-connection_id'][normalize-space()='{conn_id}']]"


def _test_button_sends_portless_ok(cluster: AirflowCluster) -> bool:
    """Whether this Airflow's "Test" works on a connection without a port (saved from this form).

    The UI sends ``port: Number(null)``, i.e. ``0``, with the masked password; Airflow 3.3.2's endpoint takes
    ``0`` for a new destination and answers 400 (apache/airflow#73298, fixed upstream by normalising ``0``).
    Asked of the api-server's own Airflow, so the test expects success again as soon as a fixed one is installed.
    """
    probe = (
        "try:\n"
        "    from airflow.api_fastapi.core_api.routes.public.connections import _same_endpoint\n"
        "except ImportError:\n"
        "    print(True)\n"
        "else:\n"
        "    print(_same_endpoint(0, None))\n"
    )
    result = subprocess.run(
        [cluster.python, "-c", probe],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1] == "True"


def test_connection_form_save_and_test(api_server, emulator_server, browser):
    page = Page(browser)
    (SCREENSHOTS / "failure.png").unlink(missing_ok=True)  # of an earlier run
    fields = conn_fields()
    behaviour = ui_field_behaviour()
    try:
        # Admin → Connections, as a user clicks through the navigation.
        browser.get(api_server.base_url + "/")
        page.click("//button[.//*[normalize-space(text())='Admin']]")
        page.click("//a[@role='menuitem'][normalize-space()='Connections']")
        page.wait.until(lambda d: urlsplit(d.current_url).path.rstrip("/").endswith("/connections"))
        page.click("//button[normalize-space()='Add Connection']")
        page.visible("//*[@role='dialog']//h2[normalize-space()='Add Connection']")

        # The type list offers kluster (under its hook name).
        combo = page.visible("//*[@role='dialog']//input[@role='combobox']")
        combo.click()
        page.visible("//*[@role='option']")
        listed = [o.text.strip() for o in browser.find_elements("xpath", "//*[@role='option']")]
        assert HOOK_NAME in listed, f"connection types offered: {listed}"
        combo.send_keys("kluster")
        page.click(f"//*[@role='option'][normalize-space()='{HOOK_NAME}']")

        # Standard fields: relabelled, with placeholders; the hidden ones are absent.
        host = page.field("host")
        password = page.field("password")
        assert host.label_text == behaviour["relabeling"]["host"] == "Base URL"
        assert host.get_attribute("placeholder") == behaviour["placeholders"]["host"]
        assert password.label_text == behaviour["relabeling"]["password"] == "API key"
        assert password.get_attribute("placeholder") == behaviour["placeholders"]["password"]
        assert password.get_attribute("type") == "password"
        for hidden in behaviour["hidden_fields"]:
            shown = [e for e in browser.find_elements("name", hidden) if e.is_displayed()]
            assert not shown, f"field {hidden!r} should be hidden for {CONN_TYPE}"

        # Point it at the emulator (before the extras: opening their section folds this one).
        page.visible("//*[@role='dialog']//input[@name='connection_id']").send_keys(FORM_CONN_ID)
        host.send_keys(emulator_server.base_url)
        password.send_keys(API_KEY)  # a password input: masked on the page and in the screenshot
        page.shot("01-add-connection-standard-fields")

        # Extras: labels, defaults and help texts of connection.py.
        page.click("//*[@role='dialog']//button[@data-part='item-trigger'][normalize-space()='Extra Fields']")
        extras = {}
        for name, spec in fields.items():
            element = page.field(f"element_{name}")
            extras[name] = element
            assert element.label_text == spec["label"]
            assert element.get_attribute("value") == str(spec["schema"]["default"]), name
            assert element.helper_text == spec["description"]

        # A shorter timeout and fewer retries than the defaults, then save.
        page.retype(extras["timeout"], "10")
        page.retype(extras["max_retries"], "2")
        page.shot("02-add-connection-extra-fields")
        page.click("//*[@role='dialog']//footer//button[normalize-space()='Save']")
        page.gone("//*[@role='dialog']")

        # The list shows it, and the api-server stored what was typed.
        row = _row(FORM_CONN_ID)
        assert page.visible(f"{row}/td[@data-testid='table-cell-conn_type']").text.strip() == CONN_TYPE
        assert (
            page.visible(f"{row}/td[@data-testid='table-cell-host']").text.strip() == emulator_server.base_url
        )
        stored = api_server.api.request("GET", f"/connections/{FORM_CONN_ID}")
        assert stored["conn_type"] == CONN_TYPE
        assert stored["host"] == emulator_server.base_url
        assert stored["password"] == "***"  # masked by the API; set (the test below needs it)
        assert json.loads(stored["extra"]) == {
            "timeout": 10,
            "max_retries": 2,
            "max_connections": fields["max_connections"]["schema"]["default"],
            "platform_url": fields["platform_url"]["schema"]["default"],
        }
        page.shot("03-connections-list")

        # "Test Connection" on the saved connection.
        before = page.toast_ids()
        page.click(f"{row}//button[@aria-label='Test Connection']")
        title, message = page.new_toast(before)
        page.shot("04-test-form-connection")
        expected_ok = rf"Connected to {re.escape(emulator_server.base_url)}: [1-9]\d* models available\."
        if _test_button_sends_portless_ok(api_server):
            assert title == "Test Connection Successful", _redact((title, message))
            assert re.fullmatch(expected_ok, message), _redact(message)
        else:
            # Airflow's own bug (apache/airflow#73298): every connection without a port gets 400 here.
            assert (title, message) == ("Test Connection Failed", "Bad Request"), _redact((title, message))

        # The same emulator as a bare host + port + schema (a connection with a port, which that bug spares),
        # created through the REST API as a CLI user would; its Test button must succeed on every Airflow.
        root = urlsplit(emulator_server.base_url)
        api_server.api.request(
            "POST",
            "/connections",
            ok=(201,),
            json={
                "connection_id": PORT_CONN_ID,
                "conn_type": CONN_TYPE,
                "host": root.hostname,
                "port": root.port,
                "schema": root.path.strip("/"),
                "password": API_KEY,
            },
        )
        browser.refresh()
        before = page.toast_ids()
        page.click(f"{_row(PORT_CONN_ID)}//button[@aria-label='Test Connection']")
        title, message = page.new_toast(before)
        page.shot("05-test-connection-success")
        assert title == "Test Connection Successful", _redact((title, message))
        assert re.fullmatch(expected_ok, message), _redact(message)
    except Exception as exc:
        page.shot("failure")
        # Re-raised redacted, traceback included: the form's value attributes hold the typed key.
        details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(_redact(f"{details}\nscreenshot: {SCREENSHOTS / 'failure.png'}")) from None
