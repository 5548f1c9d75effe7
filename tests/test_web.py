"""The morph web page (web/) in a real headless browser against a real TorchServe + guard.

Debian's chromium and chromium-driver are installed with apt where missing (skipped, saying so,
only where apt cannot reach its archive); Selenium drives them. One TorchServe and one web
process serve both browser cases; the morphs are tiny (5 frames, 4 LoRA steps, 6 DDIM steps on
top of the `fast` preset), so the module takes about a minute beyond the server's start. The
finished page is saved as out/test-web/web-screenshot.png (the README's docs/web-screenshot.png
is a copy of it).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morph_protocol.keyfile import TokenSource
from client.morph_client import MorphClient, MorphClientError
from tests.conftest import DEMO_DIR, REPO_ROOT
from launcher.torchserve import TorchServeProcess, free_ports

pytestmark = pytest.mark.slow

OUT_DIR = REPO_ROOT / "out" / "test-web"
SCREENSHOT = OUT_DIR / "web-screenshot.png"
DEMO_NAMES = ("red_circle.png", "blue_triangle.png")
FRAMES = 5
SEED = 3
# On top of the page's default preset (fast): a morph of a few seconds on 2 CPU cores.
ADVANCED = {"lora_steps": "4", "num_inference_steps": "6"}
STAGES = ("lora", "inversion", "frames", "reschedule")
MORPH_TIMEOUT_S = 300


# ---------------------------------------------------------------------------- no torch
def test_web_process_imports_no_torch() -> None:
    """The page is a client: importing it and building its app loads neither torch nor the core."""
    code = (
        "import json, sys\n"
        "import web.__main__\n"
        "from web.app import WebSettings, create_app\n"
        "from web.limits import page_limits\n"
        "create_app(WebSettings(page_limits()))\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] in ('torch', 'diffmorpher', 'diffusers', 'transformers', 'lpips'))))\n"
    )
    env = dict(os.environ)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, check=True)
    # The options module (standard library only) and what the package imports with it, no more.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["diffmorpher", "diffmorpher.config",
                                                                 "diffmorpher.interrupt"]


def test_limits_come_from_the_service_sources(tmp_path: Path) -> None:
    """The upload size is the config.properties' the service runs with (a changed
    max_request_size changes the page's limit), presets and options are MorphConfig's. What the
    page and the service do at and one past each limit: the `*_limit` tests below."""
    from diffmorpher import config
    from web.limits import page_limits

    properties = tmp_path / "config.properties"
    properties.write_text((REPO_ROOT / "config.properties").read_text().replace(
        "max_request_size=104857600", "max_request_size=12345"))
    limits = page_limits(properties)
    assert limits.max_request_bytes == 12345
    assert limits.presets["fast"] == config.FAST_PRESET_OPTIONS and limits.default_preset == "fast"
    names = [option["name"] for option in limits.options]
    assert "lora_steps" in names and "device" not in names and "num_frames" not in names
    assert page_limits().max_request_bytes == 104857600
    assert limits.known_prompts["red_circle.png"] == json.loads((DEMO_DIR / "prompts.json").read_text())["red_circle.png"]


# ---------------------------------------------------------------------------- fixtures
def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed from Debian's archive where missing."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium/chromium-driver are missing and apt-get cannot install them here (not root)")
    update = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
    install = subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"],
                             capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("apt could not install chromium and chromium-driver (archive unreachable?):\n"
                    + (update.stderr + install.stderr)[-2000:])
    return browser, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_store: Path):
    with TorchServeProcess(tmp_path_factory.mktemp("torchserve-web") / "server", model_store) as process:
        yield process


@contextlib.contextmanager
def web_process(server: TorchServeProcess, log_name: str, *args: str):
    """`python -m web` against the server, with its config.properties and key file; its URL."""
    (port,) = free_ports(1)
    log_path = server.workdir / log_name
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "web", "--port", str(port), "--target", server.grpc_target,
         "--key-file", str(server.key_file), "--ts-config", str(server.workdir / "config.properties"), *args],
        cwd=REPO_ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "api/limits", timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the web page did not start:\n{log_path.read_text()}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def web_url(server: TorchServeProcess):
    with web_process(server, "web.out") as url:
        yield url


SMALL_UPLOAD_BYTES = 12345


@pytest.fixture(scope="module")
def small_web_url(server: TorchServeProcess):
    """A second web process whose config.properties allows SMALL_UPLOAD_BYTES per morph, so the
    limit can be met and passed by one byte cheaply."""
    properties = server.workdir / "config-small-upload.properties"
    properties.write_text((server.workdir / "config.properties").read_text().replace(
        "max_request_size=104857600", f"max_request_size={SMALL_UPLOAD_BYTES}"))
    with web_process(server, "web-small.out", "--ts-config", str(properties)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------- page helpers
def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for_state(driver, ("idle",), 30)


def wait_for_state(driver, states: tuple[str, ...], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        state = driver.find_element("tag name", "body").get_attribute("data-state")
        if state in states:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"page state {state!r} after {timeout_s:.0f}s; error box: {error_text(driver)!r}")
        time.sleep(0.2)


def error_text(driver) -> str:
    box = driver.find_element("id", "error")
    return box.text if box.is_displayed() else ""


def upload(driver, *paths: Path) -> None:
    driver.find_element("id", "file-input").send_keys("\n".join(str(path) for path in paths))


def image_names(driver) -> list[str]:
    return [item.find_element("css selector", ".name").text for item in driver.find_elements("css selector", "#images li")]


def set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def fill_fast_settings(driver) -> None:
    set_field(driver, "frames", str(FRAMES))
    set_field(driver, "seed", str(SEED))
    driver.find_element("css selector", "#advanced summary").click()
    for name, value in ADVANCED.items():
        set_field(driver, f"opt-{name}", value)


def download(driver, link_id: str) -> bytes:
    """The bytes behind a download link (a blob: URL of the page), fetched by the page itself."""
    script = (
        "const done = arguments[arguments.length - 1];"
        f"fetch(document.getElementById('{link_id}').href).then(r => r.arrayBuffer()).then(b => {{"
        "  let s = ''; const a = new Uint8Array(b);"
        "  for (let i = 0; i < a.length; i += 8192) s += String.fromCharCode(...a.subarray(i, i + 8192));"
        "  done(btoa(s)); }).catch(e => done('error:' + e));"
    )
    data = driver.execute_async_script(script)
    assert not data.startswith("error:"), data
    return base64.b64decode(data)


def save_full_page(driver, path: Path) -> None:
    """A screenshot of the whole page, not just the window's viewport."""
    width = int(driver.execute_script("return document.documentElement.clientWidth"))
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def gif_frame_count(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.format == "GIF"
        return gif.n_frames


def morph_and_wait(driver) -> str:
    driver.find_element("id", "morph").click()
    return wait_for_state(driver, ("done", "error"), MORPH_TIMEOUT_S)


# ---------------------------------------------------------------------------- limits over HTTP
QUICK = {"num_frames": 2, "lora_steps": 1, "num_inference_steps": 2, "use_reschedule": False}


def post_morph(url: str, images: list[bytes], options: dict) -> tuple[int, list[tuple[str, dict]]]:
    """POST /api/morph as the page does (multipart: `image` files, one `prompt` each, `options`):
    the HTTP status and the server-sent events, or ("refused", body) for a refusal."""
    boundary = "limit-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image{i}.png"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
             for i, data in enumerate(images)]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nimage {i}\r\n'.encode()
              for i in range(len(images))]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n'
                 f"{json.dumps(options)}\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(url + "api/morph", data=b"".join(parts), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=MORPH_TIMEOUT_S) as response:
            return response.status, parse_events(response.read().decode())
    except urllib.error.HTTPError as error:
        return error.code, [("refused", json.loads(error.read()))]


def parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if "event" in lines:
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_upload_limit_the_page_passes_the_limit_on_and_refuses_one_byte_more(small_web_url: str) -> None:
    """Images of exactly max_request_size bytes together are passed on (the service then judges
    them: junk bytes are no image); one byte more is the page's own 413, with the sizes."""
    first = b"x" * 6000
    status, events = post_morph(small_web_url, [first, b"y" * (SMALL_UPLOAD_BYTES - len(first))], QUICK)
    assert status == 200 and events[0][0] == "accepted", events
    assert events[-1][0] == "error" and events[-1][1]["code"] == "INVALID_ARGUMENT", events
    assert "is not a readable image" in events[-1][1]["message"]  # the service's words: it got them
    status, events = post_morph(small_web_url, [first, b"y" * (SMALL_UPLOAD_BYTES - len(first) + 1)], QUICK)
    assert (status, events) == (413, [("refused", {
        "code": "REFUSED",
        "message": f"the images are {SMALL_UPLOAD_BYTES + 1} bytes together; this service takes at most "
                   f"{SMALL_UPLOAD_BYTES} bytes per morph"})])


def test_image_count_limit_max_images_pass_one_more_or_one_image_is_a_400(web_url: str) -> None:
    from morph_protocol.limits import MAX_IMAGES, MIN_IMAGES

    status, events = post_morph(web_url, [b"junk"] * MAX_IMAGES, QUICK)
    assert status == 200 and [name for name, _ in events] == ["accepted", "error"], events
    assert "field 'image_0' is not a readable image" in events[-1][1]["message"]  # passed on
    for count in (MAX_IMAGES + 1, MIN_IMAGES - 1):
        status, events = post_morph(web_url, [b"junk"] * count, QUICK)
        assert (status, events) == (400, [("refused", {
            "code": "REFUSED", "message": f"a morph takes {MIN_IMAGES} to {MAX_IMAGES} images, got {count}"})])


