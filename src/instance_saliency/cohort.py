"""Explain a whole cohort, resumably, then pool the lesion tables and run the statistics.

:func:`run_cohort` runs :func:`instance_saliency.explain.explain` on every subject of a
dataset and writes ``out/subjects/<subject>/`` (the folder of one ``explain`` run). Because a
subject folder appears only once its run is complete (staging folder + atomic rename), the
cohort is resumable: a re-run skips subjects whose folder has ``run.json``, removes leftover
staging folders of a killed run, and redoes only what is missing. ``--shard i/n`` splits the
subjects between independent processes writing into the same ``out``. At the end the cohort
statistics (:func:`instance_saliency.stats.analyze`) are computed, unless the run is one shard
of several (then run ``instance-saliency analyze OUT`` once all shards are done). Under
``torchrun`` the ranks are the shards (rank ``r`` of ``n`` takes shard ``r+1/n``) and rank 0
computes the statistics once every rank has finished (:mod:`instance_saliency.distributed`).

Datasets are given as

* an nnU-Net raw folder: ``imagesTs/<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ... (the
  model's channels in order: FLAIR, MPRAGE for the shipped model), optional
  ``labelsTs/<case>.nii.gz`` (ground-truth lesion mask); ``imagesTr`` / ``labelsTr`` are used
  when there is no ``imagesTs``; or
* a CSV manifest with columns ``subject``, one column per model channel (named as the channel,
  synonyms allowed: ``flair``, ``mprage`` or ``t1``, ...) and optional ``mask`` (may be empty):
  relative paths are relative to the manifest's folder, which is also the data root that no
  path may leave (after resolving ``..`` and symbolic links) unless ``allow_outside_root``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DistributedError, InputError, InstanceSaliencyError, OutputError
from .explain import RUN_FILE, ExplainConfig, explain
from .io import CHANNELS

__all__ = ["Case", "discover_cases", "read_manifest", "resolve_manifest_path", "parse_shard",
           "shard_cases", "run_cohort", "SUBJECTS_DIR", "FAILURES_FILE"]

SUBJECTS_DIR = "subjects"
FAILURES_FILE = "failures.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_NNUNET_FILE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})\.nii(\.gz)?$")
_NIFTI = re.compile(r"\.nii(\.gz)?$")
#: ExplainConfig fields that change no number (memory, speed, display, which map files are
#: written): not compared on resume
_NEUTRAL = {"batch_size", "sw_batch_size", "device", "figures", "maps", "maps_margin_mm"}


@dataclass(frozen=True)
class Case:
    """One subject of a cohort: its name (the output folder name) and input files.

    Attributes
    ----------
    subject : str
    images : tuple of Path
        One file per channel, in the order of ``channels`` (the model's).
    mask : Path or None
    channels : tuple of str
    """

    subject: str
    images: tuple
    mask: Path | None = None
    channels: tuple = CHANNELS

    @property
    def flair(self) -> Path:
        """The first channel's file (FLAIR for the shipped model)."""
        return self.images[0]

    @property
    def mprage(self) -> Path:
        """The second channel's file (MPRAGE for the shipped model)."""
        return self.images[1]


def _check_names(cases: list, where: str) -> None:
    seen: dict = {}
    for c in cases:
        if not _SAFE_NAME.match(c.subject) or ".partial-" in c.subject or ".old-" in c.subject:
            raise InputError(f"{where}: subject name {c.subject!r} is not usable as a folder "
                             f"name (letters, digits, '.', '_', '-'; not starting with '.')")
        key = c.subject.lower()  # folders collide on case-insensitive file systems
        if key in seen:
            raise InputError(f"{where}: subject name {c.subject!r} is not unique "
                             f"(also {seen[key]!r})")
        seen[key] = c.subject


def _nnunet_cases(root: Path, channels=CHANNELS) -> list:
    split = "Ts" if (root / "imagesTs").is_dir() else "Tr"
    images, labels = root / f"images{split}", root / f"labels{split}"
    if not images.is_dir():
        raise InputError(f"{root}: neither imagesTs/ nor imagesTr/ (nnU-Net raw layout) found; "
                         f"give a folder in that layout or a CSV manifest")
    found: dict = {}
    for f in sorted(images.iterdir()):
        if f.name.startswith(".") or not _NIFTI.search(f.name):
            continue
        m = _NNUNET_FILE.match(f.name)
        if not m:
            raise InputError(f"{f}: not named <case>_XXXX.nii.gz (nnU-Net raw layout)")
        found.setdefault(m["case"], {})[int(m["ch"])] = f
    if not found:
        raise InputError(f"{images}: no <case>_0000.nii.gz images found")
    cases = []
    for name, ch in sorted(found.items()):
        for k, cname in enumerate(channels):
            if k not in ch:
                raise InputError(f"case {name!r} in {images} has no {cname} image "
                                 f"({name}_{k:04d}.nii.gz)")
        mask = next((p for p in (labels / f"{name}.nii.gz", labels / f"{name}.nii")
                     if p.is_file()), None)
        cases.append(Case(name, tuple(ch[k] for k in range(len(channels))), mask,
                          tuple(channels)))
    _check_names(cases, str(images))
    return cases


def read_manifest(manifest: str | os.PathLike, required: tuple, usage: str):
    """Read a CSV manifest as text (column names stripped and lowercased).

    Raises
    ------
    InputError
        Missing or unreadable file, a missing column of ``required`` (``usage`` tells the
        expected columns), or no rows.
    """
    import pandas as pd

    manifest = Path(manifest)
    if not manifest.is_file():
        raise InputError(f"manifest {manifest} not found")
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"cannot read manifest {manifest}: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"manifest {manifest} lacks column(s) {', '.join(missing)} "
                         f"(needs {usage})")
    if not len(df):
        raise InputError(f"manifest {manifest} lists no subjects")
    return df


