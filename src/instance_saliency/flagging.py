"""Flagging segmentation errors (false-positive lesions): does saliency add anything beyond the
model's own confidence and the lesion's size?

The seed paper closes with the claim that quantitative instance saliency "may help identify
segmentation errors" [1]_; RadiomXAI [2]_ trains an L1 logistic regression on radiomics of the
lesion-wise saliency maps and raises lesion F1 on a held-out test set. The honest question is
sharper: **do saliency features add information beyond the lesion probability and size the
model already gives?** :func:`compare_feature_sets` answers it for every saliency method of a
cohort by comparing two logistic regressions on the same lesions with the same validation:

* (a) **baseline**: ln(volume), mean and max lesion probability, distance to the brain edge;
* (b) **baseline + saliency** of one method (its summary numbers and its map features:
  first-order, GLCM and GLSZM texture inside the lesion and in its rim; see
  :mod:`instance_saliency.features` for every definition).

Validation that cannot leak (subject-grouped **nested** cross-validation, [3]_):

* outer folds split *subjects* (:class:`~sklearn.model_selection.LeaveOneGroupOut` for at most
  ``n_splits`` subjects, else :class:`~sklearn.model_selection.GroupKFold`); a test subject's
  lesions never enter anything fitted for its fold;
* inside each outer training part, inner subject-grouped folds choose the regularisation
  (L1 or L2 penalty and strength ``C`` from :data:`GRID`, by the inner out-of-fold AUC; ties to
  the stronger regularisation) and then the flagging threshold on the inner out-of-fold
  probabilities of the training subjects (:func:`choose_threshold`, lesion-F1 rule);
* the imputer (median), scaler and model are fitted on the outer training part only
  (:func:`make_classifier` is a scikit-learn pipeline fitted as a whole), and applied once to
  the test subjects.

**Flagging never lowers F1 on the training folds' own choice of threshold, by design**: "flag
nothing" (threshold ``+inf``) is always a candidate and wins ties, and a threshold whose
training F1 (inner out of fold) would be lower than without flagging is replaced by ``+inf``.
Such a fold keeps all lesions and its record says so (``keeps_all``). The test subjects' F1
can still drop: that is what the out-of-fold numbers measure.

Reported per set: the pooled out-of-fold AUC (positive class FP) with a subject-bootstrap CI
[4]_, and lesion F1 / TPR / FDR before and after removing the flagged lesions
(:func:`detection_counts`); per method: the paired ΔAUC = AUC(b) − AUC(a) on the same lesions
with a subject-bootstrap CI and a paired permutation p-value (:func:`paired_permutation_test`,
[5]_), and one plain sentence (:func:`plain_sentence`).

A flagger fitted on a whole cohort (:func:`fit_flagger`) is stored as JSON (no pickle:
imputer medians, scaler, coefficients, threshold, feature names, what it was fitted on) and
applied to new runs by :func:`apply_flagger` (``explain --flagger FILE``).

References
----------
.. [1] F. Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
   segmentation", arXiv:2406.09335, 2024.
.. [2] F. Spagnolo et al., "Exploiting XAI maps to improve MS lesion segmentation and detection
   in MRI" (RadiomXAI), arXiv:2409.03772, 2024.
.. [3] S. Varma and R. Simon, "Bias in error estimation when using cross-validation for model
   selection", BMC Bioinformatics 7, 91, 2006.
.. [4] C. A. Field and A. H. Welsh, "Bootstrapping clustered data", J. R. Statist. Soc. B
   69(3), 369-390, 2007.
.. [5] A. I. Bandos, H. E. Rockette and D. Gur, "A permutation test sensitive to differences in
   areas for comparing ROC curves from a paired design", Statistics in Medicine 24(18),
   2873-2893, 2005.
.. [6] A. Malinin et al., "Shifts 2.0: Extending the dataset of real distributional shifts",
   arXiv:2206.15407, 2022 (lesion F1 = TP / (TP + (FP + FN) / 2)).
.. [7] W. J. Youden, "Index for rating diagnostic tests", Cancer 3(1), 32-35, 1950.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ._format import fmt_number as _f
from .errors import InputError
from .explain import METHOD_LABELS  # display names (explain imports torch lazily)
from .features import BASELINE, feature_table, lesion_features, methods_in

__all__ = [
    "GRID",
    "METHOD_LABELS",
    "detection_counts",
    "choose_threshold",
    "make_classifier",
    "select_and_fit",
    "nested_cv",
    "paired_permutation_test",
    "compare_feature_sets",
    "plain_sentence",
    "markdown",
    "fit_flagger",
    "save_flagger",
    "load_flagger",
    "flagger_probabilities",
    "apply_flagger",
    "flag_errors",
]

#: regularisation candidates of the inner folds, strongest first: (penalty, C)
GRID = tuple((pen, c) for c in (0.01, 0.1, 1.0, 10.0) for pen in ("l2", "l1"))
FLAGGER_FORMAT = "instance-saliency-flagger"
FLAGGER_VERSION = 1


def _stats():
    from . import stats

    return stats


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


# --------------------------------------------------------------------------------------------
# counts and thresholds


def detection_counts(tp: int, fp: int, fn: int) -> dict:
    """Lesion F1, TPR and FDR from lesion counts (Shifts definition [6]_).

    ``F1 = TP / (TP + (FP + FN) / 2)`` (1.0 when all counts are 0), ``TPR = TP / (TP + FN)``,
    ``FDR = FP / (TP + FP)`` (NaN when the denominator is 0). TP and FP count predicted lesions
    and FN counts missed ground-truth lesions.
    """
    denom = tp + 0.5 * (fp + fn)
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn),
            "f1": 1.0 if denom == 0 else tp / denom,
            "tpr": tp / (tp + fn) if tp + fn else float("nan"),
            "fdr": fp / (tp + fp) if tp + fp else float("nan")}


def choose_threshold(prob_fp: np.ndarray, is_fp: np.ndarray, n_fn: int = 0,
                     rule: str = "f1") -> float:
    """Flagging threshold on predicted FP probabilities (lesions with ``prob >= t`` removed).

    Called with **training subjects only** (:func:`select_and_fit`, :func:`flag_errors`).

    * ``rule="f1"``: the threshold that maximises the pooled lesion F1 of these lesions after
      removing the flagged ones. Removing a TP lesion turns its ground-truth lesion into a
      missed one (approximation: one ground-truth lesion per TP lesion), so after removal
      ``TP' = TP - r_TP``, ``FP' = FP - r_FP``, ``FN' = FN + r_TP``. Candidates: ``+inf``
      (remove nothing) and every distinct probability; ties go to the highest threshold
      (fewest removals), so F1 after is never below F1 before on these lesions.
    * ``rule="youden"``: maximises Youden's J = TPR − FPR of FP detection [7]_ over the
      thresholds of :func:`sklearn.metrics.roc_curve`.

    Parameters
    ----------
    prob_fp : ndarray, shape (n,)
        Predicted probability that each lesion is a false positive.
    is_fp : ndarray of bool, shape (n,)
        True for FP lesions, False for TP lesions.
    n_fn : int
        Missed ground-truth lesions (FN) of the same subjects.
    rule : {"f1", "youden"}

    Returns
    -------
    float
        The threshold (``inf`` = flag nothing).

    Raises
    ------
    InputError
        Unknown ``rule``.
    """
    p = np.asarray(prob_fp, dtype=np.float64)
    y = np.asarray(is_fp, dtype=bool)
    if rule == "youden":
        from sklearn.metrics import roc_curve

        if y.all() or not y.any():
            return float("inf")
        fpr, tpr, thr = roc_curve(y, p)
        j = tpr - fpr
        return float(thr[int(np.flatnonzero(np.isclose(j, j.max()))[0])])
    if rule != "f1":
        raise InputError(f"threshold rule must be 'f1' or 'youden', got {rule!r}")
    tp0, fp0 = int((~y).sum()), int(y.sum())
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    cum_fp, cum_tp = np.cumsum(ys), np.cumsum(~ys)
    # last index of each distinct value in the descending order: remove all with p >= value
    last = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True]) if ps.size else np.zeros(0, int)
    cands = np.r_[np.inf, ps[last]]
    r_fp = np.r_[0, cum_fp[last]]
    r_tp = np.r_[0, cum_tp[last]]
    tp1, fp1, fn1 = tp0 - r_tp, fp0 - r_fp, n_fn + r_tp
    denom = tp1 + 0.5 * (fp1 + fn1)
    f1 = np.where(denom > 0, tp1 / np.where(denom > 0, denom, 1), 1.0)
    best = int(np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))[0])
    return float(cands[best])


def _splitter(n_groups: int, n_splits: int):
    from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

    if n_groups <= n_splits:
        return LeaveOneGroupOut(), "LeaveOneGroupOut"
    return GroupKFold(n_splits=n_splits), f"GroupKFold({n_splits})"


# --------------------------------------------------------------------------------------------
# the classifier and nested cross-validation


def _logistic(C: float, penalty: str, seed: int):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    kw = dict(C=C, solver="liblinear", class_weight="balanced", max_iter=5000,
              random_state=seed)
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):  # `penalty` is deprecated there in favour of l1_ratio
        kw["l1_ratio"] = 1.0 if penalty == "l1" else 0.0
    else:
        kw["penalty"] = penalty
    return LogisticRegression(**kw)


def make_classifier(C: float = 1.0, penalty: str = "l2", seed: int = 0):
    """Median imputer → standard scaler → class-balanced logistic regression (liblinear).

    One :class:`sklearn.pipeline.Pipeline`, so that every fitted part (imputer medians, scaler
    means and SDs, coefficients) is fitted on exactly the rows given to ``fit``.

    Parameters
    ----------
    C : float
        Inverse regularisation strength (> 0).
    penalty : {"l1", "l2"}
    seed : int
        ``random_state`` of the solver.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if penalty not in ("l1", "l2"):
        raise InputError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                         StandardScaler(), _logistic(C, penalty, seed))


