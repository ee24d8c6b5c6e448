"""The web page at ``/`` in a real headless browser (Debian's chromium through its chromedriver, driven by Selenium).

The page is checked against independent Python paths: its decoded masks against pycocotools' decode of the same
JSON, its canvas (read back with ``getImageData``) pixel for pixel against ``visualize.blend_segments`` of those
masks, its label points against ``visualize.pole``, its RLE decoder against pycocotools' run lengths. Then hover,
the checkboxes, the raw-JSON link and an error answer.

Without chromium the tests are skipped, except where ``CI`` is set (``.ci/install-deploy-tools`` installs it).
``M2F_WEB_SCREENSHOT=docs/web.png`` also saves a screenshot of the page (as in docs/web.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from m2f import synth, visualize

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHAPE = (240, 320)  # (H, W) of the test image: shown at 2x (640 px wide)


def need_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def driver():
    need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path given too, Selenium Manager never runs
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,860"):
        options.add_argument(arg)
    options.add_argument("--force-device-scale-factor=1")
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_script_timeout(30)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def server(start_server):
    return start_server()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("web") / "shapes.png"
    Image.fromarray(synth.make_sample(seed=2024, index=3, size=SHAPE).image).save(path)
    return path


def wait_for(driver, script: str, timeout: float = 30):
    """Poll ``return <script>`` in the page until it is truthy; its value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := driver.execute_script(f"return {script}"):
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{script} still falsy after {timeout}s; page error: {error_text(driver)!r}")


def error_text(driver) -> str:
    return driver.execute_script("const e = document.getElementById('error'); return e.hidden ? '' : e.textContent")


def upload(driver, path: Path, task: str = "panoptic") -> dict:
    """Choose ``task`` and the file in the page; the JSON the page got once it has drawn it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    runs = driver.execute_script("return window.__m2f.runs")
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait_for(driver, f"window.__m2f.runs > {runs} && window.__m2f.status !== 'busy'")
    return driver.execute_script("return window.__m2f.response")


def canvas_pixels(driver) -> np.ndarray:
    """(H, W, 3) uint8 of the page's canvas, via getImageData."""
    b64, w, h = driver.execute_script(
        """const c = document.getElementById('view');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = ''; for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
        return [btoa(s), c.width, c.height];"""
    )
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)[..., :3]


def js_masks(driver, n: int) -> np.ndarray:
    """(n, H, W) bool: the masks the page decoded."""
    packed = np.frombuffer(base64.b64decode(driver.execute_script("return window.__m2f.masks()")), np.uint8)
    return np.unpackbits(packed)[: n * SHAPE[0] * SHAPE[1]].reshape(n, *SHAPE).astype(bool)


@pytest.fixture(scope="module")
def page(driver, server, image_path):
    """The page with the test image segmented (panoptic): (driver, JSON, pycocotools masks, image array)."""
    driver.get(server.base + "/")
    wait_for(driver, "window.__m2f && !document.getElementById('model').textContent.includes('connecting')")
    body = upload(driver, image_path)
    assert driver.execute_script("return window.__m2f.status") == "done", error_text(driver)
    masks = [mask_util.decode(s["segmentation"]).astype(bool) for s in body["segments"]]
    return driver, body, masks, np.asarray(Image.open(image_path).convert("RGB"))


# ---------------------------------------------------------------------------------------------- tests
def test_page_is_served_self_contained(server):
    r = server.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text
    for asset, ctype in (("web/app.js", "javascript"), ("web/overlay.js", "javascript"), ("web/app.css", "text/css")):
        a = server.client.get(f"/{asset}")
        assert a.status_code == 200 and ctype in a.headers["content-type"], asset
        assert "http://" not in a.text and "https://" not in a.text, f"{asset} loads something from elsewhere"
    assert "/" not in server.client.get("/openapi.json").json()["paths"]


