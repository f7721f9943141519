"""Command-line interface: a thin layer of argument parsing over the Python API.

Every :class:`~instance_saliency.errors.InstanceSaliencyError` is printed as one line
``instance-saliency: error: …`` and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from . import __version__
from .errors import InputError, InstanceSaliencyError, ModelError, OutputError


def _subject_from_args(name: str | None, data_dir: str | None):
    from . import datasets
    from .io import load_subject

    paths = datasets.fetch_subject(name, data_dir)
    return load_subject(paths["flair"], paths["mprage"], paths["mask"])


def _load_manifest_subjects(manifest: str, allow_outside_root: bool = False):
    """Training subjects of a CSV manifest (``subject,flair,mprage,mask``), each with a mask.

    Paths are resolved and checked against the data root by
    :func:`instance_saliency.cohort.discover_cases`.
    """
    from .cohort import discover_cases
    from .io import load_subject

    if not Path(manifest).is_file():
        raise InputError(f"training manifest {manifest} not found (a CSV file with columns "
                         f"subject,flair,mprage,mask)")
    cases = discover_cases(manifest, allow_outside_root)
    no_mask = [c.subject for c in cases if c.mask is None]
    if no_mask:
        more = " ..." if len(no_mask) > 5 else ""
        raise InputError(f"manifest {manifest}: training needs a lesion mask for every subject; "
                         f"none for {', '.join(no_mask[:5])}{more}")
    out = []
    for c in cases:
        s = load_subject(c.flair, c.mprage, c.mask)
        s.paths["subject"] = c.subject
        out.append(s)
    return out


def _check_train_options(a) -> dict:
    """Validate the numeric options and the architecture arguments of ``train``."""
    from .models import build_model

    for name in ("steps", "batch_size", "roi", "val_every"):
        if getattr(a, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if not (a.lr > 0 and a.lr < float("inf")):
        raise InputError("--lr must be a positive number")
    if not (0 <= a.ema_decay < 1):
        raise InputError("--ema-decay must be in [0, 1)")
    for name in ("warmup", "checkpoint_every", "stop_after"):
        if getattr(a, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative")
    if a.init_from:  # the starting network's settings fill in what the command left out
        from .training import read_init_config

        icfg = read_init_config(a.init_from)
        a.architecture = a.architecture or icfg.architecture
        a.normalisation = a.normalisation or icfg.normalisation
        if not a.channels and a.architecture == icfg.architecture:
            a.channels = ",".join(str(c) for c in icfg.arguments.get("channels", []))
    a.architecture = a.architecture or "unet3d"
    a.normalisation = a.normalisation or "zscore_nonzero"
    arch_args = {}
    if a.channels:
        try:
            arch_args["channels"] = [int(c) for c in a.channels.split(",")]
        except ValueError:
            raise InputError(f"--channels must be comma-separated integers, "
                             f"got {a.channels!r}") from None
        if any(c < 1 for c in arch_args["channels"]):
            raise InputError(f"--channels must be positive, got {a.channels!r}")
        arch_args["strides"] = [2] * (len(arch_args["channels"]) - 1)
    build_model(a.architecture, **arch_args)  # ModelError for arguments it does not accept
    if a.init_from:  # refused before anything is written
        from .training import check_init_from

        check_init_from(a.init_from, a.architecture, arch_args, a.normalisation)
    return arch_args


#: parameters of `instance-saliency demo` (chosen to finish in < 15 min on 2 CPU cores)
DEMO_DEFAULTS = {"n_samples": 4}


def cmd_train(a) -> int:
    import torch

    from .distributed import World
    from .models import CONFIG_NAME, WEIGHTS_NAME
    from .training import train

    if a.threads:
        torch.set_num_threads(a.threads)
    arch_args = _check_train_options(a)
    world = World.from_environment()  # under torchrun rank 0 alone writes and prints
    if a.batch_size % world.size:
        raise InputError(f"--batch-size {a.batch_size} (the global batch) must be a multiple "
                         f"of the number of processes, WORLD_SIZE={world.size}")
    from .explain import check_device

    check_device(world.device(a.device))
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    if a.resume and a.overwrite:
        raise InputError("--resume and --overwrite exclude each other")
    if a.resume and not (out / "train_state.pt").is_file():
        if (out / WEIGHTS_NAME).is_file():
            raise InputError(f"--resume: the training in {out} has finished ({WEIGHTS_NAME} is "
                             f"written); nothing to resume")
        raise InputError(f"--resume: {out / 'train_state.pt'} not found (no interrupted run "
                         f"in {out})")
    if ((out / CONFIG_NAME).exists() or (out / WEIGHTS_NAME).exists()) and not a.overwrite:
        raise OutputError(f"output folder {out} already holds a trained model; use --overwrite "
                          f"to replace")
    if (out / "train_state.pt").is_file() and not (a.resume or a.overwrite):
        raise OutputError(f"output folder {out} holds an interrupted training (train_state.pt); "
                          f"add --resume to continue it, or --overwrite to start again")
    from . import datasets

    # public names in the registry's spelling, so that config.json's trained_on matches them
    a.train_subjects = [datasets.canonical_subject(n) for n in a.train_subjects]
    a.val_subjects = [datasets.canonical_subject(n) for n in a.val_subjects]
    tr = [_subject_from_args(n, a.data_dir) for n in a.train_subjects]
    va = [_subject_from_args(n, a.data_dir) for n in a.val_subjects]
    names = list(a.train_subjects)
    if a.manifest:
        extra = _load_manifest_subjects(a.manifest, a.allow_outside_root)
        tr += extra
        names += [s.paths["subject"] for s in extra]
    if not tr:
        raise InputError("no training subjects (use --train-subjects or --manifest)")
    for s in tr:
        if any(n < a.roi for n in s.shape):
            raise InputError(f"training scan {s.paths.get('flair')} has shape {s.shape}, smaller "
                             f"than the patch (--roi {a.roi})")
    created = not out.exists()
    try:  # writable? (nothing is created before every input was checked)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write into {out}: {e.strerror or e}") from None
    if a.overwrite and world.is_main:  # nothing of the replaced model is mixed into the new one
        for name in (CONFIG_NAME, WEIGHTS_NAME, "history.json", "history.png", "train.log",
                     "train_state.pt"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "last", ignore_errors=True)
    data = f"train={a.train_subjects} val={a.val_subjects}"
    if a.manifest:
        data += f" manifest={a.manifest}"
    try:
        summary = train(tr, va, out, architecture=a.architecture, arguments=arch_args,
                        roi_size=[a.roi] * 3, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                        val_every=a.val_every, seed=a.seed, recipe=a.recipe,
                        ema_decay=a.ema_decay, warmup=a.warmup,
                        checkpoint_every=a.checkpoint_every, resume=a.resume,
                        stop_after=a.stop_after or None, save_val_prob=a.save_val_prob,
                        trained_on=names, normalisation=a.normalisation,
                        device=a.device, echo=print, init_from=a.init_from,
                        command="instance-saliency "
                        + " ".join(shlex.quote(x) for x in sys.argv[1:]),
                        data_description=data)
    except BaseException:
        if (created and world.is_main and not (out / CONFIG_NAME).exists()
                and not (out / "train_state.pt").exists()):
            shutil.rmtree(out, ignore_errors=True)  # no checkpoint yet: leave nothing
        raise
    if not world.is_main:
        return 0
    if "stopped_at" in summary:
        print(f"stopped at step {summary['stopped_at']}; continue with --resume (state in "
              f"{out / 'train_state.pt'})")
        return 0
    val = summary.get("val_at_last") or []
    figs = ", ".join(f"nDSC {r['ndsc']:.3f} lesion F1 {r['lesion_f1']:.3f}" for r in val)
    print(f"trained {summary['steps']} steps ({summary['weights']} weights)"
          + (f"; validation at the last step: {figs}" if figs else "") + f"; model in {a.out}")
    return 0


def _explain_config(a):
    from .explain import ExplainConfig

    return ExplainConfig(
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
        n_samples=a.n_samples, noise_level=a.noise_level, mode=a.mode, reduction=a.reduction,
        connectivity=a.connectivity, min_size=a.min_size, min_size_unit=a.min_size_unit,
        matching=a.matching, iou_threshold=a.iou_threshold, threshold=a.threshold,
        cam_layer=a.cam_layer, seed=a.seed, batch_size=a.batch_size,
        sw_batch_size=a.sw_batch_size, max_instances=a.max_instances,
        figures=not a.no_figures, maps=a.maps, maps_margin_mm=a.maps_margin_mm,
        device=a.device, precision=a.precision, flagger=a.flagger, **_model_options(a))


def _cli_log(msg: str) -> None:
    """Progress lines to stdout; warnings as ``instance-saliency: warning: …`` to stderr."""
    if msg.startswith("warning: "):
        print(f"instance-saliency: {msg}", file=sys.stderr)
    else:
        print(msg)


def _model_options(a) -> dict:
    """nnU-Net / ensemble options of the command line, as ExplainConfig fields."""
    return {"folds": tuple(a.folds) if a.folds else None, "checkpoint": a.checkpoint,
            "mirroring": False if a.no_mirroring else None, "step_size": a.step_size,
            "lesion_label": a.lesion_label}


def _load_model_from_args(a):
    from .explain import check_device
    from .models import load_model

    check_device(a.device)
    opts = _model_options(a)
    if opts["step_size"] is not None and not (0 < opts["step_size"] <= 1):
        raise InputError("--step-size must lie in (0, 1]")
    model = load_model(a.model, a.device, folds=list(opts["folds"]) if opts["folds"] else None,
                       checkpoint=opts["checkpoint"], mirroring=opts["mirroring"],
                       step_size=opts["step_size"], lesion_label=opts["lesion_label"])
    for w in model.warnings:
        print(f"instance-saliency: warning: {w}", file=sys.stderr)
    return model


def cmd_explain(a) -> int:
    from .explain import explain
    from .models.channels import parse_image_options

    images = parse_image_options(a.image, a.flair, a.mprage)
    explain(None, None, a.out, mask=a.mask, model_dir=a.model, config=_explain_config(a),
            overwrite=a.overwrite, progress=not a.quiet, images=images, log=_cli_log)
    return 0


def cmd_demo(a) -> int:
    from . import datasets
    from .explain import check_device, explain
    from .io import load_subject

    paths = datasets.fetch_subject(datasets.DEMO_SUBJECT, a.data_dir)
    s = load_subject(paths["flair"], paths["mprage"], paths["mask"])
    from .instances import connected_components

    _, n = connected_components(s.mask, connectivity=26)
    print(f"demo scan {datasets.DEMO_SUBJECT} (open_ms_data, CC-BY; checksums verified): "
          f"shape {s.shape}, spacing {tuple(round(v, 3) for v in s.spacing)} mm, orientation "
          f"{s.orientation}, {n} consensus lesions (26-connected)")
    if a.verify_only:
        return 0
    model = None
    from .models import model_kind

    if model_kind(a.model) == "checkpoint":  # keep the demo honest: no member saw the scan
        from .models import load_checkpoint_model

        check_device(a.device)
        model = load_checkpoint_model(a.model, a.device,
                                      False if a.no_mirroring else None,
                                      exclude_subjects=[datasets.DEMO_SUBJECT])
        used = model.info["members_trained_on"]
        print("model: " + "; ".join(f"{u['member']} (trained on {', '.join(u['trained_on']) or 'unknown scans'})"
                                    for u in used)
              + f" — never saw {datasets.DEMO_SUBJECT}")
    explain(paths["flair"], paths["mprage"], a.out, mask=paths["mask"], model_dir=a.model,
            config=_explain_config(a), overwrite=a.overwrite, progress=not a.quiet, log=_cli_log,
            model=model)
    return 0


def _run_command(run_file: Path) -> str:
    """The command that wrote a ``run.json`` (``explain`` for runs that do not say)."""
    import json

    try:
        return str(json.loads(run_file.read_text()).get("command") or "explain")
    except (OSError, ValueError, AttributeError):
        return "unknown"


def cmd_predict(a) -> int:
    import json
    import time

    import numpy as np
    import torch

    from . import datasets
    from .input_checks import check_inputs
    from .explain import (RUN_FILE, _networks_text, _versions, commit_output, prepare_output)
    from .inference import sliding_window_logits
    from .instances import connected_components
    from .io import atomic_write_text, load_images, save_map
    from .models.base import check_lesion_class
    from .models.channels import match_channels, parse_image_options

    t_all = time.time()
    images = parse_image_options(a.image, a.flair, a.mprage)
    if a.sw_batch_size < 1:
        raise InputError("--sw-batch-size must be at least 1")
    if a.threshold is not None and not (0 < a.threshold < 1):
        raise InputError("--threshold must lie strictly between 0 and 1")
    if not (a.min_size >= 0 and a.min_size < float("inf")):
        raise InputError("--min-size must be a finite number >= 0")
    model = _load_model_from_args(a)
    ordered = match_channels(model.channels, images,
                             f"model {a.model}" if a.model else "the shipped model")
    s = load_images(ordered, model.channels)
    out = Path(a.out)
    stage = None
    inputs = tuple(ordered) + (a.model,)
    if out.name.endswith((".nii", ".nii.gz")):
        mask_path = out
        prob_path = out.with_name(out.name.replace(".nii", "_prob.nii", 1))
        run_path = out.with_name(out.name.split(".nii")[0] + "_run.json")
    else:
        if out.exists() and not out.is_dir():
            raise OutputError(f"output {out} exists and is not a folder")
        if (out / RUN_FILE).is_file() and _run_command(out / RUN_FILE) != "predict":
            # a finished explain (or other) run: replaced as a whole with --overwrite, as
            # explain does, never mixed with a prediction
            if not a.overwrite:
                raise OutputError(f"output folder {out} holds a finished "
                                  f"{_run_command(out / RUN_FILE)} run ({RUN_FILE}); use "
                                  "--overwrite to replace it, or choose another --out")
            stage = prepare_output(out, True, inputs)
        target = stage or out
        mask_path, prob_path = target / "prediction_mask.nii.gz", target / "prediction_prob.nii.gz"
        run_path = target / RUN_FILE
    for p in (mask_path, prob_path, run_path):
        if any(os.path.realpath(p) == os.path.realpath(i) for i in ordered):
            raise OutputError(f"output {p} would overwrite an input; choose another --out")
    existing = [p for p in (mask_path, prob_path, run_path) if p.exists()]
    if existing and not a.overwrite:
        raise OutputError(f"{existing[0]} already exists; use --overwrite to replace")
    input_record, input_warnings = check_inputs(s.image, model, ordered)
    for w in input_warnings:
        print(f"instance-saliency: warning: {w}", file=sys.stderr)
    print(f"predict: model {model.source}: {_networks_text(model)}")
    try:
        try:
            prep = model.prepare(s.image, s.spacing, affine=s.affine)
            x = torch.from_numpy(prep.x).to(a.device)
            with torch.no_grad():
                logits = sliding_window_logits(model.network, x[None],
                                               model.grid(prep.x.shape[1:]), a.sw_batch_size,
                                               not a.quiet)
            check_lesion_class(model, logits.shape[1])
            probs = prep.probabilities(logits[0].cpu().numpy())
        except (RuntimeError, IndexError) as e:
            raise ModelError(f"the model ({a.model or 'shipped default'}) failed on this input: "
                             f"{str(e).splitlines()[0]}") from None
        prob = probs[model.lesion_class]
        # the rule of explain's prediction_mask.nii.gz: threshold (or argmax), then drop
        # components smaller than --min-size
        raw = model.segment(probs, a.threshold)
        labels, n = connected_components(raw, a.connectivity, a.min_size, a.min_size_unit,
                                         s.spacing)
        mask = labels > 0
        decision = "threshold" if a.threshold is not None or model.decision != "argmax" \
            else "argmax"
        threshold = a.threshold if a.threshold is not None else model.threshold
        rule = (f"threshold {threshold}" if decision == "threshold" else "argmax") + \
            f", components >= {a.min_size:g} {a.min_size_unit} ({a.connectivity}-connected)"
        run = {
            "instance_saliency_run": 1, "command": "predict",
            "inputs": {k: {"path": str(Path(p).resolve()), "sha256": datasets.sha256sum(p)}
                       for k, p in s.paths.items()},
            "model": {"folder": str(a.model or model.source), **model.describe()},
            "parameters": {"threshold": threshold, "decision": decision,
                           "min_size": a.min_size, "min_size_unit": a.min_size_unit,
                           "connectivity": a.connectivity, "device": a.device,
                           "sw_batch_size": a.sw_batch_size,
                           **{k: v for k, v in _model_options(a).items()}},
            "summary": {"lesion_voxels": int(mask.sum()), "lesions": int(n),
                        "removed_small_voxels": int(raw.sum() - mask.sum()),
                        "shape": list(s.shape), "spacing_mm": list(s.spacing),
                        "orientation": s.orientation, "channels": list(model.channels)},
            "outputs": {"mask": mask_path.name, "probability": prob_path.name},
            "checks": input_record,
            "versions": _versions(), "timings_s": {"total_s": round(time.time() - t_all, 2)},
        }
        # each file is written atomically; the mask (the result) last
        save_map(prob_path, prob, s.affine, s.header)
        atomic_write_text(run_path, json.dumps(run, indent=2, default=str) + "\n")
        save_map(mask_path, mask.astype(np.uint8), s.affine, s.header, np.uint8)
        if stage is not None:
            commit_output(stage, out, True, inputs)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    shown = out / mask_path.name if stage is not None else mask_path
    print(f"{int(mask.sum())} lesion voxels in {n} lesion(s) ({rule}); written {shown}")
    return 0


def cmd_evaluate(a) -> int:
    import numpy as np
    import pandas as pd

    from .io import atomic_write_text, load_mask, load_volume
    from .metrics import evaluate_pair

    if a.manifest:
        from .cohort import read_manifest, resolve_manifest_path

        df = read_manifest(a.manifest, ("subject", "prediction", "mask"),
                           "subject,prediction,mask")
        pairs = []
        for i, r in enumerate(df.to_dict(orient="records"), start=1):
            where = f"manifest {Path(a.manifest).name} row {i} (subject {r['subject']!r})"
            pairs.append((r["subject"], *(
                resolve_manifest_path(a.manifest, r[c].strip(), a.allow_outside_root,
                                      f"{where}: {c}") for c in ("prediction", "mask"))))
    else:
        if not (a.pred and a.mask):
            raise InputError("give --pred and --mask, or --manifest")
        pairs = [(a.subject or _subject_name(a.pred), a.pred, a.mask)]
    if not (0 < a.iou_threshold <= 1):
        raise InputError(f"--iou-threshold must lie in (0, 1], got {a.iou_threshold}")
    rows = []
    for subj, p, m in pairs:
        ref = load_volume(m, "mask")
        gt = load_mask(m)
        pr = load_mask(p, ref, m, role="prediction")
        spacing = tuple(float(v) for v in np.linalg.norm(ref.affine[:3, :3], axis=0))
        rows.append({"subject": subj, **evaluate_pair(gt, pr, spacing, a.iou_threshold,
                                                      a.connectivity)})
    text = _metrics_csv(pd.DataFrame(rows))
    if a.out:
        if Path(a.out).is_dir():
            raise OutputError(f"--out {a.out} is a folder; give a CSV file path")
        atomic_write_text(a.out, text)
        print(f"metrics of {len(rows)} subject(s) written to {a.out}")
    else:
        print(text, end="")
    return 0


#: file names that `predict` and `explain` give a mask: the subject is the folder's name then
_GENERIC_MASK_NAMES = ("prediction_mask", "mask", "prediction", "pred", "seg", "segmentation")


def _subject_name(path) -> str:
    """Subject name of a prediction file: its name without ``.nii``/``.nii.gz``, or the name of
    its folder when the file has a generic name (``out/sub01/prediction_mask.nii.gz`` ->
    ``sub01``)."""
    p = Path(path)
    stem = p.name[:-7] if p.name.endswith(".nii.gz") else p.stem
    if stem.lower() in _GENERIC_MASK_NAMES and p.resolve().parent.name:
        return p.resolve().parent.name
    return stem


def _metrics_csv(table) -> str:
    """``evaluate``'s CSV: one row per subject (counts as integers, other metrics rounded to 4
    decimals, volumes to 0.001 mm^3), then the ``mean`` and ``std`` rows over subjects (the
    sample standard deviation, ddof 1: empty for a single subject, as ``analyze`` says "not
    estimable")."""
    import numpy as np
    import pandas as pd

    counts = [c for c in table.columns if c.startswith("n_")]
    num = table.drop(columns=["subject"]).astype(float)
    summary = pd.concat([num.mean().rename("mean"), num.std(ddof=1).rename("std")], axis=1).T
    summary.insert(0, "subject", summary.index)
    rows = table.astype(object)
    for c in counts:
        rows[c] = [int(v) for v in table[c]]
    out = pd.concat([rows, summary.astype(object)], ignore_index=True)
    for c in out.columns:
        if c == "subject":
            continue
        digits = 3 if c.endswith("_mm3") else 4
        out[c] = pd.Series([int(v) if isinstance(v, (int, np.integer)) else round(float(v), digits)
                            for v in out[c]], dtype=object)  # NaN stays NaN: an empty cell
    return out.to_csv(index=False)


def cmd_cohort(a) -> int:
    from .cohort import parse_shard, run_cohort

    shard = parse_shard(a.shard) if a.shard else None
    res = run_cohort(a.data, a.out, _explain_config(a), model_dir=a.model, shard=shard,
                     overwrite=a.overwrite, progress=not a.quiet,
                     allow_outside_root=a.allow_outside_root, n_boot=a.n_boot, seed=a.seed,
                     log=_cli_log, include_training_scans=a.include_training_scans)
    # under torchrun every rank exits 1 when a subject of any rank failed
    failed = res["failed"] or any(r.get("failed") for r in res.get("ranks", ()))
    return 1 if failed else 0


def cmd_analyze(a) -> int:
    from .stats import analyze

    if not (0 < a.p0 < 1):  # named as the option, not as the function's parameter
        raise InputError(f"--p0 must lie strictly between 0 and 1, got {a.p0}")
    analyze(a.outdir, n_boot=a.n_boot, seed=a.seed, p0=a.p0, method=a.method,
            include_log_volume=a.log_volume, threshold_rule=a.threshold_rule,
            figures=not a.no_figures, n_perm=a.n_perm, fit_flagger=a.fit_flagger,
            flagger_set=a.flagger_set, flagger_method=a.flagger_method)
    return 0


def _float_list(text: str, name: str) -> tuple:
    """``"0,2,4"`` or ``"0:15:1"`` (start:stop:step, stop included) as floats."""
    import numpy as np

    try:
        if ":" in text:
            a, b, c = (float(v) for v in text.split(":"))
        else:
            return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{name} must be comma-separated numbers or start:stop:step, "
                         f"got {text!r}") from None
    if not (c > 0 and b >= a):
        raise InputError(f"{name} start:stop:step needs stop >= start and step > 0, "
                         f"got {text!r}")
    return tuple(float(v) for v in np.arange(a, b + c / 2, c))


