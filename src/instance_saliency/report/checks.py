"""Figures and the HTML page of the per-lesion trust checks (:mod:`instance_saliency.checks`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .figures import _new_figure, _save
from .html import write_report

_LABELS = {"smoothgrad": "SmoothGrad", "gradcampp": "Grad-CAM++", "hirescam": "HiResCAM"}
_COLOURS = {"smoothgrad": "#1f77b4", "gradcampp": "#d62728", "hirescam": "#2ca02c",
            "random": "#7f7f7f", "model": "#000000"}


def _median_curve(df, x="x"):
    g = df.groupby(x)["value"]
    return g.median().index.to_numpy(float), g.median().to_numpy(float)


def randomisation_figure(curves, out_png) -> Path:
    """Median similarity (Spearman |map|, SSIM) of each method's maps against the trained
    network's, over cascading randomisation stages (one thin line per lesion)."""
    fig = _new_figure((8.0, 3.2))
    cur = curves[curves["check"] == "randomisation_cascading"]
    for i, var in enumerate(("spearman_abs", "ssim")):
        ax = fig.add_subplot(1, 2, i + 1)
        for method, g in cur[cur["variant"] == var].groupby("method"):
            col = _COLOURS.get(method, "k")
            for _, gl in g.groupby("label"):
                ax.plot(gl["x"], gl["value"], color=col, alpha=0.15, lw=0.8)
            xs, ys = _median_curve(g)
            ax.plot(np.r_[0, xs], np.r_[1.0, ys], "o-", color=col, label=_LABELS.get(method, method))
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="layers randomised (stage, from the output)",
               ylabel={"spearman_abs": "Spearman |map| vs trained", "ssim": "SSIM vs trained"}[var],
               ylim=(-0.3, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


def deletion_figure(curves, out_png, baseline: str = "background") -> Path:
    """Median lesion target (normalised by its unperturbed value) against the fraction of the
    neighbourhood removed, per method and for random order."""
    fig = _new_figure((8.0, 3.2))
    cur = curves[(curves["check"] == f"deletion_{baseline}") & (curves["variant"] == "target")]
    ax = fig.add_subplot(1, 2, 1)
    for method, g in cur.groupby(cur["method"].str.replace(r"random\d+", "random", regex=True)):
        norm = []
        for _, gl in g.groupby(["label", "method"]):
            t0 = gl.loc[gl["x"] == 0, "value"].iloc[0]
            if t0 != 0:
                norm.append(gl.assign(value=gl["value"] / abs(t0)))
        if not norm:
            continue
        import pandas as pd

        xs, ys = _median_curve(pd.concat(norm))
        ax.plot(xs, ys, "o-", color=_COLOURS.get(method, "k"), label=_LABELS.get(method, method))
    ax.set(xlabel="fraction of the neighbourhood removed", ylabel="target / |target at 0|",
           title=f"deletion ({baseline})")
    ax.legend(fontsize=7)
    det = curves[(curves["check"] == f"deletion_{baseline}") & (curves["variant"] == "detected")]
    ax = fig.add_subplot(1, 2, 2)
    for method, g in det.groupby(det["method"].str.replace(r"random\d+", "random", regex=True)):
        xs, ys = _median_curve(g)
        ax.plot(xs, ys, "o-", color=_COLOURS.get(method, "k"), label=_LABELS.get(method, method))
    ax.set(xlabel="fraction of the neighbourhood removed",
           ylabel="median fraction of lesion still detected", ylim=(-0.02, 1.02))
    fig.tight_layout()
    return _save(fig, out_png)


def context_figure(curves, out_png) -> Path:
    """Dice of the re-predicted lesion against the context shell kept (mm), per TP lesion."""
    fig = _new_figure((4.5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    cur = curves[(curves["check"] == "context") & (curves["variant"] == "dice")]
    for _, g in cur.groupby("label"):
        ax.plot(g["x"], g["value"], color="#1f77b4", alpha=0.25, lw=0.8)
    if len(cur):
        xs, ys = _median_curve(cur)
        ax.plot(xs, ys, "ko-", label="median")
        ax.legend(fontsize=7)
    ax.set(xlabel="context kept around the lesion (mm)", ylabel="Dice with the original lesion",
           ylim=(-0.02, 1.02), title="context (TP lesions)")
    fig.tight_layout()
    return _save(fig, out_png)


def write_checks_report(run_dir, rows, curves, summary) -> Path:
    """Write ``figures/checks_*.png`` and ``checks.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    figdir = run_dir / "figures"
    figs = []
    checks = set(rows["check"]) if len(rows) else set()
    if "randomisation" in checks:
        figs.append(("Model-parameter randomisation (cascading): similarity to the trained "
                     "network's map", randomisation_figure(curves, figdir / "checks_randomisation.png"),
                     "Randomisation"))
    if "deletion" in checks:
        for b in sorted({c.split("_", 1)[1] for c in set(curves["check"])
                         if c.startswith("deletion_")}):
            figs.append((f"Deletion curves, baseline {b}",
                         deletion_figure(curves, figdir / f"checks_deletion_{b}.png", b),
                         "Deletion"))
    if "context" in checks:
        figs.append(("Context experiment (seed paper): Dice against context kept",
                     context_figure(curves, figdir / "checks_context.png"), "Context"))
    cfg = summary.get("config", {})
    model = summary.get("model", {}) or {}
    head = {"lesions checked": len(summary.get("lesions", [])),
            "model": {k: model[k] for k in ("folder", "members", "members_trained_on")
                      if model.get(k)},
            "settings": {k: cfg[k] for k in ("checks", "methods", "n_samples", "margin_mm",
                                             "stages", "independent", "steps", "random_orders",
                                             "baselines", "context_mm", "detect_fraction",
                                             "max_lesions", "seed") if k in cfg},
            "cost (s)": summary.get("cost", {}),
            "explain run time (s)": summary.get("explain_total_s")}
    return write_report(run_dir / "checks.html", "instance-saliency: per-lesion checks", head,
                        rows, figs, notes=[verdict(summary.get("summary", {}))],
                        table_title="Checks (one row per lesion, method and check)")


def verdict(summary: dict) -> str:
    """One plain sentence per method from the medians of :func:`instance_saliency.checks.summarise`."""
    parts = []
    for method, d in sorted(summary.get("randomisation", {}).items()):
        s = d.get("median_spearman_abs_full")
        if s is not None:
            parts.append(f"{_LABELS.get(method, method)}: median Spearman |map| after full "
                         f"randomisation {s:.2f} (lower = the map depends more on the learned "
                         "weights; `analyze` applies the pass rule with subject-bootstrap CIs "
                         "over a cohort)")
    for method, d in sorted(summary.get("deletion", {}).items()):
        a = d.get("median_aopc_background_minus_random")
        if a is not None:
            parts.append(f"{_LABELS.get(method, method)}: median deletion AOPC minus random "
                         f"{a:+.3f} logit (positive = removing what the map ranks first lowers "
                         "the lesion's logit faster than random order)")
    ctx = summary.get("context", {}).get("model", {})
    if "median_recovery_mm" in ctx:
        parts.append(f"context: median recovery distance {ctx['median_recovery_mm']:.1f} mm "
                     "(seed paper: about 7 mm)")
    return "; ".join(parts) if parts else "no checks summarised"
