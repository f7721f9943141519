"""FP flagging on synthetic cohorts where the truth is known, and the map features by hand.

* saliency features that are pure noise: ΔAUC ≈ 0 with a CI covering 0;
* saliency features that carry the label beyond size and probability: ΔAUC > 0;
* nothing fitted for an outer fold (imputer/scaler/model, regularisation, threshold) ever saw a
  test subject: checked by construction (every fit records the subjects of its rows);
* the JSON flagger round-trips and gives the fitted pipeline's probabilities.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss

from instance_saliency import features, flagging, stats
from instance_saliency.errors import InputError

SAL = [f"smoothgrad_{ch}_{q}" for ch in ("flair", "mprage")
       for q in ("peak_max", "peak_min", "mean_in", "rim_out_1mm", "rim_out_2mm",
                 "rim_out_3mm")] + ["smoothgrad_flair_share",
                                    "smoothgrad_flair_fo_in_mean", "smoothgrad_flair_fo_rim_sd",
                                    "smoothgrad_flair_glcm_in_contrast"]


def make_cohort(n_subjects=16, n_tp=8, n_fp=6, n_fn=3, saliency="noise", seed=0,
                volume_codes=False):
    """Per-lesion table: prob_mean/prob_max carry a moderate FP signal; the saliency columns
    are pure noise (``saliency="noise"``) or shift FP lesions by 2 SD in two of them
    (``"label"``), independently of the probability."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        label = 0
        for status, n in (("TP", n_tp), ("FP", n_fp), ("FN", n_fn)):
            for _ in range(n):
                label += 1
                fp = status == "FP"
                pm = float(np.clip(rng.normal(0.75 - 0.06 * fp, 0.08), 0.5, 1))
                r = {"subject": f"S{s:02d}", "label": label, "status": status,
                     "source": "gt" if status == "FN" else "pred",
                     "volume_mm3": (math.exp(s + 1) if volume_codes
                                    else float(rng.lognormal(3, 1))),
                     "prob_mean": pm, "prob_max": float(min(1, pm + abs(rng.normal(0.1, 0.05))))}
                for c in SAL:
                    r[c] = float(rng.normal())
                if saliency == "label" and fp:
                    r["smoothgrad_flair_fo_in_mean"] += 2.0
                    r["smoothgrad_flair_peak_max"] -= 2.0
                rows.append(r)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def noise_res():
    return flagging.compare_feature_sets(make_cohort(saliency="noise"), n_boot=300,
                                         n_perm=500, seed=0)


@pytest.fixture(scope="module")
def label_res():
    return flagging.compare_feature_sets(make_cohort(saliency="label", seed=1), n_boot=300,
                                         n_perm=500, seed=0)


# --------------------------------------------------------------------------------------------
# the comparison


def test_noise_saliency_adds_nothing(noise_res):
    r = noise_res
    assert r["status"] == "ok" and r["cv"] == "GroupKFold(5)" and list(r["methods"]) == [
        "smoothgrad"]
    base = r["baseline"]
    assert base["features"] == ["log_volume_mm3", "prob_mean", "prob_max"]
    assert 0.6 < base["auc"]["auc"] < 0.85  # the probability carries a moderate signal
    d = r["methods"]["smoothgrad"]["delta_auc"]
    assert abs(d["estimate"]) < 0.05
    assert d["ci_low"] < 0 < d["ci_high"]
    assert d["p_permutation"] > 0.05 and d["n_perm"] == 500 and not d["exact"]
    sal = r["methods"]["smoothgrad"]["saliency"]
    assert sal["n_features"] == 3 + 4 * 2 + 1 + 3  # baseline + summary + share + map columns
    assert d["estimate"] == pytest.approx(sal["auc"]["auc"] - base["auc"]["auc"])
    assert r["methods"]["smoothgrad"]["sentence"].startswith(
        "No evidence that SmoothGrad saliency adds anything")
    assert "rough" not in r["methods"]["smoothgrad"]["sentence"]  # 16 subjects


