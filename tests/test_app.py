"""The demo app: its display helpers (fast), and the page itself in a real browser.

The browser test starts ``streamlit run app.py`` on a free loopback port as a fresh
checkout has it (the shipped zoo, no model named), drives Debian's headless Chromium
through Selenium (never a browser or driver downloaded at run time) the way a reviewer
would: upload a CT, check that the page chose the zoo model best for CT, read the panels
and the metrics, download the upscaled DICOM, upload a corrupt file, then a good one.
``SR_APP_SCREENSHOT=docs/app.png`` also saves the result page there (the README's).
"""

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests import ROOT
from sr_tf import display, zoo

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


# ----------------------------------------------------------------------------- helpers


def test_window_maps_hu_through_the_presets():
    lo, hi = -1024.0, 3071.0
    hu = np.array([-1350.0, -600.0, 150.0, 40.0, 0.0, 80.0])
    stored = (hu - lo) / (hi - lo)
    np.testing.assert_allclose(display.window(stored, lo, hi, *display.WINDOW_PRESETS["lung"])[:3], [0, 0.5, 1],
                               atol=1e-5)
    np.testing.assert_allclose(display.window(stored, lo, hi, *display.WINDOW_PRESETS["brain"])[3:], [0.5, 0, 1],
                               atol=1e-5)
    assert set(display.WINDOW_PRESETS) == {"lung", "soft tissue", "bone", "brain"}
    assert display.WINDOW_PRESETS["bone"] == (2000, 300)
    with pytest.raises(ValueError, match="width"):
        display.window(stored, lo, hi, 0, 40)


def test_zoom_box_is_the_same_region_in_every_panel():
    assert display.zoom_box(100, 80) == (0, 100, 0, 80)
    assert display.zoom_box(100, 80, zoom=2) == (25, 75, 20, 60)
    assert display.zoom_box(100, 80, zoom=4, centre_x=0.0, centre_y=1.0) == (75, 100, 0, 20)  # kept inside
    with pytest.raises(ValueError):
        display.zoom_box(10, 10, zoom=0.5)
    lr = np.random.default_rng(0).random((30, 40), np.float32)
    hr = np.kron(lr, np.ones((2, 2), np.float32))  # every LR pixel as 2x2 HR pixels
    box = display.zoom_box(30, 40, zoom=3, centre_x=0.7, centre_y=0.2)
    np.testing.assert_array_equal(display.crop(hr, box, 2), np.kron(display.crop(lr, box), np.ones((2, 2))))


def test_resize_keeps_pixels_when_enlarging_and_averages_when_shrinking():
    image = np.array([[0.0, 1.0], [0.25, 0.5]], np.float32)
    assert display.display_size(image.shape, 8) == (8, 8)
    assert display.display_size((50, 100), 768) == (384, 768)
    big = display.resize(image, (8, 8))
    np.testing.assert_array_equal(big[:4, :4], 0.0)
    np.testing.assert_array_equal(big[4:, 4:], 0.5)
    np.testing.assert_allclose(display.resize(big, (1, 1)), [[0.4375]])
    assert display.to_uint8(np.array([-1.0, 0.5, 2.0])).tolist() == [0, 128, 255]


def test_difference_map_colours_the_absolute_difference():
    a = np.zeros((4, 4), np.float32)
    b = a.copy()
    b[0, 0] = 0.2
    rgb, full_scale = display.difference_map(a, b, full_scale=0.1)
    assert rgb.shape == (4, 4, 3) and full_scale == 0.1
    np.testing.assert_allclose(rgb[1, 1], 0.0, atol=0.02)  # no difference: black
    assert rgb[0, 0].sum() > 2.0  # saturated: the bright end of inferno
    rgb, full_scale = display.difference_map(a, a, size=(8, 8))
    assert rgb.shape == (8, 8, 3) and full_scale == 1e-6


