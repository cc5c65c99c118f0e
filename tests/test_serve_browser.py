"""`vilex serve` in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by selenium.

The page runs as a user starts it (``python -m vilex serve`` on the shipped toy assets, on a free loopback port, in
its own process); the browser then does what a visitor does: uploads a toy image, moves the token slider, composes
with a prompt, asks the VLMs a question, and uploads a file that is not an image. Each step checks what the page shows
and saves a screenshot in the test's tmp folder (keep them with ``pytest --basetemp DIR``). With
``VILEX_SERVE_SCREENSHOT=PATH`` the first screenshot is also written to PATH, small enough for the docs (that is how
assets/docs/serve.png was made; README.md, "See it work").

Skipped, saying what is missing, on a machine without Chromium, its driver or selenium (no browser can be downloaded
here: ``apt-get install chromium chromium-driver``, see README.md, "See it work"). Timings (server start, the slider's
reconstruction as the browser sees it) are printed; performance is measured by scripts/bench/serve_latency.py.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium
except ImportError:  # pragma: no cover - requirements.txt pins it
    selenium = None

_MISSING = [what for what, there in (("chromium", CHROMIUM), ("chromedriver (Debian: chromium-driver)", CHROMEDRIVER),
                                     ("selenium (pip install -r requirements.txt)", selenium)) if not there]
pytestmark = [
    pytest.mark.slow,  # ~1 minute: a server start plus some twenty samplings on 2 CPU cores
    pytest.mark.skipif(bool(_MISSING), reason="no browser to drive: missing " + ", ".join(_MISSING) + "; install with "
                       "`apt-get install chromium chromium-driver` (README.md, 'See it work')"),
]

GALLERY = 6  # scenes in the page's gallery; the uploaded scene is the one after them, so it is not in the gallery
SERVER_START_S = 240  # loading the toy models on 2 busy cores
STEP_S = 120  # one step of the visit (a queued reconstruction ladder is the longest)
# Chromium on a closed network: no background requests (they are refused, and slow the start), a fresh profile
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1500")
DOCS_WIDTH = 960  # the docs screenshot is scaled to this width and reduced to a palette (< 150 kB)


@dataclass
class Server:
    url: str
    log: Path
    started_s: float


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``vilex serve`` on the toy assets, on a free loopback port (its log in the tmp folder)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "DISABLE_TQDM": "1"}
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vilex", "serve", "--port", str(port), "--gallery",
                                 str(GALLERY)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vilex serve exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - started > SERVER_START_S:
                pytest.fail(f"vilex serve did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield Server(url, log, time.perf_counter() - started)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


# ----------------------------------------------------------------------------- reading the page
def _wait(driver, condition, what: str, timeout: float = STEP_S):
    """``condition(driver)`` once it is truthy; a failure names ``what`` was awaited."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
            condition)
    except TimeoutException:
        raise AssertionError(f"waited {timeout:.0f} s for {what}") from None


def _markdown(driver, elem_id: str) -> str:
    """The text of a gr.Markdown (not its progress overlay, which reads 'queue: 1/1 | 0.4s' while it waits)."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} [data-testid='markdown']").text.strip()


def _images(driver, elem_id: str) -> list[str]:
    """The ``src`` of every image inside an element that the browser has loaded and drawn (a gr.Image shows one, a
    gr.Gallery one per item)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => i.src)", f"#{elem_id} img")


LADDER = (1, 4, 16)  # the toy ViLex makes 16 tokens: the page shows 1, 4 and 16


def _ladder_done(driver) -> bool:
    return all(_images(driver, f"ladder-{k}") and _markdown(driver, f"ladder-psnr-{k}").endswith(" dB")
               for k in LADDER)


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def _open_tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()