def resolve_manifest_path(manifest: str | os.PathLike, value: str, allow_outside_root: bool,
                          what: str) -> Path:
    """Resolve one path of a manifest and check that it stays inside the data root.

    Relative paths are relative to the manifest's folder, which is also the data root; the
    check is made after resolving ``..`` and symbolic links.

    Parameters
    ----------
    manifest : path
        The manifest file.
    value : str
        The path as written in the manifest (``~`` is expanded).
    allow_outside_root : bool
        Accept paths outside the data root.
    what : str
        Where the path comes from, for messages (e.g. ``"manifest m.csv row 2 (subject 's2'):
        mask"``).

    Returns
    -------
    pathlib.Path
        The absolute, resolved path of an existing file.

    Raises
    ------
    InputError
        The path lies outside the data root (without ``allow_outside_root``), or the file
        does not exist.
    """
    manifest = Path(manifest)
    root = manifest.parent.resolve()
    p = Path(value).expanduser()
    p = (p if p.is_absolute() else manifest.parent / p).resolve()
    if not allow_outside_root and not p.is_relative_to(root):
        raise InputError(f"{what} path {value!r} lies outside the data root {root}; "
                         f"use --allow-outside-root to allow it")
    if not p.is_file():
        raise InputError(f"{what} file {p} not found")
    return p


def _manifest_cases(manifest: Path, allow_outside_root: bool, channels=CHANNELS) -> list:
    from .models.channels import canonical

    usage = "subject," + ",".join(c.lower() for c in channels) + "[,mask]"
    df = read_manifest(manifest, ("subject",), usage)
    cols = []
    for ch in channels:  # a column per channel, by name or synonym (mprage = t1, ...)
        hit = [c for c in df.columns if c not in ("subject", "mask")
               and canonical(c) == canonical(ch)]
        if not hit:
            raise InputError(f"manifest {manifest} lacks column {ch.lower()} (channel {ch}) "
                             f"(needs {usage})")
        cols.append(hit[0])
    cases = []
    for i, r in enumerate(df.to_dict(orient="records"), start=1):
        subject = r["subject"].strip()
        where = f"manifest {manifest.name} row {i} (subject {subject!r})"
        if not subject:
            raise InputError(f"manifest {manifest.name} row {i}: empty subject name")
        files = []
        for col, ch in zip(cols, channels):
            v = str(r.get(col, "") or "").strip()
            if not v:
                raise InputError(f"{where}: no {ch} path")
            files.append(resolve_manifest_path(manifest, v, allow_outside_root,
                                               f"{where}: {col}"))
        v = str(r.get("mask", "") or "").strip()
        mask = resolve_manifest_path(manifest, v, allow_outside_root, f"{where}: mask") \
            if v else None
        cases.append(Case(subject, tuple(files), mask, tuple(channels)))
    _check_names(cases, f"manifest {manifest.name}")
    return cases


