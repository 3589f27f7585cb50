"""The chat page at ``/`` in headless Chromium: type a message, watch the reply stream in, save a
screenshot (``$LOOPLM_TEST_ARTIFACTS`` or the test's temporary directory)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (pip install selenium)")

from looplm.serve.api import create_app  # noqa: E402
from looplm.serve.engine import Engine  # noqa: E402
from tests.serve.util import serve, tiny_model, tokenizer  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--window-size=1000,700")


@pytest.mark.skipif(not (CHROMIUM and DRIVER),
                    reason="Chromium is absent: apt-get install -y chromium chromium-driver")
def test_chat_page_streams_a_reply(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tok = tokenizer(eos=False)  # the reply runs to max_tokens: many streamed pieces
    app = create_app(Engine(tiny_model("gated_deltanet"), tok), model_id="tiny-gdn")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    # Chromium's profile and its temporary directories (singleton socket) in one directory removed
    # afterwards, short enough for a socket's path (at most 107 bytes; tmp_path can be longer)
    with serve(app) as url, tempfile.TemporaryDirectory(prefix="looplm-chromium-") as scratch:
        options.add_argument(f"--user-data-dir={scratch}/profile")
        service = webdriver.ChromeService(executable_path=DRIVER, env={**os.environ, "TMPDIR": scratch})
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-gdn")
            driver.find_element(By.ID, "max-tokens").clear()
            driver.find_element(By.ID, "max-tokens").send_keys("48")
            box = driver.find_element(By.ID, "input")
            box.send_keys("hello there")
            driver.find_element(By.ID, "send").click()
            reply = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
            user = driver.find_element(By.CSS_SELECTOR, ".msg.user")
            assert user.text == "hello there"
            assert int(reply.get_attribute("data-chunks")) > 1  # it arrived in several pieces
            assert reply.text.strip()
            out = Path(os.environ.get("LOOPLM_TEST_ARTIFACTS", tmp_path))
            out.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(out / "chat_page.png"))
            assert (out / "chat_page.png").stat().st_size > 1000
        finally:
            driver.quit()
