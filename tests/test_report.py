"""Figures and the HTML report (instance_saliency.report): what is drawn and what is written."""

import base64
import os
import struct
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from instance_saliency.errors import InputError
from instance_saliency.report import (
    distance_profile_figure,
    instance_figure,
    modality_share_figure,
    write_report,
)
from instance_saliency.report import figures as figmod
from instance_saliency.report import html as htmlmod

PNG_SIG = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 100_000


def _png_size(data: bytes) -> tuple:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == PNG_SIG
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _no_temp_files(folder) -> bool:
    # temporary names end in ".tmp" or ".tmp<suffixes of the target>" (``io.atomic_write``)
    return not [p for p in os.listdir(folder) if ".tmp" in p]


@pytest.fixture
def captured(monkeypatch):
    """Record every matplotlib Figure that the report module saves."""
    figs = []
    real = figmod._save

    def spy(fig, out_png, dpi=figmod._DPI, **kwargs):
        figs.append(fig)
        return real(fig, out_png, dpi=dpi, **kwargs)

    monkeypatch.setattr(figmod, "_save", spy)
    return figs


def _scene(shape=(40, 44, 30), centre=(20, 22, 15), seed=0):
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(float)
    r = np.sqrt(sum((g[a] - centre[a]) ** 2 for a in range(3)))
    flair = 1.0 + 0.1 * rng.standard_normal(shape) + 1.5 * (r < 4)
    mask = r < 3.5
    sal = np.stack([0.8 * np.exp(-r ** 2 / 20) - 0.2 * np.exp(-(r - 6) ** 2 / 4),
                    -0.3 * np.exp(-r ** 2 / 30)]) + 0.01 * rng.standard_normal((2,) + shape)
    return flair, mask, sal


def _shown_crops(sal_c, centre, crop):
    """The three 2D saliency crops shown for one channel, computed independently."""
    sx, sy, sz = crop
    i, j, k = centre
    return [sal_c[sx, sy, k], sal_c[sx, j, sz], sal_c[i, sy, sz]]


def _overlays(fig):
    """The saliency overlay image of each panel (the second image drawn in each axes)."""
    return [ax.images[1] for ax in fig.axes if len(ax.images) == 2]


# ------------------------------------------------------------------ instance figure


def test_instance_figure_scale_symmetric_shared_over_shown_crops(tmp_path, captured):
    flair, mask, sal = _scene()
    centre = (20, 22, 15)
    # A huge value far from the lesion, outside every shown crop, must not set the scale ...
    sal[0, 0, 0, 0] = 50.0
    # ... but one inside a shown crop of the *second* channel must (shared across channels).
    sal[1, 22, 22, 15] = -2.5
    spacing = (1.0, 1.0, 1.0)
    info = instance_figure(flair, mask, sal, centre, spacing, crop_mm=20.0,
                           out_png=tmp_path / "a.png")
    crop = tuple(slice(c - 10, c + 11) for c in centre)
    assert info["crop_slices"] == crop
    v = max(np.abs(s).max() for c in range(2) for s in _shown_crops(sal[c], centre, crop))
    assert v == 2.5
    assert info["vmax"] == v
    assert info["signed"] and info["cmap"] == "RdBu_r"
    assert info["views"] == ("axial", "coronal", "sagittal")
    assert info["view_axes"] == {"axial": 2, "coronal": 1, "sagittal": 0}

    fig = captured[-1]
    overlays = _overlays(fig)
    assert len(overlays) == 6  # 2 channels x 3 views
    for im in overlays:  # the drawn colour range is [-v, v] in every panel
        assert im.norm.vmin == -v and im.norm.vmax == v
        assert im.get_cmap().name == "RdBu_r"
    # near-zero saliency (< 5% of v) is fully transparent, the rest is not
    for im, s in zip(overlays, [s for c in range(2) for s in _shown_crops(sal[c], centre, crop)]):
        alpha = np.asarray(im.get_alpha())
        shown = np.rot90(s)
        np.testing.assert_array_equal(np.asarray(im.get_array()), shown)
        assert (alpha[np.abs(shown) < 0.05 * v] == 0).all()
        assert (alpha[np.abs(shown) >= 0.05 * v] > 0).all()
        assert alpha.max() <= 0.9 + 1e-12
    # the input is not modified by the display scaling
    assert sal[1, 22, 22, 15] == -2.5 and sal[0, 0, 0, 0] == 50.0


