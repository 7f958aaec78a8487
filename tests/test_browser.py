"""Promotion as a person does it: the `production` alias saved on a version's page in the MLflow UI,
in headless Chromium, reaches Triton through the webhook.

Debian's `chromium` and `chromium-driver` (`make system-packages` installs them as root), driven by
Selenium through the system driver: no browser is downloaded. Written for the MLflow UI of the
version pinned in pyproject.toml (3.17.2): the version page's "Aliases: Add" control, the alias
editor's combobox and its "Save aliases" button.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import new_version, wait_served, webhook_receiver
from tests.mlflow_fixtures import free_port

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless as root in a closed network: no sandbox (root), and none of the background connections
# Chromium would otherwise make (each refused, slowly) at start.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")
UI_TIMEOUT = 60  # seconds for the single-page app to render a control (a cold start on 2 busy cores)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for program in (CHROMIUM, CHROMEDRIVER):
        if not Path(program).exists() and not shutil.which(Path(program).name):
            pytest.fail(f"{program} not found: run `make system-packages` as root (Debian's chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _save_alias_in_the_ui(driver: object, mlflow_url: str, model: str, version: int, alias: str, shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, UI_TIMEOUT)
    driver.get(f"{mlflow_url}/#/models/{model}/versions/{version}")
    try:
        wait.until(ready.element_to_be_clickable((By.XPATH, "//*[normalize-space(text())='Add']"))).click()
        editor = "//form[@data-component-id='mlflow.edit-aliases-modal']//input[@role='combobox']"
        field = wait.until(ready.element_to_be_clickable((By.XPATH, editor)))
        field.send_keys(alias)
        field.send_keys(Keys.ENTER)
        save = "//button[@data-component-id='mlflow.edit-aliases-modal.save-button']"
        wait.until(ready.element_to_be_clickable((By.XPATH, save))).click()
        # the editor closes once the server has stored the alias
        wait.until(ready.invisibility_of_element_located((By.XPATH, editor)))
    except Exception:
        driver.save_screenshot(str(shots / "mlflow-ui.png"))  # what the page showed, for the failure report
        raise


def test_production_alias_saved_in_the_mlflow_ui_is_served_by_triton(harness, in_project: Path, params, browser: object,
                                                                       triton_server: str, mlflow_server: str,
                                                                       tmp_path: Path) -> None:
    from cwtops.serving.rollout import reconcile
    from mlflow import MlflowClient

    reconcile(params)  # start from a converged state
    newer = new_version(params)
    rollout = params.rollout.model_copy(update={"webhook_port": free_port()})  # its own receiver
    receiving = params.model_copy(update={"rollout": rollout})
    with webhook_receiver(receiving, in_project / "params.yaml", f"browser-test-{time.time()}"):
        _save_alias_in_the_ui(browser, mlflow_server, params.base.model_name, newer, "production", tmp_path)
        saved = time.monotonic()

        client = MlflowClient(tracking_uri=mlflow_server)
        assert client.get_model_version_by_alias(params.base.model_name, "production").version == str(newer)
        assert wait_served(params, newer, timeout=30, url=triton_server) <= 30
        print(f"alias saved in the UI -> Triton serving version {newer}: {time.monotonic() - saved:.1f} s")
