"""Cohort statistics against scipy / scikit-learn called directly on synthetic lesion tables.

The synthetic cohort has known group differences: FP lesions have lower FLAIR peak saliency than
TP lesions, FN lesions lower still; FLAIR saliency is larger than MPRAGE saliency; most lesions
are positive inside and negative in the 1-3 mm rim.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss
from sklearn.metrics import roc_auc_score

from instance_saliency import flagging, stats
from instance_saliency.errors import InputError

RIMS = [f"rim_out_{k}mm" for k in range(1, 6)] + ["rim_in_1mm", "rim_in_2mm"]


def make_cohort(n_subjects=6, seed=0, n_tp=6, n_fp=4, n_fn=3):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        label = 0
        for status, n, peak in (("TP", n_tp, 3.0), ("FP", n_fp, 1.5), ("FN", n_fn, 0.5)):
            for _ in range(n):
                label += 1
                r = {"subject": f"S{s:02d}", "label": label, "status": status,
                     "volume_mm3": float(rng.uniform(5, 200))}
                for ch, scale in (("flair", 1.0), ("mprage", 0.3)):
                    p = f"smoothgrad_{ch}"
                    r[f"{p}_peak_max"] = scale * (peak + rng.normal(0, 0.6))
                    r[f"{p}_peak_min"] = -scale * (0.5 * peak + rng.normal(0, 0.4))
                    r[f"{p}_mean_in"] = scale * (0.4 * peak + rng.normal(0, 0.3))
                    r[f"{p}_sum_in"] = r[f"{p}_mean_in"] * r["volume_mm3"]
                    for rim in RIMS:
                        sign = -1 if rim.startswith("rim_out") else 1
                        r[f"{p}_{rim}"] = scale * (sign * 0.2 * peak + rng.normal(0, 0.25))
                r["smoothgrad_flair_share"] = float(np.clip(rng.normal(0.75, 0.1), 0, 1))
                rows.append(r)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def cohort():
    return make_cohort()


# --------------------------------------------------------------------------------------------
# building blocks


def test_holm_matches_hand_computation():
    # sorted: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> max with 0.06 = 0.06)
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    # NaN is left out of the family: m = 2
    out = stats.holm([0.02, np.nan, 0.6])
    np.testing.assert_allclose(out[[0, 2]], [0.04, 0.6])
    assert np.isnan(out[1])
    np.testing.assert_allclose(stats.holm([0.2, 0.9]), [0.4, 0.9])  # 0.9 x 1, monotone
    assert stats.holm([0.6, 0.7]).max() <= 1.0


def test_rank_biserial_sign_convention():
    a, b = np.array([1.0, 2, 3]), np.array([4.0, 5, 6, 7])
    u = ss.mannwhitneyu(a, b).statistic  # U of a = 0: every b is larger
    assert stats.rank_biserial(u, 3, 4) == pytest.approx(1.0)
    u = ss.mannwhitneyu(b, a).statistic
    assert stats.rank_biserial(u, 4, 3) == pytest.approx(-1.0)


def test_fast_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random(40) < 0.4
    s = np.round(rng.normal(size=40), 1)  # ties
    assert stats._auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_subject_bootstrap_reproducible_resamples_whole_subjects():
    subjects = np.repeat(["a", "b", "c", "d"], [3, 1, 4, 2])
    values = np.arange(10.0)
    seen = []

    def stat(idx):
        seen.append(np.sort(idx))
        return values[idx].mean()

    r1 = stats.subject_bootstrap(subjects, stat, n_boot=200, seed=3)
    r2 = stats.subject_bootstrap(subjects, lambda i: values[i].mean(), n_boot=200, seed=3)
    r3 = stats.subject_bootstrap(subjects, lambda i: values[i].mean(), n_boot=200, seed=4)
    assert r1 == r2
    assert (r1["ci_low"], r1["ci_high"]) != (r3["ci_low"], r3["ci_high"])
    assert r1["estimate"] == pytest.approx(values.mean())
    assert r1["ci_low"] <= r1["estimate"] <= r1["ci_high"]
    assert r1["n_valid"] == 200 and r1["n_subjects"] == 4
    # every replicate pools whole subjects: each subject's rows appear equally often
    for idx in seen[1:]:
        counts = np.bincount(idx, minlength=10)
        for s in "abcd":
            c = counts[subjects == s]
            assert (c == c[0]).all()
        assert sum(np.bincount(idx, minlength=10)[subjects == s][0] for s in "abcd") == 4


def test_subject_bootstrap_skips_invalid_replicates():
    subjects = np.array(["a", "a", "b", "b", "c", "c"])
    y = np.array([True, False, True, True, True, True])  # b and c alone have one class
    s = np.array([0.9, 0.1, 0.8, 0.7, 0.6, 0.5])
    r = stats.subject_bootstrap(subjects, lambda i: stats._auc(y[i], s[i]), 100, seed=0)
    assert 0 < r["n_valid"] < 100  # replicates without a are skipped


# --------------------------------------------------------------------------------------------
# peak saliency by status


def test_peak_by_status_matches_scipy_and_sklearn(cohort):
    res = stats.peak_by_status(cohort, n_boot=300, seed=0)
    feats = {f["feature"]: f for f in res["features"]}
    assert set(feats) == {f"smoothgrad_{c}_peak_{m}" for c in ("flair", "mprage")
                          for m in ("max", "min")}
    f = feats["smoothgrad_flair_peak_max"]
    x = {s: cohort.loc[cohort.status == s, "smoothgrad_flair_peak_max"].to_numpy()
         for s in ("TP", "FP", "FN")}
    h, p = ss.kruskal(x["TP"], x["FP"], x["FN"])
    assert f["kruskal_h"] == pytest.approx(h) and f["kruskal_p"] == pytest.approx(p)
    assert f["kruskal_p"] < 1e-6
    raw = []
    for pair, (a, b) in zip(f["pairs"], stats.PAIRS):
        mw = ss.mannwhitneyu(x[a], x[b], alternative="two-sided")
        assert (pair["a"], pair["b"]) == (a, b)
        assert pair["u"] == pytest.approx(mw.statistic)
        assert pair["p"] == pytest.approx(mw.pvalue)
        assert pair["rank_biserial"] == pytest.approx(
            1 - 2 * mw.statistic / (len(x[a]) * len(x[b])))
        raw.append(mw.pvalue)
    # Holm by hand over the 3 pairs of this feature
    order = np.argsort(raw)
    hand = np.empty(3)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (3 - rank) * raw[i])
        hand[i] = min(1.0, running)
    np.testing.assert_allclose([q["p_holm"] for q in f["pairs"]], hand)
    # TP peaks are higher than FP peaks -> r(TP, FP) < 0 (second group smaller)
    assert f["pairs"][0]["rank_biserial"] < -0.5
    # AUC for FP vs TP (positive class FP) = roc_auc_score = U_FP / (n_FP n_TP)
    a = f["auc_fp_vs_tp"]
    sel = cohort.status.isin(["TP", "FP"])
    auc = roc_auc_score(cohort.status[sel] == "FP", cohort.smoothgrad_flair_peak_max[sel])
    assert a["auc"] == pytest.approx(auc)
    u_fp = ss.mannwhitneyu(x["FP"], x["TP"]).statistic
    assert a["auc"] == pytest.approx(u_fp / (len(x["FP"]) * len(x["TP"])))
    assert a["auc"] < 0.2
    assert a["ci_low"] <= a["auc"] <= a["ci_high"]
    assert a["n_valid"] == 300
    again = stats.peak_by_status(cohort, n_boot=300, seed=0)
    assert again["features"][0]["auc_fp_vs_tp"] == res["features"][0]["auc_fp_vs_tp"]


def test_peak_by_status_small_groups_give_nan():
    df = make_cohort(n_subjects=1, n_tp=3, n_fp=1, n_fn=0)
    f = stats.peak_by_status(df, ["smoothgrad_flair_peak_max"], n_boot=10)["features"][0]
    # FP has 1 value and FN none: fewer than 2 groups with >= 2 values
    assert math.isnan(f["kruskal_p"]) and f["groups_tested"] == ["TP"]
    assert all(math.isnan(p["p"]) and math.isnan(p["p_holm"]) for p in f["pairs"])
    # the AUC is still defined with one FP
    assert 0 <= f["auc_fp_vs_tp"]["auc"] <= 1


# --------------------------------------------------------------------------------------------
# FLAIR versus MPRAGE


def test_flair_vs_mprage_wilcoxon_and_share(cohort):
    res = stats.flair_vs_mprage(cohort, n_boot=300, seed=1)
    a = cohort.smoothgrad_flair_mean_in.abs().to_numpy()
    b = cohort.smoothgrad_mprage_mean_in.abs().to_numpy()
    w = ss.wilcoxon(a, b)
    assert res["quantity"] == "abs_mean_in" and res["n"] == len(cohort)
    assert res["wilcoxon_w"] == pytest.approx(w.statistic)
    assert res["wilcoxon_p"] == pytest.approx(w.pvalue)
    assert res["wilcoxon_p"] < 1e-6 and res["median_flair"] > res["median_mprage"]
    sh = res["share"]
    assert sh["median"] == pytest.approx(np.median(cohort.smoothgrad_flair_share))
    assert sh["ci_low"] <= sh["median"] <= sh["ci_high"]
    assert 0.6 < sh["ci_low"] and sh["ci_high"] < 0.9
    assert stats.flair_vs_mprage(cohort, n_boot=300, seed=1)["share"] == sh
    # a sum_abs column takes precedence when present for both channels
    df = cohort.assign(smoothgrad_flair_sum_abs=a * 10, smoothgrad_mprage_sum_abs=b * 10)
    assert stats.flair_vs_mprage(df, n_boot=0)["quantity"] == "sum_abs"


# --------------------------------------------------------------------------------------------
# lesion versus rim


def test_sign_pattern_binomial_matches_scipy(cohort):
    res = stats.sign_pattern(cohort, p0=0.25)
    inside = cohort.smoothgrad_flair_mean_in.to_numpy()
    rim = cohort[[f"smoothgrad_flair_rim_out_{k}mm" for k in (1, 2, 3)]].mean(axis=1).to_numpy()
    k = int(((inside > 0) & (rim < 0)).sum())
    o = res["overall"]
    assert (o["k"], o["n"]) == (k, len(cohort))
    bt = ss.binomtest(k, len(cohort), 0.25)
    assert o["p"] == pytest.approx(bt.pvalue)
    ci = bt.proportion_ci(0.95, method="exact")
    assert (o["ci_low"], o["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert o["proportion"] > 0.5 and o["p"] < 1e-6
    tp = cohort.status == "TP"
    k_tp = int(((inside > 0) & (rim < 0) & tp).sum())
    assert res["by_status"]["TP"]["k"] == k_tp
    other = stats.sign_pattern(cohort, p0=0.5, alternative="greater")
    assert other["overall"]["p"] == pytest.approx(
        ss.binomtest(k, len(cohort), 0.5, alternative="greater").pvalue)
    with pytest.raises(InputError):
        stats.sign_pattern(cohort, p0=1.0)


def test_sign_pattern_skips_nan_rims():
    df = make_cohort(n_subjects=1)
    df.loc[0, [f"smoothgrad_flair_rim_out_{k}mm" for k in (1, 2, 3)]] = np.nan
    df.loc[1, "smoothgrad_flair_rim_out_1mm"] = np.nan  # mean of the 2 others
    res = stats.sign_pattern(df)
    assert res["overall"]["n"] == len(df) - 1


def test_profile_by_status_t_interval():
    prof = pd.DataFrame({
        "subject": ["a"] * 4 + ["b"] * 4, "label": [1, 1, 2, 2, 1, 1, 2, 2],
        "status": ["TP", "TP", "FP", "FP", "TP", "TP", "TP", "TP"],
        "method": "smoothgrad", "channel": "flair", "distance_mm": [-0.5, 0.5] * 4,
        "mean": [1.0, -0.2, 0.4, 0.1, 2.0, -0.4, 1.5, np.nan], "voxels": 5})
    out = stats.profile_by_status(prof)
    r = out[(out.status == "TP") & (out.distance_mm == -0.5)].iloc[0]
    v = np.array([1.0, 2.0, 1.5])
    half = ss.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(v.mean())
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((v.mean() - half, v.mean() + half))
    r = out[(out.status == "TP") & (out.distance_mm == 0.5)].iloc[0]
    assert r["n"] == 2  # the NaN bin is skipped
    r = out[(out.status == "FP") & (out.distance_mm == 0.5)].iloc[0]
    assert r["n"] == 1 and math.isnan(r["ci_low"])
    assert (out.status == "all").sum() == 2


# --------------------------------------------------------------------------------------------
# error flagging


def test_detection_counts_and_threshold_by_hand():
    d = stats.detection_counts(3, 2, 1)
    assert d["f1"] == pytest.approx(3 / (3 + 1.5)) and d["tpr"] == 0.75 and d["fdr"] == 0.4
    # 2 TP (p 0.1, 0.6), 2 FP (p 0.7, 0.9), 1 FN.
    p = np.array([0.1, 0.6, 0.7, 0.9])
    y = np.array([False, False, True, True])
    # remove nothing: F1 = 2/(2+1.5)=.571; p>=.9: 2/(2+1)=.667; p>=.7: 2/(2+.5)=.8;
    # p>=.6: 1/(1+1.5)=.4 -> best .7
    assert stats.choose_threshold(p, y, n_fn=1) == pytest.approx(0.7)
    assert stats.choose_threshold(np.array([0.2, 0.3]), np.array([False, False])) == np.inf
    assert stats.choose_threshold(p, y, rule="youden") == pytest.approx(0.7)
    with pytest.raises(InputError):
        stats.choose_threshold(p, y, rule="bogus")


def test_flag_errors_grouped_cv_and_counts(cohort):
    res = stats.flag_errors(cohort, n_boot=200, seed=0)
    assert res["status"] == "ok" and res["cv"] == "GroupKFold(5)"
    subjects = set(cohort.subject)
    tested = []
    for f in res["folds"]:
        assert not set(f["train_subjects"]) & set(f["test_subjects"])
        assert set(f["train_subjects"]) | set(f["test_subjects"]) == subjects
        tested += f["test_subjects"]
    assert sorted(tested) == sorted(subjects)  # each subject tested exactly once
    pr = res["predictions"]
    assert len(pr) == (cohort.status != "FN").sum() and pr.prob_fp.notna().all()
    assert res["auc"]["auc"] == pytest.approx(roc_auc_score(pr.status == "FP", pr.prob_fp))
    assert res["auc"]["auc"] > 0.8
    assert res["auc"]["ci_low"] <= res["auc"]["auc"] <= res["auc"]["ci_high"]
    # counts before / after by hand from the flagged lesions
    tp, fp, fn = [(cohort.status == s).sum() for s in ("TP", "FP", "FN")]
    r_tp = int((pr.flagged & (pr.status == "TP")).sum())
    r_fp = int((pr.flagged & (pr.status == "FP")).sum())
    assert res["before"] == stats.detection_counts(tp, fp, fn)
    assert (res["after"]["tp"], res["after"]["fp"], res["after"]["fn"]) == (
        tp - r_tp, fp - r_fp, fn + r_tp)
    assert res["after"]["f1"] == pytest.approx((tp - r_tp) / (
        tp - r_tp + 0.5 * (fp - r_fp + fn + r_tp)))
    assert res["after"]["f1"] > res["before"]["f1"]
    # each fold's flags are its test lesions' probabilities against its own threshold
    for f in res["folds"]:
        sel = pr.subject.isin(f["test_subjects"])
        assert (pr.flagged[sel] == (pr.prob_fp[sel] >= f["threshold"])).all()


def test_flag_errors_uses_logo_for_few_subjects():
    df = make_cohort(n_subjects=3)
    res = stats.flag_errors(df, n_boot=0)
    assert res["cv"] == "LeaveOneGroupOut"
    assert [f["test_subjects"] for f in res["folds"]] == [["S00"], ["S01"], ["S02"]]


def test_threshold_chosen_without_test_fold(cohort, monkeypatch):
    calls = []
    real = stats.choose_threshold

    def spy(prob, is_fp, n_fn=0, rule="f1"):
        calls.append((len(prob), int(np.sum(is_fp)), n_fn))
        return real(prob, is_fp, n_fn, rule)

    monkeypatch.setattr(flagging, "choose_threshold", spy)
    res = stats.flag_errors(cohort, n_boot=0)
    assert len(calls) == len(res["folds"])
    for (n, n_fp, n_fn), f in zip(calls, res["folds"]):
        train = cohort[cohort.subject.isin(f["train_subjects"])]
        assert n == f["n_train"] == train.status.isin(["TP", "FP"]).sum()
        assert n_fp == (train.status == "FP").sum() and n_fn == (train.status == "FN").sum()
    monkeypatch.undo()
    # changing the test subject's features wildly does not change its fold's threshold
    base = stats.flag_errors(cohort, n_boot=0)
    fold0 = base["folds"][0]
    wild = cohort.copy()
    sel = wild.subject.isin(fold0["test_subjects"])
    cols = [c for c in wild.columns if c.startswith("smoothgrad_")]
    wild.loc[sel, cols] = wild.loc[sel, cols] * -7 + 3
    changed = stats.flag_errors(wild, n_boot=0)
    assert changed["folds"][0]["threshold"] == base["folds"][0]["threshold"]
    assert changed["folds"][0]["test_subjects"] == fold0["test_subjects"]


def test_flag_errors_not_enough_data():
    df = make_cohort(n_subjects=3)
    df = df[~((df.status == "FP") & (df.subject != "S00"))]  # only S00 has both classes
    res = stats.flag_errors(df)
    assert res["status"] == "not enough data" and "1 subject" in res["reason"]
    unknown = make_cohort(n_subjects=2).assign(status="unknown")
    assert stats.flag_errors(unknown)["status"] == "not enough data"


def test_flag_errors_tiny_case_by_hand(monkeypatch):
    """Before/after F1 on 3 subjects, threshold forced to 0.5 so the flags are known."""
    df = make_cohort(n_subjects=3, n_tp=2, n_fp=2, n_fn=1)
    monkeypatch.setattr(flagging, "choose_threshold", lambda *a, **k: 0.5)
    res = stats.flag_errors(df, n_boot=0)
    pr = res["predictions"]
    flagged = pr.prob_fp >= 0.5
    assert (pr.flagged == flagged).all()
    # before: 6 TP, 6 FP, 3 FN -> F1 = 6 / (6 + 4.5)
    assert res["before"]["f1"] == pytest.approx(6 / 10.5)
    r_tp = int((flagged & (pr.status == "TP")).sum())
    r_fp = int((flagged & (pr.status == "FP")).sum())
    tp1, fp1, fn1 = 6 - r_tp, 6 - r_fp, 3 + r_tp
    assert res["after"]["f1"] == pytest.approx(tp1 / (tp1 + (fp1 + fn1) / 2))
    assert res["after"]["tpr"] == pytest.approx(tp1 / (tp1 + fn1))


# --------------------------------------------------------------------------------------------
# pooling and the cohort analysis


def write_cohort(root, df, profiles=True):
    for s, g in df.groupby("subject"):
        d = root / "subjects" / s
        d.mkdir(parents=True)
        g.drop(columns="subject").to_csv(d / "instances.csv", index=False)
        (d / "run.json").write_text("{}")
        if profiles:
            rows = []
            for r in g.itertuples():
                for dist in (-1.5, -0.5, 0.5, 1.5, 2.5):
                    val = r.smoothgrad_flair_mean_in if dist < 0 else \
                        getattr(r, f"smoothgrad_flair_rim_out_{int(dist + 0.5)}mm")
                    for ch, scale in (("flair", 1.0), ("mprage", 0.3)):
                        rows.append({"label": r.label, "status": r.status,
                                     "method": "smoothgrad", "channel": ch,
                                     "distance_mm": dist, "mean": scale * val, "voxels": 10})
            pd.DataFrame(rows).to_csv(d / "profiles.csv", index=False)


def test_pool_instances(tmp_path):
    df = make_cohort(n_subjects=3)
    write_cohort(tmp_path, df)
    (tmp_path / "subjects" / ".S00.partial-123").mkdir()  # staging leftover: ignored
    df.head(2).to_csv(tmp_path / "subjects" / ".S00.partial-123" / "instances.csv")
    (tmp_path / "subjects" / "noRun").mkdir()  # unfinished (no run.json): ignored
    df.head(2).to_csv(tmp_path / "subjects" / "noRun" / "instances.csv")
    empty = tmp_path / "subjects" / "S99"
    empty.mkdir()
    (empty / "instances.csv").write_text("\n")  # a subject without lesions
    (empty / "run.json").write_text("{}")
    inst, prof = stats.pool_instances(tmp_path)
    assert inst.attrs["subjects"] == ["S00", "S01", "S02", "S99"]
    assert len(inst) == len(df) and list(inst.columns)[0] == "subject"
    pd.testing.assert_frame_equal(inst[df.columns].reset_index(drop=True),
                                  df.reset_index(drop=True), check_dtype=False)
    assert set(prof.subject) == {"S00", "S01", "S02"} and len(prof) == len(df) * 10
    with pytest.raises(InputError, match="no subjects with instances.csv under"):
        stats.pool_instances(tmp_path / "nothing")


def test_analyze_writes_consistent_outputs(tmp_path):
    df = make_cohort(n_subjects=6)
    write_cohort(tmp_path, df)
    (tmp_path / "failures.json").write_text(json.dumps({"S77": {"message": "bad scan"}}))
    logs = []
    res = stats.analyze(tmp_path, n_boot=100, seed=0, log=logs.append)
    for f in ("cohort_instances.csv", "cohort_profiles.csv", "stats.json", "stats.md",
              "cohort_report.html", "figures/peak_by_status.png",
              "figures/profile_by_status.png", "figures/flair_share.png",
              "figures/roc_error_flagging.png"):
        assert (tmp_path / f).is_file(), f
    js = json.loads((tmp_path / "stats.json").read_text())
    inst, _ = stats.pool_instances(tmp_path)
    direct = stats.peak_by_status(inst, n_boot=100, seed=0)
    assert js["peak_by_status"]["features"][0]["kruskal_p"] == pytest.approx(
        direct["features"][0]["kruskal_p"])
    assert js["peak_by_status"]["features"][0]["auc_fp_vs_tp"]["ci_low"] == pytest.approx(
        direct["features"][0]["auc_fp_vs_tp"]["ci_low"])
    assert js["n_subjects"] == 6 and js["counts"]["TP"] == 36
    assert js["flag_errors"]["status"] == "ok"
    assert js["failures"]["S77"]["message"] == "bad scan"
    prof = pd.DataFrame(js["profile"]["flair"])
    assert set(prof.status) == {"TP", "FP", "FN", "all"}
    table = pd.read_csv(tmp_path / "cohort_instances.csv")
    assert len(table) == len(df) and table.prob_fp.notna().sum() == (df.status != "FN").sum()
    md = (tmp_path / "stats.md").read_text()
    assert "Kruskal" in md and "lesion F1" in md and "S77" in md
    assert "FP-flagging AUC" in logs[0]
    assert js["training_scans"] == [] and "Not held-out" not in md
    html = (tmp_path / "cohort_report.html").read_text()
    assert html.count("data:image/png;base64") == 4
    # same seed -> same numbers
    res2 = stats.analyze(tmp_path, n_boot=100, seed=0, figures=False, log=lambda m: None)
    assert json.loads((tmp_path / "stats.json").read_text()) == js
    assert res2["flag_errors"]["baseline"]["auc"] == res["flag_errors"]["baseline"]["auc"]
    assert (res2["flag_errors"]["methods"]["smoothgrad"]["delta_auc"]
            == res["flag_errors"]["methods"]["smoothgrad"]["delta_auc"])


def test_cohort_report_links_each_subject_report(tmp_path):
    """The cohort report links every pooled subject's report.html (relative, so the folder
    can be moved) with its lesion counts, and names the cohort figure files."""
    import re

    df = make_cohort(n_subjects=3)
    write_cohort(tmp_path, df)
    for s in ("S00", "S02"):  # S01 has no report (run with --no-figures)
        (tmp_path / "subjects" / s / "report.html").write_text("<html></html>")
    stats.analyze(tmp_path, n_boot=50, seed=0, log=lambda m: None)
    html = (tmp_path / "cohort_report.html").read_text()
    hrefs = re.findall(r'<a href="([^"]+)">([^<]+)</a>', html)
    assert hrefs == [("subjects/S00/report.html", "S00"), ("subjects/S02/report.html", "S02")]
    for href, _ in hrefs:
        assert (tmp_path / href).is_file()
    counts = df[df.subject == "S01"].status.value_counts()
    assert f"S01 <span class=\"muted\">(no report)</span> — {counts['TP']} TP" in html
    for f in ("peak_by_status", "profile_by_status", "flair_share", "roc_error_flagging"):
        assert f"figures/{f}.png" in html


def test_analyze_without_ground_truth(tmp_path):
    df = make_cohort(n_subjects=2, n_tp=3, n_fp=2, n_fn=0).assign(status="unknown")
    write_cohort(tmp_path, df)
    res = stats.analyze(tmp_path, n_boot=20, log=lambda m: None)
    assert res["flag_errors"]["status"] == "not enough data"
    assert math.isnan(res["peak_by_status"]["features"][0]["kruskal_p"])
    assert "not enough data" in (tmp_path / "stats.md").read_text()
    assert (tmp_path / "figures" / "roc_error_flagging.png").is_file()


def test_analyze_empty_folder_is_one_line_error(tmp_path, capsys):
    from instance_saliency import cli

    assert cli.main(["analyze", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no subjects with instances.csv under" in err


def test_subjects_the_model_trained_on_are_named_in_stats(tmp_path):
    """A subject explained by a model whose members trained on it (its run.json's
    ``model.members_trained_on``; names case-insensitive) is listed in stats.json and named in
    stats.md as in-sample; held-out subjects and unreadable run.json files are not."""
    df = make_cohort(n_subjects=4)
    write_cohort(tmp_path, df)
    runs = {"S00": [{"member": "model", "trained_on": ["s00", "S03"]}],
            "S01": [{"member": "fold_a", "trained_on": ["S02"]}],
            "S02": [{"member": "fold_a", "trained_on": ["S00"]},
                    {"member": "fold_b", "trained_on": ["S02"]}]}
    for s_, used in runs.items():
        (tmp_path / "subjects" / s_ / "run.json").write_text(
            json.dumps({"model": {"members_trained_on": used}}))
    (tmp_path / "subjects" / "S03" / "run.json").write_text("not json")
    assert stats.training_scans(tmp_path, ["S00", "S01", "S02", "S03"]) == ["S00", "S02"]
    stats.analyze(tmp_path, n_boot=20, seed=0, figures=False, log=lambda m: None)
    assert json.loads((tmp_path / "stats.json").read_text())["training_scans"] == ["S00", "S02"]
    assert ("**Not held-out:** S00, S02 were training scans of the model that explained them "
            "(`run.json`: `model.members_trained_on`); their TP/FP/FN are in-sample figures."
            in (tmp_path / "stats.md").read_text())
    (tmp_path / "subjects" / "S02" / "run.json").write_text("{}")  # one left: singular
    stats.analyze(tmp_path, n_boot=20, seed=0, figures=False, log=lambda m: None)
    assert ("**Not held-out:** S00 was a training scan of the model that explained it "
            "(`run.json`: `model.members_trained_on`); its TP/FP/FN are in-sample figures."
            in (tmp_path / "stats.md").read_text())