def _names(subjects) -> list:
    """Sorted distinct subject names as plain ``str``."""
    return sorted({str(s) for s in subjects})


def _fn_count(fn_by_subject: dict, subjects) -> int:
    return int(sum(fn_by_subject.get(s, 0) for s in set(subjects)))


def _oof_probabilities(X, y, subj, C, penalty, seed, n_splits):
    """Grouped out-of-fold probabilities (NaN where a fold's training part had one class)."""
    p = np.full(len(y), np.nan)
    folds = []
    if np.unique(subj).size < 2:  # one training subject (a 2-subject cohort): no inner fold
        return p, folds
    splitter, _ = _splitter(np.unique(subj).size, n_splits)
    for tr, te in splitter.split(X, y, groups=subj):
        rec = {"train_subjects": _names(subj[tr]), "test_subjects": _names(subj[te]),
               "skipped": bool(y[tr].all() or not y[tr].any())}
        if not rec["skipped"]:
            p[te] = make_classifier(C, penalty, seed).fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
        folds.append(rec)
    return p, folds


def select_and_fit(X: np.ndarray, y: np.ndarray, subj: np.ndarray, fn_by_subject: dict,
                   grid: Sequence = GRID, n_splits: int = 5, seed: int = 0,
                   rule: str = "f1") -> dict:
    """Choose regularisation and threshold by grouped CV on these rows, then fit on all of them.

    Used for every outer training part of :func:`nested_cv` (the rows given are the training
    subjects only) and for the final flagger (:func:`fit_flagger`).

    Steps: (1) for each ``(penalty, C)`` of ``grid`` (strongest regularisation first),
    subject-grouped out-of-fold probabilities over these rows (inner folds; a fold whose
    training part has one class is skipped) and their pooled AUC; the best AUC wins, ties to
    the earlier (stronger) candidate. (2) The threshold is :func:`choose_threshold` on the
    winner's inner out-of-fold probabilities, with the FN count of the same subjects; if its
    inner F1 is below the F1 without flagging (possible with ``rule="youden"``), or no inner
    fold could be fitted, the threshold is ``+inf`` (keep all lesions). (3) The pipeline
    (:func:`make_classifier`) is fitted on all rows.

    Parameters
    ----------
    X : ndarray, shape (n, k)
        Features (NaN allowed).
    y : ndarray of bool, shape (n,)
        True for FP lesions.
    subj : ndarray of str, shape (n,)
        Subject of each row.
    fn_by_subject : dict
        Subject -> number of missed (FN) lesions.
    grid, n_splits, seed, rule :
        Candidates, inner folds, solver seed, threshold rule.

    Returns
    -------
    dict
        ``penalty``, ``C``, ``inner_auc``, ``grid_auc`` (list of ``[penalty, C, auc]``),
        ``threshold`` (``inf`` = keep all), ``keeps_all``, ``keep_all_reason``,
        ``train_before``, ``train_after`` (:func:`detection_counts` of the rows with inner
        predictions, before and after flagging at the threshold), ``fit_subjects`` (every
        subject of the rows: the model, imputer and scaler saw these only),
        ``threshold_subjects``, ``inner_folds``, ``model`` (the fitted pipeline, or None
        with one class only).
    """
    from .stats import _auc

    subj = np.asarray(subj).astype(str)
    res = {"fit_subjects": _names(subj), "grid_auc": [], "keeps_all": True,
           "keep_all_reason": None, "threshold": float("inf"), "inner_auc": float("nan"),
           "threshold_subjects": [], "inner_folds": [], "train_before": None,
           "train_after": None, "model": None, "penalty": "l2", "C": 1.0}
    best = None
    for pen, C in grid:
        p, folds = _oof_probabilities(X, y, subj, C, pen, seed, n_splits)
        ok = np.isfinite(p)
        auc = _auc(y[ok], p[ok]) if ok.any() else float("nan")
        res["grid_auc"].append([pen, float(C), auc])
        if math.isfinite(auc) and (best is None or auc > best[0] + 1e-12):
            best = (auc, pen, C, p, folds)
    if best is None:
        res["keep_all_reason"] = "no inner fold had both TP and FP lesions to fit"
    else:
        auc, pen, C, p, folds = best
        ok = np.isfinite(p)
        n_fn = _fn_count(fn_by_subject, subj[ok])
        thr = choose_threshold(p[ok], y[ok], n_fn, rule)
        tp, fp = int((~y[ok]).sum()), int(y[ok].sum())
        before = detection_counts(tp, fp, n_fn)
        flag = p[ok] >= thr
        r_tp, r_fp = int((flag & ~y[ok]).sum()), int((flag & y[ok]).sum())
        after = detection_counts(tp - r_tp, fp - r_fp, n_fn + r_tp)
        if after["f1"] < before["f1"]:
            thr, after = float("inf"), before
            res["keep_all_reason"] = ("the threshold rule would lower F1 on the training "
                                      "subjects (inner out of fold)")
        elif not math.isfinite(thr):
            res["keep_all_reason"] = ("no threshold raises F1 on the training subjects "
                                      "(inner out of fold)")
        res.update(penalty=pen, C=float(C), inner_auc=auc, threshold=float(thr),
                   keeps_all=not math.isfinite(thr), threshold_subjects=_names(subj[ok]),
                   inner_folds=folds, train_before=before, train_after=after)
    if y.any() and (~y).any():
        res["model"] = make_classifier(res["C"], res["penalty"], seed).fit(X, y)
    return res


