"""Cohort statistics of per-lesion saliency: TP vs FP vs FN, FLAIR vs MPRAGE, lesion vs rim;
:func:`analyze` also runs the false-positive flagging comparison of
:mod:`instance_saliency.flagging` (features: :mod:`instance_saliency.features`).

Input: the pooled per-lesion tables written by :func:`instance_saliency.explain.explain` for many
subjects (``instances.csv``, ``profiles.csv``; see the README, "Outputs"), one row per lesion
with a ``subject`` column. Every function here is a pure function of those tables (no NIfTI).
:func:`analyze` runs them all on a cohort folder written by
:func:`instance_saliency.cohort.run_cohort` and writes ``stats.json``, ``stats.md``, figures (drawn
by :mod:`instance_saliency.report.cohort_figures`) and ``cohort_report.html``.

The questions follow the cohort findings of Spagnolo et al. [1]_: saliency is positive inside
lesions and negative in the rim around them, FLAIR dominates over MPRAGE, and the peak saliency
differs between true- and false-positive lesions, so it can flag segmentation errors.

Lesions of one subject are not independent (same scan, same noise, same model behaviour), so
every confidence interval that is meant for inference resamples *subjects* (cluster bootstrap
[7]_), and the error-flagging classifier is validated with subject-grouped cross-validation.
The rank tests (Kruskal-Wallis, Mann-Whitney, Wilcoxon, binomial) treat lesions as independent,
as in [1]_; read their p-values as descriptive when a few subjects contribute most lesions.

References
----------
.. [1] F. Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
   segmentation", arXiv:2406.09335, 2024.
.. [2] W. H. Kruskal and W. A. Wallis, "Use of ranks in one-criterion variance analysis",
   JASA 47(260), 583-621, 1952.
.. [3] H. B. Mann and D. R. Whitney, "On a test of whether one of two random variables is
   stochastically larger than the other", Ann. Math. Statist. 18(1), 50-60, 1947.
.. [4] S. Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist.
   6(2), 65-70, 1979.
.. [5] D. S. Kerby, "The simple difference formula: an approach to teaching nonparametric
   correlation", Comprehensive Psychology 3, 2014 (rank-biserial r = 1 - 2U/(n1 n2), after
   H. W. Wendt, Eur. J. Soc. Psychol. 2(4), 463-465, 1972).
.. [6] J. A. Hanley and B. J. McNeil, "The meaning and use of the area under a receiver
   operating characteristic (ROC) curve", Radiology 143(1), 29-36, 1982 (AUC = U/(n1 n2)).
.. [7] C. A. Field and A. H. Welsh, "Bootstrapping clustered data", J. R. Statist. Soc. B
   69(3), 369-390, 2007.
.. [8] F. Wilcoxon, "Individual comparisons by ranking methods", Biometrics Bulletin 1(6),
   80-83, 1945.
.. [9] C. J. Clopper and E. S. Pearson, "The use of confidence or fiducial limits illustrated in
   the case of the binomial", Biometrika 26(4), 404-413, 1934.
.. [10] W. J. Youden, "Index for rating diagnostic tests", Cancer 3(1), 32-35, 1950.
.. [11] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional shifts",
   arXiv:2206.15407, 2022 (lesion F1 = TP / (TP + (FP + FN) / 2)).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from ._format import fmt_number as _f
from .errors import InputError, OutputError

__all__ = [
    "STATUSES",
    "pool_instances",
    "holm",
    "rank_biserial",
    "subject_bootstrap",
    "peak_by_status",
    "flair_vs_mprage",
    "profile_by_status",
    "sign_pattern",
    "lesion_features",
    "choose_threshold",
    "detection_counts",
    "flag_errors",
    "analyze",
]

#: lesion statuses compared across groups (``unknown`` rows, without ground truth, are left out)
STATUSES = ("TP", "FP", "FN")
#: pairs of statuses for the post-hoc Mann-Whitney tests, in this order
PAIRS = (("TP", "FP"), ("TP", "FN"), ("FP", "FN"))
#: groups with fewer values than this are left out of a rank test
MIN_GROUP = 2

_PEAK_RE = re.compile(r"^(.+)_peak_(max|min)$")


# --------------------------------------------------------------------------------------------
# pooling


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:  # a subject without lesions writes an empty table
        return pd.DataFrame()
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def pool_instances(out: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pool the per-lesion tables of every complete subject of a cohort folder.

    Reads ``out/subjects/<subject>/instances_full.csv`` and ``profiles_full.csv`` (full
    precision; the rounded ``instances.csv`` / ``profiles.csv`` of runs that lack them) of
    every subject folder that holds a ``run.json`` (a finished run; hidden staging folders are
    skipped) and prepends a ``subject`` column (the folder name, as text).

    Parameters
    ----------
    out : path
        Cohort output folder (see :func:`instance_saliency.cohort.run_cohort`).

    Returns
    -------
    instances : pandas.DataFrame
        One row per lesion of all subjects (columns of ``instances.csv`` plus ``subject``);
        the union of the subjects' columns (a method missing in one subject is NaN there).
        The attribute ``instances.attrs["subjects"]`` lists every pooled subject, including
        those without any lesion.
    profiles : pandas.DataFrame
        Rows of all ``profiles.csv`` with ``subject`` prepended (columns ``subject, label,
        status, method, channel, distance_mm, mean, voxels``).

    Raises
    ------
    InputError
        No subject folder with ``instances.csv`` under ``out/subjects``, or a table cannot be
        read.
    """
    root = Path(out) / "subjects"
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / "run.json").is_file() and (p / "instances.csv").is_file()) \
        if root.is_dir() else []
    if not dirs:
        if (Path(out) / "run.json").is_file():
            raise InputError(f"{out} is the output of one explain run; analyze needs a cohort "
                             "folder (instance-saliency cohort --data DATA --out COHORT, then "
                             "instance-saliency analyze COHORT)")
        raise InputError(f"no subjects with instances.csv under {root}")
    inst, prof = [], []
    for d in dirs:
        # full precision when the run wrote it (instances_full.csv), else the rounded table
        full = d / "instances_full.csv"
        t = _read_csv(full if full.is_file() else d / "instances.csv")
        t = t.copy()  # one block: inserting into a wide table read from CSV warns otherwise
        t.insert(0, "subject", d.name)
        inst.append(t)
        pf = d / "profiles_full.csv"
        pf = pf if pf.is_file() else d / "profiles.csv"
        if pf.is_file():
            p = _read_csv(pf)
            p.insert(0, "subject", d.name)
            prof.append(p)
    inst = [t for t in inst if len(t)]
    prof = [p for p in prof if len(p)]
    instances = (pd.concat(inst, ignore_index=True, sort=False) if inst
                 else pd.DataFrame(columns=["subject", "label", "status"]))
    profiles = (pd.concat(prof, ignore_index=True, sort=False) if prof
                else pd.DataFrame(columns=["subject", "label", "status", "method", "channel",
                                           "distance_mm", "mean", "voxels"]))
    instances["subject"] = instances["subject"].astype(str)
    profiles["subject"] = profiles["subject"].astype(str)
    instances, profiles = _canonical_channels(instances, profiles)
    instances.attrs["subjects"] = [d.name for d in dirs]
    return instances, profiles