def test_frame_limit_one_frame_over_is_refused_by_the_service_in_its_words(web_url: str) -> None:
    """The page leaves options to the service: num_frames one over the limit comes back as the
    service's INVALID_ARGUMENT, naming the bounds (the page's form caps its field at the same
    limit: test_morph_in_the_browser); at the limit the options are valid."""
    from diffmorpher.config import MorphConfig
    from morph_protocol.limits import MAX_FRAMES

    demo = [(DEMO_DIR / name).read_bytes() for name in DEMO_NAMES]
    status, events = post_morph(web_url, demo, {**QUICK, "num_frames": MAX_FRAMES + 1})
    assert status == 200 and [name for name, _ in events] == ["accepted", "error"], events
    assert events[-1][1]["code"] == "INVALID_ARGUMENT"
    assert f"num_frames must be between 2 and {MAX_FRAMES}, got {MAX_FRAMES + 1}" in events[-1][1]["message"]
    assert MorphConfig(num_frames=MAX_FRAMES).num_frames == MAX_FRAMES  # a morph of 256 frames is not cheap here


def test_pixel_limit_an_image_at_the_limit_morphs_one_column_more_is_refused(web_url: str) -> None:
    from morph_protocol.limits import MAX_IMAGE_PIXELS

    side = math.isqrt(MAX_IMAGE_PIXELS)
    assert side * side == MAX_IMAGE_PIXELS
    other = (DEMO_DIR / DEMO_NAMES[1]).read_bytes()
    status, events = post_morph(web_url, [png_of_size(side + 1, side), other], QUICK)
    assert status == 200 and [name for name, _ in events] == ["accepted", "error"], events
    assert events[-1][1]["code"] == "INVALID_ARGUMENT"
    assert (f"field 'image_0' exceeds the image size limit of {MAX_IMAGE_PIXELS} pixels ({side + 1}x{side}); "
            f"send at most {side}x{side}") in events[-1][1]["message"]
    status, events = post_morph(web_url, [png_of_size(side, side), other], QUICK)
    assert status == 200 and events[-1][0] == "result", events[-1]
    assert events[-1][1]["metadata"]["num_frames"] == 2