def test_instance_figure_crop_clipped_at_volume_edges(tmp_path):
    shape = (30, 40, 20)
    flair = np.ones(shape)
    mask = np.zeros(shape, bool)
    mask[0:3, 37:40, 18:20] = True
    sal = np.zeros((2,) + shape)
    spacing = (1.0, 0.5, 2.0)  # 40 mm -> half-widths 20, 40 and 10 voxels
    info = instance_figure(flair, mask, sal, (1.2, 38.4, 18.6), spacing, crop_mm=40.0,
                           out_png=tmp_path / "edge.png")
    assert info["centre_vox"] == (1, 38, 19)
    assert info["nominal_window"] == ((-19, 22), (-2, 79), (9, 30))
    assert info["crop_slices"] == (slice(0, 22), slice(0, 40), slice(9, 20))
    assert info["vmax"] == 0.0  # all-zero saliency is drawn, and reported as such
    assert (tmp_path / "edge.png").read_bytes()[:8] == PNG_SIG


def test_instance_figure_orientation_anterior_and_superior_up(tmp_path, captured):
    shape = (21, 21, 21)
    flair = np.zeros(shape)
    flair[10, 15, 10] = 5.0  # anterior of the centre (axis 1 increasing)
    flair[10, 10, 16] = 7.0  # superior of the centre (axis 2 increasing)
    flair[14, 10, 10] = 3.0  # towards +axis 0
    mask = np.zeros(shape, bool)
    mask[9:12, 9:12, 9:12] = True
    instance_figure(flair, mask, np.zeros((2,) + shape), (10, 10, 10), (1, 1, 1),
                    out_png=tmp_path / "o.png")
    fig = captured[-1]
    by_title = {ax.get_title(): ax for ax in fig.axes}
    ax_img = by_title["FLAIR · axial z=10"].images[0]
    cor_img = by_title["FLAIR · coronal y=10"].images[0]
    sag_img = by_title["FLAIR · sagittal x=10"].images[0]

    def pos(im, value):
        """(row from top, column from left) of a value in the displayed array."""
        r, c = np.argwhere(np.asarray(im.get_array()) == value)[0]
        return r, c

    # axial: anterior up, +axis 0 to the right
    r_a, _ = pos(ax_img, 5.0)
    _, c_x = pos(ax_img, 3.0)
    assert r_a < 10 and c_x > 10
    # coronal and sagittal: superior up; sagittal: anterior to the right
    assert pos(cor_img, 7.0)[0] < 10
    assert pos(sag_img, 7.0)[0] < 10
    assert pos(sag_img, 5.0)[1] > 10
    # the panel shows the whole nominal window, so a 1 mm voxel is square on screen
    assert ax_img.get_extent() == [-0.5, 20.5, -0.5, 20.5]


def test_instance_figure_png_valid_small_and_atomic(tmp_path, monkeypatch):
    flair, mask, sal = _scene()
    out = tmp_path / "lesion_001.png"
    instance_figure(flair, mask, sal, (20, 22, 15), (1, 1, 1), title="lesion 1 (TP)",
                    out_png=out)
    data = out.read_bytes()
    w, h = _png_size(data)
    assert 400 <= w <= 800 and 250 <= h <= 600  # ~80 dpi
    assert len(data) <= MAX_PNG_BYTES

    # A failure while saving leaves the existing figure untouched and no temporary file.
    from matplotlib.figure import Figure

    def broken_savefig(self, fname, **kw):
        fname.write(b"partial")
        raise RuntimeError("disk full")

    import matplotlib.image as mimage

    def broken_imsave(fname, *a, **kw):  # the already-rendered canvas is encoded directly
        fname.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    monkeypatch.setattr(mimage, "imsave", broken_imsave)
    with pytest.raises(RuntimeError):
        instance_figure(flair, mask, sal, (20, 22, 15), (1, 1, 1), out_png=out)
    assert out.read_bytes() == data
    assert _no_temp_files(tmp_path)