def check_drawing(driver, body: dict, masks: list[np.ndarray], rgb: np.ndarray) -> np.ndarray:
    """The page's masks, colours and drawing order are pycocotools' and visualize's; its canvas, read back, is
    ``visualize.blend_segments`` of them, exactly. Returns the canvas."""
    n = len(masks)
    segs = driver.execute_script("return window.__m2f.segments")
    assert len(segs) == n
    decoded = js_masks(driver, n)
    for k, seg in enumerate(segs):
        np.testing.assert_array_equal(decoded[k], masks[k], err_msg=f"segment {k}")
        assert seg["area"] == body["segments"][k]["area"] == masks[k].sum()
        assert seg["colour"] == visualize.palette(n)[k].tolist()
    order = driver.execute_script("return window.__m2f.drawingOrder()")
    assert order == visualize.drawing_order(body["segments"])
    canvas = canvas_pixels(driver)
    np.testing.assert_array_equal(
        canvas, visualize.blend_segments(rgb, [masks[i] for i in order], visualize.palette(n)[order])
    )
    return canvas


def check_labels(driver, body: dict, masks: list[np.ndarray], same_pole: bool = True) -> None:
    """Each label's point lies inside its segment, no two at the same point, boxes inside the image; with
    ``same_pole``, each segment's unobstructed label point is ``visualize.pole``'s."""
    segs = driver.execute_script("return window.__m2f.segments")
    points = set()
    for k, (seg, mask) in enumerate(zip(segs, masks)):
        if not mask.any():
            assert seg["labelPoint"] is None
            continue
        if same_pole:
            assert tuple(seg["pole"]) == visualize.pole(mask), f"segment {k}: the page and visualize.pole differ"
        x, y = seg["labelPoint"]
        assert mask[y, x], f"segment {k}: label point {x, y} outside the mask"
        points.add((x, y))
        left, top, right, bottom = seg["labelBox"]
        assert 0 <= left < right <= SHAPE[1] and 0 <= top < bottom <= SHAPE[0]
    assert len(points) == sum(m.any() for m in masks), "every label at its own point"
    texts = driver.execute_script(
        "return [...document.querySelectorAll('#labels .label')].map(e => [Number(e.dataset.index), e.textContent])"
    )
    assert sorted(texts) == [[k, visualize.label_text(s)] for k, s in enumerate(body["segments"]) if masks[k].any()]


def test_page_draws_the_masks_the_api_returns(page):
    driver, body, masks, rgb = page
    assert len(masks) >= 3, "the demo model finds several segments in this image"
    canvas = check_drawing(driver, body, masks, rgb)
    n = len(masks)
    # and spelled out at sampled pixels: inside segment k (off its outline), half its colour over the image
    rng = np.random.default_rng(0)
    for k, mask in enumerate(masks):
        inner = mask.copy()  # off the outline: every 4-neighbour in the image is in the mask too
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        ys, xs = np.nonzero(inner)
        for j in rng.choice(len(ys), size=min(20, len(ys)), replace=False):
            y, x = ys[j], xs[j]
            want = (rgb[y, x].astype(int) + visualize.palette(n)[k]) // 2
            assert canvas[y, x].tolist() == want.tolist(), (k, x, y)
    outside = ~np.any(masks, axis=0)
    np.testing.assert_array_equal(canvas[outside], rgb[outside])


def test_labels_sit_inside_their_segments(page):
    driver, body, masks, _ = page
    check_labels(driver, body, masks)