def _canonical_channels(instances: pd.DataFrame, profiles: pd.DataFrame):
    """Name the channels as the statistics do: a model's T1-weighted channel (``t1``, ``t1w``,
    ``mprage``, ...) becomes ``mprage`` and its FLAIR channel (``flair``, ``t2_flair``, ...)
    ``flair``, so cohorts explained with nnU-Net models (e.g. channels FLAIR, T1) get the same
    FLAIR-versus-MPRAGE and rim analyses."""
    from .models.channels import canonical

    names = {"t1": "mprage", "flair": "flair"}
    methods = {c.split("_")[0] for c in instances.columns if "_" in c}
    rename = {}
    for col in instances.columns:
        for m in methods:
            pre = f"{m}_"
            if not col.startswith(pre):
                continue
            rest = col[len(pre):]
            # map features ({ch}_fo_, _glcm_, _glszm_...) and rims ({ch}_rim_...): the channel
            # is what precedes the first marker
            marks = [rest.find(k) for k in ("_fo_", "_glcm_", "_glszm_", "_rim_") if k in rest]
            ch = rest[:min(marks)] if marks else next(
                (rest[: -len(sfx)] for sfx in ("_peak_max", "_peak_min", "_mean_in", "_sum_in",
                                               "_sum_abs", "_share") if rest.endswith(sfx)),
                None)
            if ch:
                new = names.get(canonical(ch))
                if new and new != ch:
                    rename[col] = pre + new + rest[len(ch):]
                break
    if rename:
        instances = instances.rename(columns=rename)
    if len(profiles) and "channel" in profiles:
        profiles = profiles.assign(channel=[names.get(canonical(c), c)
                                            for c in profiles["channel"].astype(str)])
    return instances, profiles


# --------------------------------------------------------------------------------------------
# building blocks


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjustment of a family of p-values [4]_.

    With the ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted
    values are ``q_(j) = min(1, max_{i <= j} (m - i + 1) p_(i))``. NaN p-values are left NaN
    and do not count in ``m``.

    Parameters
    ----------
    pvalues : sequence of float, length k

    Returns
    -------
    ndarray, float64, shape (k,)
        Adjusted p-values in the input order.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
        res = np.empty(m)
        res[order] = adj
        out[ok] = res
    return out


def rank_biserial(u: float, n1: int, n2: int) -> float:
    """Rank-biserial correlation from a Mann-Whitney U [5]_: ``r = 1 - 2 U / (n1 n2)``.

    ``U`` is the statistic of the *first* sample ``a`` (number of pairs with ``a > b``, ties
    counting 1/2; what :func:`scipy.stats.mannwhitneyu` returns for ``(a, b)``), so
    ``r = P(b > a) - P(a > b)``: **positive when the second group tends to have larger
    values**, in [-1, 1].
    """
    if n1 <= 0 or n2 <= 0:
        return float("nan")
    return 1.0 - 2.0 * float(u) / (n1 * n2)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """AUC by ranks (= Mann-Whitney U of the positives / (n1 n0), ties 1/2) [6]_."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


#: fewer subjects than this give no bootstrap CI: with 2 subjects there are only 3 distinct
#: resamples ({a, a}, {b, b}, {a, b}), whose percentiles are often one value (a zero-width
#: "interval") that says nothing about the uncertainty
MIN_BOOT_SUBJECTS = 3


def subject_bootstrap(subjects: Sequence, statistic: Callable[[np.ndarray], float],
                      n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile confidence interval by resampling subjects (cluster bootstrap) [7]_.

    Each replicate draws as many subjects as there are, with replacement, and pools all their
    rows (a subject drawn twice contributes its rows twice); ``statistic`` is evaluated on the
    row indices of that pool. Replicates where it returns NaN (e.g. an AUC on a pool with one
    class only) are skipped and counted.

    Parameters
    ----------
    subjects : sequence, length n
        Subject of each row.
    statistic : callable
        ``statistic(idx) -> float`` with ``idx`` an int array of row indices (repeats allowed).
    n_boot : int
        Number of replicates.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the same seed gives the same interval.
    level : float
        Coverage of the interval, in (0, 1).

    Returns
    -------
    dict
        ``estimate`` (statistic on all rows), ``ci_low``, ``ci_high`` (percentiles
        ``(1 - level) / 2`` and ``(1 + level) / 2`` of the valid replicates; NaN when none),
        ``n_boot`` (requested), ``n_valid`` (replicates used), ``level``, ``n_subjects``,
        and ``ci_note`` (why the CI is NaN, else absent). With fewer than
        :data:`MIN_BOOT_SUBJECTS` subjects the CI is not estimable: ``ci_low`` / ``ci_high``
        are NaN and no replicate is drawn.
    """
    subjects = np.asarray(subjects).astype(str)
    n = subjects.size
    estimate = float(statistic(np.arange(n))) if n else float("nan")
    uniq, codes = np.unique(subjects, return_inverse=True)
    rows = [np.flatnonzero(codes == k) for k in range(uniq.size)]
    rng = np.random.default_rng(seed)
    vals = []
    note = None
    if uniq.size < MIN_BOOT_SUBJECTS:
        note = (f"not estimable: {uniq.size} subject(s), a subject bootstrap needs at least "
                f"{MIN_BOOT_SUBJECTS}")
    elif n_boot > 0:
        for _ in range(int(n_boot)):
            pick = rng.integers(0, uniq.size, uniq.size)
            v = float(statistic(np.concatenate([rows[k] for k in pick])))
            if math.isfinite(v):
                vals.append(v)
    a = (1.0 - level) / 2.0
    lo, hi = (np.percentile(vals, [100 * a, 100 * (1 - a)]) if vals else (np.nan, np.nan))
    if note is None and not vals:
        note = "not estimable: no bootstrap replicate gave a finite value"
    res = {"estimate": estimate, "ci_low": float(lo), "ci_high": float(hi),
           "n_boot": int(n_boot), "n_valid": len(vals), "level": level,
           "n_subjects": int(uniq.size)}
    if note:
        res["ci_note"] = note
    return res