def nested_cv(X: np.ndarray, y: np.ndarray, subj: np.ndarray, fn_by_subject: dict,
              n_splits: int = 5, inner_splits: int = 5, grid: Sequence = GRID, seed: int = 0,
              rule: str = "f1") -> dict:
    """Subject-grouped nested cross-validation of the FP classifier (see the module docs).

    Parameters
    ----------
    X : ndarray, shape (n, k)
    y : ndarray of bool, shape (n,)
        True for FP lesions.
    subj : ndarray of str, shape (n,)
    fn_by_subject : dict
        Subject -> number of missed lesions.
    n_splits, inner_splits : int
        Outer and inner folds (LeaveOneGroupOut when there are at most that many subjects).
    grid, seed, rule :
        See :func:`select_and_fit`.

    Returns
    -------
    dict
        ``cv`` (outer splitter name), ``oof`` (out-of-fold probability per row; NaN for
        skipped folds), ``flagged`` (bool per row), ``folds`` (per outer fold:
        ``train_subjects``, ``test_subjects``, ``skipped``, and from :func:`select_and_fit`
        ``fit_subjects``, ``threshold_subjects``, ``inner_folds``, ``penalty``, ``C``,
        ``inner_auc``, ``threshold``, ``keeps_all``, ``keep_all_reason``, ``train_before``,
        ``train_after``, ``n_train``, ``n_test``), ``skipped_subjects``.
    """
    subj = np.asarray(subj).astype(str)
    splitter, name = _splitter(np.unique(subj).size, n_splits)
    oof = np.full(len(y), np.nan)
    flagged = np.zeros(len(y), dtype=bool)
    folds, skipped = [], []
    for tr, te in splitter.split(X, y, groups=subj):
        fold = {"train_subjects": _names(subj[tr]), "test_subjects": _names(subj[te]),
                "n_train": int(tr.size), "n_test": int(te.size), "skipped": False}
        if y[tr].all() or not y[tr].any():
            fold["skipped"] = True
            skipped += fold["test_subjects"]
            folds.append(fold)
            continue
        sel = select_and_fit(X[tr], y[tr], subj[tr], fn_by_subject, grid, inner_splits, seed,
                             rule)
        p_te = sel.pop("model").predict_proba(X[te])[:, 1]
        oof[te] = p_te
        flagged[te] = p_te >= sel["threshold"]
        fold.update(sel)
        folds.append(fold)
    return {"cv": name, "oof": oof, "flagged": flagged, "folds": folds,
            "skipped_subjects": sorted(skipped)}


# --------------------------------------------------------------------------------------------
# comparing feature sets


