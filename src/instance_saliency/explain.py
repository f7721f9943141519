"""The main job: predict, split into lesion instances, explain each instance, quantify, report.

:func:`explain` runs the whole pipeline of one scan (DESIGN.md) and writes an output folder
whose file names are stable (see the README, "Outputs"). All files are first written into a
hidden staging folder beside ``out`` and the folder is renamed into place at the end, so an
interrupted run leaves either the previous complete result or none.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError, ModelError, OutputError

METHODS = ("smoothgrad", "gradcampp", "hirescam")
#: methods run when none are named (HiResCAM is opt-in: ``--methods ...,hirescam``)
DEFAULT_METHODS = ("smoothgrad", "gradcampp")
#: display names
METHOD_LABELS = {"smoothgrad": "SmoothGrad", "gradcampp": "Grad-CAM++", "hirescam": "HiResCAM"}
#: methods whose maps live at a CAM layer (one map, not one per input channel)
CAM_METHODS = ("gradcampp", "hirescam")
RUN_FILE = "run.json"
#: what ``instance-saliency check`` adds to a run's folder (its PNGs go into ``figures/``):
#: results about that run, replaced with it (``--overwrite``), never left beside new maps
CHECK_FILES = ("checks.csv", "check_curves.csv", "checks.json", "checks.html")
#: everything a run writes into its folder (anything else there belongs to the user)
RUN_ENTRIES = {"prediction_prob.nii.gz", "prediction_mask.nii.gz", "instances.nii.gz",
               "saliency", "instances.csv", "profiles.csv", "instances_full.csv",
               "profiles_full.csv", "figures", "report.html",
               RUN_FILE, *CHECK_FILES}


@dataclass
class ExplainConfig:
    """Parameters of :func:`explain` (all recorded in ``run.json``).

    Attributes
    ----------
    methods : tuple of str
        Subset of :data:`METHODS` (default :data:`DEFAULT_METHODS`).
    n_samples : int
        SmoothGrad noise samples N (seed paper: 50).
    noise_level : float
        SmoothGrad σ as a fraction of the normalised FLAIR range (seed paper: 0.05).
    mode : {"sliding", "patch"}
        ``sliding``: exact with respect to sliding-window prediction (window-sparse);
        ``patch``: one ROI centred on each instance (cheaper, approximate).
    reduction : {"sum", "mean"}
        Instance target: lesion logit summed (seed code) or averaged over the instance.
    connectivity : {6, 18, 26}
        Connectivity of lesion instances.
    min_size : float
        Predicted components smaller than this (``min_size_unit``) are dropped.
    matching : {"overlap", "iou"}
        TP/FP/FN rule with a ground-truth mask: any overlap (seed paper) or IoU ≥
        ``iou_threshold`` (Shifts).
    threshold : float or None
        Probability threshold of the mask; ``None`` = the checkpoint's.
    cam_layer : str or None
        Grad-CAM++ layer; ``None`` = the model's default.
    folds, checkpoint, mirroring, step_size, lesion_label
        Model options (nnU-Net folds, checkpoint name, test-time mirroring, tile step size,
        lesion label); ``None`` = the model's defaults (:func:`instance_saliency.models.load_model`).
    max_instances : int
        Refuse scans with more instances than this (raise ``min_size`` or this limit); at
        least 1.
    flagger : str or None
        JSON flagger (:func:`instance_saliency.flagging.load_flagger`): adds the per-lesion
        columns ``flagger_prob_fp`` and ``flagger_flagged`` and marks flagged lesions in the
        report.
    figures : bool
        Write PNG figures and ``report.html``.
    maps : {"crop", "full", "none"}
        Per-lesion saliency NIfTI files: cropped to the lesion's bounding box grown by
        ``maps_margin_mm`` (default), full-grid, or none. Numbers never depend on it.
    maps_margin_mm : float or None
        Margin of the cropped maps in mm; ``None`` = :func:`instance_saliency.maps.default_margin_mm`
        (the farthest distance from the lesion border any number reads: 8 mm by default).
    device : str
        Torch device of the network passes and of the saliency accumulation (``cpu``,
        ``cuda``, ``cuda:1``, ...).
    precision : {"fp32", "bf16", "fp16"}
        Numeric precision of the saliency passes (:data:`instance_saliency.saliency.PRECISIONS`):
        IEEE float32 (default, on every device) or ``torch.autocast`` to bfloat16/float16 —
        faster on GPUs, with a map error measured in docs/performance.md. The prediction (and
        so the lesion instances) is always float32.
    """

    methods: tuple = DEFAULT_METHODS
    n_samples: int = 50
    noise_level: float = 0.05
    mode: str = "sliding"
    reduction: str = "sum"
    connectivity: int = 26
    min_size: float = 3
    min_size_unit: str = "voxels"
    matching: str = "overlap"
    iou_threshold: float = 0.25
    threshold: float | None = None
    cam_layer: str | None = None
    seed: int = 0
    batch_size: int = 1
    sw_batch_size: int = 2
    max_instances: int = 300
    share_margin_mm: float = 2.0
    peak_margin_mm: float = 3.0
    profile_bins_mm: tuple = tuple(range(-3, 9))
    figures: bool = True
    maps: str = "crop"
    maps_margin_mm: float | None = None
    device: str = "cpu"
    precision: str = "fp32"
    folds: tuple | None = None
    checkpoint: str | None = None
    mirroring: bool | None = None
    step_size: float | None = None
    lesion_label: str | None = None
    flagger: str | None = None

    def validate(self) -> None:
        """Raise :class:`InputError` for out-of-range parameters."""
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InputError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if self.mode not in ("sliding", "patch"):
            raise InputError(f"mode must be 'sliding' or 'patch', got {self.mode!r}")
        if self.n_samples < 1:
            raise InputError("--n-samples must be at least 1")
        if not (self.noise_level >= 0 and np.isfinite(self.noise_level)):
            raise InputError("--noise-level must be a finite number >= 0")
        if self.connectivity not in (6, 18, 26):
            raise InputError("--connectivity must be 6, 18 or 26")
        if self.threshold is not None and not (0 < self.threshold < 1):
            raise InputError("--threshold must lie strictly between 0 and 1")
        if self.reduction not in ("sum", "mean"):
            raise InputError("--reduction must be 'sum' or 'mean'")
        if self.batch_size < 1 or self.sw_batch_size < 1:
            raise InputError("--batch-size and --sw-batch-size must be at least 1")
        if self.max_instances < 1:  # 0 would refuse every scan with a lesion, after the
            raise InputError("--max-instances must be at least 1")  # prediction
        if not (self.min_size >= 0 and np.isfinite(self.min_size)):
            raise InputError("--min-size must be a finite number >= 0")
        if not (0 < self.iou_threshold <= 1):
            raise InputError("--iou-threshold must lie in (0, 1]")
        if self.step_size is not None and not (0 < self.step_size <= 1):
            raise InputError("--step-size must lie in (0, 1]")
        from .maps import MAP_MODES

        if self.maps not in MAP_MODES:
            raise InputError(f"--maps must be one of {', '.join(MAP_MODES)}, got {self.maps!r}")
        if self.maps_margin_mm is not None and not (
                np.isfinite(self.maps_margin_mm) and self.maps_margin_mm >= 0):
            raise InputError("--maps-margin-mm must be a finite number >= 0")
        from .saliency import PRECISIONS

        if self.precision not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")

    def model_options(self) -> dict:
        """Keyword arguments of :func:`instance_saliency.models.load_model`."""
        return {"folds": list(self.folds) if self.folds else None,
                "checkpoint": self.checkpoint, "mirroring": self.mirroring,
                "step_size": self.step_size, "lesion_label": self.lesion_label}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("instance-saliency", "torch", "monai", "numpy", "scipy", "nibabel",
              "connected-components-3d", "pandas", "matplotlib"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX; elsewhere always True, so nothing is removed)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) terminates on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def remove_stale_staging(out: str | os.PathLike) -> list:
    """Remove the leftovers of killed runs beside ``out``.

    A run writes into ``.<name>.partial-<pid>`` and, while replacing an old run, moves it to
    ``.<name>.old-<pid>`` (``<name>`` = ``out.name``, ``<pid>`` = the writing process). A
    process killed with SIGKILL cannot remove them; they are removed here when process
    ``<pid>`` no longer exists (folders of a live process, e.g. a concurrent run, are kept).

    Returns
    -------
    list of str
        Names removed.
    """
    out = Path(out)
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)$")
    removed = []
    try:
        entries = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return removed
    for p in entries:
        m = pat.match(p.name)
        if not m or _pid_alive(int(m[2])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p.name)
    return removed


def _is_inside(path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(folder)
        return True
    except ValueError:
        return False


def check_output_folder(out: Path, overwrite: bool, inputs=()) -> None:
    """Refuse an output folder that cannot safely receive (or be replaced by) a run.

    ``--overwrite`` replaces only a folder that holds a finished run (``run.json``) or is
    empty; never a folder holding other files, nor one that contains an input file.

    Raises
    ------
    OutputError
    """
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    for p in inputs:
        if p is not None and _is_inside(p, out):
            raise OutputError(f"output folder {out} contains the input {p}; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RUN_FILE).exists():
            raise OutputError(f"output folder {out} holds files that are not an instance-saliency "
                              "run; choose an empty or new folder")
        if not overwrite:
            raise OutputError(f"output folder {out} already holds a finished run; use "
                              "--overwrite to replace it")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES)
        if foreign:
            raise OutputError(f"output folder {out} holds files that are not part of a run "
                              f"({', '.join(foreign[:3])}); --overwrite would delete them: "
                              "move them or choose another --out")


def prepare_output(out: Path, overwrite: bool, inputs=()) -> Path:
    """Check ``out`` and create a fresh staging folder beside it.

    ``out`` is resolved first (a symbolic link to a folder is followed). Leftover staging
    folders of killed runs beside ``out`` are removed (:func:`remove_stale_staging`).

    Raises
    ------
    OutputError
        See :func:`check_output_folder`; or the parent folder cannot be written.
    """
    out = Path(os.path.realpath(out))
    check_output_folder(out, overwrite, inputs)
    remove_stale_staging(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        probe = stage / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = "not a folder" if e.errno == 20 else (e.strerror or str(e))
        raise OutputError(f"cannot write into {out.parent}: {why}") from None
    return stage


def commit_output(stage: Path, out: Path, overwrite: bool = False, inputs=()) -> None:
    """Move the finished staging folder onto ``out`` (replacing an old run last).

    The checks of :func:`check_output_folder` are repeated, so that a run which finished
    meanwhile into the same folder (a concurrent run) is not silently replaced.
    """
    out = Path(os.path.realpath(out))
    check_output_folder(out, overwrite, inputs)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc ``malloc_trim``).

    Full-grid arrays freed by one stage otherwise stay in the process's heap (its resident
    size does not fall), so a long run, or the next subject of a cohort, starts from the
    previous stage's high-water mark. No-op where glibc is not available.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def check_precision_on(device: str, precision: str) -> None:
    """Refuse a ``--precision`` the device cannot run, with a one-line :class:`InputError`
    (e.g. bf16 on a GPU without bfloat16, or on a CPU without AVX-512)."""
    from .saliency._speed import check_precision

    try:
        check_precision(precision, device)
    except ValueError as e:
        raise InputError(f"--precision {precision} on --device {device}: {e}") from None


def cuda_peak_gb(device: str) -> float | None:
    """Peak CUDA memory allocated by torch on ``device`` since the last reset, in GB
    (1e9 bytes; ``torch.cuda.max_memory_allocated``); None off CUDA."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated(dev) / 1e9, 3)