def test_label_saliency_adds_information(label_res):
    r = label_res
    d = r["methods"]["smoothgrad"]["delta_auc"]
    sal, base = r["methods"]["smoothgrad"]["saliency"], r["baseline"]
    assert d["estimate"] > 0.15 and d["ci_low"] > 0 and d["p_permutation"] < 0.01
    assert sal["auc"]["auc"] > 0.9
    assert sal["after"]["f1"] > sal["before"]["f1"]  # removing flagged lesions helps here
    assert r["methods"]["smoothgrad"]["sentence"].startswith(
        "SmoothGrad saliency added information")
    # the out-of-fold predictions and the pooled AUC agree
    pr = r["predictions"]
    from sklearn.metrics import roc_auc_score

    assert sal["auc"]["auc"] == pytest.approx(roc_auc_score(pr.status == "FP",
                                                            pr.prob_fp_smoothgrad))
    assert base["auc"]["auc"] == pytest.approx(roc_auc_score(pr.status == "FP",
                                                             pr.prob_fp_baseline))
    assert (pr.prob_fp == pr.prob_fp_smoothgrad).all()
    # before / after counts by hand from the flags
    df = make_cohort(saliency="label", seed=1)
    tp, fp, fn = [(df.status == s).sum() for s in ("TP", "FP", "FN")]
    r_tp = int((pr.flagged_smoothgrad & (pr.status == "TP")).sum())
    r_fp = int((pr.flagged_smoothgrad & (pr.status == "FP")).sum())
    assert sal["before"] == flagging.detection_counts(tp, fp, fn)
    assert sal["after"] == flagging.detection_counts(tp - r_tp, fp - r_fp, fn + r_tp)
    assert sal["removed"] == {"tp": r_tp, "fp": r_fp}
    md = flagging.markdown(r)
    assert "ΔAUC" in md and "baseline + SmoothGrad" in md and "added information" in md


def test_training_f1_never_lowered_and_keep_all_is_said(noise_res, label_res):
    for res in (noise_res, label_res):
        for r in [res["baseline"], res["methods"]["smoothgrad"]["saliency"]]:
            for f in r["folds"]:
                assert f["train_after"]["f1"] >= f["train_before"]["f1"]
                if f["keeps_all"]:
                    assert f["threshold"] == math.inf and f["keep_all_reason"]
                    assert f["train_after"] == f["train_before"]
    # a useless baseline (only ln volume, pure noise) keeps all lesions and says so
    df = make_cohort(saliency="noise").drop(columns=["prob_mean", "prob_max"])
    res = flagging.compare_feature_sets(df, n_boot=0, n_perm=0)
    b = res["baseline"]
    assert b["folds_keeping_all"] >= 3 and b["removed"]["tp"] <= 2
    assert "keep all lesions" in flagging.markdown(res)


def test_youden_threshold_that_lowers_training_f1_keeps_all():
    df = make_cohort(n_subjects=6, saliency="noise")
    res = flagging.compare_feature_sets(df, threshold_rule="youden", n_boot=0, n_perm=0)
    for f in res["baseline"]["folds"]:
        assert f["train_after"]["f1"] >= f["train_before"]["f1"]
        if f["keeps_all"]:
            assert f["keep_all_reason"]


# --------------------------------------------------------------------------------------------
# no leakage, by construction


class _Recorder:
    """Records the subjects of the rows every imputer/scaler/model was fitted on; the subject
    is encoded in the feature ln(volume) = subject index + 1 (``volume_codes``)."""

    def __init__(self):
        self.fits = []
        self.allowed = None

    def make(self, real):
        rec = self

        def make_classifier(C=1.0, penalty="l2", seed=0):
            pipe = real(C, penalty, seed)
            fit = pipe.fit

            def recording_fit(X, y):
                subjects = {f"S{int(round(v)) - 1:02d}" for v in X[:, 0]}
                rec.fits.append(subjects)
                if rec.allowed is not None:
                    assert subjects <= rec.allowed, (subjects, rec.allowed)
                return fit(X, y)

            pipe.fit = recording_fit
            return pipe

        return make_classifier