def paired_permutation_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray,
                            subjects: np.ndarray, n_perm: int = 2000, seed: int = 0) -> dict:
    """Paired permutation test of ΔAUC = AUC(b) − AUC(a), exchanging whole subjects [5]_.

    Each score is first replaced by its normalised mid-rank within its model (AUC is rank
    invariant, and ranks make the two models' scores exchangeable in scale). Under the null
    hypothesis that both models rank lesions equally well, the labels "a" and "b" of a
    subject's pair of score vectors are exchangeable; every permutation swaps them for a random
    half of the subjects (the unit of dependence) and recomputes ΔAUC. With ``2^S <= n_perm``
    (``S`` subjects) every one of the ``2^S`` swaps is enumerated (exact test); otherwise
    ``n_perm`` random ones, with ``p = (1 + #{|Δ*| >= |Δ|}) / (1 + n_perm)``. Two-sided.

    Parameters
    ----------
    y : ndarray of bool, shape (n,)
    score_a, score_b : ndarray, shape (n,)
        Out-of-fold scores of models (a) and (b) on the same lesions (finite).
    subjects : ndarray, shape (n,)
    n_perm : int
    seed : int

    Returns
    -------
    dict
        ``delta`` (observed), ``p``, ``n_perm`` (permutations used), ``exact``.
    """
    from scipy.stats import rankdata

    from .stats import _auc

    y = np.asarray(y, dtype=bool)
    n = y.size
    ra, rb = rankdata(score_a) / max(n, 1), rankdata(score_b) / max(n, 1)
    obs = _auc(y, rb) - _auc(y, ra)
    _, codes = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    k = int(codes.max()) + 1 if n else 0
    if not math.isfinite(obs) or k == 0 or n_perm <= 0:
        return {"delta": obs, "p": float("nan"), "n_perm": 0, "exact": False}

    def delta(swap):
        sw = swap[codes]
        return _auc(y, np.where(sw, ra, rb)) - _auc(y, np.where(sw, rb, ra))

    tol = 1e-12
    if 2 ** k <= n_perm:
        ds = np.array([delta(np.array(s, dtype=bool))
                       for s in itertools.product((False, True), repeat=k)])
        return {"delta": obs, "p": float(np.mean(np.abs(ds) >= abs(obs) - tol)),
                "n_perm": int(ds.size), "exact": True}
    rng = np.random.default_rng(seed)
    ds = np.array([delta(rng.random(k) < 0.5) for _ in range(int(n_perm))])
    return {"delta": obs, "p": float((1 + np.sum(np.abs(ds) >= abs(obs) - tol)) / (1 + n_perm)),
            "n_perm": int(n_perm), "exact": False}


def _prepare_rows(instances: pd.DataFrame):
    st = _stats()
    status = st._status(instances)
    subj_all = instances["subject"].astype(str).to_numpy()
    pred = np.isin(status, ("TP", "FP"))
    fn_by_subject = pd.Series(status == "FN").groupby(subj_all).sum().astype(int).to_dict()
    return status, subj_all, pred, fn_by_subject


def _subjects_with_both(subj: np.ndarray, is_fp: np.ndarray) -> list:
    """Subjects (sorted) that hold both TP and FP lesions."""
    return sorted(s for s in np.unique(subj) if is_fp[subj == s].any()
                  and (~is_fp[subj == s]).any())


def _oof_auc(y: np.ndarray, oof: np.ndarray, subj: np.ndarray, n_boot: int, seed: int,
             level: float) -> dict:
    """Out-of-fold AUC of the lesions with a probability, with its subject-bootstrap CI."""
    st = _stats()
    covered = np.isfinite(oof)
    yc, pc = y[covered], oof[covered]
    auc = {"auc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
           "n_valid": 0, "n": int(covered.sum())}
    if yc.any() and (~yc).any():
        auc["auc"] = st._auc(yc, pc)
        bs = st.subject_bootstrap(subj[covered], lambda i: st._auc(yc[i], pc[i]), n_boot, seed,
                                  level)
        auc.update(ci_low=bs["ci_low"], ci_high=bs["ci_high"], n_valid=bs["n_valid"])
        if "ci_note" in bs:  # e.g. fewer than 3 subjects
            auc["ci_note"] = bs["ci_note"]
    return auc


def _flagging_rows(instances: pd.DataFrame):
    """The predicted lesions to flag, or a "not enough data" result.

    Returns
    -------
    dict or tuple
        ``{"status": "not enough data", ...}`` without subject/status columns or with fewer
        than two subjects holding both TP and FP lesions; otherwise ``(status_all,
        subjects_all, is_predicted, fn_by_subject, predicted_rows, their_subjects, is_fp)``.
    """
    if "subject" not in instances or "status" not in instances:
        return {"status": "not enough data", "reason": "no subject/status columns"}
    status_all, subj_all, pred, fn_by_subject = _prepare_rows(instances)
    subj = subj_all[pred]
    y = status_all[pred] == "FP"
    both = _subjects_with_both(subj, y)
    if len(both) < 2:
        return {"status": "not enough data",
                "reason": f"{len(both)} subject(s) with both TP and FP lesions (need >= 2)",
                "n_tp": int((~y).sum()), "n_fp": int(y.sum())}
    return status_all, subj_all, pred, fn_by_subject, instances[pred], subj, y


def _evaluate_set(df, X: pd.DataFrame, y, subj, status_all, subj_all, fn_by_subject,
                  n_splits, inner_splits, grid, seed, rule, n_boot, level) -> dict:
    X = X.loc[:, X.notna().any()]
    Xv = X.to_numpy(dtype=np.float64)
    cv = nested_cv(Xv, y, subj, fn_by_subject, n_splits, inner_splits, grid, seed, rule)
    oof, flagged = cv["oof"], cv["flagged"]
    auc = _oof_auc(y, oof, subj, n_boot, seed, level)
    auc["level"] = level
    evaluated = _names(set(subj_all) - set(cv["skipped_subjects"]))
    ev = np.isin(subj_all, evaluated)
    tp0 = int((ev & (status_all == "TP")).sum())
    fp0 = int((ev & (status_all == "FP")).sum())
    fn0 = int((ev & (status_all == "FN")).sum())
    r_tp, r_fp = int((flagged & ~y).sum()), int((flagged & y).sum())
    folds = cv["folds"]
    final = select_and_fit(Xv, y, subj, fn_by_subject, grid, inner_splits, seed, rule)
    model = final.pop("model")
    coefs = {}
    if model is not None:
        coefs = dict(zip(X.columns, (float(c) for c in model[-1].coef_[0])))
    return {
        "features": list(X.columns), "n_features": int(X.shape[1]), "cv": cv["cv"],
        "folds": folds, "auc": auc,
        "before": detection_counts(tp0, fp0, fn0),
        "after": detection_counts(tp0 - r_tp, fp0 - r_fp, fn0 + r_tp),
        "removed": {"tp": r_tp, "fp": r_fp},
        "folds_keeping_all": int(sum(1 for f in folds if not f["skipped"] and f["keeps_all"])),
        "n_folds_fitted": int(sum(1 for f in folds if not f["skipped"])),
        "subjects": evaluated, "skipped_subjects": cv["skipped_subjects"],
        "final": {k: final[k] for k in ("penalty", "C", "inner_auc", "threshold", "keeps_all",
                                        "keep_all_reason")},
        "coefficients": coefs, "oof": oof, "flagged": flagged,
    }