def _status(df: pd.DataFrame) -> np.ndarray:
    return df["status"].astype(str).to_numpy() if "status" in df else np.array([""] * len(df))


def _num(df: pd.DataFrame, col: str) -> np.ndarray:
    return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)


# --------------------------------------------------------------------------------------------
# 1. peak saliency by status


def peak_features(columns: Sequence[str]) -> list:
    """The ``*_peak_max`` / ``*_peak_min`` columns, in table order."""
    return [c for c in columns if _PEAK_RE.match(str(c))]


def peak_by_status(instances: pd.DataFrame, features: Sequence[str] | None = None,
                   n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Compare peak saliency between TP, FP and FN lesions.

    For each feature (default: every ``*_peak_max`` and ``*_peak_min`` column), NaN values
    dropped:

    * **Kruskal-Wallis H** across the status groups [2]_ (:func:`scipy.stats.kruskal`); groups
      with fewer than 2 values are left out; NaN when fewer than 2 groups remain (or all
      values are equal).
    * **Mann-Whitney U**, two-sided [3]_, for each pair ``(a, b)`` of :data:`PAIRS`
      (TP-FP, TP-FN, FP-FN), with ``U`` the statistic of ``a``; the p-values of the pairs of
      one feature are **Holm-adjusted** [4]_ (:func:`holm`).
    * **rank-biserial r** = ``1 - 2 U / (n_a n_b)`` [5]_ = ``P(b > a) - P(a > b)``: positive
      when group ``b`` has larger values (e.g. r > 0 for TP-FP means FP peaks are higher).
    * **AUC of the feature for TP vs FP**, positive class FP
      (:func:`sklearn.metrics.roc_auc_score`): the probability that a random FP lesion has a
      larger value than a random TP lesion, ``AUC = U_FP / (n_FP n_TP)`` [6]_; AUC < 0.5 means
      FP values are lower. Its ``level`` CI resamples subjects (:func:`subject_bootstrap`).

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table with ``subject``, ``status`` and the feature columns.
    features : sequence of str, optional
        Columns to test (default: :func:`peak_features`).
    n_boot, seed, level :
        Bootstrap of the AUC CI, see :func:`subject_bootstrap`.

    Returns
    -------
    dict
        ``features``: list of dicts, one per feature, with ``feature``, ``n`` (status -> count),
        ``median`` (status -> median), ``kruskal_h``, ``kruskal_p``, ``groups_tested``,
        ``pairs`` (list of dicts ``a, b, n_a, n_b, u, p, p_holm, rank_biserial``) and
        ``auc_fp_vs_tp`` (dict ``auc, ci_low, ci_high, n_valid, n_boot, n_tp, n_fp``).
    """
    from scipy.stats import kruskal, mannwhitneyu
    from sklearn.metrics import roc_auc_score

    features = list(features) if features is not None else peak_features(instances.columns)
    status = _status(instances)
    subj = instances["subject"].astype(str).to_numpy() if "subject" in instances \
        else np.zeros(len(instances), dtype=str)
    results = []
    for feat in features:
        x = _num(instances, feat)
        ok = np.isfinite(x)
        groups = {s: x[ok & (status == s)] for s in STATUSES}
        tested = [s for s in STATUSES if groups[s].size >= MIN_GROUP]
        h = p = float("nan")
        if len(tested) >= 2:
            try:
                with warnings.catch_warnings():  # all values identical -> NaN (or ValueError)
                    warnings.simplefilter("ignore", RuntimeWarning)
                    h, p = (float(v) for v in kruskal(*[groups[s] for s in tested]))
            except ValueError:
                pass
        pairs = []
        for a, b in PAIRS:
            xa, xb = groups[a], groups[b]
            row = {"a": a, "b": b, "n_a": int(xa.size), "n_b": int(xb.size), "u": float("nan"),
                   "p": float("nan"), "rank_biserial": float("nan")}
            if xa.size >= MIN_GROUP and xb.size >= MIN_GROUP:
                res = mannwhitneyu(xa, xb, alternative="two-sided")
                row["u"] = float(res.statistic)
                row["p"] = float(res.pvalue)
                row["rank_biserial"] = rank_biserial(res.statistic, xa.size, xb.size)
            pairs.append(row)
        for row, q in zip(pairs, holm([r["p"] for r in pairs])):
            row["p_holm"] = float(q)
        sel = ok & np.isin(status, ("TP", "FP"))
        y = status[sel] == "FP"
        xs = x[sel]
        auc = {"auc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
               "n_valid": 0, "n_boot": int(n_boot), "n_tp": int((~y).sum()),
               "n_fp": int(y.sum())}
        if y.any() and (~y).any():
            auc["auc"] = float(roc_auc_score(y, xs))
            bs = subject_bootstrap(subj[sel], lambda i: _auc(y[i], xs[i]), n_boot, seed, level)
            auc.update(ci_low=bs["ci_low"], ci_high=bs["ci_high"], n_valid=bs["n_valid"])
            if "ci_note" in bs:
                auc["ci_note"] = bs["ci_note"]
        results.append({
            "feature": feat,
            "n": {s: int(groups[s].size) for s in STATUSES},
            "median": {s: (float(np.median(groups[s])) if groups[s].size else float("nan"))
                       for s in STATUSES},
            "kruskal_h": h, "kruskal_p": p, "groups_tested": tested,
            "pairs": pairs, "auc_fp_vs_tp": auc,
        })
    return {"features": results, "level": level}


# --------------------------------------------------------------------------------------------
# 2. FLAIR versus MPRAGE


def flair_vs_mprage(instances: pd.DataFrame, method: str = "smoothgrad", n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Per-lesion comparison of the saliency magnitude of FLAIR and MPRAGE.

    * Paired magnitude: ``{method}_{ch}_sum_abs`` (sum of ``|S|`` over the lesion dilated by
      2 mm, the region of the share) when the table has it for both channels, else
      ``|{method}_{ch}_mean_in|`` (absolute signed lesion mean; the lesion size is the same for
      both channels, so this compares per-voxel magnitudes).
      Wilcoxon signed-rank test, two-sided, on the paired values [8]_
      (:func:`scipy.stats.wilcoxon`, zero differences dropped, its default).
    * FLAIR share ``{method}_flair_share`` = Σ|S_FLAIR| / (Σ|S_FLAIR| + Σ|S_MPRAGE|) over the
      lesion dilated by 2 mm (see :func:`instance_saliency.quantify.quantify_instance`): its
      median over lesions, with a ``level`` CI resampling subjects
      (:func:`subject_bootstrap`), and per status.

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table.
    method : str
        Column prefix (``"smoothgrad"``; Grad-CAM++ has no per-modality maps).
    n_boot, seed, level :
        Bootstrap of the median share, see :func:`subject_bootstrap`.

    Returns
    -------
    dict
        ``quantity``, ``n`` (lesions with both values), ``median_flair``, ``median_mprage``,
        ``median_difference`` (FLAIR - MPRAGE), ``fraction_flair_larger``, ``wilcoxon_w``,
        ``wilcoxon_p``, and ``share`` (``median, ci_low, ci_high, n, n_valid, by_status``).
        ``available`` is False (with ``reason``) when the columns are missing.
    """
    from scipy.stats import wilcoxon

    cols_sum = [f"{method}_{c}_sum_abs" for c in ("flair", "mprage")]
    cols_mean = [f"{method}_{c}_mean_in" for c in ("flair", "mprage")]
    if all(c in instances for c in cols_sum):
        quantity, cols = "sum_abs", cols_sum
    elif all(c in instances for c in cols_mean):
        quantity, cols = "abs_mean_in", cols_mean
    else:
        return {"available": False, "reason": f"no {method} FLAIR/MPRAGE columns"}
    a, b = np.abs(_num(instances, cols[0])), np.abs(_num(instances, cols[1]))
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    res = {"available": True, "quantity": quantity, "columns": cols, "n": int(a.size),
           "median_flair": float(np.median(a)) if a.size else float("nan"),
           "median_mprage": float(np.median(b)) if b.size else float("nan"),
           "median_difference": float(np.median(a - b)) if a.size else float("nan"),
           "fraction_flair_larger": float(np.mean(a > b)) if a.size else float("nan"),
           "wilcoxon_w": float("nan"), "wilcoxon_p": float("nan")}
    if a.size and np.any(a != b):
        try:
            w = wilcoxon(a, b, alternative="two-sided")
            res["wilcoxon_w"], res["wilcoxon_p"] = float(w.statistic), float(w.pvalue)
        except ValueError:
            pass
    share_col = f"{method}_flair_share"
    if share_col in instances:
        s = _num(instances, share_col)
        oks = np.isfinite(s)
        sv = s[oks]
        subj = instances["subject"].astype(str).to_numpy()[oks]
        status = _status(instances)[oks]
        bs = subject_bootstrap(subj, lambda i: float(np.median(sv[i])) if i.size else np.nan,
                               n_boot, seed, level) if sv.size else None
        res["share"] = {
            "column": share_col, "n": int(sv.size),
            "median": float(np.median(sv)) if sv.size else float("nan"),
            "ci_low": bs["ci_low"] if bs else float("nan"),
            "ci_high": bs["ci_high"] if bs else float("nan"),
            "n_valid": bs["n_valid"] if bs else 0, "level": level,
            **({"ci_note": bs["ci_note"]} if bs and "ci_note" in bs else {}),
            "fraction_above_half": float(np.mean(sv > 0.5)) if sv.size else float("nan"),
            "by_status": {st: {"n": int((status == st).sum()),
                               "median": float(np.median(sv[status == st]))
                               if (status == st).any() else float("nan")}
                          for st in STATUSES},
        }
    return res


# --------------------------------------------------------------------------------------------
# 3. lesion versus rim


def profile_by_status(profiles: pd.DataFrame, method: str = "smoothgrad",
                      channel: str = "flair", level: float = 0.95) -> pd.DataFrame:
    """Mean saliency profile against signed distance from the border, per status, with a CI.

    Each lesion contributes one value per distance bin (its mean saliency in the bin, from
    ``profiles.csv``; empty bins are NaN and skipped). Per status (TP, FP, FN, and ``all``)
    and bin: the mean over lesions and a **t-interval over lesions**,
    ``mean ± t_{(1+level)/2, n-1} · sd / sqrt(n)`` (sd with ddof 1). The t-interval treats
    lesions as independent, ignoring that lesions of one subject are correlated: it is a
    descriptive band, narrower than a subject-level interval would be.

    Parameters
    ----------
    profiles : pandas.DataFrame
        Pooled ``profiles.csv`` (``subject, label, status, method, channel, distance_mm,
        mean``).
    method, channel : str
        Which profiles (``channel`` lowercase: ``flair``, ``mprage``, ``cam``).
    level : float
        Coverage of the interval.

    Returns
    -------
    pandas.DataFrame
        Columns ``status, distance_mm, n, mean, sd, ci_low, ci_high`` (CI NaN when n < 2),
        sorted by status then distance.
    """
    from scipy.stats import t as t_dist

    cols = ["status", "distance_mm", "n", "mean", "sd", "ci_low", "ci_high"]
    if profiles is None or not len(profiles):
        return pd.DataFrame(columns=cols)
    p = profiles[(profiles["method"].astype(str) == method)
                 & (profiles["channel"].astype(str).str.lower() == channel.lower())].copy()
    p["mean"] = pd.to_numeric(p["mean"], errors="coerce")
    p["distance_mm"] = pd.to_numeric(p["distance_mm"], errors="coerce")
    p = p[np.isfinite(p["mean"]) & np.isfinite(p["distance_mm"])]
    rows = []
    groups = [(s, p[p["status"].astype(str) == s]) for s in STATUSES] + [("all", p)]
    for s, g in groups:
        for d, v in g.groupby("distance_mm")["mean"]:
            v = v.to_numpy(dtype=np.float64)
            n = v.size
            m = float(v.mean())
            sd = float(v.std(ddof=1)) if n >= 2 else float("nan")
            half = (float(t_dist.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
                    if n >= 2 else float("nan"))
            rows.append({"status": s, "distance_mm": float(d), "n": n, "mean": m, "sd": sd,
                         "ci_low": m - half, "ci_high": m + half})
    return pd.DataFrame(rows, columns=cols)


def sign_pattern(instances: pd.DataFrame, method: str = "smoothgrad", channel: str = "flair",
                 rim_mm: Sequence[int] = (1, 2, 3), p0: float = 0.25,
                 alternative: str = "two-sided", level: float = 0.95) -> dict:
    """Proportion of lesions with positive saliency inside and negative saliency in the rim.

    A lesion shows the pattern when ``{method}_{channel}_mean_in > 0`` **and** the rim mean —
    the unweighted mean of the shell means ``{method}_{channel}_rim_out_{k}mm`` for ``k`` in
    ``rim_mm`` (default the 1-3 mm rim outside the border; NaN shells skipped) — is ``< 0``.
    Lesions without a finite inside value or rim mean are left out. Exact binomial test
    (:func:`scipy.stats.binomtest`) of the count against ``p0``, with a Clopper-Pearson CI of
    the proportion [9]_, overall and per status.

    Why ``p0 = 0.25``: with no systematic effect, the sign of each of the two quantities is
    positive or negative with probability about 1/2, so both hold together with probability
    about 1/2 · 1/2 = 1/4 if they are independent. A proportion well above 1/4 supports the
    paper's "positive inside, negative in the rim" finding [1]_. ``p0`` is a parameter
    because independence is an assumption (neighbouring shells share voxels' smoothing).

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table.
    method, channel : str
        Which saliency (default FLAIR SmoothGrad).
    rim_mm : sequence of int
        Outside shells averaged into the rim mean.
    p0 : float
        Null proportion, in (0, 1).
    alternative : {"two-sided", "greater", "less"}
        Alternative of :func:`scipy.stats.binomtest`.
    level : float
        Coverage of the Clopper-Pearson interval.

    Returns
    -------
    dict
        ``available``; ``overall`` and ``by_status`` (status -> dict) each with ``n``, ``k``
        (lesions with the pattern), ``proportion``, ``ci_low``, ``ci_high``, ``p`` (binomial
        test), ``fraction_positive_inside``, ``fraction_negative_rim``; plus ``p0``,
        ``alternative``, ``rim_columns``.

    Raises
    ------
    InputError
        ``p0`` not in (0, 1).
    """
    from scipy.stats import binomtest

    if not (0 < p0 < 1):
        raise InputError(f"p0 must lie strictly between 0 and 1, got {p0}")
    pre = f"{method}_{channel}"
    rim_cols = [f"{pre}_rim_out_{k:g}mm" for k in rim_mm]
    missing = [c for c in [f"{pre}_mean_in", *rim_cols] if c not in instances]
    if missing:
        return {"available": False, "reason": f"missing column(s) {missing}"}
    inside = _num(instances, f"{pre}_mean_in")
    rim_vals = np.column_stack([_num(instances, c) for c in rim_cols]) if len(instances) \
        else np.zeros((0, len(rim_cols)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN
        rim = np.nanmean(rim_vals, axis=1) if rim_vals.size else np.zeros(0)
    ok = np.isfinite(inside) & np.isfinite(rim)
    status = _status(instances)

    def one(sel):
        n = int(sel.sum())
        pos, neg = inside[sel] > 0, rim[sel] < 0
        k = int((pos & neg).sum())
        r = {"n": n, "k": k, "proportion": k / n if n else float("nan"),
             "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"),
             "fraction_positive_inside": float(pos.mean()) if n else float("nan"),
             "fraction_negative_rim": float(neg.mean()) if n else float("nan")}
        if n:
            bt = binomtest(k, n, p0, alternative=alternative)
            ci = bt.proportion_ci(confidence_level=level, method="exact")
            r.update(p=float(bt.pvalue), ci_low=float(ci.low), ci_high=float(ci.high))
        return r

    return {"available": True, "method": method, "channel": channel, "rim_columns": rim_cols,
            "p0": p0, "alternative": alternative, "level": level, "overall": one(ok),
            "by_status": {s: one(ok & (status == s)) for s in STATUSES}}


# --------------------------------------------------------------------------------------------
# 4. error flagging: moved to instance_saliency.flagging (and .features); the old names still
# resolve here for scripts written against earlier releases

_MOVED = {"lesion_features": "features", "detection_counts": "flagging",
          "choose_threshold": "flagging", "flag_errors": "flagging"}


def __getattr__(name):  # PEP 562: lazy, so that flagging can import this module
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# analysis of a cohort folder


def _clean(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/Inf to None, DataFrames left out."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items() if not isinstance(v, pd.DataFrame)}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.0f} %"


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ci(d: dict, est_key: str) -> str:
    if d.get("ci_note"):  # e.g. too few subjects: say so rather than print "[–, –]"
        return f"{_f(d.get(est_key))} [CI {d['ci_note']}]"
    return f"{_f(d.get(est_key))} [{_f(d.get('ci_low'))}, {_f(d.get('ci_high'))}]"


def training_scans(out: str | os.PathLike, subjects) -> list:
    """The subjects of a cohort that the model which explained them had trained on: their
    ``run.json`` lists, under ``model.members_trained_on``, a member whose ``trained_on``
    holds the subject's name (compared case-insensitively). Their TP/FP/FN are in-sample.

    Parameters
    ----------
    out : path
        Cohort output folder.
    subjects : sequence of str
        Subject folder names under ``out/subjects``.

    Returns
    -------
    list of str
        Those subjects, in the given order (an unreadable ``run.json`` counts as not).
    """
    from .datasets import saw_any

    found = []
    for s in subjects:
        try:
            run = json.loads((Path(out) / "subjects" / str(s) / "run.json").read_text())
        except (OSError, ValueError):
            continue
        model = run.get("model") if isinstance(run, dict) else None
        used = (model.get("members_trained_on") if isinstance(model, dict) else None) or []
        if any(saw_any(u.get("trained_on") or [], [str(s)]) for u in used
               if isinstance(u, dict)):
            found.append(str(s))
    return found


def _markdown(res: dict, figures: bool = True) -> str:
    """``stats.md``: the statistics as text and tables; ``figures``: whether the figure files
    exist to be linked."""
    out = [f"# Cohort statistics\n",
           f"{res['n_subjects']} subjects, {res['n_lesions']} lesions "
           f"({', '.join(f'{k} {v}' for k, v in res['counts'].items())}). "
           f"Bootstrap: {res['n_boot']} resamples of subjects, seed {res['seed']}; "
           f"CIs are 95 %.\n"]
    seen = res.get("training_scans") or []
    if seen:
        was, it, its = (("was a training scan", "it", "its") if len(seen) == 1
                        else ("were training scans", "them", "their"))
        out.append(f"\n**Not held-out:** {', '.join(seen)} {was} of the model that explained "
                   f"{it} (`run.json`: `model.members_trained_on`); {its} TP/FP/FN are "
                   f"in-sample figures.\n")
    fe = res["flag_errors"]
    if fe["status"] == "ok":
        out.append("\n**Does saliency flag false positives beyond the lesion's size and the "
                   "model's probability?**\n\n" + "".join(
                       f"- {e['sentence']}\n" for e in fe["methods"].values()))
    out.append("\n## Peak saliency by lesion status\n\n"
               "Kruskal–Wallis across TP/FP/FN; pairwise two-sided Mann–Whitney U with Holm "
               "adjustment per feature; rank-biserial r = 1 − 2U/(n_a n_b) = P(b > a) − "
               "P(a > b) (positive: group b larger). AUC: feature for FP vs TP (positive class "
               "FP; < 0.5 means FP values are lower), CI by subject bootstrap.\n\n")
    rows = []
    for f in res["peak_by_status"]["features"]:
        a = f["auc_fp_vs_tp"]
        rows.append([f["feature"], "/".join(str(f["n"][s]) for s in STATUSES),
                     "/".join(_f(f["median"][s]) for s in STATUSES), _f(f["kruskal_h"]),
                     _f(f["kruskal_p"]), _ci(a, "auc")])
    out.append(_md_table(["feature", "n TP/FP/FN", "median TP/FP/FN", "H", "p (KW)",
                          "AUC FP vs TP [95% CI]"], rows))
    rows = [[f["feature"], f"{p['a']}–{p['b']}", p["n_a"], p["n_b"], _f(p["u"]), _f(p["p"]),
             _f(p["p_holm"]), _f(p["rank_biserial"])]
            for f in res["peak_by_status"]["features"] for p in f["pairs"]]
    out.append("\n" + _md_table(["feature", "pair a–b", "n_a", "n_b", "U_a", "p", "p (Holm)",
                                 "r"], rows))
    fm = res["flair_vs_mprage"]
    out.append("\n## FLAIR versus MPRAGE\n\n")
    if fm.get("available"):
        out.append(f"Paired per lesion ({fm['quantity']}, n = {fm['n']}): median FLAIR "
                   f"{_f(fm['median_flair'])}, median MPRAGE {_f(fm['median_mprage'])}, "
                   f"FLAIR larger in {_pct(fm['fraction_flair_larger'])} of lesions; Wilcoxon "
                   f"signed-rank W = {_f(fm['wilcoxon_w'])}, p = {_f(fm['wilcoxon_p'])}.\n")
        if "share" in fm:
            s = fm["share"]
            out.append(f"\nMedian FLAIR share {_ci(s, 'median')} (n = {s['n']}, subject "
                       f"bootstrap); > 0.5 in {_pct(s['fraction_above_half'])} of lesions. "
                       "By status: " + ", ".join(
                           f"{k} {_f(v['median'])} (n = {v['n']})"
                           for k, v in s["by_status"].items()) + ".\n")
    else:
        out.append(f"not available: {fm.get('reason')}\n")
    sp = res["sign_pattern"]
    out.append("\n## Lesion versus rim\n\n")
    if sp.get("available"):
        out.append(f"Lesions with {sp['method']} {sp['channel']} mean inside > 0 and mean over "
                   f"the {sp['rim_columns'][0].rsplit('_', 2)[-1]}–"
                   f"{sp['rim_columns'][-1].rsplit('_', 1)[-1]} rim < 0; exact binomial test "
                   f"against p0 = {sp['p0']} ({sp['alternative']}), Clopper–Pearson CI.\n\n")
        rows = [[g, d["n"], d["k"], _ci(d, "proportion"), _f(d["p"]),
                 _f(d["fraction_positive_inside"]), _f(d["fraction_negative_rim"])]
                for g, d in [("all", sp["overall"]), *sp["by_status"].items()]]
        out.append(_md_table(["lesions", "n", "k", "proportion [95% CI]", "p", "inside > 0",
                              "rim < 0"], rows))
    else:
        out.append(f"not available: {sp.get('reason')}\n")
    out.append("\nDistance profiles (mean ± t-interval over lesions) are in "
               + ("`figures/profile_by_status.png` and " if figures else "")
               + "`stats.json`.\n")
    from .flagging import markdown as flagging_markdown

    out.append(flagging_markdown(res["flag_errors"]))
    if res.get("failures"):
        out.append(f"\n## Failed subjects\n\n" + "".join(
            f"- {k}: {v.get('message', v)}\n" for k, v in res["failures"].items()))
    return "".join(out)


def _pick_method(instances: pd.DataFrame, profiles: pd.DataFrame, method: str | None):
    """The method of the per-channel analyses and its main channel (``flair``, else ``cam``).

    Raises
    ------
    InputError
        ``method`` given but absent from the cohort (the message lists those present).
    """
    present = [m for m in ("smoothgrad", "gradcampp", "hirescam")
               if any(str(c).startswith(m + "_") and str(c).endswith("_mean_in")
                      for c in instances.columns)
               or (len(profiles) and (profiles["method"].astype(str) == m).any())]
    if method is None:
        method = present[0] if present else "smoothgrad"
    elif (len(instances) or len(profiles)) and method not in present:
        raise InputError(f"--method {method}: no {method} maps in this cohort; present: "
                         f"{', '.join(present) or 'none'}")
    channel = "flair" if f"{method}_flair_mean_in" in instances else (
        "cam" if f"{method}_cam_mean_in" in instances else "flair")
    return method, channel


def analyze(out: str | os.PathLike, n_boot: int = 1000, seed: int = 0, p0: float = 0.25,
            method: str | None = None, include_log_volume: bool = False,
            threshold_rule: str = "f1", figures: bool = True, log=print, n_perm: int = 2000,
            fit_flagger: str | os.PathLike | None = None, flagger_set: str = "saliency",
            n_splits: int = 5, flagger_method: str | None = None) -> dict:
    """Run every cohort statistic on a cohort folder and write the results.

    Writes (all atomically) ``out/cohort_instances.csv`` (pooled lesion table with the
    out-of-fold FP probability when available), ``out/cohort_profiles.csv`` (both rounded as
    :func:`instance_saliency._format.round_table` states; full precision in
    ``cohort_instances_full.csv`` and ``cohort_profiles_full.csv``),
    ``out/stats.json`` (all numbers; NaN as null), ``out/stats.md`` (readable tables), and
    with ``figures``: ``out/figures/peak_by_status.png``, ``profile_by_status.png``,
    ``flair_share.png``, ``roc_error_flagging.png`` and ``out/cohort_report.html``; with
    ``fit_flagger``, the flagger JSON (:func:`instance_saliency.flagging.fit_flagger`).

    False-positive flagging (``stats.json`` key ``flag_errors``) is
    :func:`instance_saliency.flagging.compare_feature_sets`: baseline (size, probability)
    versus baseline + saliency of each method, subject-grouped nested CV, ΔAUC with CI and
    permutation p, and one plain sentence per method.

    Parameters
    ----------
    out : path
        Cohort folder with ``subjects/<subject>/instances.csv``.
    n_boot : int
        Subject-bootstrap resamples of every CI.
    seed : int
        Seed of the bootstraps and of the classifier.
    p0 : float
        Null proportion of :func:`sign_pattern`.
    method : str, optional
        Saliency method of the FLAIR/MPRAGE, rim and profile analyses, the primary method of
        the flagging columns of ``cohort_instances.csv`` and of ``fit_flagger``; default:
        SmoothGrad when the cohort has it, else the method present (a Grad-CAM++-only cohort
        gets the rim and profile analyses of its one map, ``cam``, and no FLAIR/MPRAGE
        comparison).
    include_log_volume : bool
        Ignored (kept for old scripts): ln(volume) is always in the baseline features.
    threshold_rule : {"f1", "youden"}
        See :func:`instance_saliency.flagging.choose_threshold`.
    figures : bool
        Write the PNG figures and the HTML report.
    log : callable
        Receives the one-line summary.
    n_perm : int
        Permutations of the ΔAUC test.
    fit_flagger : path, optional
        Also fit the flagger on all subjects and write it there as JSON.
    flagger_set : {"saliency", "baseline"}
        Feature set of that flagger (``saliency``: baseline + ``flagger_method``'s saliency).
    flagger_method : str, optional
        Saliency method of that flagger (default ``method``; any method with per-lesion
        columns, e.g. ``gradcampp``).
    n_splits : int
        Outer (and inner) subject-grouped folds of the flagging CV.

    Returns
    -------
    dict
        The content of ``stats.json`` (plus DataFrames under ``profile`` and
        ``flag_errors["predictions"]``).

    Raises
    ------
    InputError
        ``out`` does not exist or is not a folder; no subject with ``instances.csv`` under
        ``out/subjects``; bad ``flagger_set``; too few subjects to fit the flagger.
    OutputError
        ``out`` (or ``out/figures``) cannot be written; checked before any file is replaced.
    """
    from .features import methods_in
    from .flagging import compare_feature_sets
    from .io import atomic_write_text

    out = Path(out)
    if n_boot < 0:
        raise InputError(f"--n-boot must be >= 0, got {n_boot}")
    if n_perm < 0:
        raise InputError(f"--n-perm must be >= 0, got {n_perm}")
    if flagger_set not in ("saliency", "baseline"):
        raise InputError(f"--flagger-set must be 'saliency' or 'baseline', got {flagger_set!r}")
    if not out.is_dir():  # one line, as check says of a missing run folder
        raise InputError(f"cohort folder {out} does not exist" if not out.exists()
                         else f"{out} is not a folder; analyze needs a cohort folder")
    instances, profiles = pool_instances(out)
    method, channel = _pick_method(instances, profiles, method)
    flagger_method = flagger_method or method
    if fit_flagger is not None and flagger_set == "saliency" \
            and flagger_method not in methods_in(instances.columns):
        raise InputError(f"--fit-flagger: no {flagger_method} saliency columns in this cohort; "
                         f"available: {', '.join(methods_in(instances.columns)) or 'none'}")
    for d in (out, out / "figures") if figures else (out,):  # before any file is replaced
        try:
            d.mkdir(exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise OutputError(f"cannot write into {d}: {e.strerror or e}") from None
    subjects = instances.attrs.get("subjects", sorted(set(instances["subject"])))
    status = _status(instances)
    counts = {s: int((status == s).sum()) for s in (*STATUSES, "unknown")}
    res = {
        "n_subjects": len(subjects), "subjects": subjects, "n_lesions": int(len(instances)),
        "training_scans": training_scans(out, subjects),
        "counts": counts, "n_boot": n_boot, "seed": seed, "method": method, "channel": channel,
        "peak_by_status": peak_by_status(instances, n_boot=n_boot, seed=seed),
        "flair_vs_mprage": flair_vs_mprage(instances, method, n_boot, seed),
        "sign_pattern": sign_pattern(instances, method, channel, p0=p0),
        "flag_errors": compare_feature_sets(instances, n_splits=n_splits,
                                            inner_splits=n_splits,
                                            threshold_rule=threshold_rule, n_boot=n_boot,
                                            n_perm=n_perm, seed=seed, primary=method),
    }
    channels = [c for c in ("flair", "mprage", "cam")
                if len(profiles) and ((profiles["method"] == method)
                                      & (profiles["channel"] == c)).any()]
    prof = {c: profile_by_status(profiles, method, c) for c in channels}
    res["profile"] = {c: p.to_dict(orient="list") for c, p in prof.items()}
    fail_file = out / "failures.json"
    if fail_file.is_file():
        try:
            res["failures"] = json.loads(fail_file.read_text())
        except (OSError, ValueError):
            res["failures"] = {"failures.json": {"message": "unreadable"}}
    table = instances.copy()
    fe = res["flag_errors"]
    if fe["status"] == "ok":
        p = fe["predictions"].drop(columns="status")
        table = table.merge(p, on=["subject", "label"], how="left")
    from ._format import round_table

    atomic_write_text(out / "cohort_instances.csv", round_table(table).to_csv(index=False))
    atomic_write_text(out / "cohort_profiles.csv", round_table(profiles).to_csv(index=False))
    atomic_write_text(out / "cohort_instances_full.csv", table.to_csv(index=False))
    atomic_write_text(out / "cohort_profiles_full.csv", profiles.to_csv(index=False))
    from .checks import checks_markdown, pool_checks

    pooled_checks = pool_checks(out, n_boot=n_boot, seed=seed)
    if pooled_checks is not None:
        res["checks"] = pooled_checks
    atomic_write_text(out / "stats.json", json.dumps(_clean(res), indent=2) + "\n")
    md = _markdown(res, figures) + ("\n" + checks_markdown(pooled_checks)
                                    if pooled_checks else "")
    atomic_write_text(out / "stats.md", md)
    if figures:
        _cohort_report(out, instances, prof, res)
    if fit_flagger is not None:
        _fit_and_save_flagger(out, instances, res, fit_flagger, flagger_set, flagger_method,
                              threshold_rule, seed, n_splits, log)
    tail = ""
    if fe["status"] == "ok":
        tail = (f"; out-of-fold FP-flagging AUC {_f(fe['baseline']['auc']['auc'])} with size and "
                "probability" + "".join(
                    f", {_f(e['saliency']['auc']['auc'])} with {m} (ΔAUC "
                    f"{_f(e['delta_auc']['estimate'])} [{_f(e['delta_auc']['ci_low'])}, "
                    f"{_f(e['delta_auc']['ci_high'])}])" for m, e in fe["methods"].items()))
    log(f"cohort statistics of {len(subjects)} subject(s), {len(instances)} lesion(s) "
        f"written to {out / 'stats.md'}{tail}")
    return res


# --------------------------------------------------------------------------------------------
# cohort report: the figures are drawn by instance_saliency.report.cohort_figures


def _cohort_report(out: Path, instances: pd.DataFrame, prof: dict, res: dict) -> None:
    """Figures (drawn by the report package) and ``cohort_report.html`` of the statistics."""
    from .report import write_report
    from .report.cohort_figures import cohort_figures

    figs = cohort_figures(out / "figures", instances, prof, res)
    fe = res["flag_errors"]
    keep = [c for c in ("subject", "label", "status", "volume_mm3", "prob_max",
                        *(f"{res['method']}_{res['channel']}_{q}"
                          for q in ("peak_max", "peak_min", "mean_in")),
                        f"{res['method']}_flair_share")
            if c in instances]
    table = instances[keep].copy()
    if fe["status"] == "ok":
        table = table.merge(fe["predictions"][["subject", "label", "prob_fp_baseline",
                                               "prob_fp", "flagged"]],
                            on=["subject", "label"], how="left")
    summary = {"subjects": res["n_subjects"], "lesions": res["n_lesions"],
               "counts": res["counts"]}
    if fe["status"] == "ok":
        from .flagging import METHOD_LABELS

        b = fe["baseline"]
        summary["FP-flagging AUC, size + probability (out of fold)"] = b["auc"]["auc"]
        for m, e in fe["methods"].items():
            lab = METHOD_LABELS.get(m, m)
            summary[f"does {lab} saliency add anything?"] = e["sentence"]
            r = e["saliency"]
            summary[f"lesion F1 before / after flagging (+ {lab})"] = [r["before"]["f1"],
                                                                       r["after"]["f1"]]
    else:
        summary["FP flagging"] = f"not enough data ({fe.get('reason')})"
    sh = res["flair_vs_mprage"].get("share")
    if sh:
        summary["median FLAIR share [95% CI]"] = [sh["median"], sh["ci_low"], sh["ci_high"]]
    sp = res["sign_pattern"]
    if sp.get("available"):
        summary["lesions + inside / − rim (FLAIR)"] = (
            f"{sp['overall']['k']}/{sp['overall']['n']} (p = {_f(sp['overall']['p'])} vs "
            f"p0 = {sp['p0']})")
    notes = [line for line in _markdown(res).splitlines() if line and not line.startswith("|")
             and not line.startswith("#")]
    notes.append("Cohort figures (PNG files): " + ", ".join(
        f"figures/{Path(f[1]).name}" for f in figs))
    write_report(out / "cohort_report.html", "instance-saliency cohort report", summary, table,
                 figs, notes=notes, links=("Subject reports", _subject_links(out, instances)))


def _fit_and_save_flagger(out: Path, instances: pd.DataFrame, res: dict, path, feature_set: str,
                          method: str, threshold_rule: str, seed: int, n_splits: int,
                          log) -> None:
    """Fit the flagger on all subjects (:func:`instance_saliency.flagging.fit_flagger`),
    record what it was fitted on and its nested-CV estimate, and write it atomically."""
    from .flagging import fit_flagger, save_flagger

    fe = res["flag_errors"]
    cv = None
    if fe["status"] == "ok":
        r = fe["baseline"] if feature_set == "baseline" else fe["methods"].get(method, {}).get(
            "saliency")
        if r is not None:
            cv = {"auc": r["auc"], "before": r["before"], "after": r["after"], "cv": r["cv"]}
            if feature_set == "saliency":
                cv["delta_auc_vs_baseline"] = fe["methods"][method]["delta_auc"]
                cv["sentence"] = fe["methods"][method]["sentence"]
    prov = {"cohort": out.name}
    for s in res["subjects"]:
        try:
            run = json.loads((out / "subjects" / s / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if run:
            prov["model"] = run.get("model", {}).get("folder")
            keep = ("methods", "n_samples", "noise_level", "mode", "threshold", "min_size",
                    "min_size_unit", "connectivity", "matching", "iou_threshold", "cam_layer")
            prov["explain_parameters"] = {k: run.get("parameters", {}).get(k) for k in keep}
            prov["versions"] = run.get("versions")
            break
    fl = fit_flagger(instances, feature_set, method, n_splits=n_splits,
                     threshold_rule=threshold_rule, seed=seed, provenance=prov,
                     cross_validated=cv)
    save_flagger(fl, path)
    log(f"flagger ({feature_set}{'' if feature_set == 'baseline' else ' + ' + method}, "
        f"{len(fl['features'])} features, "
        + ("keeps all lesions" if fl["threshold"] is None else f"threshold {_f(fl['threshold'])}")
        + f") written to {path}")


def _subject_links(out: Path, instances: pd.DataFrame) -> list:
    """``(subject, relative href of its report.html or None, lesion counts)`` per pooled
    subject, for the cohort report."""
    subjects = list(instances.attrs.get("subjects") or
                    sorted(instances["subject"].astype(str).unique()))
    items = []
    for s in subjects:
        rep = Path("subjects") / str(s) / "report.html"
        st = instances.loc[instances["subject"].astype(str) == str(s), "status"]
        counts = st.value_counts()
        note = ", ".join(f"{int(counts[k])} {k}" for k in ("TP", "FP", "FN", "unknown")
                         if k in counts) or "no lesion instances"
        items.append((str(s), rep.as_posix() if (out / rep).is_file() else None, note))
    return items
