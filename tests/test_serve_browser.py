"""The page end to end in headless Chromium (Selenium driving Debian's chromium and
chromium-driver): a chat message comes back as streamed text, choosing a model to compare with
keeps the conversation, a digit drawn on the canvas gets a class, a model id or class name that
is an HTML tag shows as text and runs nothing, and the page fits a desktop and a phone (no
sideways scroll, the main parts on screen; screenshots go to $DANLU_SCREENSHOTS if set). Skips
only where no browser or driver is installed."""
import os
import shutil
import tempfile

import pytest
import torch

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from checkpoint import load_checkpoint, weights_path  # noqa: E402
from classify import class_names  # noqa: E402
from test_serve import LiveServer, runs  # noqa: E402, F401  (runs is a fixture)
from test_sft import GREETING_REPLY  # noqa: E402

# a model (a folder) and a class (an image folder) named as HTML that runs a script if parsed
EVIL_MODEL = '<img src=x onerror="window.pwned=1">'
EVIL_CLASS = '<img src=x onerror="window.pwned=2">'

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def evil_classifier(classifier: str, root) -> str:
    """A copy of the classifier run in a folder named EVIL_MODEL, its class 0 named EVIL_CLASS."""
    ckpt = load_checkpoint(weights_path(classifier))
    ckpt["tokenizer"]["class_names"] = [EVIL_CLASS] + class_names(ckpt["tokenizer"])[1:]
    folder = os.path.join(root, EVIL_MODEL)
    os.makedirs(folder)
    torch.save(ckpt, os.path.join(folder, "ckpt.pt"))
    return folder


@pytest.fixture(scope="module")
def browser(runs, tmp_path_factory):  # noqa: F811
    if not (BROWSER and DRIVER):
        pytest.skip("no chromium + chromedriver here (Debian: apt-get install chromium chromium-driver)")
    evil = evil_classifier(runs["classifier"], tmp_path_factory.mktemp("evil"))
    server = LiveServer([runs["chat"], runs["classifier"], evil])
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


def test_choosing_a_model_to_compare_keeps_the_conversation(browser):
    texts = lambda column: [m.text for m in column.find_elements(By.CSS_SELECTOR, ".msg")]  # noqa: E731
    before = texts(browser.find_element(By.CSS_SELECTOR, ".column"))
    assert before == ["hello", GREETING_REPLY]  # what the chat test left
    Select(browser.find_element(By.ID, "model-b")).select_by_value("sft_char_tiny")
    first, second = browser.find_elements(By.CSS_SELECTOR, ".column")
    assert texts(first) == before  # kept as it was
    assert texts(second)[:2] == before and "from here on" in texts(second)[2]  # joins with the conversation
    Select(browser.find_element(By.ID, "model-b")).select_by_value("")
    assert texts(browser.find_element(By.CSS_SELECTOR, ".column")) == before


def draw_a_seven(browser) -> None:
    """A bar across the top, then down to the lower left (offsets from the canvas' centre)."""
    canvas = browser.find_element(By.ID, "canvas")
    (ActionChains(browser).move_to_element_with_offset(canvas, -70, -90).click_and_hold()
     .move_by_offset(140, 0).move_by_offset(-40, 80).move_by_offset(-40, 100).release().perform())


def test_drawing_a_digit_shows_a_class(browser):
    browser.find_element(By.ID, "tab-draw").click()
    draw_a_seven(browser)
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "prediction").text.isdigit())
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 10 and len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar.top")) == 1
    assert "sure" in browser.find_element(By.ID, "confidence").text
    browser.find_element(By.ID, "erase").click()
    assert browser.find_element(By.ID, "prediction").text == "?"


def test_a_model_or_class_named_as_html_shows_as_text_and_runs_nothing(browser):
    browser.find_element(By.ID, "tab-draw").click()
    models = Select(browser.find_element(By.ID, "model-cls"))
    assert EVIL_MODEL in [o.text.split(" (")[0] for o in models.options]
    models.select_by_value(EVIL_MODEL)
    browser.find_element(By.ID, "erase").click()
    draw_a_seven(browser)
    # read in one script: the page redraws the bars at each answer while the stroke grows, and an
    # element found before a redraw is gone when asked for its text (seen beside other tests)
    names = "return Array.from(document.querySelectorAll('#bars .bar span'), s => s.textContent)"
    WebDriverWait(browser, 20).until(lambda d: len(d.execute_script(names)) == 10)
    assert browser.execute_script(names) == [EVIL_CLASS] + [str(k) for k in range(1, 10)]
    assert browser.find_elements(By.CSS_SELECTOR, "main img, select img") == []
    assert browser.execute_script("return window.pwned") is None


def layout_problems(browser, selectors: list[str], wide: list[str]) -> list[str]:
    """What is wrong with the page at this size: a sideways scroll, one of selectors not wholly
    on screen (or of no size), one of wide narrower than 240 px or 60% of the screen."""
    return browser.execute_script("""
        const [selectors, wide] = arguments, problems = [], width = innerWidth, height = innerHeight;
        if (document.documentElement.scrollWidth > width)
            problems.push(`scrolls sideways: ${document.documentElement.scrollWidth} > ${width}`);
        for (const selector of selectors.concat(wide)) {
            const el = document.querySelector(selector), r = el && el.getBoundingClientRect();
            if (!r) { problems.push(`${selector}: missing`); continue; }
            const off = r.width < 1 || r.height < 1 || r.left < 0 || r.top < 0 || r.right > width + 0.5
                || r.bottom > height + 0.5;
            if (off || (wide.includes(selector) && r.width < Math.min(240, 0.6 * width)))
                problems.push(`${selector}: ${[r.left, r.top, r.right, r.bottom].map(Math.round)}`);
        }
        return problems;""", selectors, wide)


# per tab: what must be on screen, and what must not be squeezed to a sliver
VIEWS = {"tab-chat": (["header h1", "#tab-draw", "#server-line", "#temperature", ".column h2", "#prompt",
                       "#send", "#clear"], ["#model-a", ".column .messages"]),
         "tab-draw": (["header h1", "#tab-chat", "#erase", "#model-cls"], ["#canvas"])}


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)])
def test_the_page_fits_a_desktop_and_a_phone(browser, width, height, tmp_path):
    folder = os.environ.get("DANLU_SCREENSHOTS") or str(tmp_path)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 700})
    try:
        for tab, (selectors, wide) in VIEWS.items():
            browser.find_element(By.ID, tab).click()
            browser.save_screenshot(os.path.join(folder, f"serve_{tab[4:]}_{width}x{height}.png"))
            assert layout_problems(browser, selectors, wide) == [], (tab, width)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_characters_the_model_cannot_read_are_named_on_the_page(browser):
    """The server names the characters a char vocabulary lacks; the page shows that, as text."""
    browser.find_element(By.ID, "tab-chat").click()
    browser.find_element(By.ID, "prompt").send_keys("hello ☃")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: any("☃" in n.text for n in d.find_elements(By.CSS_SELECTOR, ".msg.note")))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "send").is_enabled())