def compare_feature_sets(instances: pd.DataFrame, methods: Sequence[str] | None = None,
                         n_splits: int = 5, inner_splits: int = 5, grid: Sequence = GRID,
                         threshold_rule: str = "f1", n_boot: int = 1000, n_perm: int = 2000,
                         seed: int = 0, level: float = 0.95, primary: str | None = None) -> dict:
    """Does saliency flag FP lesions beyond volume and probability? One answer per method.

    Fits (a) the baseline and, per saliency method, (b) baseline + that method's saliency
    features with :func:`nested_cv` on the same lesions (TP vs FP rows of ``instances``; FN
    rows only enter the detection counts), and compares them.

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table (``subject``, ``status``, ``label``, ``volume_mm3``,
        ``prob_mean``, ``prob_max`` and the saliency columns).
    methods : sequence of str, optional
        Saliency methods to test (default: every method with per-lesion columns,
        :func:`instance_saliency.features.methods_in`).
    n_splits, inner_splits : int
        Outer and inner subject-grouped folds (at least 2).
    grid : sequence of (penalty, C)
        Regularisation candidates of the inner folds.
    threshold_rule : {"f1", "youden"}
    n_boot : int
        Subject-bootstrap resamples of the AUC and ΔAUC CIs.
    n_perm : int
        Permutations of :func:`paired_permutation_test`.
    seed : int
        Seed of the bootstrap, permutations and solver.
    level : float
        CI coverage.
    primary : str, optional
        Method whose predictions fill ``predictions["prob_fp"]`` / ``["flagged"]`` (default
        the first method).

    Returns
    -------
    dict
        ``status`` ("ok" or "not enough data" with ``reason``); with "ok": ``cv``,
        ``threshold_rule``, ``baseline`` (result of the baseline set: ``features``, ``auc``,
        ``before``, ``after``, ``removed``, ``folds``, ``folds_keeping_all``,
        ``coefficients``, ``final``, ...), ``methods`` (method -> ``saliency`` (same keys),
        ``delta_auc`` (``estimate, ci_low, ci_high, n_valid, p_permutation, n_perm, exact``),
        ``sentence``), ``primary``, ``n_subjects``, ``subjects``, ``skipped_subjects``,
        ``level``, and ``predictions`` (DataFrame: ``subject, label, status,
        prob_fp_baseline, flagged_baseline``, per method ``prob_fp_{m}, flagged_{m}``, and
        ``prob_fp, flagged`` of the primary method).

    Raises
    ------
    InputError
        ``n_splits`` or ``inner_splits`` below 2, unknown threshold rule.
    """
    st = _stats()
    if n_splits < 2 or inner_splits < 2:
        raise InputError(f"n_splits and inner_splits must be at least 2, got {n_splits}, "
                         f"{inner_splits}")
    if threshold_rule not in ("f1", "youden"):
        raise InputError(f"threshold rule must be 'f1' or 'youden', got {threshold_rule!r}")
    rows = _flagging_rows(instances)
    if isinstance(rows, dict):
        return rows
    status_all, subj_all, pred, fn_by_subject, df, subj, y = rows
    methods = list(methods) if methods is not None else methods_in(df.columns)
    args = (y, subj, status_all, subj_all, fn_by_subject, n_splits, inner_splits, grid, seed,
            threshold_rule, n_boot, level)
    base_X = feature_table(df, "baseline")
    if base_X.notna().any().sum() == 0:
        return {"status": "not enough data",
                "reason": f"no baseline column ({', '.join(BASELINE)}) in the lesion table"}
    base = _evaluate_set(df, base_X, *args)
    labels = df["label"].to_numpy() if "label" in df else np.arange(len(df))
    preds = pd.DataFrame({"subject": subj, "label": labels, "status": status_all[pred],
                          "prob_fp_baseline": base["oof"], "flagged_baseline": base["flagged"]})
    out_methods = {}
    for m in methods:
        sal = _evaluate_set(df, feature_table(df, "saliency", m), *args)
        both_ok = np.isfinite(base["oof"]) & np.isfinite(sal["oof"])
        yb, pa, pb = y[both_ok], base["oof"][both_ok], sal["oof"][both_ok]
        d = {"estimate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
             "n_valid": 0, "p_permutation": float("nan"), "n_perm": 0, "exact": False,
             "level": level, "n": int(both_ok.sum())}
        if yb.any() and (~yb).any():
            sb = subj[both_ok]
            bs = st.subject_bootstrap(sb, lambda i: st._auc(yb[i], pb[i]) - st._auc(yb[i], pa[i]),
                                      n_boot, seed, level)
            pt = paired_permutation_test(yb, pa, pb, sb, n_perm, seed)
            d.update(estimate=bs["estimate"], ci_low=bs["ci_low"], ci_high=bs["ci_high"],
                     n_valid=bs["n_valid"], p_permutation=pt["p"], n_perm=pt["n_perm"],
                     exact=pt["exact"])
            if "ci_note" in bs:
                d["ci_note"] = bs["ci_note"]
        entry = {"saliency": sal, "delta_auc": d}
        entry["sentence"] = plain_sentence(m, base, sal, d, len(_subjects_with_both(subj, y)))
        out_methods[m] = entry
        preds[f"prob_fp_{m}"] = sal["oof"]
        preds[f"flagged_{m}"] = sal["flagged"]
    primary = primary if primary in out_methods else (methods[0] if methods else None)
    preds["prob_fp"] = preds[f"prob_fp_{primary}"] if primary else preds["prob_fp_baseline"]
    preds["flagged"] = preds[f"flagged_{primary}"] if primary else preds["flagged_baseline"]
    for r in [base] + [e["saliency"] for e in out_methods.values()]:
        r.pop("oof")
        r.pop("flagged")
    return {"status": "ok", "cv": base["cv"], "threshold_rule": threshold_rule,
            "inner_splits": inner_splits, "grid": [list(g) for g in grid],
            "baseline": base, "methods": out_methods, "primary": primary,
            "n_subjects": int(np.unique(subj_all).size),
            "subjects": base["subjects"], "skipped_subjects": base["skipped_subjects"],
            "level": level, "predictions": preds}