def cmd_check(a) -> int:
    import torch

    from .checks import CheckConfig, run_checks

    if a.threads:
        torch.set_num_threads(a.threads)
    lesions = None
    if a.lesions:
        try:
            lesions = tuple(int(v) for v in a.lesions.split(","))
        except ValueError:
            raise InputError(f"--lesions must be comma-separated labels, got {a.lesions!r}") \
                from None
    cfg = CheckConfig(checks=tuple(a.checks.split(",")), methods=tuple(a.methods.split(",")),
                      n_samples=a.n_samples, margin_mm=a.margin_mm, stages=a.stages,
                      independent=a.independent, steps=a.steps, random_orders=a.random_orders,
                      baselines=tuple(a.baselines.split(",")),
                      context_mm=_float_list(a.context_mm, "--context-mm"), lesions=lesions,
                      max_lesions=a.max_lesions, seed=a.seed)
    log = (lambda s: None) if a.quiet else (lambda s: print(s, file=sys.stderr))
    if (Path(a.run) / "subjects").is_dir() and not (Path(a.run) / "run.json").exists():
        from .checks import check_cohort

        done = check_cohort(a.run, cfg, overwrite=a.overwrite, figures=not a.no_figures,
                            log=log)
        print(f"checks written for {len(done)} subject(s); pool them with `instance-saliency "
              f"analyze {a.run}`")
        return 0
    run_checks(a.run, cfg, overwrite=a.overwrite, figures=not a.no_figures, log=log)
    return 0