def test_every_fit_saw_training_subjects_only(monkeypatch):
    df = make_cohort(n_subjects=7, saliency="label", volume_codes=True)
    rec = _Recorder()
    monkeypatch.setattr(flagging, "make_classifier", rec.make(flagging.make_classifier))
    real_select = flagging.select_and_fit
    thresholds = []

    def select(X, y, subj, *a, **k):
        rec.allowed = set(subj)  # an outer training part: nothing else may be fitted on
        out = real_select(X, y, subj, *a, **k)
        rec.allowed = None
        return out

    real_choose = flagging.choose_threshold

    def choose(prob, is_fp, n_fn=0, rule="f1"):
        assert rec.allowed is not None  # only ever inside a fit on given (training) subjects
        thresholds.append((len(prob), frozenset(rec.allowed)))
        return real_choose(prob, is_fp, n_fn, rule)

    monkeypatch.setattr(flagging, "select_and_fit", select)
    monkeypatch.setattr(flagging, "choose_threshold", choose)
    res = flagging.compare_feature_sets(df, n_boot=0, n_perm=0)
    assert rec.fits and all(len(s) >= 1 for s in rec.fits)
    subjects = set(df.subject)
    n_outer = 0
    for r in [res["baseline"], res["methods"]["smoothgrad"]["saliency"]]:
        tested = []
        for f in r["folds"]:
            n_outer += 1
            tr, te = set(f["train_subjects"]), set(f["test_subjects"])
            assert not tr & te and tr | te == subjects
            assert set(f["fit_subjects"]) == tr  # imputer, scaler and model
            assert set(f["threshold_subjects"]) <= tr  # the threshold's probabilities
            for inner in f["inner_folds"]:  # regularisation: inner folds of tr only
                assert set(inner["train_subjects"]) | set(inner["test_subjects"]) <= tr
                assert not set(inner["train_subjects"]) & set(inner["test_subjects"])
            tested += f["test_subjects"]
        assert sorted(tested) == sorted(subjects)
    # one threshold per outer fold (on its training lesions only) and one per final fit
    assert len(thresholds) == n_outer + 2
    assert sum(allowed == subjects for _, allowed in thresholds) == 2
    pred_rows = df[df.status != "FN"].groupby("subject").size()
    for n, allowed in thresholds:
        assert n <= pred_rows[sorted(allowed)].sum()


def test_test_subject_changes_nothing_fitted_for_its_fold():
    df = make_cohort(n_subjects=6, saliency="label")
    base = flagging.compare_feature_sets(df, n_boot=0, n_perm=0)
    fold0 = base["methods"]["smoothgrad"]["saliency"]["folds"][0]
    wild = df.copy()
    sel = wild.subject.isin(fold0["test_subjects"])
    cols = [c for c in wild.columns if c.startswith("smoothgrad_") or c.startswith("prob_")]
    wild.loc[sel, cols] = wild.loc[sel, cols] * -7 + 3
    swap = {"TP": "FP", "FP": "TP", "FN": "FN"}
    wild.loc[sel, "status"] = wild.loc[sel, "status"].map(swap)
    changed = flagging.compare_feature_sets(wild, n_boot=0, n_perm=0)
    f1 = changed["methods"]["smoothgrad"]["saliency"]["folds"][0]
    assert f1["test_subjects"] == fold0["test_subjects"]
    for k in ("threshold", "penalty", "C", "inner_auc", "grid_auc", "train_before",
              "train_after", "keeps_all"):
        assert f1[k] == fold0[k], k


def test_not_enough_data():
    df = make_cohort(n_subjects=3)
    df = df[~((df.status == "FP") & (df.subject != "S00"))]
    res = flagging.compare_feature_sets(df)
    assert res["status"] == "not enough data" and "1 subject" in res["reason"]
    assert "not enough data" in flagging.markdown(res)
    with pytest.raises(InputError, match="at least 2"):
        flagging.compare_feature_sets(df, n_splits=1)


# --------------------------------------------------------------------------------------------
# permutation test


def test_paired_permutation_test_exact_and_identity():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    subj = np.repeat([f"S{i}" for i in range(6)], 10)
    a = rng.normal(size=60)
    r = flagging.paired_permutation_test(y, a, a.copy(), subj, n_perm=1000)
    assert r["delta"] == 0 and r["p"] == 1.0 and r["exact"] and r["n_perm"] == 64
    b = a + 3 * y  # b ranks FP lesions far better
    r = flagging.paired_permutation_test(y, a, b, subj, n_perm=1000)
    # only the identity and the full swap reach |Δ|: p = 2 / 64
    assert r["delta"] > 0.3 and r["p"] == pytest.approx(2 / 64)
    r = flagging.paired_permutation_test(y, a, b, subj, n_perm=20, seed=1)
    assert not r["exact"] and r["n_perm"] == 20 and 1 / 21 <= r["p"] <= 1