def test_instance_figure_gradcampp_nonnegative_single_channel(tmp_path, captured):
    flair, mask, sal = _scene()
    cam = np.maximum(sal[0], 0)  # (X, Y, Z) is one channel
    info = instance_figure(flair, mask, cam, (20, 22, 15), (1, 1, 1), channel_names=("CAM",),
                           out_png=tmp_path / "cam.png", method_label="Grad-CAM++")
    assert not info["signed"] and info["cmap"] == "inferno"
    overlays = _overlays(captured[-1])
    assert len(overlays) == 3
    for im in overlays:
        assert im.norm.vmin == 0.0 and im.norm.vmax == info["vmax"]
    assert captured[-1]._suptitle.get_text().startswith("Grad-CAM++")
    with pytest.raises(InputError, match="negative"):
        instance_figure(flair, mask, sal[1], (20, 22, 15), (1, 1, 1), channel_names=("CAM",),
                        out_png=tmp_path / "bad.png", signed=False)


def test_instance_figure_rejects_bad_inputs(tmp_path):
    flair, mask, sal = _scene()
    out = tmp_path / "x.png"
    with pytest.raises(InputError, match="channel names"):
        instance_figure(flair, mask, sal, (20, 22, 15), (1, 1, 1), channel_names=("FLAIR",),
                        out_png=out)
    with pytest.raises(InputError, match="outside the volume"):
        instance_figure(flair, mask, sal, (20, 60, 15), (1, 1, 1), out_png=out)
    with pytest.raises(InputError, match="shape"):
        instance_figure(flair, mask[:-1], sal, (20, 22, 15), (1, 1, 1), out_png=out)
    with pytest.raises(InputError, match="spacing"):
        instance_figure(flair, mask, sal, (20, 22, 15), (1, 0, 1), out_png=out)
    bad = sal.copy()
    bad[0, 20, 22, 15] = np.nan
    with pytest.raises(InputError, match="NaN"):
        instance_figure(flair, mask, bad, (20, 22, 15), (1, 1, 1), out_png=out)
    assert not out.exists() and _no_temp_files(tmp_path)


# ------------------------------------------------------------------ distance profiles


def _profiles():
    rows = []
    d = [-1.5, -0.5, 0.5, 1.5, 2.5]
    for label, status, scale in [(1, "TP", 1.0), (2, "FP", 3.0), (3, "FN", 2.0)]:
        for method, chans in [("smoothgrad", ("flair", "mprage")), ("gradcampp", ("cam",))]:
            for ch in chans:
                sign = -1.0 if ch == "mprage" else 1.0
                for k, x in enumerate(d):
                    mean = sign * scale * (len(d) - k)
                    if label == 3 and x == 2.5:
                        mean = np.nan  # an empty bin
                    rows.append(dict(label=label, status=status, method=method, channel=ch,
                                     distance_mm=x, mean=mean, voxels=10))
    return pd.DataFrame(rows)