def _type(driver, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea")
    box.clear()
    box.send_keys(text)


def _docs_screenshot(png: Path, out: Path) -> None:
    """``png`` scaled to ``DOCS_WIDTH`` and reduced to a 256-colour palette (a page is mostly flat colours)."""
    from PIL import Image

    with Image.open(png) as shot:
        shot = shot.convert("RGB")
        small = shot.resize((DOCS_WIDTH, round(shot.height * DOCS_WIDTH / shot.width)), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


# ----------------------------------------------------------------------------- the visit
def test_a_visitor_reconstructs_composes_and_asks(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from serve.gallery import toy_test_scenes

    d = browser
    d.get(server.url)
    # on load the page picks the first toy scene and reconstructs it: m tokens, its caption, then 1, 4, 16 tokens
    _wait(d, _ladder_done, "the first scene's reconstructions")
    assert "dB" in _markdown(d, "psnr-m") and "dB" in _markdown(d, "psnr-caption")
    d.save_screenshot(str(tmp_path / "1_first_scene.png"))
    if os.environ.get("VILEX_SERVE_SCREENSHOT"):
        _docs_screenshot(tmp_path / "1_first_scene.png", Path(os.environ["VILEX_SERVE_SCREENSHOT"]))
    first_psnr = _markdown(d, "psnr-m")

    # upload a held-out toy scene that is not in the gallery
    scene = tmp_path / "toy_scene.png"
    toy_test_scenes(GALLERY + 1, 32)[GALLERY].image.save(scene)
    _upload(d, scene)
    _wait(d, lambda d: "toy_scene.png" in _markdown(d, "image-message"), "the upload's message")
    _wait(d, lambda d: _ladder_done(d) and _markdown(d, "psnr-m") != first_psnr
          and _markdown(d, "psnr-caption").startswith("No caption"), "the upload's reconstructions")
    psnr_before, image_before = _markdown(d, "psnr-m"), _images(d, "recon-m")
    assert psnr_before.startswith("16 tokens · PSNR") and len(image_before) == 1
    d.save_screenshot(str(tmp_path / "2_uploaded.png"))

    # move the token slider to its left end: the reconstruction from 1 token replaces the one from 16
    slider = d.find_element(By.CSS_SELECTOR, "#tokens input[type=range]")
    moved = time.perf_counter()
    ActionChains(d).move_to_element_with_offset(slider, -slider.size["width"] // 2 + 1, 0).click().perform()
    _wait(d, lambda d: _markdown(d, "psnr-m").startswith("1 token ·"), "the 1-token reconstruction")
    _wait(d, lambda d: _images(d, "recon-m") and _images(d, "recon-m") != image_before, "the 1-token image")
    slider_s = time.perf_counter() - moved
    assert slider.get_attribute("value") == "1"
    assert _markdown(d, "psnr-m") != psnr_before and _markdown(d, "psnr-m").endswith(" dB")
    assert _markdown(d, "reconstruct-message") == ""
    d.save_screenshot(str(tmp_path / "3_one_token.png"))

    # compose the uploaded scene with a prompt: two samples next to the prompt alone
    _open_tab(d, "Compose")
    _type(d, "prompt", "on a red background")
    _wait(d, lambda d: "up to 16 ViLex tokens fit" in _markdown(d, "budget"), "the prompt's token budget")
    d.find_element(By.ID, "compose").click()
    _wait(d, lambda d: len(_images(d, "composed")) == 2 and len(_images(d, "prompt-only")) == 1,
          "the composed images and the prompt alone")
    assert _markdown(d, "compose-message") == ""
    d.save_screenshot(str(tmp_path / "4_compose.png"))

    # ask every VLM the same question: one answer each, side by side
    _open_tab(d, "Ask")
    _type(d, "question", "how many objects are there?")
    d.find_element(By.ID, "ask").click()

    def answers(d) -> list[str] | None:
        texts = []
        for i in range(3):  # the three toy VLMs: SigLIP, ViLex and ViLex + tokens towers
            replies = d.find_elements(By.CSS_SELECTOR, f"#chat-{i} [data-testid='bot']")
            if not replies or not replies[-1].text.strip():
                return None
            texts.append(replies[-1].text.strip())
        return texts

    assert len(_wait(d, answers, "an answer from each of the three toy VLMs")) == 3
    d.save_screenshot(str(tmp_path / "5_ask.png"))
    print(f"\nserver up in {server.started_s:.1f} s; slider -> 1-token reconstruction shown in {slider_s:.2f} s; "
          f"screenshots in {tmp_path}")


def test_a_bad_upload_is_a_message_on_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server.url)
    _wait(d, lambda d: _markdown(d, "image-message").startswith("Held-out toy scene"), "the page")
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels")
    _upload(d, notes)
    _wait(d, lambda d: "is not an image" in _markdown(d, "image-message"), "the bad upload's message")
    assert "notes.txt" in _markdown(d, "image-message")
    assert "Traceback" not in d.find_element(By.TAG_NAME, "body").text
    assert d.find_elements(By.CSS_SELECTOR, ".toast-body") == []  # gradio's pop-up for an exception in a handler
    d.save_screenshot(str(tmp_path / "bad_upload.png"))