def _add_model_options(e) -> None:
    e.add_argument("--model", help="model folder: an instance-saliency checkpoint or an nnU-Net "
                   "v2 trained-model folder (dataset.json, plans.json, fold_N/); default: the "
                   "shipped model")
    e.add_argument("--folds", nargs="+", metavar="F",
                   help="nnU-Net folds to average (default: every fold present)")
    e.add_argument("--checkpoint", help="nnU-Net checkpoint file name (default "
                   "checkpoint_final.pth)")
    e.add_argument("--no-mirroring", action="store_true",
                   help="no test-time mirroring (default: as the model allows; nnU-Net: on)")
    e.add_argument("--step-size", type=float, default=None,
                   help="nnU-Net tile step size as a fraction of the patch (default 0.5)")
    e.add_argument("--lesion-label", help="lesion label of an nnU-Net model, by name or value "
                   "(default: its only foreground label)")


def _add_image_options(e, required: bool = False) -> None:
    e.add_argument("--image", action="append", metavar="NAME=FILE",
                   help="an input channel by name, e.g. --image FLAIR=flair.nii.gz --image "
                   "T1=t1.nii.gz (repeat; names as the model declares them; T1/T1w/MPRAGE and "
                   "FLAIR/T2-FLAIR are synonyms)")
    e.add_argument("--flair", help="FLAIR NIfTI (shortcut for --image FLAIR=FILE)")
    e.add_argument("--mprage", help="MPRAGE (T1-weighted) NIfTI on the same grid (shortcut for "
                   "--image MPRAGE=FILE)")


