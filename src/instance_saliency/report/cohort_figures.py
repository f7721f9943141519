"""Figures of the cohort statistics (display only).

The numbers are computed by :func:`instance_saliency.stats.analyze` (``stats computes, report
draws``); the functions here only draw them. Like the per-lesion figures of
:mod:`instance_saliency.report.figures`, every figure is drawn on a private matplotlib
``Figure`` (no pyplot) and written atomically; a figure without data says so in its image
instead of failing.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .._format import fmt_number as _fmt
from .figures import (STATUS_COLOURS, _decorate_profile_axes, _message_figure, _new_figure,
                      _save)

__all__ = [
    "peak_by_status_figure",
    "profile_by_status_figure",
    "flair_share_figure",
    "error_flagging_roc_figure",
    "flagging_roc_figure",
    "cohort_figures",
]

#: lesion statuses compared across groups, in display order (as ``stats.STATUSES``)
_STATUSES = ("TP", "FP", "FN")


def _status(table) -> np.ndarray:
    if "status" not in table:
        return np.array([""] * len(table))
    return table["status"].astype(str).to_numpy()


def _num(table, col: str) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(table[col], errors="coerce").to_numpy(dtype=np.float64)


def peak_by_status_figure(instances, peak_by_status: dict, out_png) -> Path:
    """Box and dot plots of every peak feature by lesion status (TP, FP, FN).

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table (``status`` and the ``*_peak_max`` / ``*_peak_min`` columns).
    peak_by_status : dict
        Result of :func:`instance_saliency.stats.peak_by_status`: its ``features`` (name and
        ``kruskal_p``) choose the panels and their titles. Grad-CAM++ ``cam_peak_min`` (always
        0 after the ReLU) is not drawn.
    out_png : path

    Returns
    -------
    pathlib.Path
        The PNG written (a message figure when no lesion has a TP/FP/FN status).
    """
    status = _status(instances)
    feats = [f["feature"] for f in peak_by_status["features"]
             if not f["feature"].endswith("cam_peak_min")]
    present = [s for s in _STATUSES if (status == s).any()]
    if not (feats and present):
        return _message_figure(out_png, "no lesions with TP/FP/FN status",
                               "peak saliency by status")
    nc = min(3, len(feats))
    nr = math.ceil(len(feats) / nc)
    fig = _new_figure((3.3 * nc + 0.4, 2.9 * nr + 0.3))
    axes = fig.subplots(nr, nc, squeeze=False).ravel()
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.9, wspace=0.35, hspace=0.45)
    rng = np.random.default_rng(0)  # horizontal jitter of the dots only
    by = {f["feature"]: f for f in peak_by_status["features"]}
    for ax, feat in zip(axes, feats):
        x = _num(instances, feat)
        data = [x[np.isfinite(x) & (status == s)] for s in present]
        keep = [i for i, d in enumerate(data) if d.size]
        if keep:
            ax.boxplot([data[i] for i in keep], positions=keep, widths=0.5, showfliers=False)
        for i, (s, d) in enumerate(zip(present, data)):
            ax.scatter(i + rng.uniform(-0.15, 0.15, d.size), d, s=8, alpha=0.6,
                       color=STATUS_COLOURS.get(s, "#444"), edgecolors="none")
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present, fontsize=8)
        ax.axhline(0, color="0.6", lw=0.7)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{feat}\nKruskal-Wallis p = {_fmt(by[feat]['kruskal_p'])}", fontsize=8)
    for ax in axes[len(feats):]:
        ax.set_axis_off()
    fig.suptitle("peak saliency by lesion status", fontsize=10)
    return _save(fig, out_png)


def profile_by_status_figure(profiles: dict, method: str, out_png) -> Path:
    """Mean saliency against signed distance from the border, one line and band per status.

    Parameters
    ----------
    profiles : dict of str -> pandas.DataFrame
        Channel name -> result of :func:`instance_saliency.stats.profile_by_status` (columns
        ``status, distance_mm, mean, ci_low, ci_high, n``), one panel per channel.
    method : str
        Saliency method, for the titles.
    out_png : path

    Returns
    -------
    pathlib.Path
        The PNG written (a message figure when there is no profile).
    """
    if not (profiles and any(len(p) for p in profiles.values())):
        return _message_figure(out_png, "no profiles", "distance profile")
    fig = _new_figure((4.4 * len(profiles) + 0.3, 3.4))
    axes = fig.subplots(1, len(profiles), squeeze=False)[0]
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, top=0.85, wspace=0.3)
    for ax, (ch, p) in zip(axes, profiles.items()):
        groups = [s for s in _STATUSES if (p["status"] == s).any()] or ["all"]
        for s in groups:
            g = p[p["status"] == s].sort_values("distance_mm")
            col = STATUS_COLOURS.get(s, "#444444")
            ax.plot(g["distance_mm"], g["mean"], color=col, lw=2,
                    label=f"{s} (n ≤ {int(g['n'].max())})")
            ax.fill_between(g["distance_mm"], g["ci_low"], g["ci_high"], color=col, alpha=0.2,
                            lw=0)
        _decorate_profile_axes(ax, f"{method} {ch.upper()}", label_size=8)
    fig.suptitle("saliency profile by status (band: 95% t-interval over lesions)", fontsize=9)
    return _save(fig, out_png)


def flair_share_figure(instances, method: str, flair_vs_mprage: dict, out_png) -> Path:
    """Histogram of the per-lesion FLAIR share ``{method}_flair_share``, stacked by status.

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table.
    method : str
        Column prefix.
    flair_vs_mprage : dict
        Result of :func:`instance_saliency.stats.flair_vs_mprage`; its ``share.median`` is
        drawn as a line.
    out_png : path

    Returns
    -------
    pathlib.Path
        The PNG written (a message figure when no lesion has a finite share).
    """
    status = _status(instances)
    col = f"{method}_flair_share"
    if not (col in instances and np.isfinite(_num(instances, col)).any()):
        return _message_figure(out_png, "no FLAIR share values", "FLAIR share")
    s = _num(instances, col)
    groups = [g for g in (*_STATUSES, "unknown") if (np.isfinite(s) & (status == g)).any()]
    fig = _new_figure((4.6, 3.3))
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.15, top=0.88)
    ax.hist([np.clip(s[np.isfinite(s) & (status == g)], 0, 1) for g in groups],
            bins=np.linspace(0, 1, 21), stacked=True, label=groups,
            color=[STATUS_COLOURS.get(g, "#444") for g in groups])
    sh = flair_vs_mprage.get("share", {})
    ax.axvline(0.5, color="k", ls="--", lw=0.9)
    if sh and sh.get("median") is not None and math.isfinite(sh["median"]):
        ax.axvline(sh["median"], color="C3", lw=1.5, label=f"median {_fmt(sh['median'])}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("FLAIR share of |saliency| (lesion + 2 mm)", fontsize=8)
    ax.set_ylabel("lesions", fontsize=8)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{method}: FLAIR share", fontsize=10)
    return _save(fig, out_png)


def error_flagging_roc_figure(instances, flag_errors: dict, peak_by_status: dict,
                              out_png) -> Path:
    """ROC of flagging FP lesions: the out-of-fold classifier and the first 4 peak features.

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table (``status`` and the peak columns).
    flag_errors : dict
        Result of :func:`instance_saliency.flagging.flag_errors` (``status``, ``predictions``
        with ``status`` and ``prob_fp``, ``auc``).
    peak_by_status : dict
        Result of :func:`instance_saliency.stats.peak_by_status` (single-feature AUCs, drawn
        in-sample for reference).
    out_png : path

    Returns
    -------
    pathlib.Path
        The PNG written (a message figure when the classifier was not fitted).
    """
    if flag_errors["status"] != "ok":
        return _message_figure(out_png, "not enough data", "flagging FP lesions")
    from sklearn.metrics import roc_curve

    status = _status(instances)
    pr = flag_errors["predictions"]
    ok = np.isfinite(pr["prob_fp"].to_numpy(dtype=float))
    yv = (pr["status"] == "FP").to_numpy()[ok]
    fig = _new_figure((4.2, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.9)
    fpr, tpr, _ = roc_curve(yv, pr["prob_fp"].to_numpy(dtype=float)[ok])
    ax.plot(fpr, tpr, color="C3", lw=2,
            label=f"logistic, out-of-fold (AUC {_fmt(flag_errors['auc']['auc'])})")
    sel = np.isin(status, ("TP", "FP"))
    for k, f in enumerate(peak_by_status["features"][:4]):
        x = _num(instances, f["feature"])[sel]
        yy = status[sel] == "FP"
        good = np.isfinite(x)
        if yy[good].any() and (~yy[good]).any():
            a, b, _ = roc_curve(yy[good], x[good])
            ax.plot(a, b, lw=0.9, alpha=0.7, color=f"C{k}",
                    label=f"{f['feature']} (AUC {_fmt(f['auc_fp_vs_tp']['auc'])})")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    ax.set_xlabel("false-positive rate (TP lesions flagged)", fontsize=8)
    ax.set_ylabel("true-positive rate (FP lesions flagged)", fontsize=8)
    ax.legend(fontsize=6, frameon=False, loc="lower right")
    ax.set_title("flagging FP lesions (single features: in-sample)", fontsize=9)
    return _save(fig, out_png)


def flagging_roc_figure(flagging: dict, out_png) -> Path:
    """Out-of-fold ROC of flagging FP lesions: baseline versus baseline + each method.

    Parameters
    ----------
    flagging : dict
        Result of :func:`instance_saliency.flagging.compare_feature_sets` (``status``,
        ``baseline``, ``methods`` and ``predictions`` with ``status``, ``prob_fp_baseline``
        and ``prob_fp_{method}``).
    out_png : path

    Returns
    -------
    pathlib.Path
        The PNG written (a message figure when there was not enough data).
    """
    if flagging["status"] != "ok":
        return _message_figure(out_png, "not enough data", "flagging FP lesions")
    from sklearn.metrics import roc_curve

    from ..flagging import METHOD_LABELS

    pr = flagging["predictions"]
    y = (pr["status"] == "FP").to_numpy()
    fig = _new_figure((4.4, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.12, top=0.9)
    curves = [("size + probability", "prob_fp_baseline", flagging["baseline"]["auc"]["auc"],
               "0.25")]
    curves += [(f"+ {METHOD_LABELS.get(m, m)}", f"prob_fp_{m}", e["saliency"]["auc"]["auc"],
                f"C{k + 3}") for k, (m, e) in enumerate(flagging["methods"].items())]
    for name, col, auc, colour in curves:
        p = pr[col].to_numpy(dtype=float)
        ok = np.isfinite(p)
        if y[ok].any() and (~y[ok]).any():
            a, b, _ = roc_curve(y[ok], p[ok])
            ax.plot(a, b, lw=1.6, color=colour, label=f"{name} (AUC {_fmt(auc)})")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=0.8)
    ax.set_xlabel("false-positive rate (TP lesions flagged)", fontsize=8)
    ax.set_ylabel("true-positive rate (FP lesions flagged)", fontsize=8)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title("flagging FP lesions, out of fold (nested, by subject)", fontsize=9)
    return _save(fig, out_png)


def cohort_figures(figdir, instances, profiles: dict, res: dict) -> list:
    """Draw the four cohort figures into ``figdir``.

    Parameters
    ----------
    figdir : path
        Folder of ``peak_by_status.png``, ``profile_by_status.png``, ``flair_share.png`` and
        ``roc_error_flagging.png`` (created if needed).
    instances : pandas.DataFrame
        Pooled lesion table.
    profiles : dict of str -> pandas.DataFrame
        Channel -> :func:`instance_saliency.stats.profile_by_status` result.
    res : dict
        The statistics of :func:`instance_saliency.stats.analyze` (``method``,
        ``peak_by_status``, ``flair_vs_mprage``, ``flag_errors`` as returned by
        :func:`instance_saliency.flagging.compare_feature_sets`).

    Returns
    -------
    list of (str, pathlib.Path, str)
        ``(caption, png, section)`` per figure, as taken by
        :func:`instance_saliency.report.write_report`.
    """
    figdir = Path(figdir)
    return [
        ("Peak saliency by lesion status (box: quartiles; dots: lesions)",
         peak_by_status_figure(instances, res["peak_by_status"],
                               figdir / "peak_by_status.png"), "Cohort"),
        ("Mean saliency against signed distance from the border, by status",
         profile_by_status_figure(profiles, res["method"], figdir / "profile_by_status.png"),
         "Cohort"),
        ("FLAIR share of the saliency magnitude per lesion",
         flair_share_figure(instances, res["method"], res["flair_vs_mprage"],
                            figdir / "flair_share.png"), "Cohort"),
        ("ROC of flagging FP lesions out of fold (subject-grouped nested CV): lesion size and "
         "probability alone versus with each method's saliency features",
         flagging_roc_figure(res["flag_errors"], figdir / "roc_error_flagging.png"), "Cohort"),
    ]
