"""Small PNG figures for the per-lesion report: instance panels, distance profiles, modality share.

All figures are drawn with matplotlib's Agg canvas on a private :class:`~matplotlib.figure.Figure`
(no pyplot, no display, no global state) and saved atomically: the PNG is written to a temporary
name in the destination folder and renamed over ``out_png`` only once complete, so an existing
figure is never left half-written.

Saliency keeps its sign and magnitude everywhere in the package; the scaling done here (a colour
range of ``[-v, v]``, a FLAIR grey-level window, transparency of near-zero saliency) is for
display only and never changes the arrays passed in.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from .._validate import check_spacing as _check_spacing
from ..errors import InputError
from ..io import atomic_write

__all__ = [
    "instance_figure",
    "distance_profile_figure",
    "modality_share_figure",
    "VIEWS",
    "STATUS_COLOURS",
]

#: View name -> voxel axis that is sliced (the other two axes are in plane, in increasing order).
VIEWS = {"axial": 2, "coronal": 1, "sagittal": 0}

#: Colour of each lesion status in scatter plots and histograms.
STATUS_COLOURS = {"TP": "#1b9e77", "FP": "#d95f02", "FN": "#7570b3", "unknown": "#666666"}

SIGNED_CMAP = "RdBu_r"
SEQUENTIAL_CMAP = "inferno"
DEFAULT_UNITS = "logit / normalised intensity"
#: Saliency with ``|s| < ALPHA_FLOOR * v`` is drawn fully transparent.
ALPHA_FLOOR = 0.05
_ALPHA_MAX = 0.9
_DPI = 80


# --------------------------------------------------------------------------------------------
# saving


def _atomic_write(path, write) -> Path:
    """Call ``write(fileobj)`` on a temporary binary file next to ``path``, then rename it onto
    ``path`` (through :func:`instance_saliency.io.atomic_write`).

    The parent folder is created if needed. On any error the temporary file is removed and
    ``path`` is left as it was.

    Raises
    ------
    OutputError
        The folder cannot be created or written into.
    """
    def write_tmp(tmp):
        with open(tmp, "wb") as f:
            write(f)

    return atomic_write(path, write_tmp)


def _new_figure(figsize, dpi=_DPI):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _fit_right_edge(fig, gs, artists, pad_px: float = 4.0, drawn: bool = False) -> bool:
    """Move the grid ``gs`` left until every artist in ``artists`` (e.g. a colour bar's label
    and tick labels) lies inside the figure, so that none is clipped at the right edge.

    ``drawn``: the canvas already shows the figure as it is (its first draw is skipped).
    Returns whether the canvas shows the final figure (no change after the last draw), so
    that :func:`_save` can encode it without drawing it again."""
    artists = list(artists)
    for i in range(3):
        if not (drawn and i == 0):
            fig.canvas.draw()
        width = fig.bbox.x1
        right = max(a.get_window_extent().x1 for a in artists if a.get_visible())
        if right <= width - pad_px:
            return True
        gs.update(right=gs.right - (right - width + pad_px) / width)
    return False


def _save(fig, out_png, dpi=_DPI, rendered: bool = False) -> Path:
    """Write ``fig`` as PNG (rendered in memory first, so a drawing error never touches the
    destination). ``rendered``: the Agg canvas already holds the final figure at ``dpi``; it
    is encoded as it is, as ``savefig`` would after drawing it once more (the same bytes)."""
    buf = io.BytesIO()
    if rendered and float(fig.dpi) == float(dpi):
        import matplotlib.image as mimage

        mimage.imsave(buf, fig.canvas.buffer_rgba(), format="png", origin="upper",
                      dpi=fig.dpi, metadata={"Software": None})
    else:
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    data = buf.getvalue()
    return _atomic_write(out_png, lambda f: f.write(data))


def _out_path(out_png) -> Path:
    if out_png is None:
        raise InputError("out_png (the PNG file to write) is required")
    return Path(out_png)


def _message_figure(out_png, message: str, title: str = "", figsize=(4.0, 2.0)) -> Path:
    fig = _new_figure(figsize)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="#444444",
            transform=ax.transAxes)
    if title:
        ax.text(0.5, 0.9, title, ha="center", va="top", fontsize=10, transform=ax.transAxes)
    return _save(fig, out_png)


# --------------------------------------------------------------------------------------------
# instance figure


def _centre_voxel(centroid_vox, shape) -> tuple:
    try:
        c = tuple(float(v) for v in centroid_vox)
    except (TypeError, ValueError):
        raise InputError(f"centroid_vox must be 3 numbers, got {centroid_vox!r}") from None
    if len(c) != 3 or not all(math.isfinite(v) for v in c):
        raise InputError(f"centroid_vox must be 3 finite numbers, got {centroid_vox!r}")
    idx = tuple(int(np.floor(v + 0.5)) for v in c)
    if not all(0 <= i < n for i, n in zip(idx, shape)):
        raise InputError(f"centroid_vox {c} lies outside the volume of shape {tuple(shape)}")
    return idx


def crop_window(centre_vox, shape, spacing, crop_mm) -> tuple:
    """Voxel window of about ``crop_mm`` x ``crop_mm`` mm around a voxel, clipped at the edges.

    Parameters
    ----------
    centre_vox : tuple of 3 int
        Centre voxel index.
    shape : tuple of 3 int
        Volume shape ``(X, Y, Z)``.
    spacing : tuple of 3 float
        Voxel spacing in mm.
    crop_mm : float
        Side of the window in mm.

    Returns
    -------
    nominal : tuple of 3 (int, int)
        Unclipped ``(start, stop)`` per axis: ``centre -+ h`` with ``h = round(crop_mm / 2 /
        spacing)``, ``stop`` exclusive (so ``2 h + 1`` voxels); may extend past the volume.
    clipped : tuple of 3 slice
        The same window intersected with ``[0, shape)``.
    """
    nominal, clipped = [], []
    for c, n, sp in zip(centre_vox, shape, spacing):
        h = int(round(crop_mm / 2.0 / sp))
        lo, hi = c - h, c + h + 1
        nominal.append((lo, hi))
        clipped.append(slice(max(lo, 0), min(hi, n)))
    return tuple(nominal), tuple(clipped)


def _view_index(view: str, centre: tuple, crop: tuple) -> tuple:
    """Index of the 2D crop shown in ``view``: the centre along the sliced axis, crop in plane."""
    ax = VIEWS[view]
    return tuple(centre[a] if a == ax else crop[a] for a in range(3))


def instance_figure(flair, mask, saliency, centroid_vox, spacing,
                    channel_names=("FLAIR", "MPRAGE"), title: str = "", crop_mm: float = 40.0,
                    out_png=None, method_label: str = "SmoothGrad", *, signed: bool | None = None,
                    units: str | None = None, dpi: int = _DPI) -> dict:
    """Draw one lesion: FLAIR crops with the lesion contour and the saliency overlay.

    A grid of ``C`` rows (one per saliency channel) by 3 columns (axial, coronal, sagittal
    slices through the lesion centroid), plus one colour bar shared by all panels.

    Views and orientation. The voxel grid is assumed to have NIfTI RAS-like axes (RAS, LAS,
    ...): axis 0 left-right, axis 1 posterior -> anterior, axis 2 inferior -> superior.

    * axial: slice ``[:, :, k]`` (axis 2); horizontal = axis 0, vertical = axis 1 (anterior up);
    * coronal: slice ``[:, j, :]`` (axis 1); horizontal = axis 0, vertical = axis 2 (superior up);
    * sagittal: slice ``[i, :, :]`` (axis 0); horizontal = axis 1 (anterior right), vertical =
      axis 2 (superior up).

    Each in-plane array is drawn as ``np.rot90`` of the ``(horizontal, vertical)`` slice, so
    the index along the vertical axis increases upwards and along the horizontal axis to the
    right. For an RAS grid the patient's right is on the image right (neurological
    convention); for LAS it is on the image left (radiological). Pixels are drawn with the
    aspect ratio of the voxel spacing, so panels are isotropic in mm.

    Display scaling (display only; the inputs are not modified):

    * FLAIR: grey levels windowed to its 1st-99.5th percentile over the shown crops;
    * signed saliency (SmoothGrad): diverging colour map ``RdBu_r`` on ``[-v, v]``, centred on
      0, with ``v = max |saliency|`` over the shown crops of **all** channels, so modalities
      share one scale;
    * non-negative saliency (Grad-CAM++): sequential ``inferno`` on ``[0, v]``;
    * opacity ``0.9 * sqrt(|s| / v)``, fully transparent where ``|s| < 0.05 v``.

    Parameters
    ----------
    flair : array_like, shape (X, Y, Z)
        FLAIR image (any intensity units; shown in grey levels).
    mask : array_like of bool or {0, 1}, shape (X, Y, Z)
        Binary mask of the lesion; its 0.5 iso-line is drawn as the contour (green).
    saliency : array_like, shape (C, X, Y, Z) or (X, Y, Z)
        Saliency map of the lesion, one channel per input modality (a 3D array is one
        channel). Units: change of logit per unit of normalised intensity for gradient maps.
    centroid_vox : sequence of 3 float
        Lesion centroid in voxel indices; it is rounded to the nearest voxel and must lie in
        the volume.
    spacing : sequence of 3 float
        Voxel spacing in mm, used to convert ``crop_mm`` to voxels and for the pixel aspect.
    channel_names : sequence of str, length C
        Row labels (modalities), e.g. ``("FLAIR", "MPRAGE")`` or ``("CAM",)``.
    title : str
        Figure title; ``method_label`` is prepended.
    crop_mm : float
        Side of the square window around the centroid, in mm; the window is clipped at the
        volume edges (the missing part is drawn black, the panel keeps its size).
    out_png : path
        PNG file to write (required); its folder is created if needed.
    method_label : str
        Name of the saliency method for the title, e.g. ``"SmoothGrad"``, ``"Grad-CAM++"``.
    signed : bool or None
        ``True``: diverging, symmetric colour scale. ``False``: non-negative map with a
        sequential scale (negative values are an error). ``None`` (default): signed unless
        every shown value is >= 0. Pass it explicitly to keep all lesions of one method on
        the same kind of scale.
    units : str or None
        Colour-bar units; default ``"logit / normalised intensity"`` for signed maps and
        ``"a.u."`` for non-negative ones.
    dpi : int
        Resolution of the PNG (default 80; a 2-channel figure is about 600 x 400 pixels).

    Returns
    -------
    dict
        What was drawn: ``vmax`` (float, ``v`` above in saliency units; 0.0 when the shown
        saliency is all zero), ``signed`` (bool), ``cmap`` (str), ``centre_vox`` (tuple of 3
        int), ``crop_slices`` (tuple of 3 slice, the clipped window per voxel axis),
        ``nominal_window`` (tuple of 3 (start, stop), unclipped), ``views`` (tuple of view
        names, column order), ``view_axes`` (view -> sliced voxel axis), ``channels`` (tuple
        of str) and ``out_png`` (Path).

    Raises
    ------
    InputError
        Shapes disagree, ``len(channel_names) != C``, the centroid lies outside the volume,
        invalid spacing or ``crop_mm``, non-finite saliency in the shown crops, negative
        values with ``signed=False``, or no ``out_png``.
    OutputError
        The PNG cannot be written.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    out_png = _out_path(out_png)
    flair = np.asarray(flair)
    if flair.ndim != 3:
        raise InputError(f"flair must be a 3D array (X, Y, Z), got shape {flair.shape}")
    shape = flair.shape
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise InputError(f"mask shape {mask.shape} differs from the FLAIR shape {shape}")
    sal = np.asarray(saliency)
    if sal.ndim == 3:
        sal = sal[None]
    if sal.ndim != 4 or sal.shape[1:] != shape:
        raise InputError(f"saliency must have shape (C, *{shape}) or {shape}, got {sal.shape}")
    if isinstance(channel_names, str):
        channel_names = (channel_names,)
    channel_names = tuple(str(c) for c in channel_names)
    n_ch = sal.shape[0]
    if len(channel_names) != n_ch:
        raise InputError(f"{len(channel_names)} channel names for a saliency map with "
                         f"{n_ch} channels")
    sp = _check_spacing(spacing)
    try:
        crop_mm = float(crop_mm)
    except (TypeError, ValueError):
        raise InputError(f"crop_mm must be a positive number (mm), got {crop_mm!r}") from None
    if not math.isfinite(crop_mm) or crop_mm <= 0:
        raise InputError(f"crop_mm must be a positive number (mm), got {crop_mm!r}")
    centre = _centre_voxel(centroid_vox, shape)
    nominal, crop = crop_window(centre, shape, sp, crop_mm)
    views = tuple(VIEWS)

    # Gather the shown 2D crops: (horizontal, vertical) arrays per view.
    flair_crops, mask_crops, sal_crops = {}, {}, {}
    for view in views:
        idx = _view_index(view, centre, crop)
        flair_crops[view] = np.asarray(flair[idx], dtype=np.float64)
        m = mask[idx]
        if m.dtype != bool:
            if not np.isin(m, (0, 1)).all():
                raise InputError("lesion mask is not binary: values other than 0/1 found")
            m = m != 0
        mask_crops[view] = m
        for c in range(n_ch):
            s = np.asarray(sal[(c,) + idx], dtype=np.float64)
            if not np.isfinite(s).all():
                raise InputError(f"saliency channel {channel_names[c]} has NaN/Inf values "
                                 f"in the {view} view of the lesion")
            sal_crops[view, c] = s
    vmax = float(max(np.abs(s).max(initial=0.0) for s in sal_crops.values()))
    vmin_data = float(min(s.min(initial=0.0) for s in sal_crops.values()))
    if signed is None:
        signed = vmin_data < 0
    signed = bool(signed)
    if not signed and vmin_data < 0:
        raise InputError(f"signed=False but the saliency has negative values "
                         f"(min {vmin_data:.4g}) in the shown crops")
    v_disp = vmax if vmax > 0 else 1.0
    cmap_name = SIGNED_CMAP if signed else SEQUENTIAL_CMAP
    cmap = colormaps[cmap_name]
    norm = Normalize(-v_disp, v_disp) if signed else Normalize(0.0, v_disp)
    if units is None:
        units = DEFAULT_UNITS if signed else "a.u."

    finite_f = np.concatenate([f[np.isfinite(f)].ravel() for f in flair_crops.values()])
    if finite_f.size:
        g_lo, g_hi = (float(x) for x in np.percentile(finite_f, (1.0, 99.5)))
    else:
        g_lo, g_hi = 0.0, 1.0
    if not g_hi > g_lo:
        g_hi = g_lo + 1.0

    panel = 2.1
    fig = _new_figure((3 * panel + 1.0, n_ch * panel + 0.55), dpi=dpi)
    gs = fig.add_gridspec(n_ch, 4, width_ratios=(1, 1, 1, 0.07), left=0.02, right=0.88,
                          bottom=0.02, top=1.0 - 0.5 / (n_ch * panel + 0.55),
                          wspace=0.06, hspace=0.14)
    for r in range(n_ch):
        for col, view in enumerate(views):
            ax = fig.add_subplot(gs[r, col])
            a_h, a_v = (a for a in range(3) if a != VIEWS[view])
            h0, h1 = crop[a_h].start, crop[a_h].stop
            v0, v1 = crop[a_v].start, crop[a_v].stop
            extent = (h0 - 0.5, h1 - 0.5, v0 - 0.5, v1 - 0.5)
            aspect = sp[a_v] / sp[a_h]
            ax.set_facecolor("black")
            ax.imshow(np.rot90(flair_crops[view]), cmap="gray", vmin=g_lo, vmax=g_hi,
                      extent=extent, origin="upper", aspect=aspect, interpolation="nearest")
            s = sal_crops[view, r]
            mag = np.abs(s) / v_disp
            alpha = np.where(mag >= ALPHA_FLOOR, _ALPHA_MAX * np.sqrt(np.clip(mag, 0, 1)), 0.0)
            ax.imshow(np.rot90(s), cmap=cmap, norm=norm, alpha=np.rot90(alpha), extent=extent,
                      origin="upper", aspect=aspect, interpolation="nearest")
            m = mask_crops[view]
            if m.any() and not m.all():
                ax.contour(np.arange(h0, h1), np.arange(v0, v1), m.T.astype(np.float32),
                           levels=[0.5], colors="#00e000", linewidths=1.0)
            (n_h0, n_h1), (n_v0, n_v1) = nominal[a_h], nominal[a_v]
            ax.set_xlim(n_h0 - 0.5, n_h1 - 0.5)
            ax.set_ylim(n_v0 - 0.5, n_v1 - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            # no ticks and no axis labels: the axes draw nothing (the same pixels), so they
            # are not drawn at all (a third of the figure's drawing time)
            ax.xaxis.set_visible(False)
            ax.yaxis.set_visible(False)
            axis_name = "xyz"[VIEWS[view]]
            ax.set_title(f"{channel_names[r]} · {view} {axis_name}={centre[VIEWS[view]]}",
                         fontsize=9, pad=2)
    cax = fig.add_subplot(gs[:, 3])
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.set_label(f"saliency ({units})", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    head = f"{method_label}: {title}" if title else str(method_label)
    if vmax == 0.0:
        head += " (saliency is zero here)"
    # the title first (it moves nothing: no layout engine), so that the last draw of the
    # fitting below is the final figure and is encoded without a further draw
    fig.suptitle(f"{head}   [{crop_mm:g} mm crop]", fontsize=10, y=0.995, va="top")
    fig.canvas.draw()
    box = cb.ax.yaxis.label.get_window_extent()
    drawn = True
    if box.y0 < 0 or box.y1 > fig.bbox.y1:  # taller than a one-row figure: two lines
        cb.set_label(f"saliency\n({units})", fontsize=9)
        drawn = False
    rendered = _fit_right_edge(fig, gs, [cb.ax.yaxis.label, *cb.ax.get_yticklabels()],
                               drawn=drawn)
    _save(fig, out_png, dpi=dpi, rendered=rendered)
    return {
        "vmax": vmax,
        "signed": signed,
        "cmap": cmap_name,
        "centre_vox": centre,
        "crop_slices": crop,
        "nominal_window": nominal,
        "views": views,
        "view_axes": dict(VIEWS),
        "channels": channel_names,
        "out_png": out_png,
    }


# --------------------------------------------------------------------------------------------
# distance profiles


_PROFILE_COLUMNS = ("label", "status", "method", "channel", "distance_mm", "mean")


def _channel_colours(channels) -> dict:
    base = {"flair": "#1f77b4", "mprage": "#d62728", "cam": "#9467bd"}
    spare = iter(["#2ca02c", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"])
    return {ch: base.get(str(ch).lower()) or next(spare, "#444444") for ch in channels}


def _decorate_profile_axes(ax, title: str, label_size: int = 9) -> None:
    """Border and zero lines, title, axis labels, ticks and legend of a distance-profile panel.

    Axis labels use ``label_size`` points, ticks and legend one point less, the title 10.
    """
    ax.axvline(0.0, color="k", ls="--", lw=0.9)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("signed distance from lesion border (mm; < 0 inside)", fontsize=label_size)
    ax.set_ylabel("mean saliency in bin", fontsize=label_size)
    ax.tick_params(labelsize=label_size - 1)
    ax.legend(fontsize=label_size - 1, frameon=False)


def distance_profile_figure(profiles, out_png, title: str = "") -> dict:
    """Plot mean saliency against signed distance from the lesion border, per method.

    One subplot per method (independent y axes: methods have different units). In each,
    per channel: every lesion's curve thin and light, and the mean over lesions (each lesion
    weighted equally, empty bins skipped) thick. Dashed vertical line at 0 mm (the border),
    grey horizontal line at 0 saliency.

    Parameters
    ----------
    profiles : pandas.DataFrame
        Long table with columns ``label, status, method, channel, distance_mm, mean``: the
        mean saliency ``mean`` of lesion ``label`` in the signed-distance bin centred on
        ``distance_mm`` (mm; < 0 inside the lesion, > 0 outside), as produced by
        :func:`instance_saliency.quantify.distance_profile`. Other columns are ignored. An
        empty table gives a figure that says "no lesions".
    out_png : path
        PNG file to write.
    title : str
        Figure title.

    Returns
    -------
    dict
        ``methods`` (list of str, subplot order), ``n_lesions`` (method -> number of lesions),
        ``mean_curves`` ((method, channel) -> (distance_mm, mean over lesions), two float
        arrays sorted by distance) and ``out_png`` (Path). For an empty table ``methods`` is
        empty.

    Raises
    ------
    InputError
        A required column is missing.
    OutputError
        The PNG cannot be written.
    """
    import pandas as pd

    out_png = _out_path(out_png)
    if profiles is None or len(profiles) == 0:
        _message_figure(out_png, "no lesions", title)
        return {"methods": [], "n_lesions": {}, "mean_curves": {}, "out_png": out_png}
    missing = [c for c in _PROFILE_COLUMNS if c not in profiles.columns]
    if missing:
        raise InputError(f"profiles table lacks column(s) {missing}")
    df = profiles.copy()
    df["distance_mm"] = pd.to_numeric(df["distance_mm"], errors="coerce")
    df["mean"] = pd.to_numeric(df["mean"], errors="coerce")
    methods = list(dict.fromkeys(df["method"]))
    n = len(methods)
    fig = _new_figure((4.3 * n + 0.3, 3.3))
    axes = fig.subplots(1, n, squeeze=False)[0]
    fig.subplots_adjust(left=0.09 / n ** 0.5, right=0.98, bottom=0.16, top=0.84, wspace=0.25)
    mean_curves, n_lesions = {}, {}
    for ax, method in zip(axes, methods):
        dm = df[df["method"] == method]
        channels = list(dict.fromkeys(dm["channel"]))
        colours = _channel_colours(channels)
        n_lesions[method] = int(dm[["label", "status"]].drop_duplicates().shape[0])
        for ch in channels:
            dc = dm[dm["channel"] == ch]
            for _, g in dc.groupby(["label", "status"], sort=False):
                g = g.sort_values("distance_mm")
                ax.plot(g["distance_mm"], g["mean"], color=colours[ch], lw=0.6, alpha=0.3)
            mc = dc.groupby("distance_mm")["mean"].mean().sort_index()
            x, y = mc.index.to_numpy(dtype=float), mc.to_numpy(dtype=float)
            mean_curves[method, ch] = (x, y)
            ax.plot(x, y, color=colours[ch], lw=2.4, label=f"{ch} (mean)")
        _decorate_profile_axes(ax, f"{method} (n = {n_lesions[method]} lesions)", label_size=9)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, out_png)
    return {"methods": methods, "n_lesions": n_lesions, "mean_curves": mean_curves,
            "out_png": out_png}


# --------------------------------------------------------------------------------------------
# modality share


def modality_share_figure(table, out_png, method: str = "smoothgrad",
                          channel_names=("FLAIR", "MPRAGE")) -> dict:
    """Compare the two modalities' saliency per lesion: scatter and share histogram.

    Left: per lesion, saliency magnitude of channel 0 (x) against channel 1 (y), coloured by
    status, with the diagonal ``y = x``. The magnitude is ``{method}_{ch}_sum_abs`` (sum of
    ``|S|`` over the lesion dilated by the share margin) when the table has it for both channels, otherwise ``|{method}_{ch}_mean_in|``
    (absolute value of the signed lesion mean). Right: histogram of
    ``{method}_{ch0}_share`` (sum |S_ch0| / sum over channels, in [0, 1]; see
    :func:`instance_saliency.quantify.quantify_instance`), stacked by status, with a line at
    0.5. Rows with NaN are left out of a panel and counted in its title.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per lesion with ``status`` and the columns named above (channel names
        lowercased). An empty table gives a figure that says "no lesions".
    out_png : path
        PNG file to write.
    method : str
        Method prefix of the columns, e.g. ``"smoothgrad"``.
    channel_names : sequence of 2 str
        The two channels compared; channel 0 is the one whose share is plotted.

    Returns
    -------
    dict
        ``n`` (rows in the table), ``quantity`` (``"sum_abs"`` or ``"abs_mean_in"``), ``x``,
        ``y`` (float arrays, one per row, NaN kept), ``share`` (float array) and ``out_png``.

    Raises
    ------
    InputError
        Not exactly 2 channel names, or a required column is missing.
    OutputError
        The PNG cannot be written.
    """
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    out_png = _out_path(out_png)
    if isinstance(channel_names, str) or len(tuple(channel_names)) != 2:
        raise InputError(f"modality_share_figure compares exactly 2 channels, got "
                         f"{channel_names!r}")
    names = tuple(str(c) for c in channel_names)
    chs = tuple(c.lower() for c in names)
    method = str(method).strip().lower()
    if table is None or len(table) == 0:
        _message_figure(out_png, "no lesions", f"{method}: {names[0]} vs {names[1]}")
        return {"n": 0, "quantity": None, "x": np.zeros(0), "y": np.zeros(0),
                "share": np.zeros(0), "out_png": out_png}
    sum_cols = [f"{method}_{c}_sum_abs" for c in chs]
    if all(c in table.columns for c in sum_cols):
        quantity, cols = "sum_abs", sum_cols
        qlabel = "sum |S| (lesion + margin)"
    else:
        quantity, cols = "abs_mean_in", [f"{method}_{c}_mean_in" for c in chs]
        qlabel = "|mean S| in lesion"
    share_col = f"{method}_{chs[0]}_share"
    missing = [c for c in [*cols, share_col, "status"] if c not in table.columns]
    if missing:
        raise InputError(f"lesion table lacks column(s) {missing} for the {method} "
                         f"modality-share figure")
    x = pd.to_numeric(table[cols[0]], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(table[cols[1]], errors="coerce").to_numpy(dtype=float)
    if quantity == "abs_mean_in":
        x, y = np.abs(x), np.abs(y)
    share = pd.to_numeric(table[share_col], errors="coerce").to_numpy(dtype=float)
    status = table["status"].astype(str).to_numpy()
    order = [s for s in STATUS_COLOURS if (status == s).any()]
    order += [s for s in dict.fromkeys(status) if s not in order]

    fig = _new_figure((8.6, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.15, top=0.86, wspace=0.28)
    ok = np.isfinite(x) & np.isfinite(y)
    for s in order:
        sel = ok & (status == s)
        if sel.any():
            ax1.scatter(x[sel], y[sel], s=18, color=STATUS_COLOURS.get(s, "#444444"),
                        label=f"{s} ({int(sel.sum())})", alpha=0.85, edgecolors="none")
    hi = float(max(x[ok].max(initial=0.0), y[ok].max(initial=0.0)))
    hi = hi * 1.05 if hi > 0 else 1.0
    ax1.plot([0, hi], [0, hi], color="0.4", lw=0.9, ls="--")
    ax1.set_xlim(-0.02 * hi, hi)
    ax1.set_ylim(-0.02 * hi, hi)
    ax1.set_aspect("equal", adjustable="box")
    ax1.set_xlabel(f"{names[0]} {qlabel}", fontsize=9)
    ax1.set_ylabel(f"{names[1]} {qlabel}", fontsize=9)
    dropped = int((~ok).sum())
    ax1.set_title(f"{method}: {names[0]} vs {names[1]}"
                  + (f" ({dropped} NaN left out)" if dropped else ""), fontsize=10)
    ax1.tick_params(labelsize=8)
    if ok.any():
        ax1.legend(fontsize=8, frameon=False, loc="upper left")

    oks = np.isfinite(share)
    bins = np.linspace(0.0, 1.0, 21)
    data = [np.clip(share[oks & (status == s)], 0, 1) for s in order]
    if oks.any():
        ax2.hist(data, bins=bins, stacked=True, label=order,
                 color=[STATUS_COLOURS.get(s, "#444444") for s in order])
        ax2.legend(fontsize=8, frameon=False)
    ax2.axvline(0.5, color="k", ls="--", lw=0.9)
    ax2.set_xlim(0, 1)
    ax2.set_xlabel(f"{names[0]} share of |saliency| (0..1)", fontsize=9)
    ax2.set_ylabel("lesions", fontsize=9)
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    dropped = int((~oks).sum())
    ax2.set_title(f"{names[0]} share" + (f" ({dropped} NaN left out)" if dropped else ""),
                  fontsize=10)
    ax2.tick_params(labelsize=8)
    _save(fig, out_png)
    return {"n": int(len(table)), "quantity": quantity, "x": x, "y": y, "share": share,
            "out_png": out_png}