# --------------------------------------------------------------------------------------------
# the JSON flagger


def test_flagger_round_trip_gives_the_pipeline_probabilities(tmp_path):
    df = make_cohort(n_subjects=8, saliency="label")
    fl = flagging.fit_flagger(df, "saliency", "smoothgrad", provenance={"cohort": "synthetic"})
    path = flagging.save_flagger(fl, tmp_path / "flagger.json")
    back = flagging.load_flagger(path)
    assert back["features"] == fl["features"] and back["fitted_on"]["cohort"] == "synthetic"
    assert back["fitted_on"]["subjects"] == sorted(set(df.subject))
    assert not list(tmp_path.glob(".*"))  # atomic write leaves no temporary file
    pred = df[df.status != "FN"].copy()
    pred.loc[pred.index[:3], "smoothgrad_flair_peak_max"] = np.nan  # imputed by the median
    p = flagging.flagger_probabilities(back, pred)
    X = features.feature_table(pred, "saliency", "smoothgrad")[fl["features"]]
    train = features.feature_table(df[df.status != "FN"], "saliency", "smoothgrad")
    model = flagging.make_classifier(fl["model"]["C"], fl["model"]["penalty"]).fit(
        train[fl["features"]].to_numpy(), (df[df.status != "FN"].status == "FP").to_numpy())
    np.testing.assert_allclose(p, model.predict_proba(X.to_numpy())[:, 1], rtol=0, atol=1e-12)
    out = flagging.apply_flagger(back, df)
    fn = out.status == "FN"
    assert out.flagger_prob_fp[fn].isna().all() and not out.flagger_flagged[fn].any()
    thr = back["threshold"]
    assert thr is not None
    assert (out.flagger_flagged[~fn] == (out.flagger_prob_fp[~fn] >= thr)).all()
    # a table whose channels are named as an nnU-Net model names them (T1) works the same
    t1 = df.rename(columns={c: c.replace("_mprage_", "_t1_") for c in df.columns})
    np.testing.assert_allclose(flagging.apply_flagger(back, t1).flagger_prob_fp,
                               out.flagger_prob_fp, rtol=0, atol=1e-12)
    # a run without the flagger's method is refused in one line
    with pytest.raises(InputError, match="needs smoothgrad saliency"):
        flagging.apply_flagger(back, df[["subject", "label", "status", "source", "volume_mm3",
                                         "prob_mean", "prob_max"]])


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not an instance-saliency flagger"),
    ('{"format": "instance-saliency-flagger", "version": 9}', "unsupported version"),
    ("LENGTH", "'coef' must be a list of 3 numbers"),
    ("SCALE", "'scaler_scale' must be positive"),
    ("THRESH", "'threshold' must be a probability"),
])
def test_bad_flagger_file_is_one_line_error(tmp_path, content, match):
    path = tmp_path / "f.json"
    good = {"format": "instance-saliency-flagger", "version": 1, "feature_set": "baseline",
            "method": None, "features": ["log_volume_mm3", "prob_mean", "prob_max"],
            "imputer_median": [1, 0.5, 0.6], "scaler_mean": [1, 0.5, 0.6],
            "scaler_scale": [1, 1, 1], "coef": [0.1, 0.2, 0.3], "intercept": 0.0,
            "threshold": 0.5}
    if content == "LENGTH":
        content = json.dumps({**good, "coef": [1, 2]})
    elif content == "SCALE":
        content = json.dumps({**good, "scaler_scale": [1, 0, 1]})
    elif content == "THRESH":
        content = json.dumps({**good, "threshold": 2})
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        flagging.load_flagger(path)
    assert "\n" not in str(e.value)
    path.write_text(json.dumps(good))
    assert flagging.load_flagger(path)["threshold"] == 0.5


