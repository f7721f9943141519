"""Plausibility checks of the inputs that warn, before any work, instead of refusing.

:func:`identical_channels` finds two channels given the same file or identical data (``--flair
a.nii.gz --mprage a.nii.gz``).

:func:`channel_order_check` looks for FLAIR and T1-weighted images given the wrong way round
(``--flair T1.nii.gz --mprage FLAIR.nii.gz``): the model then runs to the end and explains
nonsense (0 TP on the demo scan) without any error.

The check: the order of the tissue classes inside the brain
------------------------------------------------------------
In a T1-weighted image (MPRAGE) white matter, the most common brain tissue, is also the
brightest (CSF < grey matter < white matter), so the peak of the brain's intensity histogram
lies high in its range. In FLAIR white matter is darker than grey matter and lesions (CSF <
white matter < grey matter < lesions), so its peak lies lower, and the suppressed CSF gives it
the longer dark tail (lower skewness). Two numbers per channel, over the voxels that are
non-zero in both channels (the brain after skull stripping):

* ``mode_position`` = (histogram peak − 2nd percentile) / (98th − 2nd percentile), the peak
  of a 100-bin histogram between those percentiles smoothed over 5 bins;
* ``skewness`` (Fisher-Pearson, :func:`scipy.stats.skew`) of the same voxels.

The channels are reported as **probably swapped** when *both* contradict the expected order:
the image given as FLAIR peaks more than :data:`MODE_MARGIN` higher than the one given as T1
**and** it is the more right-skewed of the two. Measured on the four public scans of this
project (open_ms_data patients 07 and 19, MSLesSeg P18 and P39): T1 peak position 0.61-0.91,
FLAIR 0.54-0.74, T1 higher by 0.07-0.18 in every scan; skewness FLAIR lower by 0.23-0.96 in
every scan; so each correct pair passes and each swapped pair is reported. It is a heuristic, not a tissue segmentation: unusual
contrasts (e.g. a T1 with contrast agent, strong bias field) can defeat it, so it only warns.
"""

from __future__ import annotations

import numpy as np

from .models.channels import canonical

__all__ = ["channel_order_check", "check_inputs", "identical_channels", "MODE_MARGIN"]

#: the FLAIR peak must lie this much (fraction of the 2-98 % range) above the T1 peak to count
MODE_MARGIN = 0.05


def _histogram_stats(v: np.ndarray) -> dict:
    from scipy.stats import skew

    p2, p98 = np.percentile(v, [2, 98])
    if not p98 > p2:
        return {"mode_position": float("nan"), "skewness": float("nan")}
    inside = v[(v >= p2) & (v <= p98)]
    h, edges = np.histogram(inside, bins=100, range=(p2, p98))
    h = np.convolve(h, np.ones(5) / 5, mode="same")
    k = int(h.argmax())
    mode = 0.5 * (edges[k] + edges[k + 1])
    return {"mode_position": float((mode - p2) / (p98 - p2)), "skewness": float(skew(v))}


def channel_order_check(image: np.ndarray, channels, max_voxels: int = 2_000_000) -> dict | None:
    """Do the FLAIR and T1-weighted channels look swapped? (see the module text)

    Parameters
    ----------
    image : ndarray, shape (C, X, Y, Z)
        Raw intensities, in the order of ``channels``.
    channels : sequence of str
        Channel names (``FLAIR``, ``MPRAGE``/``T1``/... matched by synonym).
    max_voxels : int
        At most this many brain voxels are used (an evenly strided subset), for speed.

    Returns
    -------
    dict or None
        None when the model has no FLAIR and T1-weighted channel pair or the brain has fewer
        than 1000 voxels; else ``{"flair": {...}, "t1": {...}, "swapped_suspected": bool,
        "channels": [flair name, t1 name], "rule": str}`` with each channel's
        ``mode_position`` and ``skewness``.
    """
    keys = [canonical(c) for c in channels]
    if "flair" not in keys or "t1" not in keys:
        return None
    f, t = image[keys.index("flair")], image[keys.index("t1")]
    brain = (f != 0) & (t != 0)
    n = int(brain.sum())
    if n < 1000:
        return None
    fv, tv = f[brain].astype(np.float64), t[brain].astype(np.float64)
    if n > max_voxels:
        step = int(np.ceil(n / max_voxels))
        fv, tv = fv[::step], tv[::step]
    fs, ts = _histogram_stats(fv), _histogram_stats(tv)
    swapped = bool(fs["mode_position"] > ts["mode_position"] + MODE_MARGIN
                   and fs["skewness"] > ts["skewness"])
    return {"flair": fs, "t1": ts, "swapped_suspected": swapped,
            "channels": [str(channels[keys.index("flair")]), str(channels[keys.index("t1")])],
            "rule": f"swapped when the FLAIR histogram peak lies > {MODE_MARGIN} above the T1 "
                    "peak (fraction of the 2-98 % range) and FLAIR is more right-skewed than T1 "
                    "(instance_saliency.input_checks)"}


