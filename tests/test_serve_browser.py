"""The page end to end in headless Chromium (Selenium driving Debian's chromium and
chromium-driver): a chat message comes back as streamed text, and a digit drawn on the canvas
gets a class. Skips only where no browser or driver is installed."""
import shutil
import tempfile

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_serve import LiveServer, runs  # noqa: E402, F401  (runs is a fixture)
from test_sft import GREETING_REPLY  # noqa: E402

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(runs):  # noqa: F811
    if not (BROWSER and DRIVER):
        pytest.skip("no chromium + chromedriver here (Debian: apt-get install chromium chromium-driver)")
    server = LiveServer([runs["chat"], runs["classifier"]])
    profile = tempfile.mkdtemp(prefix="danlu-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model-a option"))
        yield driver
    finally:
        driver.quit()
        server.close()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_reply_streams_into_the_page(browser):
    # record every text the reply shows on its way: streamed text shows several
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('.msg.assistant');
            if (replies.length) window.seen.push(replies[replies.length - 1].textContent);
        }).observe(document.getElementById('columns'), {subtree: true, childList: true, characterData: true});""")
    browser.execute_script("document.getElementById('temperature').value = 0;")
    browser.find_element(By.ID, "prompt").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant")
               and d.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text == GREETING_REPLY)
    wait.until(lambda d: d.find_element(By.ID, "send").is_enabled())  # the turn is over: ready for the next
    partial = {t for t in browser.execute_script("return window.seen;") if t and t != GREETING_REPLY}
    assert partial, "the reply appeared all at once, not streamed"
    stats = browser.find_element(By.CSS_SELECTOR, ".stats").text
    assert "first token" in stats and "tok/s" in stats and "MB" in stats, stats


def test_drawing_a_digit_shows_a_class(browser):
    browser.find_element(By.ID, "tab-draw").click()
    canvas = browser.find_element(By.ID, "canvas")
    # a "7": a bar across the top, then down to the lower left (offsets from the centre)
    (ActionChains(browser).move_to_element_with_offset(canvas, -70, -90).click_and_hold()
     .move_by_offset(140, 0).move_by_offset(-40, 80).move_by_offset(-40, 100).release().perform())
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "prediction").text.isdigit())
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 10 and len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar.top")) == 1
    assert "sure" in browser.find_element(By.ID, "confidence").text
    browser.find_element(By.ID, "erase").click()
    assert browser.find_element(By.ID, "prediction").text == "?"