def _add_explain_options(e, **overrides) -> None:
    from .explain import METHODS, ExplainConfig

    d = ExplainConfig(**overrides)
    _add_model_options(e)
    e.add_argument("--methods", default=",".join(d.methods),
                   help=f"comma-separated, from {','.join(METHODS)} (default: "
                   f"{','.join(d.methods)})")
    e.add_argument("--n-samples", type=int, default=d.n_samples,
                   help=f"SmoothGrad noise samples N (default here {d.n_samples}; explain and "
                   "cohort default to 50 as in the seed paper, demo to 4; the SmoothGrad time "
                   "grows linearly with N)")
    e.add_argument("--noise-level", type=float, default=d.noise_level,
                   help="SmoothGrad sigma as a fraction of the FLAIR range (default 0.05)")
    e.add_argument("--mode", choices=("sliding", "patch"), default=d.mode,
                   help="sliding: exact w.r.t. sliding-window prediction; patch: one ROI per "
                        "lesion (faster, approximate)")
    e.add_argument("--reduction", choices=("sum", "mean"), default=d.reduction,
                   help="instance target: lesion logit summed or averaged over the lesion")
    e.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=d.connectivity)
    e.add_argument("--min-size", type=float, default=d.min_size,
                   help="components smaller than this are not lesions, in the prediction and "
                   "in the ground truth (default 3; predict uses the same rule)")
    e.add_argument("--min-size-unit", choices=("voxels", "mm3"), default=d.min_size_unit)
    e.add_argument("--matching", choices=("overlap", "iou"), default=d.matching,
                   help="TP/FP/FN rule: any overlap (seed paper) or IoU >= --iou-threshold")
    e.add_argument("--iou-threshold", type=float, default=d.iou_threshold)
    e.add_argument("--threshold", type=float, default=None,
                   help="lesion probability threshold (default: the checkpoint's; nnU-Net: argmax)")
    e.add_argument("--cam-layer", help="Grad-CAM++ layer name (default: per model, a decoder "
                   "level at 1/2 resolution)")
    e.add_argument("--seed", type=int, default=d.seed)
    e.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="noise samples per chunk (memory only; same results)")
    e.add_argument("--sw-batch-size", type=int, default=d.sw_batch_size,
                   help="windows per forward pass")
    e.add_argument("--max-instances", type=int, default=d.max_instances,
                   help=f"refuse scans with more lesion instances (default {d.max_instances})")
    e.add_argument("--flagger", metavar="FILE", help="JSON flagger written by `analyze "
                   "--fit-flagger`: adds per-lesion flagger_prob_fp / flagger_flagged columns "
                   "and marks flagged lesions in the report")
    e.add_argument("--no-figures", action="store_true", help="skip PNG figures and report.html")
    e.add_argument("--maps", choices=("crop", "full", "none"), default=d.maps,
                   help="per-lesion saliency NIfTI files: cropped to the lesion's bounding box "
                        "plus --maps-margin-mm (default), full-grid, or none; the tables are "
                        "the same either way")
    e.add_argument("--maps-margin-mm", type=float, default=None, metavar="MM",
                   help="margin of cropped maps around the lesion's bounding box (default: "
                        "the farthest distance from the border any number reads, 8 mm)")
    e.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    e.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=d.precision,
                   help="numeric precision of the saliency passes: fp32 (default; exact), or "
                        "bf16/fp16 autocast (faster on GPUs, not on CPUs; maps differ by a few "
                        "percent, up to about 5e-2 relative, see docs/performance.md); the "
                        "prediction stays fp32")
    e.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    e.add_argument("--quiet", action="store_true", help="no progress bars (the one-line "
                   "steps, the plan and the expected time are still printed)")