def discover_cases(data: str | os.PathLike, allow_outside_root: bool = False,
                   channels=CHANNELS) -> list:
    """List the subjects of a dataset folder (nnU-Net raw layout) or CSV manifest.

    Parameters
    ----------
    data : path
        Folder with ``imagesTs/`` (else ``imagesTr/``) and optional ``labelsTs/``
        (``labelsTr/``), files ``<case>_0000.nii.gz`` = first channel, ``<case>_0001.nii.gz``
        = second channel, ..., ``<case>.nii.gz`` = mask (channels beyond the model's are
        ignored); or a CSV file with columns ``subject``, one per channel (by name or
        synonym, e.g. ``flair, mprage``) and optional ``mask``.
    allow_outside_root : bool
        Allow manifest paths outside the manifest's folder.
    channels : sequence of str
        The model's input channels, in order (default FLAIR, MPRAGE).

    Returns
    -------
    list of Case
        Sorted by subject name; paths are absolute for manifests.

    Raises
    ------
    InputError
        ``data`` missing; a case without one of the channels; a manifest row with a missing file,
        a missing column, or (without ``allow_outside_root``) a path outside the data root;
        subject names that are not unique or not safe as folder names.
    """
    data = Path(data)
    if data.is_dir():
        cases = _nnunet_cases(data, tuple(channels))
    elif data.is_file():
        cases = _manifest_cases(data, allow_outside_root, tuple(channels))
    else:
        raise InputError(f"dataset {data} not found (give a folder in nnU-Net raw layout or a "
                         f"CSV manifest)")
    return sorted(cases, key=lambda c: c.subject)


def parse_shard(text: str) -> tuple:
    """Parse ``"i/n"`` (1-based ``i``, ``1 <= i <= n``) into ``(i, n)``.

    Raises
    ------
    InputError
        Malformed or out of range.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not (1 <= int(m[1]) <= int(m[2])):
        raise InputError(f"--shard must be i/n with 1 <= i <= n, got {text!r}")
    return int(m[1]), int(m[2])


def shard_cases(cases: list, shard: tuple | None) -> list:
    """Every n-th case of the list sorted by subject, starting at the i-th (1-based).

    Shard ``(i, n)`` takes sorted positions ``i-1, i-1+n, i-1+2n, ...``; the shards
    ``1/n .. n/n`` partition the cohort, deterministically.
    """
    cases = sorted(cases, key=lambda c: c.subject)
    if shard is None:
        return cases
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
        raise InputError(f"shard must be (i, n) with 1 <= i <= n, got {shard!r}")
    return cases[i - 1::n]


# --------------------------------------------------------------------------------------------
# bookkeeping


def _remove_leftovers(subjects_dir: Path, subject: str) -> list:
    """Remove staging / replaced folders ``.<subject>.partial-<pid>`` / ``.old-<pid>``."""
    pat = re.compile(rf"^\.{re.escape(subject)}\.(partial|old)-\d+$")
    removed = []
    if subjects_dir.is_dir():
        for p in subjects_dir.iterdir():
            if pat.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


@contextmanager
def _locked(folder: Path):
    """Exclusive advisory lock on the folder ``folder`` itself (POSIX ``flock`` on the folder's
    descriptor; no-op elsewhere), so that no lock file is left in it.

    Where a folder cannot be ``flock``-ed (NFS emulates ``flock`` with byte-range locks, which
    a folder cannot take: the shared ``out`` of ranks on several nodes), the lock is the
    creation of the sub-folder ``.lock`` (atomic also on NFS), removed at the end; one older
    than :data:`_STALE_LOCK_S` was left by a killed process and is taken over.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        with _folder_lock(folder / ".lock"):
            yield
        return
    try:
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