# ---------------------------------------------------------------------------- browser cases
def test_morph_in_the_browser(browser, web_url: str) -> None:
    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    prompts = json.loads((DEMO_DIR / "prompts.json").read_text())
    upload(driver, *(DEMO_DIR / name for name in DEMO_NAMES))
    assert [name.split(" ")[1] for name in image_names(driver)] == list(DEMO_NAMES)
    prompt_values = [p.get_attribute("value") for p in driver.find_elements("css selector", "#images input.prompt")]
    assert prompt_values == [prompts[name] for name in DEMO_NAMES]
    # Reorderable: move the first image down and back up.
    driver.find_element("css selector", "#images li:first-child .down").click()
    assert [name.split(" ")[1] for name in image_names(driver)] == list(reversed(DEMO_NAMES))
    driver.find_element("css selector", "#images li:last-child .up").click()
    assert [name.split(" ")[1] for name in image_names(driver)] == list(DEMO_NAMES)
    assert driver.find_element("id", "preset").get_attribute("value") == "fast"
    assert driver.find_element("id", "frames").get_attribute("max") == "256"
    fill_fast_settings(driver)

    started = time.monotonic()
    state = morph_and_wait(driver)
    assert state == "done", error_text(driver)
    seconds = time.monotonic() - started

    # Every stage's bar reached its end, driven by the streamed progress (a cold cache: all ran).
    for stage in STAGES:
        bar = driver.find_element("id", f"progress-{stage}")
        value, maximum = float(bar.get_attribute("value")), float(bar.get_attribute("max"))
        assert maximum >= 1 and value == maximum, (stage, value, maximum)
        label = driver.find_element("id", f"label-{stage}").text
        if stage in ("frames", "reschedule"):  # frames done (the service counts those between the images)
            assert label == f"{value:.0f} / {maximum:.0f} frames", label
        else:  # steps (of each image: the images are fitted and inverted together)
            assert re.fullmatch(r"\d+ / \d+ steps( \(2 images\))?", label), label
    # Frames appeared as they were streamed, then the result.
    assert len(driver.find_elements("css selector", "#frames-strip img")) == FRAMES
    gif = download(driver, "download-gif")
    assert gif_frame_count(gif) == FRAMES
    assert download(driver, "download-mp4")[4:8] == b"ftyp"
    with zipfile.ZipFile(io.BytesIO(download(driver, "download-zip"))) as frames_zip:
        assert len([n for n in frames_zip.namelist() if n.endswith(".png")]) == FRAMES
    assert driver.execute_script("return document.getElementById('result-gif').naturalWidth") > 0
    rows = {row.get_attribute("data-field"): row.find_element("tag name", "td").text
            for row in driver.find_elements("css selector", "#metadata tr")}
    assert rows["frames"] == str(FRAMES) and rows["seed"] == str(SEED)
    assert "LoRA miss" in rows["cache"] and "total" in rows["timings"] and len(rows["alphas"].split()) >= FRAMES
    metadata = json.loads(driver.find_element("id", "metadata-json").get_attribute("textContent"))
    assert metadata["config"]["lora_steps"] == 4 and metadata["config"]["lora_lr"] == 4e-4  # fast + advanced

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    save_full_page(driver, SCREENSHOT)
    print(f"web morph: {FRAMES} frames in {seconds:.1f} s; screenshot {SCREENSHOT}")


def test_one_image_mode_in_the_browser(browser, web_url: str) -> None:
    """One upload shows the one-image block; with a second prompt typed there the service makes
    the other end (shown under the result) and the morph ends on it: a blue circle."""
    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    assert not driver.find_element("id", "one-image").is_displayed()
    upload(driver, DEMO_DIR / "red_circle.png")
    assert driver.find_element("id", "one-image").is_displayed()
    fill_fast_settings(driver)
    driver.find_element("id", "morph").click()  # no prompt to morph to yet: the page says so
    assert wait_for_state(driver, ("idle", "error"), 10) in ("idle", "error")
    assert "one image needs 1 to 7 prompt(s) to morph to, got 0" in error_text(driver)
    set_field(driver, "more-prompts", "a blue circle on a white background")
    assert morph_and_wait(driver) == "done", error_text(driver)
    made = driver.find_elements("css selector", "#made-endpoints img")
    assert [img.get_attribute("data-name") for img in made] == ["endpoint_1.png"]
    png = base64.b64decode(made[0].get_attribute("src").split(",", 1)[1])
    frames = driver.find_elements("css selector", "#frames-strip img")
    last = base64.b64decode(frames[-1].get_attribute("src").split(",", 1)[1])
    assert len(frames) == FRAMES
    for data in (png, last):
        from tests.test_endpoints import inside_shape

        image = Image.open(io.BytesIO(data)).convert("RGB")
        inside = np.asarray(image, dtype=np.float64)[inside_shape(image)]
        red, blue = inside[:, 0].mean(), inside[:, 2].mean()
        print(f"one-image web morph: inside the circle R {red:.0f} B {blue:.0f}")
        assert blue > red + 30, (red, blue)


