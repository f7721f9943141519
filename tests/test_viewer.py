"""The report's lesion viewer in a real browser: headless Chromium opens report.html from disk.

The report comes from the demo-style `explain` of a small real crop (the `case` fixture of
test_explain: patient07, 48^3 voxels, tiny FLAIR-driven model, both methods). Playwright for
Python drives the system Chromium (/usr/bin/chromium, installed by .ci/run from Debian's
packages; `playwright install` is never run). Checked: no console error, NiiVue holds the
volumes, clicking the third lesion row moves the crosshair to that lesion's centroid (read
from NiiVue's state) and loads its map, a screenshot shows overlay colours there, and the page
makes no request outside file:// (it opens offline, with no server).
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_explain import case, needs_data  # noqa: F401  (module-scoped fixture, reused)

CHROMIUM = os.environ.get("INSTANCE_SALIENCY_CHROMIUM") or shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
#: the flags the project runs Chromium with; SwiftShader gives WebGL2 without a GPU
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]

pytestmark = [
    needs_data,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (.ci/run installs Debian's "
                       "chromium with `apt-get install -y chromium`)"),
]


def _settle(page):
    """Wait until the browser has drawn two more frames (NiiVue redraws on the next frame)."""
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    page.wait_for_timeout(200)


def _overlay_coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the saliency colour maps: saturated red (positive) or blue (negative)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    sat = rgb.max(-1).astype(int) - rgb.min(-1).astype(int)
    return (sat > 40) & (((r > g + 30) & (r > b)) | ((b > r + 30) & (b > g)))


@pytest.fixture(scope="module")
def browser_page(case):  # noqa: F811
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    report = Path(case["run"]) / "report.html"
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        log = {"console": [], "requests": []}
        page.on("console", lambda m: log["console"].append((m.type, m.text)))
        page.on("pageerror", lambda e: log["console"].append(("error", str(e))))
        ctx.on("request", lambda r: log["requests"].append(r.url))
        page.goto(report.resolve().as_uri(), timeout=180_000)
        page.set_default_timeout(120_000)
        page.wait_for_function("window.isvViewer && (isvViewer.ready || isvViewer.error)",
                               timeout=120_000)
        yield page, log, case
        ctx.close()


def test_viewer_loads_offline_without_errors(browser_page):
    page, log, case = browser_page
    state = page.evaluate("({ready: isvViewer.ready, error: isvViewer.error, "
                          "loaded: isvViewer.loaded, n: isvViewer.nv.volumes.length, "
                          "dims: isvViewer.nv.volumes.map(v => Array.from(v.hdr.dims))})")
    assert state["error"] is None and state["ready"]
    table = pd.read_csv(case["run"] / "instances.csv")
    first = int(table["label"].iloc[0])
    assert state["loaded"] == ["FLAIR.nii.gz", f"lesion_{first}_smoothgrad_FLAIR.nii.gz",
                               "lesion_outlines.nii.gz"]
    assert state["n"] == 3 and all(d[1] > 1 and d[2] > 1 and d[3] > 1 for d in state["dims"])
    errors = [t for kind, t in log["console"] if kind == "error"]
    assert errors == []
    assert log["requests"], "the page itself should be seen as a request"
    outside = [u for u in log["requests"] if not u.startswith("file://")]
    assert outside == []


def test_click_third_row_moves_crosshair_to_centroid_with_overlay(browser_page, tmp_path):
    page, log, case = browser_page
    table = pd.read_csv(case["run"] / "instances_full.csv").set_index("label")  # full precision
    row = page.locator("#isv-table tbody tr").nth(2)
    label = int(row.get_attribute("data-label"))
    row.click()
    page.wait_for_function(f"isvViewer.selected === '{label}' && isvViewer.loaded.length === 3 "
                           f"&& isvViewer.loaded[1].startsWith('lesion_{label}_')",
                           timeout=60_000)
    _settle(page)
    mm = np.array(page.evaluate("isvViewer.crosshairMM()"))
    want = table.loc[label, ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(float)
    np.testing.assert_allclose(mm, want, atol=1e-3)
    assert page.evaluate("isvViewer.loaded[1]") == f"lesion_{label}_smoothgrad_FLAIR.nii.gz"
    status = page.locator("#isv-status").inner_text()
    assert f"lesion {label} ({table.loc[label, 'status']}" in status
    xy = page.evaluate("isvViewer.crosshairCanvas()")
    assert xy is not None
    canvas = page.locator("#isv-canvas")
    from PIL import Image

    with_overlay = tmp_path / "with.png"
    canvas.screenshot(path=str(with_overlay))
    page.evaluate("isvViewer.nv.setOpacity(1, 0); isvViewer.nv.updateGLVolume()")
    _settle(page)
    without = tmp_path / "without.png"
    canvas.screenshot(path=str(without))
    page.evaluate("isvViewer.nv.setOpacity(1, 0.85); isvViewer.nv.updateGLVolume()")
    a = np.asarray(Image.open(with_overlay).convert("RGB"))
    b = np.asarray(Image.open(without).convert("RGB"))
    x, y = (int(round(v)) for v in xy)
    r = 12
    win = (slice(max(y - r, 0), y + r + 1), slice(max(x - r, 0), x + r + 1))
    coloured = _overlay_coloured(a[win]) & (np.abs(a[win].astype(int) - b[win]).max(-1) > 30)
    assert coloured.sum() >= 5, f"no overlay colour around the crosshair at {xy}"
    assert _overlay_coloured(a).sum() > _overlay_coloured(b).sum()


def test_switch_method_and_channel_and_sort(browser_page):
    page, log, case = browser_page
    page.select_option("#isv-method", "gradcampp")
    page.wait_for_function("isvViewer.loaded[1] && isvViewer.loaded[1].endsWith('_gradcampp_CAM"
                           ".nii.gz')", timeout=60_000)
    assert page.evaluate("Array.from(document.querySelectorAll('#isv-channel option'))"
                         ".map(o => o.value)") == ["CAM"]
    page.select_option("#isv-method", "smoothgrad")
    page.select_option("#isv-channel", "MPRAGE")
    page.wait_for_function("isvViewer.loaded[1].endsWith('_smoothgrad_MPRAGE.nii.gz')",
                           timeout=60_000)
    page.select_option("#isv-background", "MPRAGE")
    page.wait_for_function("isvViewer.loaded[0] === 'MPRAGE.nii.gz'", timeout=60_000)
    # sort by voxels, descending on the second click
    head = page.locator("#isv-table th", has_text="voxels")
    head.click()
    head.click()
    vox = page.evaluate("Array.from(document.querySelectorAll('#isv-table tbody tr'))"
                        ".map(tr => +tr.cells[3].textContent)")
    assert vox == sorted(vox, reverse=True) and len(vox) >= 3
    errors = [t for kind, t in log["console"] if kind == "error"]
    assert errors == []