def test_distance_profile_mean_curves(tmp_path):
    prof = _profiles()
    info = distance_profile_figure(prof, tmp_path / "p.png", title="profiles")
    assert info["methods"] == ["smoothgrad", "gradcampp"]
    assert info["n_lesions"] == {"smoothgrad": 3, "gradcampp": 3}
    x, y = info["mean_curves"]["smoothgrad", "flair"]
    np.testing.assert_array_equal(x, [-1.5, -0.5, 0.5, 1.5, 2.5])
    # mean over lesions, each lesion equally weighted, NaN bins skipped
    np.testing.assert_allclose(y, [5 * 2, 4 * 2, 3 * 2, 2 * 2, (1 + 3) / 2])
    _, y_m = info["mean_curves"]["smoothgrad", "mprage"]
    np.testing.assert_allclose(y_m, -y)
    assert set(info["mean_curves"]) == {("smoothgrad", "flair"), ("smoothgrad", "mprage"),
                                        ("gradcampp", "cam")}
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == PNG_SIG and len(data) <= MAX_PNG_BYTES


def test_distance_profile_empty_and_missing_columns(tmp_path, captured):
    empty = pd.DataFrame(columns=["label", "status", "method", "channel", "distance_mm", "mean"])
    info = distance_profile_figure(empty, tmp_path / "e.png")
    assert info["methods"] == [] and info["mean_curves"] == {}
    texts = [t.get_text() for ax in captured[-1].axes for t in ax.texts]
    assert "no lesions" in texts
    assert (tmp_path / "e.png").read_bytes()[:8] == PNG_SIG
    with pytest.raises(InputError, match="distance_mm"):
        distance_profile_figure(_profiles().drop(columns="distance_mm"), tmp_path / "m.png")


# ------------------------------------------------------------------ modality share


def _lesion_table(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "label": np.arange(1, n + 1),
        "status": (["TP", "FP", "FN"] * n)[:n],
        "voxels": rng.integers(5, 400, n),
        "smoothgrad_flair_mean_in": rng.normal(0.1, 0.1, n),
        "smoothgrad_mprage_mean_in": rng.normal(-0.02, 0.05, n),
        "smoothgrad_flair_share": rng.uniform(0, 1, n),
    })


def test_modality_share_uses_abs_mean_or_sum_abs(tmp_path):
    t = _lesion_table()
    t.loc[2, "smoothgrad_flair_share"] = np.nan
    info = modality_share_figure(t, tmp_path / "s.png")
    assert info["quantity"] == "abs_mean_in" and info["n"] == 6
    np.testing.assert_array_equal(info["x"], np.abs(t["smoothgrad_flair_mean_in"]))
    np.testing.assert_array_equal(info["y"], np.abs(t["smoothgrad_mprage_mean_in"]))
    np.testing.assert_array_equal(info["share"], t["smoothgrad_flair_share"])
    t["smoothgrad_flair_sum_abs"] = np.arange(6.0)
    t["smoothgrad_mprage_sum_abs"] = np.arange(6.0) * 2
    info = modality_share_figure(t, tmp_path / "s.png")
    assert info["quantity"] == "sum_abs"
    np.testing.assert_array_equal(info["y"], 2 * info["x"])
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == PNG_SIG and len(data) <= MAX_PNG_BYTES


def test_modality_share_empty_and_errors(tmp_path, captured):
    info = modality_share_figure(pd.DataFrame(), tmp_path / "e.png")
    assert info["n"] == 0
    assert "no lesions" in [t.get_text() for ax in captured[-1].axes for t in ax.texts]
    with pytest.raises(InputError, match="2 channels"):
        modality_share_figure(_lesion_table(), tmp_path / "x.png", channel_names=("CAM",))
    with pytest.raises(InputError, match="gradcampp"):
        modality_share_figure(_lesion_table(), tmp_path / "x.png", method="gradcampp")


# ------------------------------------------------------------------ HTML report