def test_service_error_is_shown_and_the_page_still_works(browser, web_url: str, server: TorchServeProcess,
                                                         tmp_path: Path) -> None:
    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_bytes(b"this is not an image, just text")
    upload(driver, DEMO_DIR / DEMO_NAMES[0], not_an_image)
    fill_fast_settings(driver)
    assert morph_and_wait(driver) == "error"
    # The service's own words, as a direct client call gets them.
    prompts = [p.get_attribute("value") for p in driver.find_elements("css selector", "#images input.prompt")]
    with MorphClient(server.grpc_target, tokens=TokenSource(key_file=server.key_file), retries=0) as client:
        with pytest.raises(MorphClientError) as refused:
            client.morph([(DEMO_DIR / DEMO_NAMES[0]).read_bytes(), not_an_image.read_bytes()], prompts,
                         {"num_frames": FRAMES})
    shown = driver.find_element("css selector", "#error .message").text
    assert driver.find_element("css selector", "#error .code").text == "INVALID_ARGUMENT"
    assert shown == refused.value.details and "field 'image_1' is not a readable image" in shown
    assert "Traceback" not in driver.find_element("tag name", "body").text

    # Still usable: replace the bad file and morph.
    driver.find_element("css selector", "#images li:last-child .remove").click()
    upload(driver, DEMO_DIR / DEMO_NAMES[1])
    assert morph_and_wait(driver) == "done", error_text(driver)
    assert not driver.find_element("id", "error").is_displayed()
    assert gif_frame_count(download(driver, "download-gif")) == FRAMES



def test_fitted_loras_download_and_upload_in_the_browser(browser, web_url: str, tmp_path: Path) -> None:
    """The advanced option return_loras offers one LoRA download per image (diffusers LoRA files);
    uploaded beside their images, they are sent instead of fitted: no LoRA step runs, the
    images are inverted with the sent LoRAs, and the GIF is the same bytes."""
    from selenium.webdriver.support.select import Select

    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    upload(driver, *(DEMO_DIR / name for name in DEMO_NAMES))
    fill_fast_settings(driver)
    Select(driver.find_element("id", "opt-return_loras")).select_by_value("true")
    assert morph_and_wait(driver) == "done", error_text(driver)
    gif = download(driver, "download-gif")
    links = driver.find_elements("css selector", "#download-loras a")
    assert [link.get_attribute("download") for link in links] == ["lora_0.safetensors", "lora_1.safetensors"]
    assert driver.find_element("id", "download-loras").is_displayed()
    paths = []
    for index in range(2):
        data = download(driver, f"download-lora_{index}")
        header_length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_length])
        assert header["__metadata__"]["lora_adapter_metadata"] and any(k.startswith("unet.") for k in header)
        paths.append(tmp_path / f"lora_{index}.safetensors")
        paths[-1].write_bytes(data)
    for lora_input, path in zip(driver.find_elements("css selector", "#images input.lora"), paths):
        lora_input.send_keys(str(path))
    assert [s.text for s in driver.find_elements("css selector", "#images .lora-name")] == [p.name for p in paths]
    assert morph_and_wait(driver) == "done", error_text(driver)
    metadata = json.loads(driver.find_element("id", "metadata-json").get_attribute("textContent"))
    assert metadata["work"] == {"lora_fits": 0, "lora_steps": 0, "inversions": 2}  # sent: nothing cached under them
    assert [entry["lora"] for entry in metadata["cache"]] == ["off", "off"]
    assert download(driver, "download-gif") == gif

def test_upload_over_the_service_limit_is_refused_before_reading(web_url: str) -> None:
    """An upload larger than max_request_size is answered 413 from its Content-Length alone."""
    host, port = web_url.split("//")[1].strip("/").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/api/morph")
    connection.putheader("Content-Type", "multipart/form-data; boundary=x")
    connection.putheader("Content-Length", str(200 * 1024 * 1024))
    connection.endheaders()
    connection.send(b"--x\r\n")
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 413
    assert "at most 104857600 bytes" in answer["message"]