def test_consistency_against_the_downsampled_output():
    from sr_tf.data import degrade

    y, x = np.mgrid[0:64, 0:64] / 64.0
    hr = (0.5 + 0.4 * np.sin(6 * x) * np.cos(4 * y)).astype(np.float32)
    lr = np.asarray(degrade.downsample(hr[..., None], 2))[..., 0]
    exact = display.consistency(lr, hr, 2)  # hr is a perfectly consistent output
    assert exact["psnr"] > 60 and exact["ssim"] > 0.999
    bicubic = display.bicubic(lr, 2)
    assert bicubic.shape == (64, 64)
    baseline = display.consistency(lr, bicubic, 2)
    assert 25 < baseline["psnr"] < exact["psnr"] and baseline["ssim"] < exact["ssim"]
    tiny = display.consistency(lr[:8, :8], hr[:16, :16], 2)
    assert np.isnan(tiny["ssim"]) and tiny["psnr"] > 0
    same_size = display.consistency(lr, lr, 1)  # a restoration model (scale 1) against its input
    assert same_size["psnr"] == np.inf and same_size["ssim"] > 0.999
    # A blur_downsample model is checked with that preset's kernel (area), as evaluate.py does.
    lr_area = np.asarray(degrade.downsample(hr[..., None], 2, degrade.consistency_kernel("blur_downsample")))[..., 0]
    assert display.consistency(lr_area, hr, 2, "blur_downsample")["psnr"] > 60


def test_find_models_lists_what_load_predictor_accepts(tmp_path):
    def touch(*parts):
        path = tmp_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return str(path)

    touch("saved_models", "README.md")
    export = touch("saved_models", "swift_x4", "saved_model", "saved_model.pb")
    tflite = touch("saved_models", "swift_x4", "swift_x4_float16.tflite")
    loose = touch("saved_models", "tiny.keras")
    run = touch("runs", "srgan_x4", "generator.keras")
    touch("runs", "unfinished", "config.json")
    found = display.find_models(str(tmp_path / "saved_models"), str(tmp_path / "runs"), str(tmp_path / "missing"))
    assert found == [os.path.dirname(os.path.dirname(export)), tflite, loose, os.path.dirname(run)]


# ----------------------------------------------------------------------------- the page in a browser