def build_parser() -> argparse.ArgumentParser:
    from .explain import ExplainConfig
    from .models import ARCHITECTURES

    p = argparse.ArgumentParser(prog="instance-saliency", allow_abbrev=False, description=(
        "Explain 3D lesion segmentation models one lesion at a time (instance SmoothGrad and "
        "Grad-CAM++; Spagnolo et al., arXiv:2406.09335)."))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # no silent abbreviations (``--n-sample`` is an error, not ``--n-samples``), also in the
    # subcommands: argparse passes the parent's ``allow_abbrev`` to none of them
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add = sub.add_parser
    sub.add_parser = lambda *args, **kw: _add(*args, allow_abbrev=False, **kw)

    t = sub.add_parser("train", help="train a segmentation model on scans with lesion masks")
    t.add_argument("--train-subjects", nargs="*", default=[], metavar="NAME",
                   help="public registry subjects to train on (e.g. patient19 P18 P39)")
    t.add_argument("--val-subjects", nargs="*", default=[], metavar="NAME",
                   help="public registry subjects to validate on (nDSC and lesion F1 logged; "
                   "no checkpoint is selected by them)")
    t.add_argument("--manifest", help="CSV with columns subject,flair,mprage,mask to train on "
                   "(relative paths: from the manifest's folder, which they may not leave)")
    t.add_argument("--allow-outside-root", action="store_true",
                   help="allow manifest paths outside the manifest's folder")
    t.add_argument("--architecture", default=None, choices=sorted(ARCHITECTURES),
                   help="network (default unet3d, or that of --init-from)")
    t.add_argument("--channels", help="unet3d widths, e.g. 16,32,64,128,256 (default: "
                   "MONAI's, or those of --init-from)")
    t.add_argument("--init-from", metavar="DIR",
                   help="fine-tune: start from the weights of this checkpoint folder (one "
                   "network, e.g. a fold_* folder of the default model) instead of random "
                   "ones; its architecture, channels, normalisation, histogram standard and "
                   "lesion threshold are kept, and its training scans count as this model's. "
                   "Give a smaller --lr than from scratch, e.g. 5e-4")
    t.add_argument("--roi", type=int, default=96, help="cubic patch side in voxels")
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2); "
                   "under torchrun the global batch over all processes, a multiple of their "
                   "number (the learning rate is that of the global batch)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--recipe", default="v2", choices=["v1", "v2", "v3", "v2-carvemix"],
                   help="augmentation recipe (v2: spatial + intensity augmentation; "
                   "v2-carvemix: v2 with lesions of other training scans pasted in, "
                   "CarveMix-style; see the model card)")
    t.add_argument("--normalisation", default=None,
                   choices=["zscore_nonzero", "histogram"],
                   help="input normalisation: per-channel z-score over non-zero voxels, or that "
                   "followed by histogram standardisation onto the training scans' mean "
                   "landmarks (Nyul et al. 2000; stored with the model). Default "
                   "zscore_nonzero, or that of --init-from")
    t.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA of the weights, saved instead of the last step (0 = off)")
    t.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps "
                   "(then cosine decay)")
    t.add_argument("--checkpoint-every", type=int, default=100,
                   help="write a resumable state (train_state.pt) every N steps")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out exactly where it stopped")
    t.add_argument("--stop-after", type=int, default=0,
                   help="stop after this step with a resumable state (0 = run to --steps)")
    t.add_argument("--save-val-prob", action="store_true",
                   help="save the last validation probability maps (val_prob_<i>.nii.gz)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (under "
                   "torchrun: cuda = each rank's cuda:LOCAL_RANK)")
    t.add_argument("--data-dir", help="local mirror of the public scans "
                   "(default: $INSTANCE_SALIENCY_DATA)")
    t.add_argument("--out", required=True, help="checkpoint folder")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a trained model in --out")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("explain", help="explain every lesion of one scan (the main job)")
    _add_image_options(e)
    e.add_argument("--mask", help="ground-truth lesion mask: TP/FP/FN labels and FN lesions")
    e.add_argument("--out", required=True, help="output folder")
    _add_explain_options(e)
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="explain the public demo scan (open_ms_data patient07)")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--data-dir", help="local mirror of the public scans "
                   "(default: $INSTANCE_SALIENCY_DATA, else download into the user cache)")
    d.add_argument("--verify-only", action="store_true",
                   help="only fetch/verify the scan and print its summary")
    _add_explain_options(d, **DEMO_DEFAULTS)
    d.set_defaults(func=cmd_demo)

    pr = sub.add_parser("predict", help="sliding-window lesion segmentation of one scan")
    _add_image_options(pr)
    _add_model_options(pr)
    pr.add_argument("--out", required=True, help="output folder (or a .nii.gz mask path)")
    pr.add_argument("--threshold", type=float, default=None,
                    help="lesion probability threshold (default: the checkpoint's; nnU-Net: "
                    "argmax)")
    pr.add_argument("--min-size", type=float, default=3,
                    help="drop predicted components smaller than this (default 3, as explain: "
                    "both write the same prediction_mask.nii.gz)")
    pr.add_argument("--min-size-unit", choices=("voxels", "mm3"), default="voxels")
    pr.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26,
                    help="connectivity of the components of the size filter (default 26)")
    pr.add_argument("--sw-batch-size", type=int, default=ExplainConfig().sw_batch_size,
                    help=f"windows per forward pass (default {ExplainConfig().sw_batch_size}, "
                    "as explain)")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", help="Dice, nDSC, lesion F1/TPR/FDR of predictions as CSV")
    ev.add_argument("--pred", help="predicted binary mask")
    ev.add_argument("--mask", help="ground-truth mask")
    ev.add_argument("--manifest", help="CSV with columns subject,prediction,mask (relative "
                    "paths: from the manifest's folder, which they may not leave)")
    ev.add_argument("--allow-outside-root", action="store_true",
                    help="allow manifest paths outside the manifest's folder")
    ev.add_argument("--subject", help="subject name of the row (default: the --pred file "
                    "name, or its folder's name for a generic name such as prediction_mask)")
    ev.add_argument("--iou-threshold", type=float, default=0.25,
                    help="IoU a predicted lesion needs with a ground-truth lesion to count as "
                    "detected (default 0.25, Shifts)")
    ev.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=6)
    ev.add_argument("--out", help="CSV path (default: print)")
    ev.set_defaults(func=cmd_evaluate)

    co = sub.add_parser("cohort", help="explain every subject of a dataset (resumable), then "
                        "run the cohort statistics; exit status 1 if some subjects failed")
    co.add_argument("--data", required=True, help="folder in nnU-Net raw layout (imagesTs/"
                    "<case>_0000 = FLAIR, _0001 = MPRAGE, labelsTs/<case>) or CSV manifest "
                    "with columns subject,flair,mprage[,mask]")
    co.add_argument("--out", required=True, help="cohort folder (subjects/<subject>/, "
                    "failures.json, stats)")
    co.add_argument("--shard", metavar="I/N", help="process only every N-th subject starting "
                    "at the I-th (1-based) of the sorted list; skips the statistics when N > 1 "
                    "(under torchrun each rank takes shard RANK+1/WORLD_SIZE itself)")
    co.add_argument("--allow-outside-root", action="store_true",
                    help="allow manifest paths outside the manifest's folder")
    co.add_argument("--include-training-scans", action="store_true",
                    help="explain a subject that some ensemble members trained on with the "
                    "whole model (default: with the members that never saw it, so that its "
                    "TP/FP/FN are held-out figures)")
    co.add_argument("--n-boot", type=int, default=1000,
                    help="subject-bootstrap resamples of the statistics (default 1000; "
                         "--seed seeds them too)")
    _add_explain_options(co)
    co.set_defaults(func=cmd_cohort)

    from .checks import CheckConfig

    cd = CheckConfig()
    ck = sub.add_parser("check", help="per-lesion trust checks of a finished explain run: "
                        "model randomisation, deletion/insertion, context (checks.csv)")
    ck.add_argument("run", help="output folder of `instance-saliency explain`, or a cohort "
                    "folder (every finished subject; resumable)")
    ck.add_argument("--checks", default=",".join(cd.checks),
                    help="comma-separated, from randomisation,deletion,context (default: all)")
    ck.add_argument("--methods", default=",".join(cd.methods),
                    help="saliency methods to check (default: smoothgrad,gradcampp,hirescam)")
    ck.add_argument("--n-samples", type=int, default=cd.n_samples,
                    help=f"SmoothGrad noise samples inside the checks (default {cd.n_samples})")
    ck.add_argument("--margin-mm", type=float, default=cd.margin_mm,
                    help=f"lesion neighbourhood for similarity and deletion (default "
                    f"{cd.margin_mm:g} mm)")
    ck.add_argument("--stages", type=int, default=cd.stages,
                    help=f"cascading randomisation stages (default {cd.stages})")
    ck.add_argument("--independent", action="store_true",
                    help="also randomise each layer group alone")
    ck.add_argument("--steps", type=int, default=cd.steps,
                    help=f"deletion/insertion steps (default {cd.steps})")
    ck.add_argument("--random-orders", type=int, default=cd.random_orders,
                    help=f"random-order seeds for the deletion reference (default "
                    f"{cd.random_orders})")
    ck.add_argument("--baselines", default=",".join(cd.baselines),
                    help="deletion baselines from background,blur,road (default "
                    "background; insertion uses the first that is not road; road adds about 75 %% to the "
                    "deletion's window passes)")
    ck.add_argument("--context-mm", default="0:15:1",
                    help="context shells in mm, comma-separated or start:stop:step "
                    "(default 0:15:1)")
    ck.add_argument("--lesions", help="comma-separated lesion labels (default: every "
                    "predicted lesion)")
    ck.add_argument("--max-lesions", type=int, metavar="K",
                    help="check at most the K largest predicted lesions of each run (a "
                    "reproducible sample for full scans and cohorts; default: all)")
    ck.add_argument("--seed", type=int, default=0)
    ck.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ck.add_argument("--overwrite", action="store_true", help="replace earlier checks")
    ck.add_argument("--no-figures", action="store_true", help="no figures and no checks.html")
    ck.add_argument("--quiet", action="store_true", help="no progress lines")
    ck.set_defaults(func=cmd_check)

    an = sub.add_parser("analyze", help="cohort statistics of a cohort folder: stats.json, "
                        "stats.md, figures, cohort_report.html")
    an.add_argument("outdir", help="cohort folder written by `instance-saliency cohort`")
    an.add_argument("--n-boot", type=int, default=1000,
                    help="subject-bootstrap resamples of every CI (default 1000)")
    an.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and classifier")
    an.add_argument("--p0", type=float, default=0.25, help="null proportion of lesions with "
                    "positive saliency inside and negative in the rim (default 0.25)")
    an.add_argument("--method", default=None, metavar="{smoothgrad,gradcampp,hirescam}",
                    help="saliency method of the FLAIR/MPRAGE, rim and profile analyses "
                    "(default: smoothgrad when the cohort has it, else the method present)")
    an.add_argument("--log-volume", action="store_true",
                    help="ignored (ln lesion volume is always in the baseline features)")
    an.add_argument("--n-perm", type=int, default=2000, help="permutations of the paired "
                    "ΔAUC test, baseline vs baseline + saliency (default 2000)")
    an.add_argument("--fit-flagger", metavar="FILE", help="also fit the FP flagger on all "
                    "subjects and save it as JSON (for explain --flagger)")
    an.add_argument("--flagger-set", choices=("saliency", "baseline"), default="saliency",
                    help="features of that flagger: baseline + --method's saliency (default) "
                    "or the baseline alone (lesion size, mean/max probability)")
    an.add_argument("--flagger-method", help="saliency method of that flagger (default: "
                    "--method), e.g. gradcampp")
    an.add_argument("--threshold-rule", choices=("f1", "youden"), default="f1",
                    help="flagging threshold chosen in each training fold (default f1)")
    an.add_argument("--no-figures", action="store_true", help="skip PNGs and the HTML report")
    an.set_defaults(func=cmd_analyze)
    return p