def test_the_form_adds_a_chosen_webp_to_the_page_s_formats_and_refuses_others() -> None:
    from diffmorpher.config import OutputOptions
    from web.form import FormError, parse_options
    from web.limits import page_limits

    assert parse_options('{"seed": 1}') == {"seed": 1, "format": ["gif", "mp4", "frames-zip"]}
    assert parse_options('{"format": ["webp"], "webp_quality": 30}') == {
        "format": ["gif", "mp4", "frames-zip", "webp"], "webp_quality": 30}
    for bad in ('{"format": ["png"]}', '{"format": "webp"}', '{"format": ["gif"]}'):
        with pytest.raises(FormError) as refused:
            parse_options(bad)
        assert refused.value.status == 400 and "format must be a list of the formats the page adds (['webp'])" in refused.value.message
    assert page_limits().webp_quality == {"min": 0, "max": 100, "default": OutputOptions().webp_quality}


def webp_frames(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as webp:
        assert webp.format == "WEBP"
        frames = []
        for index in range(webp.n_frames):
            webp.seek(index)
            frames.append(np.asarray(webp.convert("RGB"), dtype=np.float64))
        return frames


def test_webp_choice_in_the_browser_downloads_a_lossy_then_a_lossless_webp(browser, web_url: str) -> None:
    """The settings' "Also as WebP" choice: its quality field takes the service's bounds and
    default, refuses 101 in the page, and a morph then offers "Download WebP" with every frame:
    lossy at the quality asked for (close to the ZIP's PNG frames), lossless (exactly them)."""
    from selenium.webdriver.support.ui import Select

    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    upload(driver, *(DEMO_DIR / name for name in DEMO_NAMES))
    fill_fast_settings(driver)
    quality = driver.find_element("id", "webp-quality")
    assert (quality.get_attribute("min"), quality.get_attribute("max"), quality.get_attribute("placeholder")) == ("0", "100", "80")
    assert not quality.is_enabled()  # no WebP chosen
    mode = Select(driver.find_element("id", "webp-mode"))
    mode.select_by_value("lossy")
    assert quality.is_enabled()
    set_field(driver, "webp-quality", "101")
    driver.find_element("id", "morph").click()
    assert "WebP quality must be a whole number from 0 to 100" in error_text(driver)
    set_field(driver, "webp-quality", "50")
    downloads = {}
    for choice in ("lossy", "lossless"):
        mode.select_by_value(choice)
        assert morph_and_wait(driver) == "done", error_text(driver)
        link = driver.find_element("id", "download-webp")
        assert link.is_displayed() and link.get_attribute("download") == "morph.webp"
        assert re.fullmatch(r"Download WebP \(\d+ (B|KiB)\)", link.text), link.text
        downloads[choice] = download(driver, "download-webp")
        metadata = json.loads(driver.find_element("id", "metadata-json").get_attribute("textContent"))
        assert metadata["formats"] == ["gif", "mp4", "frames-zip", "webp"]
        assert (metadata["webp_lossless"], metadata["webp_quality"]) == ((True, 80) if choice == "lossless" else (False, 50))
        with zipfile.ZipFile(io.BytesIO(download(driver, "download-zip"))) as frames_zip:
            pngs = [np.asarray(Image.open(io.BytesIO(frames_zip.read(name))).convert("RGB"), dtype=np.float64)
                    for name in sorted(frames_zip.namelist())]
        frames = webp_frames(downloads[choice])
        assert len(frames) == len(pngs) == FRAMES
        psnr = [10 * math.log10(255**2 / max(float(np.mean((a - b) ** 2)), 1e-12)) for a, b in zip(frames, pngs)]
        if choice == "lossless":
            assert all(np.array_equal(a, b) for a, b in zip(frames, pngs))
        else:
            assert 25.0 < min(psnr) and max(psnr) < 60.0, psnr  # close, not exact
    print(f"web WebP of {FRAMES} frames: lossy at 50 {len(downloads['lossy'])} bytes, "
          f"lossless {len(downloads['lossless'])} bytes")
    assert len(downloads["lossy"]) < len(downloads["lossless"])


def test_cancel_stops_the_morph_on_the_service(browser, web_url: str, server: TorchServeProcess) -> None:
    """Cancel in the page closes the stream; the web process then cancels its gRPC call, and the
    guard stops the morph: the next morph is served at once, not after minutes of LoRA steps."""
    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    upload(driver, *(DEMO_DIR / name for name in DEMO_NAMES))
    fill_fast_settings(driver)
    set_field(driver, "opt-lora_steps", "2000")  # minutes of fitting on a CPU
    driver.find_element("id", "morph").click()
    deadline = time.monotonic() + MORPH_TIMEOUT_S
    while float(driver.find_element("id", "progress-lora").get_attribute("value")) < 1:
        assert time.monotonic() < deadline and driver.find_element("tag name", "body").get_attribute("data-state") == "running"
        time.sleep(0.2)
    driver.find_element("id", "cancel").click()
    assert wait_for_state(driver, ("error",), 30) == "error"
    assert driver.find_element("css selector", "#error .code").text == "CANCELLED"

    set_field(driver, "opt-lora_steps", ADVANCED["lora_steps"])
    started = time.monotonic()
    assert morph_and_wait(driver) == "done", error_text(driver)
    assert time.monotonic() - started < 120
    assert "call cancelled" in (server.workdir / "web.out").read_text()


def test_deadline_is_shown_in_the_service_words(browser, server: TorchServeProcess) -> None:
    """A web process with a 3 s deadline: a long morph ends with the service's DEADLINE_EXCEEDED
    message (where the worker stopped it), not gRPC's bare "Deadline Exceeded" and not a trace:
    the client's gRPC call waits a little longer than the request's deadline
    (client.morph_client.DEADLINE_GRACE_S), so the worker's answer arrives first."""
    driver = browser
    with web_process(server, "web-deadline.out", "--deadline", "3") as url:
        open_page(driver, url)
        upload(driver, *(DEMO_DIR / name for name in DEMO_NAMES))
        fill_fast_settings(driver)
        set_field(driver, "opt-lora_steps", "2000")
        assert morph_and_wait(driver) == "error"
        assert driver.find_element("css selector", "#error .code").text == "DEADLINE_EXCEEDED"
        message = driver.find_element("css selector", "#error .message").text
        assert message.startswith("deadline exceeded: the morph was stopped"), message
        assert "during lora" in message
        assert "Traceback" not in driver.find_element("tag name", "body").text


# ---------------------------------------------------------------------------- shared LoRA (issue 26)
def test_shared_lora_switch_fits_one_lora_for_three_images(browser, web_url: str, tmp_path: Path) -> None:
    """The settings' "One LoRA for all images" switch sends shared_lora: three images morph with
    one LoRA fit (the metadata's work counts), and the option is not also in the advanced fold."""
    from PIL import ImageChops

    driver = browser
    driver.set_script_timeout(60)
    open_page(driver, web_url)
    moved = tmp_path / "red_circle_moved.png"
    with Image.open(DEMO_DIR / DEMO_NAMES[0]) as image:  # the first subject again, in another place
        ImageChops.offset(image.convert("RGB"), image.width // 6, image.height // 8).save(moved)
    upload(driver, *(DEMO_DIR / name for name in DEMO_NAMES), moved)
    assert len(image_names(driver)) == 3
    switch = driver.find_element("id", "shared-lora")
    assert switch.get_attribute("type") == "checkbox" and not switch.is_selected()
    assert not driver.find_elements("id", "opt-shared_lora")
    fill_fast_settings(driver)
    switch.click()
    assert switch.is_selected()
    assert morph_and_wait(driver) == "done", error_text(driver)
    metadata = json.loads(driver.find_element("id", "metadata-json").get_attribute("textContent"))
    assert metadata["config"]["shared_lora"] is True
    assert metadata["work"] == {"lora_fits": 1, "lora_steps": int(ADVANCED["lora_steps"]), "inversions": 3}
    assert metadata["num_frames"] == 2 * (FRAMES - 1) + 1
    assert gif_frame_count(download(driver, "download-gif")) == 2 * (FRAMES - 1) + 1
    label = driver.find_element("id", "label-lora").text
    assert label == f"{ADVANCED['lora_steps']} / {ADVANCED['lora_steps']} steps", label  # one fit, not "(3 images)"