def test_hover_shows_the_segment_under_the_pointer(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver, body, masks, _ = page
    canvas = driver.find_element(By.ID, "view")
    width, height = canvas.size["width"], canvas.size["height"]
    assert width == 2 * SHAPE[1], "small images are shown at a whole multiple of their size"

    def hover(x: int, y: int) -> None:
        dx = round((x + 0.5) * width / SHAPE[1] - width / 2)  # offsets from the element's centre
        dy = round((y + 0.5) * height / SHAPE[0] - height / 2)
        ActionChains(driver).move_to_element_with_offset(canvas, dx, dy).perform()

    for k, mask in enumerate(masks):
        hover(*visualize.pole(mask))
        tip = driver.find_element(By.ID, "tooltip")
        assert tip.is_displayed()
        assert int(tip.get_attribute("data-index")) == k
        seg = body["segments"][k]
        assert seg["label"] in tip.text and f"{seg['area']} px" in tip.text and f"{seg['score']:.3f}" in tip.text
        rows = driver.find_elements(By.CSS_SELECTOR, "#legend tbody tr.hover")
        assert [int(r.get_attribute("data-index")) for r in rows] == [k]
    if path := os.environ.get("M2F_WEB_SCREENSHOT"):
        hover(SHAPE[1] // 12, SHAPE[0] * 7 // 8)  # near the bottom-left corner, clear of the labels
        save_screenshot(driver, Path(path))


def test_checkboxes_toggle_segments(page):
    from selenium.webdriver.common.by import By

    driver, body, masks, rgb = page
    k = int(np.argmax([m.sum() for m in masks]))
    box = driver.find_element(By.CSS_SELECTOR, f"#legend input[data-index='{k}']")
    label = driver.find_element(By.CSS_SELECTOR, f"#labels .label[data-index='{k}']")
    before = canvas_pixels(driver)
    box.click()
    assert not driver.execute_script("return window.__m2f.segments")[k]["visible"]
    hidden = canvas_pixels(driver)
    np.testing.assert_array_equal(hidden[masks[k]], rgb[masks[k]])  # panoptic: nothing else drawn there
    np.testing.assert_array_equal(hidden[~masks[k]], before[~masks[k]])
    assert not label.is_displayed()
    box.click()
    np.testing.assert_array_equal(canvas_pixels(driver), before)
    assert label.is_displayed()
    driver.find_element(By.ID, "all").click()
    np.testing.assert_array_equal(canvas_pixels(driver), rgb)
    driver.find_element(By.ID, "all").click()
    np.testing.assert_array_equal(canvas_pixels(driver), before)


def test_raw_json_link_and_timings(page):
    from selenium.webdriver.common.by import By

    driver, body, _, _ = page
    link = driver.find_element(By.ID, "json")
    assert link.is_displayed() and link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == "shapes.json"
    text = driver.execute_async_script(
        "const done = arguments[0]; fetch(document.getElementById('json').href).then(r => r.text()).then(done)"
    )
    assert json.loads(text) == body
    shown = {
        e.get_attribute("data-key"): e.text for e in driver.find_elements(By.CSS_SELECTOR, "#timings dd[data-key]")
    }
    assert set(shown) == set(body["timings"])
    assert shown["inference_s"] == f"{body['timings']['inference_s'] * 1000:.1f} ms"


def test_overlapping_instances_drawn_best_on_top(page, image_path):
    """Instance masks overlap (one query's mask under several classes): drawn by score, labels kept apart."""
    driver, _, _, rgb = page
    body = upload(driver, image_path, task="instance")
    assert driver.execute_script("return window.__m2f.status") == "done", error_text(driver)
    masks = [mask_util.decode(s["segmentation"]).astype(bool) for s in body["segments"]]
    assert np.sum(masks, axis=0).max() > 1, "the test wants overlapping masks"
    check_drawing(driver, body, masks, rgb)
    check_labels(driver, body, masks, same_pole=False)  # compared on the panoptic masks and the shapes below


def test_pole_in_the_page_matches_python(driver, page):
    """The page's placement rule on shapes where ties and the coarse grid matter (same point as visualize)."""
    for mask in placement_shapes():
        h, w = mask.shape
        bits = "".join("1" if v else "0" for v in mask.ravel())
        got = driver.execute_script("return window.__m2f.pole(arguments[0], arguments[1], arguments[2])", bits, w, h)
        assert tuple(got) == visualize.pole(mask), mask.shape


def placement_shapes() -> list[np.ndarray]:
    from test_visualize import disk, ring, u_shape

    rng = np.random.default_rng(1)
    blobs = [rng.random((30, 41)) < 0.7 for _ in range(3)]
    big = np.zeros((300, 620), bool)  # over POLE_GRID: the coarse grid
    big[20:280, 10:600] = True
    big[100:200, 200:400] = False
    stripes = np.zeros((40, 300), bool)  # no full block on the coarse grid: full resolution
    stripes[::2] = True
    tiny = np.zeros((5, 7), bool)
    tiny[4, 6] = True
    return [disk(40, 50, 15), ring(60, 60, 25, 12), u_shape(50, 70), tiny, big, stripes, *blobs]


def test_rle_decoder_matches_pycocotools(driver, page):
    """The page's decoder of pycocotools' counts strings gives pycocotools' run lengths."""
    rng = np.random.default_rng(2)
    cases = []
    for p in (0.02, 0.5, 0.98):
        mask = rng.random((37, 53)) < p
        cases.append((mask_util.encode(np.asfortranarray(mask)), run_lengths(mask)))
    cases.append((mask_util.encode(np.asfortranarray(np.ones((300, 200), np.uint8))), [0, 60_000]))
    counts = [2_000_000_000, 7, 123_456, 499_876_537]  # past 2^31 (7 characters), deltas of both signs
    cases.append((mask_util.frPyObjects({"size": [50_000, 50_000], "counts": counts}, 50_000, 50_000), counts))
    for rle, want in cases:
        got = driver.execute_script("return window.__m2f.decodeCounts(arguments[0])", rle["counts"].decode())
        assert got == want


def run_lengths(mask: np.ndarray) -> list[int]:
    """Column-major runs of 0s and 1s, starting with 0s (COCO's uncompressed RLE counts)."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [len(flat)]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def test_errors_are_shown(driver, page, server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    upload(driver, bad)
    assert driver.execute_script("return window.__m2f.status") == "error"
    want = server.client.post("/v1/segment", content=bad.read_bytes(), headers={"Content-Type": "image/png"})
    err = want.json()["error"]
    assert error_text(driver) == f"{want.status_code} {err['reason']}: {err['message']}"


def test_a_dropped_file_is_sent(driver, page, server):
    """Drag and drop: a file dropped on the page is sent like a chosen one (a BMP the server refuses as too large)."""
    runs = driver.execute_script("return window.__m2f.runs")
    driver.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "big.bmp", { type: "image/bmp" }));
        document.getElementById("stage").dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));""",
        base64.b64encode(bmp_header(100_000, 100_000)).decode(),
    )
    wait_for(driver, f"window.__m2f.runs > {runs} && window.__m2f.status !== 'busy'")
    assert error_text(driver).startswith("413 too_large: "), error_text(driver)


def bmp_header(width: int, height: int) -> bytes:
    """A BMP whose header declares ``width`` x ``height`` pixels but that holds none (refused from the header)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


# ---------------------------------------------------------------------------------------------- screenshot
def save_screenshot(driver, path: Path) -> None:
    """The page as a small PNG (256 colours)."""
    png = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    png.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def test_the_model_menu_lists_the_models_and_sends_to_the_one_chosen(driver, start_server, image_path, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from service.settings import demo_onnx

    pytest.importorskip("onnxruntime")
    second = tmp_path / "second.onnx"
    second.write_bytes(demo_onnx().read_bytes())
    server = start_server("--model", f"first={demo_onnx()}", "--model", f"second={second}")
    driver.get(server.base + "/")
    wait_for(driver, "document.getElementById('modelname').options.length === 2")
    menu = Select(driver.find_element(By.ID, "modelname"))
    assert [o.text for o in menu.options] == ["first", "second"] and menu.first_selected_option.text == "first"
    menu.select_by_visible_text("second")
    wait_for(driver, "document.getElementById('model').textContent.includes('second v1')")
    upload(driver, image_path)
    assert driver.execute_script("return window.__m2f.status") == "done", error_text(driver)
    assert "POST /v1/models/second/segment 200" in server.log()