#: seconds after which a ``.lock`` folder counts as left by a killed process (holding the
#: lock takes milliseconds: read, merge and write failures.json)
_STALE_LOCK_S = 60.0


@contextmanager
def _folder_lock(path: Path, poll_s: float = 0.05):
    """Hold the lock ``path`` (a folder that exists while it is held)."""
    while True:
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            try:
                stale = time.time() - path.stat().st_mtime > _STALE_LOCK_S
            except FileNotFoundError:
                continue
            if stale:
                with suppress(OSError):
                    os.rmdir(path)
                continue
            time.sleep(poll_s)
    try:
        yield
    finally:
        with suppress(FileNotFoundError):
            os.rmdir(path)


def _update_failures(out: Path, failed: dict, cleared: list) -> dict:
    """Merge this run's failures into ``out/failures.json`` (locked, atomic write).

    Subjects in ``cleared`` (done or complete in this run) are removed; entries of subjects
    this run did not touch (other shards) are kept. The file is removed when it would be empty.
    """
    from .io import atomic_write_text

    path = out / FAILURES_FILE
    (out / ".failures.lock").unlink(missing_ok=True)  # left by earlier versions
    with _locked(out):
        cur = {}
        if path.is_file():
            try:
                cur = json.loads(path.read_text())
            except (OSError, ValueError):
                cur = {}
        for s in cleared:
            cur.pop(s, None)
        cur.update(failed)
        cur = dict(sorted(cur.items()))
        if cur:
            atomic_write_text(path, json.dumps(cur, indent=2) + "\n")
        elif path.exists():
            path.unlink()
    return cur


def _norm(v):
    return json.loads(json.dumps(v, default=str))