def plain_sentence(method: str, base: dict, sal: dict, delta: dict, n_subjects: int) -> str:
    """One plain sentence: did ``method``'s saliency add anything, and how sure are we (CI)."""
    lab = _label(method)
    a, b = base["auc"]["auc"], sal["auc"]["auc"]
    lo, hi, est = delta["ci_low"], delta["ci_high"], delta["estimate"]
    pct = f"{100 * delta.get('level', 0.95):.0f} %"
    if not all(math.isfinite(v) for v in (a, b, lo, hi, est)):
        return (f"{lab}: not enough data to say whether saliency adds anything to lesion size "
                f"and the model's probability for flagging false positives.")
    core = (f"out-of-fold AUC {_f(a)} with size and probability alone, {_f(b)} with {lab} "
            f"saliency added (ΔAUC {est:+.3f}, {pct} CI {lo:+.3f} to {hi:+.3f}, "
            f"permutation p = {_f(delta['p_permutation'])}, {n_subjects} subjects)")
    if lo > 0:
        verdict = f"{lab} saliency added information beyond size and confidence"
    elif hi < 0:
        verdict = f"{lab} saliency made flagging worse than size and confidence alone"
    else:
        verdict = (f"no evidence that {lab} saliency adds anything beyond size and confidence, "
                   f"and a gain larger than {hi:+.3f} AUC is unlikely")
    rough = (f"; with only {n_subjects} subjects the subject bootstrap has few distinct "
             f"resamples, so read this interval as rough" if n_subjects < 10 else "")
    return f"{verdict[0].upper()}{verdict[1:]}: {core}{rough}."


# --------------------------------------------------------------------------------------------
# Markdown


def markdown(res: dict) -> str:
    """The stats.md section of :func:`compare_feature_sets` (plain sentences, then tables)."""
    st = _stats()
    out = ["\n## Does saliency flag false positives beyond confidence and size?\n\n"]
    if res["status"] != "ok":
        return "".join(out) + f"not enough data: {res.get('reason')}\n"
    lvl = f"{100 * res['level']:.0f} %"
    for e in res["methods"].values():
        out.append(f"- {e['sentence']}\n")
    out.append(
        f"\nLogistic regression (median imputation, standardised features, balanced classes), "
        f"subject-grouped nested CV: outer {res['cv']} for the estimates; inner grouped folds "
        f"(up to {res['inner_splits']}) of the training subjects choose the penalty (L1/L2) "
        f"and strength C and then the threshold (`{res['threshold_rule']}` rule on the inner "
        f"out-of-fold probabilities; it never lowers the training subjects' F1 — a fold where "
        f"no threshold helps keeps all lesions). Baseline (a): "
        f"{', '.join(res['baseline']['features'])}. Saliency (b): the baseline plus the "
        f"method's peaks, lesion and rim means, shares and first-order/GLCM/GLSZM map features "
        f"(definitions: `instance_saliency.features`). AUC: positive class FP, {lvl} CI by "
        f"subject bootstrap; ΔAUC = AUC(b) − AUC(a) on the same lesions, CI by subject "
        f"bootstrap, p by exchanging the two models' ranked scores within subjects "
        f"(Bandos et al. 2005). After flagging, a removed TP counts as a missed lesion.\n\n")
    rows = []
    sets = [("baseline", res["baseline"])] + [
        (f"baseline + {_label(m)}", e["saliency"]) for m, e in res["methods"].items()]
    for name, r in sets:
        rows.append([name, r["n_features"], st._ci(r["auc"], "auc"),
                     f"{r['folds_keeping_all']}/{r['n_folds_fitted']}",
                     f"{r['removed']['fp']}/{r['removed']['tp']}",
                     f"{_f(r['before']['f1'])} → {_f(r['after']['f1'])}",
                     f"{_f(r['before']['tpr'])} → {_f(r['after']['tpr'])}",
                     f"{_f(r['before']['fdr'])} → {_f(r['after']['fdr'])}"])
    out.append(st._md_table(["features", "k", f"out-of-fold AUC [{lvl} CI]",
                             "folds keeping all", "removed FP/TP", "lesion F1 before → after",
                             "TPR", "FDR"], rows))
    rows = [[_label(m), st._ci(e["delta_auc"], "estimate"),
             _f(e["delta_auc"]["p_permutation"]),
             ("exact, " if e["delta_auc"]["exact"] else "") + f"{e['delta_auc']['n_perm']}"]
            for m, e in res["methods"].items()]
    out.append("\n" + st._md_table(["method", f"ΔAUC [{lvl} CI]", "permutation p",
                                    "permutations"], rows))
    worse = [name for name, r in sets if r["after"]["f1"] < r["before"]["f1"] - 1e-12]
    if worse:
        out.append(f"\nRemoving the flagged lesions lowered lesion F1 on the held-out subjects "
                   f"for {', '.join(worse)}, although the threshold never lowers it on the "
                   f"training subjects: here the flagging threshold does not transfer across "
                   f"subjects.\n")
    notes = []
    for name, r in sets:
        reasons = sorted({f["keep_all_reason"] for f in r["folds"]
                          if not f["skipped"] and f["keeps_all"] and f["keep_all_reason"]})
        if reasons:
            notes.append(f"- {name}: {r['folds_keeping_all']} fold(s) keep all lesions "
                         f"({'; '.join(reasons)}).\n")
    if notes:
        out.append("\n" + "".join(notes))
    if res["skipped_subjects"]:
        out.append(f"\nSkipped (training fold with one class): "
                   f"{', '.join(res['skipped_subjects'])}\n")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# a transferable flagger (JSON, no pickle)