def check_device(device: str) -> None:
    """Refuse a torch device that does not exist here, with a one-line :class:`InputError`."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown --device {device!r} ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is available to this torch build")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: only cpu and cuda devices are supported")


def table_columns(methods: Sequence[str] = DEFAULT_METHODS, channels: Sequence[str] | None = None
                  ) -> list:
    """Columns of ``instances.csv`` for ``methods`` and the model's input ``channels`` (default
    FLAIR, MPRAGE), in order (also the header of a run without any lesion instance)."""
    from .instances import Instance
    from .io import CHANNELS
    from .features import map_feature_columns
    from .models.channels import column_name
    from .quantify import quantify_columns

    chans = [column_name(c) for c in (channels or CHANNELS)]
    zero = (0, 0, 0)
    cols = list(Instance(0, "unknown", "pred", 0, 0, 0.0, zero, zero, zero, zero).to_dict())
    cols += ["prob_mean", "prob_max", "brain_border_mm"]
    for m in METHODS:
        if m in methods:
            ch = chans if m == "smoothgrad" else ("CAM",)
            cols += quantify_columns(m, ch) + [f"{m}_n_windows"] + map_feature_columns(m, ch)
    return cols


def explain(flair: str | os.PathLike | None, mprage: str | os.PathLike | None,
            out: str | os.PathLike, mask: str | os.PathLike | None = None,
            model_dir: str | os.PathLike | None = None, config: ExplainConfig | None = None,
            overwrite: bool = False, progress: bool = True, log=print,
            images: dict | None = None, model=None) -> dict:
    """Explain every lesion instance of one scan and write the results into ``out``.

    Parameters
    ----------
    flair, mprage : path or None
        Co-registered, skull-stripped 3D NIfTI images on one grid (shortcuts for
        ``images={"FLAIR": flair, "MPRAGE": mprage}``; ``None`` when not given).
    out : path
        Output folder (see the README for its files).
    mask : path, optional
        Ground-truth lesion mask: enables TP/FP/FN labels and FN instance maps.
    model_dir : path, optional
        Checkpoint folder or nnU-Net v2 trained-model folder; default: the shipped model.
    config : ExplainConfig
    overwrite : bool
        Replace a finished run in ``out``.
    images : dict of str -> path, optional
        Images by channel name (matched to the model's channels, see
        :func:`instance_saliency.models.channels.match_channels`), besides ``flair``/``mprage``.
    model : SegmentationModel, optional
        An already loaded model (then ``model_dir`` only names it in ``run.json``).

    Returns
    -------
    dict
        The run summary (also in ``run.json``).

    Raises
    ------
    InputError, ModelError, OutputError
        Bad inputs, model or output folder, a missing or unknown channel; nothing is left in
        ``out`` then.
    """
    import pandas as pd
    import torch

    from . import datasets
    from ._format import round_table
    from .inference import sliding_window_logits
    from .instances import find_instances
    from .io import atomic_write_text, load_images, save_map
    from .models import load_model
    from .models.base import check_lesion_class
    from .models.channels import column_name, match_channels
    from .features import brain_border_distance, map_features
    from .maps import default_margin_mm, map_box, save_lesion_map
    from .quantify import distance_profile, quantify_instance
    from .report import instance_figure
    from .report.viewer import ViewerData
    from .saliency import _speed, gradcampp, hirescam, record_layer_sums, smoothgrad
    from .targets import InstanceTarget

    cfg = config or ExplainConfig()
    cfg.validate()
    flagger = _load_flagger(cfg)
    out = Path(out)
    timings: dict = {}
    t_all = time.time()
    check_device(cfg.device)
    check_precision_on(cfg.device, cfg.precision)
    if torch.device(cfg.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch.device(cfg.device))
    given = dict(images or {})
    for name, path in (("FLAIR", flair), ("MPRAGE", mprage)):
        if path is not None:
            given[name] = path
    if not given:
        raise InputError("no input image given")
    loaded_here = model is None
    if loaded_here:
        model = load_model(model_dir, cfg.device, **cfg.model_options())
    else:
        model.to(cfg.device)
    model_name = f"model {model_dir}" if model_dir is not None else f"the {model.source} model"
    ordered = match_channels(model.channels, given, model_name)
    subj = load_images(ordered, model.channels, mask)
    threshold = cfg.threshold if cfg.threshold is not None else model.threshold
    decision = "threshold" if cfg.threshold is not None or model.decision != "argmax" \
        else "argmax"
    cam_layer = cfg.cam_layer or model.cam_layer
    if any(m in CAM_METHODS for m in cfg.methods):
        if cam_layer is None:
            raise InputError(f"no default Grad-CAM++ layer for this model ({model.source}); "
                             "give --cam-layer")
        names = dict(model.members[0].net.named_modules())
        if cam_layer not in names:
            conv = [n for n, m in names.items() if n and isinstance(
                m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
            raise InputError(f"Grad-CAM++ layer {cam_layer!r} is not in this model; give "
                             f"--cam-layer, e.g. one of the last convolutions: {conv[-4:]}")
    inputs = tuple(ordered) + (mask, model_dir)
    stage = prepare_output(out, overwrite, inputs)
    for w in model.warnings if loaded_here else ():
        log(f"warning: {w}")
    from .input_checks import check_inputs

    input_record, input_warnings = check_inputs(subj.image, model, ordered)
    for w in input_warnings:
        log(f"warning: {w}")
    log(run_plan(cfg, model, cam_layer))
    try:
        t0 = time.time()
        log("predicting (sliding window)")
        prep = model.prepare(subj.image, subj.spacing, affine=subj.affine)
        xt = torch.from_numpy(prep.x).to(cfg.device)
        grid = model.grid(prep.x.shape[1:])
        # Grad-CAM++ needs the sums of its layer's activations over each window before its
        # backward passes; the prediction runs every window anyway, so they are recorded here
        # (K numbers per window) and Grad-CAM++ skips a pass of its own.
        record = (cfg.mode == "sliding" and not _speed.LEGACY
                  and any(m in CAM_METHODS for m in cfg.methods))
        layer_sums = None
        try:
            # fp32 means IEEE float32 on every device (no TF32 on a GPU), as in the saliency
            with (torch.no_grad() if _speed.LEGACY else torch.inference_mode()), \
                    (contextlib.nullcontext() if _speed.LEGACY
                     else _speed.precision_context("fp32", cfg.device)), \
                    (record_layer_sums(model, cam_layer) if record
                     else contextlib.nullcontext()) as rec:
                logits = sliding_window_logits(model.network, xt[None], grid, cfg.sw_batch_size,
                                               progress)
            if rec is not None:
                layer_sums = rec.per_member(grid.n_windows, cfg.sw_batch_size)
        except RuntimeError as e:
            raise ModelError(f"the model ({model.source}) failed on this input: "
                             f"{str(e).splitlines()[0]}") from None
        check_lesion_class(model, logits.shape[1])
        probs = prep.probabilities(logits[0].cpu().numpy())
        del logits
        prob = np.ascontiguousarray(probs[model.lesion_class], dtype=np.float32)
        pred = model.segment(probs, cfg.threshold)
        del probs
        release_memory()
        timings["predict_s"] = round(time.time() - t0, 2)
        iset = find_instances(pred, subj.mask, subj.affine, subj.spacing, cfg.connectivity,
                              cfg.min_size, cfg.min_size_unit, cfg.matching, cfg.iou_threshold)
        if len(iset.instances) > cfg.max_instances:
            raise InputError(f"{len(iset.instances)} lesion instances exceed the limit of "
                             f"{cfg.max_instances}; raise --min-size or --max-instances")
        kept = iset.pred_labels > 0
        save_map(stage / "prediction_prob.nii.gz", prob, subj.affine, subj.header)
        save_map(stage / "prediction_mask.nii.gz", kept.astype(np.uint8), subj.affine,
                 subj.header, np.uint8)
        save_map(stage / "instances.nii.gz", iset.label_map, subj.affine, subj.header, np.int32)
        insts = iset.instances
        # Full-grid masks are built one lesion at a time and dropped (a target keeps only its
        # bounding-box crop): holding all of them costs 0.4 GB on the demo scan.
        rows, targets, usable = [], [], []
        windows: list = []  # per usable instance, the sliding windows its target touches
        border = brain_border_distance(subj.image, subj.spacing) if insts else None
        for k, i in enumerate(insts):
            m = iset.mask(i)
            r = i.to_dict()
            r["prob_mean"] = float(prob[m].mean())
            r["prob_max"] = float(prob[m].max())
            r["brain_border_mm"] = float(border[m].min())
            rows.append(r)
            # instance target on the network's grid (the same voxels when no resampling)
            nm = prep.to_net(m)
            if nm.any():
                usable.append(k)
                targets.append(InstanceTarget(nm, model.lesion_class, cfg.reduction,
                                              name=f"lesion_{i.label:03d}"))
                if cfg.mode == "sliding":
                    windows.append(grid.windows_touching(nm))
            del m, nm
        del border
        log(_instances_line(insts, timings["predict_s"], cfg, model,
                            windows if cfg.mode == "sliding" else None, grid.n_windows))
        skipped = [insts[k].label for k in range(len(insts)) if k not in usable]
        lost = _lost_in_resampling(prep, [iset.mask(insts[k]) for k in range(len(insts))
                                          if k not in usable], skipped)
        outside = [lab for lab in skipped if lab not in lost]
        if outside:
            log(f"warning: lesion(s) {outside} lie outside the region the model sees "
                "(nnU-Net's crop to non-zero voxels); no saliency for them")
        if lost:
            log(f"warning: lesion(s) {lost} are too small to survive the resampling onto the "
                f"network's grid ({_spacing_text(prep)}); no saliency for them")
        # Each method's maps are quantified, written and drawn lesion by lesion, straight from
        # the full in-memory map, which is then dropped (with the method's sparse result) before
        # the next method runs: at most one full-grid map is held at a time.
        sg_chans = [column_name(c) for c in model.channels]
        margin = cfg.maps_margin_mm if cfg.maps_margin_mm is not None else default_margin_mm(cfg)
        boxes = [map_box(i.bbox_start, i.bbox_stop, subj.shape, subj.spacing, margin)
                 for i in insts]
        profiles: list = []
        lesion_figs: dict = {}
        viewer = None
        timings["quantify_s"] = 0.0
        fig_s = 0.0
        if cfg.figures:
            t0 = time.time()
            viewer = ViewerData(subj.image, list(model.channels), iset.label_map, insts,
                                subj.affine, subj.spacing, boxes)
            fig_s += time.time() - t0
        for method in (m for m in METHODS if m in cfg.methods and targets):
            t0 = time.time()
            if method == "smoothgrad":
                log(f"SmoothGrad: {len(targets)} instance(s) x N = {cfg.n_samples}")
                res = smoothgrad(
                    model, xt, targets, mode=cfg.mode, grid=grid, roi_size=model.roi_size,
                    overlap=model.overlap, n_samples=cfg.n_samples, noise_level=cfg.noise_level,
                    seed=cfg.seed, batch_size=cfg.batch_size, sw_batch_size=cfg.sw_batch_size,
                    device=cfg.device, progress=progress, precision=cfg.precision)
            else:
                fn = {"gradcampp": gradcampp, "hirescam": hirescam}[method]
                log(f"{METHOD_LABELS[method]}: {len(targets)} instance(s) at {cam_layer}")
                try:
                    res = fn(
                        model, xt, targets, cam_layer, mode=cfg.mode, grid=grid,
                        roi_size=model.roi_size, overlap=model.overlap,
                        sw_batch_size=cfg.sw_batch_size, device=cfg.device, progress=progress,
                        precision=cfg.precision, layer_sums=layer_sums)
                except ValueError as e:
                    raise InputError(f"{METHOD_LABELS[method]}: {e}") from None
            timings[f"{method}_s"] = round(time.time() - t0, 2)
            t0 = time.time()
            log(f"{METHOD_LABELS[method]}: quantifying and writing the maps")
            if cfg.maps != "none":
                (stage / "saliency" / method).mkdir(parents=True, exist_ok=True)
            chans = sg_chans if method == "smoothgrad" else ["CAM"]
            variant = "mean" if method == "smoothgrad" else "raw"
            label = METHOD_LABELS[method]
            figs = lesion_figs[method] = []
            for pos, k in enumerate(usable):
                r, inst = rows[k], insts[k]
                m = iset.mask(inst)
                dense = prep.to_user(res[pos].maps[variant].to_dense())
                n_windows = res[pos].n_windows
                res[pos] = None  # the sparse map is no longer needed
                if not np.isfinite(dense).all():
                    raise InputError(f"{method} map of lesion {inst.label} is not finite")
                # numbers first, from the full map (never from what is written)
                r.update(quantify_instance(dense, m, subj.spacing, chans, method,
                                           cfg.share_margin_mm, cfg.peak_margin_mm))
                r.update(map_features(dense, m, subj.spacing, chans, method))
                r[f"{method}_n_windows"] = n_windows
                for c, ch in enumerate(chans):
                    centres, means, counts = distance_profile(dense[c], m, subj.spacing,
                                                              cfg.profile_bins_mm)
                    for d, mu, n in zip(centres, means, counts):
                        profiles.append({"label": inst.label, "status": inst.status,
                                         "method": method, "channel": ch.lower(),
                                         "distance_mm": float(d), "mean": float(mu),
                                         "voxels": int(n)})
                save_lesion_map(stage / "saliency" / method / f"lesion_{inst.label:03d}.nii.gz",
                                dense, subj.affine, subj.header, cfg.maps, boxes[k])
                if cfg.figures:
                    t1 = time.time()
                    png = stage / "figures" / f"{method}_lesion_{inst.label:03d}.png"
                    instance_figure(subj.image[0], m, dense, inst.centroid_vox, subj.spacing,
                                    channel_names=tuple(model.channels) if method == "smoothgrad"
                                    else ("CAM",), signed=method == "smoothgrad",
                                    title=f"lesion {inst.label} ({inst.status}, {inst.voxels} vox)",
                                    out_png=png, method_label=label)
                    figs.append((f"{label}: lesion {inst.label} ({inst.status})", png, "Lesions",
                                 inst.label))
                    viewer.add_map(method, inst.label, dense, boxes[k],
                                   list(model.channels) if method == "smoothgrad" else ["CAM"])
                    fig_s += time.time() - t1
                del dense, m
            del res
            release_memory()
            timings["quantify_s"] += time.time() - t0
        timings["quantify_s"] = round(timings["quantify_s"] - fig_s, 2)
        # without any lesion instance: the header alone, with the standard columns
        columns = table_columns(cfg.methods, model.channels)
        table = (pd.DataFrame(rows).reindex(columns=columns) if rows
                 else pd.DataFrame(columns=columns))
        if flagger is not None:
            from .flagging import apply_flagger

            table = apply_flagger(flagger, table)
        prof = pd.DataFrame(profiles, columns=["label", "status", "method", "channel",
                                               "distance_mm", "mean", "voxels"])
        # rounded to what the numbers support (README "Outputs"); full precision beside them
        atomic_write_text(stage / "instances.csv", round_table(table).to_csv(index=False))
        atomic_write_text(stage / "profiles.csv", round_table(prof).to_csv(index=False))
        atomic_write_text(stage / "instances_full.csv", table.to_csv(index=False))
        atomic_write_text(stage / "profiles_full.csv", prof.to_csv(index=False))
        counts = {s: int((table["status"] == s).sum()) if len(table) else 0
                  for s in ("TP", "FP", "FN", "unknown")}
        summary = {
            "instances": len(insts), "predicted": iset.n_pred, "counts": counts,
            "threshold": threshold if decision == "threshold" else "argmax",
            "shape": list(subj.shape), "spacing_mm": list(subj.spacing),
            "orientation": subj.orientation, "channels": list(model.channels),
        }
        if flagger is not None:
            n_flag = int(table["flagger_flagged"].sum())
            summary["flagged as likely FP (flagger)"] = (
                n_flag if flagger["threshold"] is not None else
                f"{n_flag} (this flagger keeps all lesions: {flagger.get('keep_all_reason')})")
        if cfg.figures:
            t0 = time.time()
            log("figures and report.html")
            figs = [f for meth in cfg.methods for f in lesion_figs.get(meth, [])]
            _figures(stage, subj, figs, table, prof, summary, cfg, list(model.channels), viewer,
                     params={**asdict(cfg), "cam_layer": cam_layer, "threshold": threshold,
                             "decision": decision},
                     model_line=f"{model.source}: {_networks_text(model)}"
                     + _trained_on_text(model))
            timings["figures_s"] = round(fig_s + time.time() - t0, 2)
        timings["total_s"] = round(time.time() - t_all, 2)
        peak = cuda_peak_gb(cfg.device)
        run = {
            "instance_saliency_run": 1, "command": "explain",
            "inputs": {k: {"path": str(Path(p).resolve()), "sha256": datasets.sha256sum(p)}
                       for k, p in subj.paths.items()},
            "model": {"folder": str(model_dir or model.source), **model.describe()},
            "grids": {"exact": prep.exact, **prep.mapping},
            "parameters": {**asdict(cfg), "cam_layer": cam_layer, "threshold": threshold,
                           "decision": decision, "maps_margin_mm": margin},
            "summary": summary, "timings_s": timings, "versions": _versions(),
            "seed": cfg.seed, "torch_threads": torch.get_num_threads(),
        }
        if peak is not None:  # torch.cuda.max_memory_allocated over the whole run
            run["cuda_peak_memory_gb"] = peak
            run["cuda_device"] = torch.cuda.get_device_name(torch.device(cfg.device))
        if outside:
            run["no_saliency_outside_network_region"] = outside
        if lost:
            run["no_saliency_lost_in_resampling"] = lost
        run["checks"] = input_record
        if flagger is not None:
            run["flagger"] = {"path": str(Path(cfg.flagger).resolve()),
                              "sha256": datasets.sha256sum(cfg.flagger),
                              **{k: flagger.get(k) for k in ("feature_set", "method",
                                                             "threshold", "fitted_on")}}
        atomic_write_text(stage / RUN_FILE, json.dumps(run, indent=2, default=str) + "\n")
        commit_output(stage, out, overwrite, inputs)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    n = summary["instances"]
    msg = (f"{n} lesion instance(s) explained ({', '.join(f'{v} {k}' for k, v in counts.items() if v)})"
           if n else "no lesion instances found: empty table written")
    mem = (f"; CUDA peak memory {run['cuda_peak_memory_gb']:.2f} GB"
           if "cuda_peak_memory_gb" in run else "")
    log(f"{msg}; outputs in {out} ({timings['total_s']:.0f} s{mem})")
    return run


def _load_flagger(cfg: ExplainConfig):
    """The flagger of ``cfg.flagger`` (None without one), checked before any work: a bad file
    or a flagger needing a method this run does not compute is a one-line InputError."""
    if not cfg.flagger:
        return None
    from .flagging import load_flagger

    fl = load_flagger(cfg.flagger)
    if fl["feature_set"] == "saliency" and fl["method"] not in cfg.methods:
        raise InputError(f"flagger {cfg.flagger} needs {fl['method']} saliency; add it to "
                         f"--methods")
    return fl


def _figures(stage, subj, lesion_figs, table, prof, summary, cfg,
             channel_names=("FLAIR", "MPRAGE"), viewer=None, params=None,
             model_line=None) -> None:
    """Summary figures and ``report.html`` (the per-lesion PNGs are drawn in the lesion loop;
    here they are grouped by lesion, each lesion's methods side by side)."""
    from .report import distance_profile_figure, modality_share_figure, write_report

    figdir = stage / "figures"
    figdir.mkdir(exist_ok=True)
    p1 = figdir / "distance_profile.png"
    distance_profile_figure(prof, p1, title="saliency against distance from the lesion border")
    overview = "Saliency over all lesions"
    summary_figs = [("Saliency against signed distance from the border (mm)", p1, overview)]
    if "smoothgrad" in cfg.methods and len(channel_names) >= 2:
        from .models.channels import column_name

        p2 = figdir / "modality_share.png"
        pair = [column_name(c) for c in channel_names[:2]]
        modality_share_figure(table, p2, method="smoothgrad", channel_names=pair)
        summary_figs.append((f"{channel_names[0]} versus {channel_names[1]} (SmoothGrad)", p2,
                             overview))
    info = {int(r["label"]): (r["status"], int(r["voxels"])) for _, r in table.iterrows()} \
        if len(table) else {}
    figs = []
    order = {lab: i for i, lab in enumerate(sorted({f[3] for f in lesion_figs}))}
    for caption, png, _section, label in sorted(lesion_figs, key=lambda f: order[f[3]]):
        flag = ""
        if "flagger_flagged" in table:  # the flagger's verdict in the caption
            hit = table.loc[table["label"] == label, "flagger_flagged"]
            flag = " — flagged as likely FP" if len(hit) and bool(hit.iloc[0]) else ""
        st, vox = info.get(int(label), ("?", 0))
        figs.append((caption + flag, png, f"Lesion {label} ({st}, {vox} voxels)"))
    # the page shows the flagger's columns up front and leaves the map features to the CSV
    flag_cols = [c for c in ("flagger_flagged", "flagger_prob_fp") if c in table]
    cols = [c for c in table.columns if c not in flag_cols and "_fo_" not in c
            and "_glcm_" not in c]
    at = cols.index("status") + 1 if "status" in cols else 0
    shown = {"subject": _subject_name(subj.paths),
             **{f"input {k}": str(v) for k, v in subj.paths.items()}, **summary}
    notes = ([f"model: {model_line}"] if model_line else []) + [
        "parameters: " + "; ".join(f"{k} = {_param_text(v)}"
                                   for k, v in (params or asdict(cfg)).items())]
    write_report(stage / "report.html", "instance-saliency report", shown,
                 table[cols[:at] + flag_cols + cols[at:]], summary_figs + figs, notes=notes,
                 viewer=viewer.payload(table) if viewer is not None else None)


def _param_text(v) -> str:
    """A parameter as a reader writes it: ``smoothgrad, gradcampp`` rather than a tuple."""
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    if v is None:
        return "model default"
    return str(v)


def _subject_name(paths: dict) -> str:
    """The subject as its files name it: the first input's file name without ``.nii(.gz)``
    (its folder's name when the file has a generic name such as ``flair.nii.gz``)."""
    p = Path(next(iter(paths.values())))
    stem = p.name[:-7] if p.name.endswith(".nii.gz") else p.stem
    if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():  # nnU-Net <case>_0000
        return stem[:-5]
    generic = stem.lower() in {"flair", "t1", "t1w", "mprage", "image", "t2"}
    return p.resolve().parent.name if generic and p.resolve().parent.name else stem


#: Cost model of the saliency steps (see ``expected_seconds``): seconds per window pass (D + P)
#: as a multiple of the prediction's seconds per window. Measured on the demo scan
#: (fold_patient07, 68 instances touching D = 27 windows, P = 402 lesion-window pairs;
#: prediction 3.5 s, SmoothGrad N = 4 75 s, Grad-CAM++ 12.3 s; 2 CPU cores, 2026-12-02):
#: below 1 because lesions sharing a window share its backward pass (packed cotangents).
_COST_SMOOTHGRAD = 0.33
_COST_GRADCAMPP = 0.22
#: seconds per instance of quantification, NIfTI writing and figures (demo: 58 s / 58), and
#: without figures (demo scan, 2026-12-02: quantification 7.5 s for 68 instances)
_COST_WRITE_S = 1.0
_COST_WRITE_NO_FIGURES_S = 0.15


def _trained_on_text(model) -> str:
    """E.g. ``"; member model trained on patient19, P18, P39"`` (empty when unknown), so that
    a reader of the report can tell held-out lesions from training scans."""
    used = getattr(model, "info", {}).get("members_trained_on") or []
    parts = [f"{u['member']} trained on {', '.join(u['trained_on'])}" for u in used
             if u.get("trained_on")]
    return ("; " + "; ".join(parts)) if parts else ""


def _networks_text(model) -> str:
    """E.g. ``"2 networks (fold_0, fold_1) x 8 mirrorings = 16 passes per window"``."""
    from .models.base import distinct_networks

    nets = distinct_networks(model.members)
    names = []
    for m in model.members:
        base = m.name.split(" ")[0]
        if base not in names:
            names.append(base)
    n_mirror = max(1, len(model.members) // max(1, len(nets)))
    text = f"{len(nets)} network(s) ({', '.join(names[:6])}{', …' if len(names) > 6 else ''})"
    if n_mirror > 1:
        text += f" x {n_mirror} mirrorings"
    return text + f" = {len(model.members)} pass(es) per window"


def run_plan(cfg: ExplainConfig, model, cam_layer=None) -> str:
    """The line printed at the start of a run: methods, N, the model's members.

    N matters most for the run time: ``explain`` defaults to the seed paper's N = 50,
    ``demo`` uses 4.
    """
    parts = []
    if "smoothgrad" in cfg.methods:
        parts.append(f"SmoothGrad with N = {cfg.n_samples} noise samples (--n-samples; explain "
                     f"default 50 as in the seed paper, demo 4), sigma = {cfg.noise_level}")
    for m in CAM_METHODS:
        if m in cfg.methods:
            parts.append(f"{METHOD_LABELS[m]} at "
                         f"{cam_layer or cfg.cam_layer or 'the default layer'}")
    return (f"explain: {'; '.join(parts)}; {cfg.mode} mode; model {model.source}: "
            f"{_networks_text(model)}")


def expected_seconds(n_instances: int, predict_s: float, cfg: ExplainConfig,
                     windows: Sequence[Sequence[int]] | None = None,
                     n_grid_windows: int | None = None) -> dict:
    """Rough run time of the rest of a run, scaled from the prediction time.

    Exact (sliding-window) saliency costs, per SmoothGrad noise sample and once for the CAMs,
    one forward pass of every window that touches a lesion (``D`` distinct windows) and one
    backward pass per lesion–window pair (``P = Σ`` windows per lesion); a window pass of the
    prediction costs ``w = predict_s / n_grid_windows``. Estimate: ``N · c · w · (D + P)`` for
    SmoothGrad and ``c · w · (D + P)`` per CAM method, with ``c`` (:data:`_COST_SMOOTHGRAD`,
    :data:`_COST_GRADCAMPP`) measured on the demo scan. Without ``windows`` (or in patch mode,
    one window per lesion) ``D = P = n_instances``.

    Parameters
    ----------
    n_instances : int
    predict_s : float
        Seconds of the prediction (one sliding-window pass over the scan).
    windows : list of list of int, optional
        Per instance, the indices of the windows its target touches.
    n_grid_windows : int, optional
        Windows of the sliding-window grid (default: ``D``).

    Returns
    -------
    dict
        Seconds per step (``smoothgrad``, ``gradcampp``, ``hirescam``, ``write``) and
        ``total``. A busy machine changes them.
    """
    if windows is None:
        windows = [[k] for k in range(n_instances)]
    d = len({w for ws in windows for w in ws})
    p = sum(len(ws) for ws in windows)
    per_window = predict_s / max(n_grid_windows or d, 1)
    passes = per_window * (d + p)
    t = {}
    if "smoothgrad" in cfg.methods:
        t["smoothgrad"] = _COST_SMOOTHGRAD * passes * cfg.n_samples
    for m in CAM_METHODS:  # HiResCAM: the same passes as Grad-CAM++
        if m in cfg.methods:
            t[m] = _COST_GRADCAMPP * passes
    t["write"] = (_COST_WRITE_S if cfg.figures else _COST_WRITE_NO_FIGURES_S) * n_instances
    t["total"] = sum(t.values())
    return t


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h")


def _instances_line(insts, predict_s: float, cfg: ExplainConfig, model, windows=None,
                    n_grid_windows=None) -> str:
    counts = {}
    for i in insts:
        counts[i.status] = counts.get(i.status, 0) + 1
    what = ", ".join(f"{v} {k}" for k, v in counts.items())
    if not insts:
        return f"prediction took {predict_s:.0f} s; no lesion instances"
    t = expected_seconds(len(insts), predict_s, cfg, windows, n_grid_windows)
    steps = ", ".join(f"{METHOD_LABELS[k]} ~{_duration(v)}" for k, v in t.items()
                      if k in METHOD_LABELS)
    return (f"{len(insts)} lesion instance(s) ({what}); prediction took {predict_s:.0f} s; "
            f"expected about {_duration(t['total'])} more ({steps}; rough: the windows the "
            f"lesions touch x the prediction's time per window)")


def _spacing_text(prep) -> str:
    m = prep.mapping or {}
    a, b = m.get("original_spacing_zyx"), m.get("network_spacing")
    if a is None or b is None:
        return "resampled"
    fmt = lambda v: " x ".join(f"{float(x):g}" for x in v)  # noqa: E731
    return f"{fmt(a)} mm -> {fmt(b)} mm"


def _lost_in_resampling(prep, masks, labels) -> list:
    """Labels of the instances (``masks`` on the user's grid, none of which reaches the
    network grid) that lie inside the region the model sees: they vanished in the resampling
    onto the network's grid rather than being cropped away."""
    if not labels or not (prep.mapping or {}).get("resampled"):
        return []
    seen = prep.to_user(np.ones((1,) + tuple(prep.x.shape[1:]), dtype=np.float32))[0] > 0.5
    return [lab for lab, m in zip(labels, masks) if (m & seen).any()]