def test_cli_explain_with_bad_flagger_exits_2_before_any_work(tmp_path, capsys):
    from instance_saliency import cli

    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    out = tmp_path / "out"
    rc = cli.main(["explain", "--flair", str(tmp_path / "missing_flair.nii.gz"),
                   "--mprage", str(tmp_path / "missing_t1.nii.gz"), "--flagger", str(bad),
                   "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "not an instance-saliency flagger" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# map features by hand


def _cube(n=12, lo=4, hi=7):
    m = np.zeros((n, n, n), bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def test_map_features_constant_and_crop_invariance():
    m = _cube()
    const = np.full((1,) + m.shape, 2.5)
    r = features.map_features(const, m, (1, 1, 1), ("CAM",), "gradcampp")
    assert list(r) == features.map_feature_columns("gradcampp", ("CAM",))
    assert r["gradcampp_cam_fo_in_mean"] == 2.5 and r["gradcampp_cam_fo_in_sd"] == 0
    assert math.isnan(r["gradcampp_cam_fo_in_skew"]) and r["gradcampp_cam_fo_in_entropy"] == 0
    assert r["gradcampp_cam_fo_in_rms"] == 2.5 and r["gradcampp_cam_fo_in_iqr"] == 0
    assert r["gradcampp_cam_glcm_in_contrast"] == 0 and r["gradcampp_cam_glcm_in_energy"] == 1
    assert r["gradcampp_cam_glcm_in_homogeneity"] == 1
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2,) + m.shape)
    full = features.map_features(s, m, (1, 1, 1))
    box = (slice(None), slice(0, 11), slice(1, 11), slice(0, 12))  # lesion + >= 3 mm margin
    crop = features.map_features(s[box], m[box[1:]], (1, 1, 1))
    assert full == pytest.approx(crop, nan_ok=True)


def test_map_features_first_order_match_scipy():
    m = _cube()
    rng = np.random.default_rng(1)
    s = rng.gamma(2.0, size=(1,) + m.shape)
    r = features.map_features(s, m, (1, 1, 1), ("FLAIR",), "smoothgrad", rim_mm=3)
    x = s[0][m]
    assert r["smoothgrad_flair_fo_in_mean"] == pytest.approx(x.mean())
    assert r["smoothgrad_flair_fo_in_sd"] == pytest.approx(x.std())
    assert r["smoothgrad_flair_fo_in_skew"] == pytest.approx(ss.skew(x))
    assert r["smoothgrad_flair_fo_in_kurt"] == pytest.approx(ss.kurtosis(x))  # excess
    assert r["smoothgrad_flair_fo_in_p90"] == pytest.approx(np.percentile(x, 90))
    assert r["smoothgrad_flair_fo_in_iqr"] == pytest.approx(ss.iqr(x))
    from instance_saliency.quantify import signed_distance_mm

    d, crop = signed_distance_mm(m, (1, 1, 1), 3)
    rim = s[0][crop][(d > 0) & (d <= 3)]
    assert r["smoothgrad_flair_fo_rim_mean"] == pytest.approx(rim.mean())
    assert r["smoothgrad_flair_fo_rim_rms"] == pytest.approx(np.sqrt(np.mean(rim ** 2)))


def test_glcm_by_hand():
    # two voxels side by side (levels 0 and 1): one neighbour pair, both orders counted
    lv = np.zeros((3, 3, 3), int)
    lv[1, 1, 2] = 1
    reg = np.zeros((3, 3, 3), bool)
    reg[1, 1, 1:3] = True
    c = features.glcm_matrix(lv, reg, 2)
    np.testing.assert_array_equal(c, [[0, 1], [1, 0]])
    # a 2x2x2 block of one level: 28 unordered neighbour pairs (12 face, 12 edge, 4 corner)
    reg = np.zeros((4, 4, 4), bool)
    reg[1:3, 1:3, 1:3] = True
    c = features.glcm_matrix(np.zeros((4, 4, 4), int), reg, 2)
    assert c[0, 0] == 56 and c.sum() == 56
    # alternating levels along x: every x-neighbour pair differs -> contrast of a 0/1 pattern
    m = _cube(10, 3, 7)
    s = np.zeros((1,) + m.shape)
    s[0, ::2] = 1.0
    r = features.map_features(s, m, (1, 1, 1), ("CAM",), "gradcampp", levels=2)
    lv = (s[0] >= 1).astype(int)
    d, crop = __import__("instance_saliency.quantify", fromlist=["x"]).signed_distance_mm(
        m, (1, 1, 1), 3)
    cm = features.glcm_matrix(lv[crop], d < 0, 2).astype(float)
    P = cm / cm.sum()
    assert r["gradcampp_cam_glcm_in_contrast"] == pytest.approx(P[0, 1] + P[1, 0])


def test_map_feature_errors():
    m = _cube()
    with pytest.raises(InputError, match="channels"):
        features.map_features(np.zeros((2,) + m.shape), m, (1, 1, 1), ("CAM",), "gradcampp")
    with pytest.raises(InputError, match="rim_mm"):
        features.map_features(np.zeros((1,) + m.shape), m, (1, 1, 1), ("CAM",), "g", rim_mm=0)
    with pytest.raises(InputError, match="empty"):
        features.map_features(np.zeros((1,) + m.shape), np.zeros_like(m), (1, 1, 1), ("CAM",))
    bad = np.zeros((1,) + m.shape)
    bad[0, 5, 5, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        features.map_features(bad, m, (1, 1, 1), ("CAM",), "gradcampp")


def test_pooling_renames_t1_map_columns():
    inst = pd.DataFrame({"smoothgrad_t1_fo_rim_mean": [1.0], "smoothgrad_t1_glcm_in_energy": [2.0],
                         "smoothgrad_t1_peak_max": [3.0], "smoothgrad_t1_rim_out_1mm": [4.0]})
    out, _ = stats._canonical_channels(inst, pd.DataFrame(columns=["channel"]))
    assert list(out.columns) == ["smoothgrad_mprage_fo_rim_mean",
                                 "smoothgrad_mprage_glcm_in_energy",
                                 "smoothgrad_mprage_peak_max", "smoothgrad_mprage_rim_out_1mm"]


def test_plain_sentence_cases():
    base = {"auc": {"auc": 0.7}}
    sal = {"auc": {"auc": 0.6}}
    d = {"estimate": -0.1, "ci_low": -0.2, "ci_high": -0.01, "p_permutation": 0.01,
         "level": 0.95}
    s = flagging.plain_sentence("gradcampp", base, sal, d, 4)
    assert s.startswith("Grad-CAM++ saliency made flagging worse") and "only 4 subjects" in s
    assert s.count(".") >= 1 and "\n" not in s and "CI -0.200 to -0.010" in s
    s = flagging.plain_sentence("newmethod", base, {"auc": {"auc": float("nan")}}, d, 20)
    assert s.startswith("newmethod: not enough data")


def test_explain_flagger_method_not_run(tmp_path, capsys):
    from instance_saliency import cli

    df = make_cohort(n_subjects=4, saliency="label")
    fl = flagging.save_flagger(flagging.fit_flagger(df, "saliency", "smoothgrad"),
                               tmp_path / "f.json")
    rc = cli.main(["explain", "--flair", "a.nii.gz", "--mprage", "b.nii.gz", "--methods",
                   "gradcampp", "--flagger", str(fl), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "needs smoothgrad saliency; add it to --methods" in err
    assert err.count("\n") == 0 and not (tmp_path / "o").exists()


def test_fit_flagger_too_few_subjects(tmp_path, capsys):
    from instance_saliency import cli

    df = make_cohort(n_subjects=3, n_tp=3, n_fp=2, n_fn=1)
    df = df[~((df.status == "FP") & (df.subject != "S00"))]
    for s, g in df.groupby("subject"):
        d = tmp_path / "subjects" / s
        d.mkdir(parents=True)
        g.drop(columns="subject").to_csv(d / "instances.csv", index=False)
        (d / "run.json").write_text("{}")
    rc = cli.main(["analyze", str(tmp_path), "--n-boot", "10", "--no-figures",
                   "--fit-flagger", str(tmp_path / "f.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot fit a flagger: 1 subject(s) with both TP and FP" in err
    assert not (tmp_path / "f.json").exists() and (tmp_path / "stats.md").is_file()


def test_glszm_by_hand():
    # levels along a row of 4 voxels: 0 0 1 0 -> zones {0,0} (size 2), {1} (1), {0} (1)
    lv = np.zeros((1, 4, 1), int)
    lv[0, 2, 0] = 1
    reg = np.ones((1, 4, 1), bool)
    r = features.glszm_features(lv, reg, 2)
    s = np.array([2.0, 1.0, 1.0])
    assert r["sze"] == pytest.approx(np.mean(1 / s ** 2)) and r["lze"] == pytest.approx(2.0)
    assert r["glnn"] == pytest.approx((2 ** 2 + 1 ** 2) / 9)  # level 0: 2 zones, level 1: 1
    assert r["zsnn"] == pytest.approx((1 ** 2 + 2 ** 2) / 9)  # size 2: 1 zone, size 1: 2
    assert r["zp"] == pytest.approx(3 / 4)
    # diagonal neighbours are one zone (26-connectivity)
    lv = np.zeros((2, 2, 2), int)
    lv[0, 0, 0] = lv[1, 1, 1] = 1
    r = features.glszm_features(lv, np.ones((2, 2, 2), bool), 2)
    assert r["zp"] == pytest.approx(2 / 8)
    assert math.isnan(features.glszm_features(lv, np.zeros((2, 2, 2), bool), 2)["zp"])


def test_brain_border_distance():
    img = np.zeros((2, 9, 9, 9))
    img[1, 2:7, 2:7, 2:7] = 1.0  # a 5^3 brain in the second channel
    img[1, 4, 4, 4] = 0.0  # a hole inside: filled
    d = features.brain_border_distance(img, (1.0, 1.0, 2.0))
    assert d[0, 0, 0] == 0 and d[2, 4, 4] == 1.0 and d[4, 4, 4] == pytest.approx(3.0)
    assert d[4, 4, 2] == 2.0  # 2 mm spacing along z
    full = features.brain_border_distance(np.ones((1, 5, 5, 5)), (1, 1, 1))
    assert full[0, 2, 2] == 1.0 and full[2, 2, 2] == 3.0  # the field of view's edge counts


def test_baseline_flagger_refuses_a_table_without_its_columns():
    df = make_cohort(n_subjects=4).assign(brain_border_mm=lambda d: d.volume_mm3 % 7)
    fl = flagging.fit_flagger(df, "baseline", None)
    assert fl["features"] == ["log_volume_mm3", "prob_mean", "prob_max", "brain_border_mm"]
    fl = json.loads(json.dumps(fl))
    with pytest.raises(InputError, match="needs column.*brain_border_mm"):
        flagging.flagger_probabilities(fl, df.drop(columns="brain_border_mm"))
    assert np.isfinite(flagging.flagger_probabilities(fl, df)).all()


def test_analyze_fits_a_cam_flagger(tmp_path):
    """--flagger-method picks any method with per-lesion columns (here Grad-CAM++)."""
    from instance_saliency import cli

    df = make_cohort(n_subjects=5, saliency="label")
    for c in [c for c in df.columns if c.startswith("smoothgrad_flair_peak")]:
        df[c.replace("smoothgrad_flair", "gradcampp_cam")] = df[c]
    for s, g in df.groupby("subject"):
        d = tmp_path / "subjects" / s
        d.mkdir(parents=True)
        g.drop(columns="subject").to_csv(d / "instances.csv", index=False)
        (d / "run.json").write_text("{}")
    args = ["analyze", str(tmp_path), "--n-boot", "10", "--n-perm", "10", "--no-figures",
            "--fit-flagger", str(tmp_path / "f.json")]
    assert cli.main([*args, "--flagger-method", "gradcampp"]) == 0
    fl = flagging.load_flagger(tmp_path / "f.json")
    assert fl["method"] == "gradcampp" and "gradcampp_cam_peak_max" in fl["features"]
    assert not any(f.startswith("smoothgrad") for f in fl["features"])
    js = json.loads((tmp_path / "stats.json").read_text())
    assert set(js["flag_errors"]["methods"]) == {"smoothgrad", "gradcampp"}
    assert cli.main([*args, "--flagger-method", "hirescam"]) == 2


def test_markdown_says_when_held_out_f1_falls(noise_res):
    import copy

    res = copy.deepcopy(noise_res)
    res.pop("predictions")
    res["baseline"]["after"] = dict(res["baseline"]["before"], f1=0.1)
    assert "lowered lesion F1 on the held-out subjects for baseline" in flagging.markdown(res)
    res["baseline"]["after"] = dict(res["baseline"]["before"])
    sal = res["methods"]["smoothgrad"]["saliency"]
    sal["after"] = dict(sal["before"])
    assert "held-out subjects" not in flagging.markdown(res)