def _require_chromium():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                    "apt-get install chromium chromium-driver")
    pytest.importorskip("selenium")
    pytest.importorskip("streamlit")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def app_server(tmp_path):
    """URL of ``streamlit run app.py`` on the shipped zoo, with no model named."""
    _require_chromium()  # before paying for a server that no browser would visit
    if zoo.best_for("CT") is None:
        pytest.fail("no zoo model is shipped in saved_models/ (python zoo.py --build=all)")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "SR_APP_MODEL"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2")
    log = open(tmp_path / "streamlit.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", os.path.join(ROOT, "app.py"), f"--server.port={port}",
         "--server.address=127.0.0.1", "--server.headless=true", "--browser.gatherUsageStats=false",
         "--server.fileWatcherType=none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"streamlit did not start:\n{(tmp_path / 'streamlit.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    """Debian's headless Chromium with downloads going to ``tmp_path/downloads``."""
    _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1600,1500", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
        "safebrowsing.enabled": False,
    })
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.downloads = downloads
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what, timeout=60):
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        text = driver.find_element("tag name", "body").text
        pytest.fail(f"timed out waiting for {what}; the page shows:\n{text[-2000:]}")


def _texts(driver, selector):
    return [element.text for element in driver.find_elements("css selector", selector)]


def _upload(driver, path):
    driver.find_element("css selector", '[data-testid="stFileUploader"] input[type="file"]').send_keys(str(path))


def _idle(driver):
    """The script run has finished (Streamlit shows a running icon while it runs)."""
    return not driver.find_elements("css selector", '[data-testid^="stStatusWidgetRunning"]')


def _result_for(name, model):
    """A condition: the run is over and the page shows the panels and metrics of file
    ``name`` upscaled by zoo model ``model``."""
    scale = zoo.RECIPES[model].scale

    def shown(driver):
        captions = _texts(driver, '[data-testid="stImageCaption"]')
        panels = [c for c in captions if c.startswith(("LR input", f"Bicubic x{scale}", f"Model {model} x{scale}"))]
        return (_idle(driver) and len(panels) == 3
                and any(name in text for text in _texts(driver, '[data-testid="stCaptionContainer"]'))
                and "PSNR, model" in _texts(driver, '[data-testid="stMetricLabel"]')
                and driver.find_elements("css selector", '[data-testid="stDownloadButton"] button'))
    return shown


def test_the_page_upscales_downloads_and_survives_a_bad_upload(app_server, browser, tmp_path, testdata):
    import pydicom
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    started = time.monotonic()
    browser.get(app_server)
    _wait(browser, lambda d: d.find_elements("css selector", '[data-testid="stFileUploader"] input[type="file"]'),
          "the file uploader")

    # A CT upload: the zoo model best for CT, three panels of the same region, the
    # metrics and the inference time.
    _upload(browser, testdata("CT_small.dcm"))
    model = zoo.best_for("CT")
    scale = zoo.RECIPES[model].scale
    side = 128 * scale
    _wait(browser, _result_for("CT_small.dcm", model), "the result of CT_small.dcm", timeout=90)
    captions = _texts(browser, '[data-testid="stImageCaption"]')
    assert any(c.startswith("LR input, 128 x 128") for c in captions), captions
    assert any(c.startswith(f"Bicubic x{scale}, {side} x {side}") for c in captions), captions
    assert any(c.startswith(f"Model {model} x{scale}, {side} x {side}") for c in captions), captions
    assert any(c.endswith("with data-consistency projection") for c in captions), captions  # on by default
    assert any(c.startswith("|bicubic - model|") for c in captions), captions
    images = browser.find_elements("css selector", '[data-testid="stImage"] img')
    sizes = [browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", i) for i in images]
    assert len(sizes) == 4 and sizes[0] == sizes[1] == sizes[2] and min(sizes[0]) > 0, sizes  # one display size
    labels = _texts(browser, '[data-testid="stMetricLabel"]')
    for label in ("PSNR, model", "PSNR, bicubic", "SSIM, model", "SSIM, bicubic", "Inference time"):
        assert label in labels, labels
    values = _texts(browser, '[data-testid="stMetricValue"]')
    assert any(v.endswith(" dB") for v in values) and any(v.endswith(" s") for v in values), values
    assert "CT window (HU)" in browser.find_element("tag name", "body").text

    # The download is a DICOM of twice the size, marked as derived.
    browser.find_element("css selector", '[data-testid="stDownloadButton"] button').click()

    def downloaded(_):
        files = [f for f in glob.glob(str(browser.downloads / "*")) if not f.endswith(".crdownload")]
        return files[0] if files else None

    path = _wait(browser, downloaded, "the downloaded DICOM", timeout=30)
    assert os.path.basename(path) == f"CT_small_x{scale}.dcm"
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (side, side)
    assert "DERIVED" in ds.ImageType and "data-consistency projection" in ds.DerivationDescription

    # Zoom x2 (two steps of the slider, from the keyboard): one region in all three panels.
    zoom = browser.find_element("css selector", '[data-testid="stSlider"] input[type="range"][aria-label="Zoom"]')
    browser.execute_script("arguments[0].focus()", zoom)  # the range input itself is visually hidden
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT).perform()
    _wait(browser, lambda d: _idle(d) and [c for c in _texts(d, '[data-testid="stImageCaption"]')
                                           if "64 x 64 px region" in c], "the zoomed panels")
    # The screenshot once the rerun's images are all decoded and the previous run's gone.
    _wait(browser, lambda d: _idle(d) and len(d.find_elements("css selector", '[data-testid="stImage"] img')) == 4
          and d.execute_script("return Array.from(document.querySelectorAll('[data-testid=\"stImage\"] img'))"
                               ".every(i => i.complete && i.naturalWidth > 0)"), "the zoomed images to load")
    time.sleep(1.0)
    shot = tmp_path / "app.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("SR_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.path.join(ROOT, os.environ["SR_APP_SCREENSHOT"]))

    # A corrupt upload is named and explained; the page keeps working.
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    _upload(browser, corrupt)
    alert = _wait(browser, lambda d: _idle(d) and [t for t in _texts(d, '[data-testid="stAlert"]')
                                                   if "corrupt.dcm" in t], "the error about corrupt.dcm")
    assert alert[0].startswith("Cannot read corrupt.dcm: "), alert
    # No stale result: Streamlit drops the previous run's images once the rerun is over,
    # which can come a moment after the alert; a result left on the page times out here.
    _wait(browser, lambda d: not d.find_elements("css selector", '[data-testid="stImage"]'),
          "the previous result to be cleared", timeout=15)

    # A good file (an 8-bit PNG radiograph) works again.
    xray = tmp_path / "chest.png"
    y, x = np.mgrid[0:96, 0:80]
    Image.fromarray((127 + 100 * np.sin(x / 7.0) * np.cos(y / 9.0)).astype(np.uint8)).save(xray)
    _upload(browser, xray)
    _wait(browser, _result_for("chest.png", zoo.best_for("DX")), "the result of chest.png")
    captions = _texts(browser, '[data-testid="stImageCaption"]')
    assert any(c.startswith("LR input, 80 x 96") for c in captions), captions
    assert not [t for t in _texts(browser, '[data-testid="stAlert"]') if "corrupt.dcm" in t]
    assert time.monotonic() - started < 120

    # The uncertainty map: a layer over the output, with the fraction of pixels above the threshold.
    box = next(b for b in browser.find_elements("css selector", '[data-testid="stCheckbox"]')
               if b.text.startswith("Uncertainty map"))
    box.find_element("tag name", "label").click()
    caption = _wait(browser, lambda d: _idle(d) and [c for c in _texts(d, '[data-testid="stImageCaption"]')
                                                     if c.startswith("Uncertainty over the output")],
                    "the uncertainty map", timeout=90)
    assert "% of the pixels above" in caption[0], caption


# ----------------------------------------------------------------------------- the page in-process


def test_the_shown_slice_and_the_volume_download_share_one_adaptation(monkeypatch):
    """Adapting is done once per image, model and settings: the whole volume's download
    is upscaled by the same adapted copy as the slice on screen (a second adaptation
    could stop at another step under its seconds limit, and costs its time again)."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from sr_tf import adaptation

    calls = []
    real = adaptation.adapt

    def counted(model, slices, **keywords):
        calls.append(np.shape(slices))
        return real(model, slices, **keywords)

    monkeypatch.setattr(adaptation, "adapt", counted)
    monkeypatch.setenv("SR_APP_MODEL", "residual_cnn_x2")  # the quickest zoo model to adapt and run
    page = AppTest.from_file(os.path.join(ROOT, "app.py"), default_timeout=300)
    page.run()
    page.radio[0].set_value("Sample image").run()
    [sample] = [box for box in page.selectbox if box.label == "Sample image"]
    sample.set_value("eCT_Supplemental.dcm").run()
    [steps] = [box for box in page.number_input if box.label.startswith("Adapt to this image")]
    steps.set_value(2).run()
    assert not page.exception and not page.error, [e.value for e in page.error]
    assert len(calls) == 1 and calls[0][0] == 2  # both frames of the volume, once
    assert any("adapted to this input: 2 self-supervised steps" in c.value for c in page.caption)
    [whole] = [box for box in page.checkbox if box.label.startswith("Download all 2 slices")]
    whole.check().run()
    assert not page.exception and not page.error, [e.value for e in page.error]
    assert len(calls) == 1  # the download's volume reused the adapted copy
    [projection] = [box for box in page.checkbox if box.label == "Data-consistency projection"]
    projection.uncheck().run()  # what runs around the model changes, the adapted model does not
    assert not page.exception and not page.error, [e.value for e in page.error]
    assert len(calls) == 1
    steps.set_value(3).run()  # other settings: adapted again
    assert len(calls) == 2