def _parameter_mismatch(run_file: Path, cfg: ExplainConfig, model_folder: str) -> str | None:
    """Describe how a finished run's parameters differ from ``cfg`` (None if they agree)."""
    try:
        run = json.loads(run_file.read_text())
        stored = run["parameters"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {run_file.name}"
    for k, v in asdict(cfg).items():
        if k in _NEUTRAL or (k in ("threshold", "cam_layer") and v is None):
            continue
        if k in stored and _norm(stored[k]) != _norm(v):
            return f"{k} = {stored[k]!r} there, {v!r} now"
    folder = str(run.get("model", {}).get("folder"))
    if folder != model_folder:
        return f"model {folder} there, {model_folder} now"
    return None


# --------------------------------------------------------------------------------------------
# the cohort run


def _expected_exclusion(model, subject: str, include_training_scans: bool) -> list:
    """The ``excluded_subjects`` a subject's ``run.json`` records under the held-out rule of
    :func:`_held_out_models`: ``[subject]`` when some, but not all, members trained on it."""
    from .datasets import saw_any

    used = model.info.get("members_trained_on", []) if hasattr(model, "info") else []
    saw = [saw_any(u.get("trained_on"), [subject]) for u in used]
    if include_training_scans or getattr(model, "kind", "") != "checkpoint" or not any(saw) \
            or all(saw):
        return []
    return [subject]


def _held_out_models(model, model_dir, config: ExplainConfig, include_training_scans: bool,
                     log):
    """``subject -> model``: the members of a checkpoint ensemble that did not train on the
    subject (cached per subject; names compared case-insensitively), else ``model``."""
    from .datasets import saw_any
    from .errors import ModelError
    from .models import load_model

    trained = [s_ for m in model.info.get("members_trained_on", [])
               for s_ in m.get("trained_on", [])]
    cache: dict = {}
    warned: set = set()

    def model_for(subject: str):
        if include_training_scans or getattr(model, "kind", "") != "checkpoint" \
                or not saw_any(trained, [subject]):
            return model
        if subject not in cache:
            try:
                cache[subject] = load_model(model_dir, config.device, exclude_subjects=[subject],
                                            **config.model_options())
                kept = [m["member"] for m in cache[subject].info["members_trained_on"]]
                log(f"{subject}: a training scan of some members; explained with the "
                    f"member(s) that never saw it: {', '.join(kept)}")
            except ModelError:
                cache[subject] = model
                if subject not in warned:
                    warned.add(subject)
                    log(f"warning: {subject} is a training scan of the model "
                        f"({model.source}); its TP/FP/FN are not held-out figures")
        return cache[subject]

    return model_for


def run_cohort(data: str | os.PathLike, out: str | os.PathLike, config: ExplainConfig,
               model_dir: str | os.PathLike | None = None, shard: tuple | None = None,
               overwrite: bool = False, progress: bool = True, allow_outside_root: bool = False,
               n_boot: int = 1000, seed: int = 0, log=print,
               include_training_scans: bool = False) -> dict:
    """Explain every subject of a dataset into ``out/subjects/<subject>/`` (resumable).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank explains shard ``RANK + 1`` of
    ``WORLD_SIZE`` (the subjects ``--shard RANK+1/WORLD_SIZE`` takes) on its own device
    (``cuda`` becomes ``cuda:LOCAL_RANK``, see :meth:`instance_saliency.distributed.World.device`),
    the ranks wait for each other (a gloo process group), and rank 0 alone computes the
    statistics once every rank has finished without error.

    Parameters
    ----------
    data : path
        nnU-Net raw folder or CSV manifest, see :func:`discover_cases`.
    out : path
        Cohort folder: ``subjects/<subject>/`` (one :func:`~instance_saliency.explain.explain`
        output each), ``failures.json``, and the statistics of
        :func:`instance_saliency.stats.analyze`.
    config : ExplainConfig
        Parameters of every subject's run.
    model_dir : path, optional
        Checkpoint folder; default the shipped model.
    shard : (int, int), optional
        ``(i, n)``: process only shard ``i`` of ``n`` (:func:`shard_cases`). With ``n > 1`` the
        statistics are not computed (run :func:`~instance_saliency.stats.analyze` at the end).
        Not under torchrun with several ranks (the ranks are the shards).
    overwrite : bool
        Redo subjects that are already complete.
    progress : bool
        Show a progress bar over subjects (rank 0's only under torchrun).
    allow_outside_root : bool
        Allow manifest paths outside the manifest's folder.
    n_boot, seed : int
        Bootstrap resamples and seed of the statistics (figures and the HTML report only when
        ``config.figures``).
    log : callable
        Receives one-line messages (prefixed ``[rank r of n]`` under torchrun).
    include_training_scans : bool
        By default a subject whose name is among the training scans of some members of a
        checkpoint ensemble (``trained_on``) is explained with the other members only, so that
        its TP/FP/FN are held-out figures (recorded in its ``run.json``,
        ``model.members_trained_on``); a subject every member trained on is explained with the
        whole model and a warning. ``True``: always the whole model.

    Returns
    -------
    dict
        ``subjects`` (this shard's, sorted), ``done``, ``skipped`` (already complete),
        ``failed`` (subject -> ``{"error", "message", "time"}``), ``removed_leftovers``,
        ``analysis`` (the result of :func:`~instance_saliency.stats.analyze`, or None); under
        torchrun also ``ranks``: every rank's ``{"ok", "subjects", "done", "skipped",
        "failed"}`` (or ``{"ok": False, "error"}``), in rank order.

    Raises
    ------
    InputError
        Bad dataset (see :func:`discover_cases`), bad parameters, or a complete subject whose
        ``run.json`` records other explain parameters or another model (use the same options,
        or ``overwrite``); every subject of this run failed (see ``failures.json``); from the
        analysis: no subject finished; ``shard`` given under torchrun with several ranks.
    ModelError
        The model folder is missing or broken (checked once, before any subject).
    OutputError
        ``out`` is not a usable folder.
    DistributedError
        Under torchrun: the ranks cannot meet, another rank did not answer in time, or (on
        rank 0) another rank failed, so that the statistics were not computed.
    KeyboardInterrupt
        Passed on; the subject being explained leaves nothing behind but its staging folder
        (removed at the next run), finished subjects stay.

    Notes
    -----
    A subject that fails with an :class:`~instance_saliency.errors.InstanceSaliencyError`
    (bad scan, too many lesions, ...) is recorded in ``out/failures.json`` and the run goes
    on; a failed subject is retried by the next run. Do not run the same shard twice at the
    same time: each run deletes the staging leftovers of its own subjects.
    """
    from .distributed import World

    world = World.from_environment()
    if world.distributed:
        if shard is not None:
            raise InputError(f"--shard {shard[0]}/{shard[1]} cannot be combined with torchrun "
                             f"(WORLD_SIZE={world.size}): each rank takes shard "
                             f"RANK+1/WORLD_SIZE itself")
        return _run_ranks(world, data, out, config, model_dir, overwrite, progress,
                          allow_outside_root, n_boot, seed, log, include_training_scans)
    res = _explain_share(data, out, config, model_dir, shard, overwrite, progress,
                         allow_outside_root, log,
                         where=f" (shard {shard[0]}/{shard[1]})" if shard else "",
                         include_training_scans=include_training_scans)
    res["analysis"] = None
    if shard is None or shard[1] == 1:
        _refuse_all_failed(out, res["failed"], len(res["done"]) + len(res["skipped"]))
        from .stats import analyze

        res["analysis"] = analyze(out, n_boot=n_boot, seed=seed, figures=config.figures,
                                  log=log)
    else:
        log(f"after all {shard[1]} shards: instance-saliency analyze {out}")
    return res


def _refuse_all_failed(out, failed: dict, n_ok: int) -> None:
    if failed and not n_ok:
        first, info = next(iter(failed.items()))
        raise InputError(f"every subject failed ({len(failed)}; first {first}: "
                         f"{info['message']}); details in {Path(out) / FAILURES_FILE}")


def _run_ranks(world, data, out, config, model_dir, overwrite, progress, allow_outside_root,
               n_boot, seed, log, include_training_scans: bool = False) -> dict:
    """:func:`run_cohort` on one rank of a torchrun launch (``world.size > 1``).

    Every rank explains its shard, then all gather each rank's outcome (also a rank that
    raised, before it passes its error on); rank 0 runs the statistics when every rank
    succeeded (else it raises a DistributedError naming the failed ranks), and the others wait
    for it at a barrier, so that torchrun does not stop rank 0 because another rank exited.
    """
    from dataclasses import replace

    from .distributed import process_group, timeout_s

    def say(m: str) -> None:
        w = "warning: " if m.startswith("warning: ") else ""
        log(f"{w}[{world}] {m[len(w):]}")

    config = replace(config, device=world.device(config.device))
    # gloo also for GPUs: the ranks exchange a few small messages, and a rank may wait hours
    # for a slower one (NCCL's watchdog would end such a wait)
    with process_group(world, config.device, timeout_s(86400), backend="gloo") as group:
        try:
            res = _explain_share(data, out, config, model_dir, world.shard, overwrite,
                                 progress and world.is_main, allow_outside_root, say,
                                 where=f" ({world})",
                                 include_training_scans=include_training_scans)
        except Exception as e:  # tell rank 0, wait until it has said so, then pass it on
            msg = str(e).splitlines()[0] if str(e) else ""
            with suppress(DistributedError):
                group.all_gather({"ok": False, "error": f"{type(e).__name__}: {msg}"})
                group.barrier()
            raise
        ranks = group.all_gather({"ok": True, "subjects": len(res["subjects"]),
                                  "done": len(res["done"]), "skipped": len(res["skipped"]),
                                  "failed": res["failed"]})
        res.update(ranks=ranks, analysis=None)
        error = None
        if world.is_main:
            try:
                bad = [r for r, s in enumerate(ranks) if not s["ok"]]
                if bad:
                    raise DistributedError(
                        f"rank(s) {', '.join(map(str, bad))} failed (rank {bad[0]}: "
                        f"{ranks[bad[0]]['error']}); cohort statistics not computed; run the "
                        f"same command again to finish the missing subjects")
                failed = {k: v for s in ranks for k, v in s["failed"].items()}
                n_ok = sum(s["done"] + s["skipped"] for s in ranks)
                log(f"cohort ({world.size} ranks): {sum(s['done'] for s in ranks)} done, "
                    f"{sum(s['skipped'] for s in ranks)} skipped (already complete), "
                    f"{len(failed)} failed of {sum(s['subjects'] for s in ranks)} subject(s)")
                _refuse_all_failed(out, failed, n_ok)
                from .stats import analyze

                res["analysis"] = analyze(out, n_boot=n_boot, seed=seed, figures=config.figures,
                                          log=log)
            except Exception as e:  # passed on once the other ranks stopped waiting
                error = e
        group.barrier()
    if error is not None:
        raise error
    return res


def _explain_share(data, out, config: ExplainConfig, model_dir, shard, overwrite: bool,
                   progress: bool, allow_outside_root: bool, log, where: str = "",
                   include_training_scans: bool = False) -> dict:
    """Explain the subjects of ``shard`` (all without one): :func:`run_cohort` without the
    statistics. Returns its dict without ``analysis``."""
    from tqdm import tqdm

    config.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder")
    # a missing or broken model is refused once, before any subject and any output
    from .explain import check_device, release_memory
    from .models import load_model

    check_device(config.device)
    model = load_model(model_dir, config.device, **config.model_options())
    for w in model.warnings:
        log(f"warning: {w}")
    cases = discover_cases(data, allow_outside_root, model.channels)
    mine = shard_cases(cases, shard)
    sub = out / SUBJECTS_DIR
    try:
        sub.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {sub}: {e.strerror or e}") from None
    model_folder = str(Path(model_dir).resolve()) if model_dir is not None else None
    stored_model = model_folder or "shipped default"
    if not overwrite:  # refuse to mix parameters before doing any work, in every shard alike
        for c in cases:
            rf = sub / c.subject / RUN_FILE
            if rf.is_file():
                why = _parameter_mismatch(rf, config, stored_model)
                if not why:
                    try:
                        had = json.loads(rf.read_text()).get("model", {}).get(
                            "excluded_subjects") or []
                    except (OSError, json.JSONDecodeError, AttributeError):
                        had = []
                    if sorted(had) != _expected_exclusion(model, c.subject,
                                                          include_training_scans):
                        why = ("ensemble members left out: "
                               f"{', '.join(had) or 'none'} (--include-training-scans)")
                if why:
                    raise InputError(f"subject {c.subject} in {sub} was explained with other "
                                     f"parameters ({why}); use the same options or --overwrite")
    model_for = _held_out_models(model, model_dir, config, include_training_scans, log)
    done, skipped, failed, leftovers, no_page = [], [], {}, [], []
    t0 = time.time()
    bar = tqdm(mine, desc="subjects", unit="subject", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    say = tqdm.write if progress else log
    try:
        for c in bar:
            bar.set_postfix_str(c.subject, refresh=False)
            target = sub / c.subject
            leftovers += _remove_leftovers(sub, c.subject)
            if (target / RUN_FILE).is_file() and not overwrite:
                skipped.append(c.subject)
                if config.figures and not (target / "report.html").is_file():
                    no_page.append(c.subject)  # explained with --no-figures earlier
                continue
            try:
                explain(None, None, target, mask=c.mask, model_dir=model_folder,
                        config=config, overwrite=overwrite, progress=False,
                        log=lambda m, s=c.subject: say(f"{s}: {m}"),
                        images=dict(zip(c.channels, c.images)), model=model_for(c.subject))
            except InstanceSaliencyError as e:
                release_memory()
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                failed[c.subject] = {"error": type(e).__name__, "message": msg,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                say(f"{c.subject}: failed: {msg}")
                _update_failures(out, {c.subject: failed[c.subject]}, [])
                continue
            release_memory()  # the subject's arrays are gone: give their memory back
            done.append(c.subject)
    finally:
        bar.close()
        _update_failures(out, {}, done + skipped)
    log(f"cohort{where}: {len(done)} done, {len(skipped)} skipped (already complete), "
        f"{len(failed)} failed of {len(mine)} subject(s) in {time.time() - t0:.0f} s; "
        f"outputs in {sub}" + (f"; failures in {out / FAILURES_FILE}" if failed else ""))
    if no_page:
        log(f"cohort{where}: {len(no_page)} complete subject(s) explained earlier with "
            f"--no-figures have no report.html and are kept as they are: "
            f"{', '.join(no_page)} (remove their folders and run again to draw them; "
            f"--overwrite redoes the whole cohort)")
    return {"subjects": [c.subject for c in mine], "done": done, "skipped": skipped,
            "failed": failed, "removed_leftovers": leftovers}