def fit_flagger(instances: pd.DataFrame, feature_set: str = "saliency",
                method: str | None = "smoothgrad", n_splits: int = 5, grid: Sequence = GRID,
                threshold_rule: str = "f1", seed: int = 0, provenance: dict | None = None,
                cross_validated: dict | None = None) -> dict:
    """Fit the FP flagger on every subject of a cohort and describe it as a JSON-able dict.

    Regularisation and threshold are chosen by subject-grouped CV over all subjects
    (:func:`select_and_fit`), then the pipeline is fitted on all TP/FP lesions.

    Parameters
    ----------
    instances : pandas.DataFrame
        Pooled lesion table.
    feature_set : {"baseline", "saliency"}
    method : str
        Saliency method of the ``saliency`` set.
    n_splits, grid, threshold_rule, seed :
        See :func:`select_and_fit`.
    provenance : dict, optional
        What the data are (cohort folder, explain parameters), stored under ``fitted_on``.
    cross_validated : dict, optional
        The nested-CV estimate of this feature set (AUC, ΔAUC), stored as is.

    Returns
    -------
    dict
        The flagger (see :func:`load_flagger` for the fields).

    Raises
    ------
    InputError
        Fewer than 2 subjects with both TP and FP lesions, or no usable feature.
    """
    from . import __version__

    status, subj_all, pred, fn_by_subject = _prepare_rows(instances)
    df = instances[pred]
    subj = subj_all[pred]
    y = status[pred] == "FP"
    both = _subjects_with_both(subj, y)
    if len(both) < 2:
        raise InputError(f"cannot fit a flagger: {len(both)} subject(s) with both TP and FP "
                         "lesions (need >= 2)")
    X = feature_table(df, feature_set, method)
    X = X.loc[:, X.notna().any()]
    if X.shape[1] == 0:
        raise InputError("cannot fit a flagger: no usable feature column")
    sel = select_and_fit(X.to_numpy(dtype=np.float64), y, subj, fn_by_subject, grid, n_splits,
                         seed, threshold_rule)
    model = sel["model"]
    imp, sc, lr = model[0], model[1], model[-1]
    thr = sel["threshold"]
    return {
        "format": FLAGGER_FORMAT, "version": FLAGGER_VERSION,
        "feature_set": feature_set, "method": method if feature_set == "saliency" else None,
        "features": list(X.columns),
        "imputer_median": [float(v) for v in imp.statistics_],
        "scaler_mean": [float(v) for v in sc.mean_],
        "scaler_scale": [float(v) for v in sc.scale_],
        "coef": [float(v) for v in lr.coef_[0]], "intercept": float(lr.intercept_[0]),
        "model": {"kind": "logistic regression", "solver": "liblinear",
                  "class_weight": "balanced", "penalty": sel["penalty"], "C": sel["C"],
                  "inner_auc": sel["inner_auc"], "grid": [list(g) for g in grid]},
        "threshold": thr if math.isfinite(thr) else None,
        "keeps_all": bool(sel["keeps_all"]), "keep_all_reason": sel["keep_all_reason"],
        "threshold_rule": threshold_rule,
        "training_f1": {"before": sel["train_before"], "after": sel["train_after"]},
        "fitted_on": {"subjects": sel["fit_subjects"], "n_tp": int((~y).sum()),
                      "n_fp": int(y.sum()), "n_fn": int(sum(fn_by_subject.values())),
                      **(provenance or {})},
        "cross_validated": cross_validated,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "instance_saliency_version": __version__,
    }


def save_flagger(flagger: dict, path: str | os.PathLike) -> Path:
    """Write ``flagger`` as JSON atomically (temporary name, then rename); NaN -> null."""
    from .io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps(_stats()._clean(flagger), indent=2) + "\n")
    return path


def _finite_list(d: dict, key: str, n: int, where: str) -> np.ndarray:
    v = d.get(key)
    if not isinstance(v, list) or len(v) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise InputError(f"{where}: {key!r} must be a list of {n} numbers")
    a = np.asarray(v, dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputError(f"{where}: {key!r} holds a non-finite number")
    return a


def load_flagger(path: str | os.PathLike) -> dict:
    """Read and check a flagger written by :func:`save_flagger`.

    Fields: ``format`` (``"instance-saliency-flagger"``), ``version`` (1), ``feature_set``
    (``baseline``/``saliency``), ``method``, ``features`` (k names), ``imputer_median``,
    ``scaler_mean``, ``scaler_scale`` (> 0), ``coef`` (k numbers each), ``intercept``,
    ``threshold`` (a probability, or null = flag nothing), plus descriptive fields
    (``model``, ``fitted_on``, ``cross_validated``, ...).

    Raises
    ------
    InputError
        Missing or unreadable file, not JSON, or any field missing or malformed (one line
        naming the file and the field).
    """
    where = f"flagger {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{where}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    try:
        fl = json.loads(text)
    except ValueError as e:
        raise InputError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(fl, dict) or fl.get("format") != FLAGGER_FORMAT:
        raise InputError(f"{where}: not an instance-saliency flagger (format field)")
    if fl.get("version") != FLAGGER_VERSION:
        raise InputError(f"{where}: unsupported version {fl.get('version')!r} "
                         f"(this release reads {FLAGGER_VERSION})")
    if fl.get("feature_set") not in ("baseline", "saliency"):
        raise InputError(f"{where}: feature_set must be 'baseline' or 'saliency'")
    if fl["feature_set"] == "saliency" and not (isinstance(fl.get("method"), str)
                                                and fl["method"]):
        raise InputError(f"{where}: a saliency flagger must name its method")
    feats = fl.get("features")
    if not isinstance(feats, list) or not feats or not all(isinstance(f, str) for f in feats) \
            or len(set(feats)) != len(feats):
        raise InputError(f"{where}: 'features' must be a non-empty list of distinct names")
    k = len(feats)
    for key in ("imputer_median", "scaler_mean", "scaler_scale", "coef"):
        fl[key] = _finite_list(fl, key, k, where).tolist()
    if not all(v > 0 for v in fl["scaler_scale"]):
        raise InputError(f"{where}: 'scaler_scale' must be positive")
    b = fl.get("intercept")
    if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b):
        raise InputError(f"{where}: 'intercept' must be a finite number")
    t = fl.get("threshold")
    if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool)
                          or not (0 <= t <= 1)):
        raise InputError(f"{where}: 'threshold' must be a probability in [0, 1] or null")
    fl["_path"] = str(path)
    return fl


def flagger_probabilities(flagger: dict, instances: pd.DataFrame) -> np.ndarray:
    """FP probability of every row of a per-lesion table under a flagger.

    ``p = 1 / (1 + exp(-(coef · (x̃ - mean) / scale + intercept)))`` with ``x̃`` the features
    of :func:`instance_saliency.features.feature_table` (channel names canonicalised as in the
    cohort statistics) and NaN replaced by the imputer median: exactly the fitted
    scikit-learn pipeline's ``predict_proba``.

    Returns
    -------
    ndarray, float64, shape (len(instances),)

    Raises
    ------
    InputError
        The table lacks a feature column the flagger needs (e.g. explained without its method).
    """
    st = _stats()
    table, _ = st._canonical_channels(instances, pd.DataFrame(columns=["channel"]))
    if flagger["feature_set"] == "saliency" and flagger["method"] not in methods_in(table.columns):
        raise InputError(f"flagger {flagger.get('_path', '')} needs {flagger['method']} saliency "
                         f"columns; explain with --methods including {flagger['method']}")
    X = feature_table(table, flagger["feature_set"], flagger["method"])
    missing = [f for f in flagger["features"] if f not in X.columns]
    if missing:
        raise InputError(f"flagger {flagger.get('_path', '')} needs column(s) this table lacks: "
                         f"{', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}")
    x = X[flagger["features"]].to_numpy(dtype=np.float64)
    med = np.asarray(flagger["imputer_median"])
    x = np.where(np.isnan(x), med, x)
    z = (x - np.asarray(flagger["scaler_mean"])) / np.asarray(flagger["scaler_scale"])
    logit = z @ np.asarray(flagger["coef"]) + float(flagger["intercept"])
    from scipy.special import expit

    return expit(logit)