class _Page(HTMLParser):
    """Collect images, lesion-table rows, script tags and external references of a page."""

    def __init__(self):
        super().__init__()
        self.imgs, self.rows, self.tags = [], [], []
        self._table = None
        self._row = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._table = a.get("class", "")
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            if self._table and "lesions" in self._table:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _report_inputs(tmp_path):
    flair, mask, sal = _scene()
    figs = []
    for k in (1, 2):
        p = tmp_path / f"lesion_{k}.png"
        instance_figure(flair, mask, sal, (20, 22, 15), (1, 1, 1), out_png=p)
        figs.append((f"SmoothGrad: lesion {k} <TP>", p))
    table = _lesion_table(4)
    table["label"] = table["label"].astype(object)
    table.loc[1, "label"] = "<b>"
    table.loc[0, "smoothgrad_flair_mean_in"] = 0.123456789
    table.loc[3, "smoothgrad_flair_mean_in"] = np.nan
    summary = {"instances": 4, "counts": {"TP": 2, "FP": 1, "FN": 1}, "threshold": 0.4123456,
               "spacing_mm": [1.0, 1.0, 1.2], "note": "a & b"}
    return summary, table, figs


def test_write_report_content(tmp_path):
    summary, table, figs = _report_inputs(tmp_path)
    out = write_report(tmp_path / "report.html", "Report <for> scan & co", summary, table,
                       figs, notes=["threshold <0.5> chosen"])
    assert out == tmp_path / "report.html"
    text = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)

    # every lesion row, labels round-tripping through the escaping
    assert len(page.rows) == 1 + len(table)  # header + one row per lesion
    header = page.rows[0]
    assert header[:3] == ["label", "status", "voxels"]
    assert [r[0] for r in page.rows[1:]] == ["1", "<b>", "3", "4"]
    col = header.index("smoothgrad_flair_mean_in")
    assert page.rows[1][col] == "0.1235"  # 4 significant digits
    assert page.rows[4][col] == "NaN"
    # escaped text: no raw markup from the data
    assert "<b>" not in text and "&lt;b&gt;" in text
    assert "Report &lt;for&gt; scan &amp; co" in text
    assert "threshold &lt;0.5&gt; chosen" in text
    assert "lesion 1 &lt;TP&gt;" in text
    assert "TP: 2, FP: 1, FN: 1" in text and "0.4123" in text and "a &amp; b" in text

    # every figure embedded as a data URI that decodes to the PNG file
    assert len(page.imgs) == len(figs)
    for img, (caption, path) in zip(page.imgs, figs):
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data[:8] == PNG_SIG
        assert data == path.read_bytes()
        assert img["alt"] == caption
    # self-contained: no scripts, no external resources
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe")]
    for _, attrs in page.tags:
        for k in ("src", "href"):
            assert not attrs.get(k, "data:").startswith(("http", "//", "file:"))


def test_write_report_sections_and_empty_table(tmp_path):
    _, _, figs = _report_inputs(tmp_path)
    items = [(figs[0][0], figs[0][1], "Summary figures"), (figs[1][0], figs[1][1], "Lesions")]
    out = write_report(tmp_path / "r.html", "t", {}, pd.DataFrame(), items)
    text = out.read_text()
    assert "no lesion instances" in text
    assert text.index("<h2>Summary figures</h2>") < text.index("<h2>Lesions</h2>")
    with pytest.raises(InputError, match="not a PNG"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"GIF89a")
        write_report(tmp_path / "r2.html", "t", {}, None, [("x", bad)])
    assert not (tmp_path / "r2.html").exists()


def test_write_report_failure_midway_leaves_existing_file(tmp_path, monkeypatch):
    summary, table, figs = _report_inputs(tmp_path)
    out = tmp_path / "report.html"
    out.write_text("old report")
    real = htmlmod._embed_png
    calls = []

    def fail_on_second(path):
        calls.append(path)
        if len(calls) == 2:  # the head, summary, table and first figure are already written
            raise RuntimeError("interrupted")
        return real(path)

    monkeypatch.setattr(htmlmod, "_embed_png", fail_on_second)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_report(out, "new", summary, table, figs)
    assert len(calls) == 2
    assert out.read_text() == "old report"
    assert _no_temp_files(tmp_path)