def _rank_prefix() -> str:
    """``[rank r of n] `` under torchrun (every rank prints its own error), else empty (also
    when the torchrun variables themselves are malformed: that is then the error)."""
    from .distributed import World

    try:
        world = World.from_environment()
    except InstanceSaliencyError:
        return ""
    return f"[{world}] " if world.distributed else ""


def main(argv: list[str] | None = None) -> int:
    import warnings

    from .errors import ModelWarning

    warnings.simplefilter("ignore", ModelWarning)  # printed as one line by the commands
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # as argparse does for a missing required argument
        parser.print_usage(sys.stderr)
        names = [n for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                 for n in a.choices]
        print(f"instance-saliency: error: a command is required ({', '.join(names)}); see "
              "instance-saliency --help", file=sys.stderr)
        return 2
    previous = _terminate_like_interrupt()
    try:
        _refuse_torchrun(args.command)
        return int(args.func(args) or 0)
    except InstanceSaliencyError as e:
        print(f"instance-saliency: error: {_rank_prefix()}{str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2
    except _Terminated:
        print("instance-saliency: terminated (SIGTERM); nothing half-written was kept",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("instance-saliency: interrupted", file=sys.stderr)
        return 130
    finally:
        from .distributed import close_process_group

        close_process_group()  # under torchrun: every rank here, before the interpreter ends
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


#: commands that share their work among torchrun's processes
DISTRIBUTED_COMMANDS = ("cohort", "train")


def _refuse_torchrun(command: str) -> None:
    """Under torchrun (``WORLD_SIZE`` > 1) only :data:`DISTRIBUTED_COMMANDS` split their work;
    any other command would run whole on every process, the copies racing for one output.

    Raises
    ------
    InputError
        ``command`` is not distributed and ``WORLD_SIZE`` > 1.
    """
    from .distributed import World

    world = World.from_environment()
    if world.size > 1 and command not in DISTRIBUTED_COMMANDS:
        raise InputError(f"'{command}' runs one job and does not split it among torchrun's "
                         f"{world.size} processes (each would do all of it); run it without "
                         f"torchrun, or use cohort for many scans")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, torchrun stopping its workers, ``kill``) raised as
    an interrupt, so that staging folders are removed as after Ctrl-C."""


def _terminate_like_interrupt():
    """Route SIGTERM to :class:`_Terminated`; return the previous handler (None when signals
    cannot be set here, e.g. outside the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise _Terminated()

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