def apply_flagger(flagger: dict, table: pd.DataFrame) -> pd.DataFrame:
    """Add ``flagger_prob_fp`` and ``flagger_flagged`` columns to a run's ``instances.csv``.

    Only predicted lesions (``source == "pred"``, or status other than FN) get a probability;
    missed ground-truth lesions get NaN and False. A lesion is flagged when its probability is
    at least the flagger's threshold (never with a null threshold: the flagger keeps all).

    Returns
    -------
    pandas.DataFrame
        A copy of ``table`` with the two columns appended.
    """
    out = table.copy()
    if not len(out):
        out["flagger_prob_fp"] = pd.Series(dtype=float)
        out["flagger_flagged"] = pd.Series(dtype=bool)
        return out
    pred = (out["source"].astype(str) == "pred").to_numpy() if "source" in out \
        else (out["status"].astype(str) != "FN").to_numpy()
    p = np.full(len(out), np.nan)
    if pred.any():
        p[pred] = flagger_probabilities(flagger, out[pred])
    thr = flagger.get("threshold")
    out["flagger_prob_fp"] = p
    out["flagger_flagged"] = (p >= thr) if thr is not None else np.zeros(len(out), bool)
    return out


# --------------------------------------------------------------------------------------------
# legacy: one classifier on all saliency summary features (single-level CV)


def _classifier(seed: int):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                         LogisticRegression(class_weight="balanced", max_iter=2000,
                                            random_state=seed))


def flag_errors(instances: pd.DataFrame, features: Sequence[str] | None = None,
                include_log_volume: bool = False, n_splits: int = 5,
                threshold_rule: str = "f1", n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Legacy single-level flagging from saliency alone (superseded by
    :func:`compare_feature_sets`, which ``analyze`` runs; kept for scripts).

    Model: logistic regression (default C) on standardised per-lesion features
    (:func:`instance_saliency.features.lesion_features`, or ``features`` columns), balanced
    classes, median imputation, all fitted inside each training fold. Subject-grouped CV
    (LeaveOneGroupOut for at most ``n_splits`` subjects, else GroupKFold); the threshold of
    each fold is :func:`choose_threshold` on the **training fold's in-sample** probabilities.
    A fold whose training part holds one class is skipped.

    Returns
    -------
    dict
        ``status``, and with "ok": ``features``, ``cv``, ``folds`` (``train_subjects,
        test_subjects, threshold, n_train, n_test, skipped``), ``threshold_rule``, ``auc``,
        ``before``, ``after``, ``removed``, ``subjects``, ``skipped_subjects``,
        ``coefficients``, ``predictions`` (``subject, label, status, prob_fp, flagged``),
        ``level``.

    Raises
    ------
    InputError
        ``n_splits`` < 2, or a ``features`` column missing.
    """
    if n_splits < 2:
        raise InputError(f"n_splits must be at least 2, got {n_splits}")
    rows = _flagging_rows(instances)
    if isinstance(rows, dict):
        return rows
    status, subj_all, pred_rows, fn_by_subject, df, subj, y = rows
    if features is None:
        X = lesion_features(df, include_log_volume)
    else:
        missing = [f for f in features if f not in df]
        if missing:
            raise InputError(f"feature column(s) {missing} not in the lesion table")
        X = df[list(features)].apply(pd.to_numeric, errors="coerce")
    X = X.loc[:, X.notna().any()]
    if X.shape[1] == 0:
        return {"status": "not enough data", "reason": "no usable feature column"}
    Xv = X.to_numpy(dtype=np.float64)
    splitter, cv_name = _splitter(np.unique(subj).size, n_splits)
    oof = np.full(len(df), np.nan)
    flagged = np.zeros(len(df), dtype=bool)
    folds, skipped = [], []
    for tr, te in splitter.split(Xv, y, groups=subj):
        tr_s, te_s = sorted(set(subj[tr])), sorted(set(subj[te]))
        fold = {"train_subjects": tr_s, "test_subjects": te_s, "n_train": int(tr.size),
                "n_test": int(te.size), "threshold": float("nan"), "skipped": False}
        if y[tr].all() or not y[tr].any():
            fold["skipped"] = True
            skipped += te_s
            folds.append(fold)
            continue
        model = _classifier(seed).fit(Xv[tr], y[tr])
        p_tr = model.predict_proba(Xv[tr])[:, 1]
        thr = choose_threshold(p_tr, y[tr], _fn_count(fn_by_subject, tr_s), threshold_rule)
        p_te = model.predict_proba(Xv[te])[:, 1]
        oof[te] = p_te
        flagged[te] = p_te >= thr
        fold["threshold"] = thr
        folds.append(fold)
    auc = _oof_auc(y, oof, subj, n_boot, seed, level)
    evaluated = sorted(set(subj_all) - set(skipped))
    ev_all = np.isin(subj_all, evaluated)
    tp0 = int((ev_all & (status == "TP")).sum())
    fp0 = int((ev_all & (status == "FP")).sum())
    fn0 = int((ev_all & (status == "FN")).sum())
    r_tp = int((flagged & ~y).sum())
    r_fp = int((flagged & y).sum())
    full = _classifier(seed).fit(Xv, y)
    coefs = dict(zip(X.columns, (float(c) for c in full[-1].coef_[0])))
    preds = pd.DataFrame({"subject": subj, "label": df["label"].to_numpy() if "label" in df
                          else np.arange(len(df)), "status": status[pred_rows],
                          "prob_fp": oof, "flagged": flagged})
    return {
        "status": "ok", "features": list(X.columns), "cv": cv_name, "folds": folds,
        "threshold_rule": threshold_rule, "auc": auc,
        "before": detection_counts(tp0, fp0, fn0),
        "after": detection_counts(tp0 - r_tp, fp0 - r_fp, fn0 + r_tp),
        "removed": {"tp": r_tp, "fp": r_fp}, "subjects": evaluated,
        "skipped_subjects": sorted(skipped), "coefficients": coefs, "predictions": preds,
        "level": level,
    }