def identical_channels(image: np.ndarray, channels, paths=()) -> list:
    """Pairs of channels given the same file or identical image data (e.g. ``--flair a.nii.gz
    --mprage a.nii.gz``): the channel-order check cannot tell them apart (it compares the
    two), and the model runs on one contrast twice without any error.

    Parameters
    ----------
    image : ndarray, shape (C, X, Y, Z)
        Raw intensities, in the order of ``channels``.
    channels : sequence of str
        Channel names.
    paths : sequence of path, optional
        The files, in the same order (a pair with one file is reported as such).

    Returns
    -------
    list of dict
        ``{"channels": [name a, name b], "same_file": bool}`` per pair; empty when every
        channel differs.
    """
    import os

    paths = list(paths) + [None] * (len(channels) - len(paths))
    real = [os.path.realpath(p) if p is not None else None for p in paths]
    out = []
    for i in range(len(channels)):
        for j in range(i + 1, len(channels)):
            same_file = real[i] is not None and real[i] == real[j]
            if same_file or np.array_equal(image[i], image[j]):
                out.append({"channels": [str(channels[i]), str(channels[j])],
                            "same_file": bool(same_file)})
    return out


def identical_warning(pairs: list) -> str | None:
    """The one-line warning for :func:`identical_channels` (None when there is none)."""
    if not pairs:
        return None
    a, b = pairs[0]["channels"]
    what = "are the same file" if pairs[0]["same_file"] else "hold identical image data"
    more = f" (and {len(pairs) - 1} more pair(s))" if len(pairs) > 1 else ""
    return (f"the {a} and {b} images {what}{more}: the model sees one contrast twice; give each "
            f"channel its own image (--flair/--mprage or --image NAME=FILE)")


def check_inputs(image: np.ndarray, model, paths) -> tuple[dict, list[str]]:
    """Every input check of this module on one subject, as ``explain`` and ``predict`` run
    them before any work.

    Parameters
    ----------
    image : ndarray, shape (C, X, Y, Z)
        Raw intensities, in the order of ``model.channels``.
    model : SegmentationModel
    paths : sequence of path
        The input files, in the same order.

    Returns
    -------
    record : dict
        ``{"channel_order": ..., "identical_channels": ...}`` for ``run.json``'s ``checks``.
    warnings : list of str
        One line each (swapped channels, identical channels, a public training scan), in
        that order; empty when nothing is suspected.
    """
    order = channel_order_check(image, model.channels)
    same = identical_channels(image, model.channels, paths)
    lines = [swap_warning(order), identical_warning(same), training_scan_warning(model, paths)]
    return ({"channel_order": order, "identical_channels": same},
            [w for w in lines if w])


def swap_warning(check: dict | None) -> str | None:
    """The one-line warning for a suspected swap (None when nothing is suspected); the
    channels are named as the model names them."""
    if not check or not check["swapped_suspected"]:
        return None
    names = check.get("channels") or ("FLAIR", "T1")
    return (f"the {names[0]} and {names[1]} images look swapped: the {names[0]} image's "
            f"intensity histogram peaks at {check['flair']['mode_position']:.2f} of its range, "
            f"the {names[1]} image's at {check['t1']['mode_position']:.2f} (white matter is the "
            f"brightest tissue in T1, not in FLAIR); check --flair/--mprage (or --image names)")


def training_scan_warning(model, paths) -> str | None:
    """A one-line warning when an input file is one of the public scans (identified by its
    SHA256, :data:`instance_saliency.datasets.FILES`) that some members of ``model`` trained on
    (their ``trained_on``, names compared case-insensitively): its TP/FP/FN would then not be
    held-out figures. None otherwise.

    Parameters
    ----------
    model : SegmentationModel
        Its ``info["members_trained_on"]`` lists ``{"member", "trained_on"}`` per member.
    paths : iterable of path
        The input image files (only files of a plausible size are hashed).
    """
    import os

    from . import datasets

    used = getattr(model, "info", {}).get("members_trained_on") or []
    if not used:
        return None
    by_hash = {h: rel for rel, h in datasets.FILES.items()}
    for path in paths:
        try:
            if path is None or os.path.getsize(path) > 200e6:
                continue
            rel = by_hash.get(datasets.sha256sum(path))
        except OSError:
            continue
        if rel is None:
            continue
        subject = next((n for n, f in datasets.SUBJECTS.items()
                        if rel in (f.flair, f.mprage, f.mask)), None)
        saw = [u["member"] for u in used if subject
               and datasets.saw_any(u.get("trained_on"), [subject])]
        if subject and saw:
            return (f"{path} is the public scan {subject}, a training scan of model member(s) "
                    f"{', '.join(saw)}: its TP/FP/FN are not held-out figures (cohort and the "
                    "demo leave such members out; or pass --model with a fold folder that "
                    "never saw it)")
    return None
