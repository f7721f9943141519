"""Public real MS scans: a registry of files with pinned download URLs and SHA256 checksums.

Files are read from a local mirror when one is configured (environment variable
``INSTANCE_SALIENCY_DATA`` or the ``data_dir`` argument / ``--data-dir`` option), laid out exactly
as in the public repositories. Otherwise they are fetched with :mod:`pooch` into the user cache.
Either way the SHA256 is verified; a mismatch is an error and the file is never overwritten.

Sources
-------
open_ms_data (CC-BY): Lesjak Ž, Galimzianova A, Koren A, et al. "A Novel Public MR Image Dataset
of Multiple Sclerosis Patients With Lesion Segmentations Based on Multi-rater Consensus",
Neuroinformatics 16 (2018), doi:10.1007/s12021-017-9348-7.
GitHub muschellij2/open_ms_data @ 65704901f60650824565aa5a4818611aa89716f4.

MSLesSeg demo subjects: Guarnera et al., MSLesSeg (ICPR 2024), Scientific Data 2025.
GitHub srozenblum/YOLO-MSLesSeg @ a3fea651c9b41685aee779ebf578f8a217176c4d.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

ENV_VAR = "INSTANCE_SALIENCY_DATA"

_OPEN_MS_URL = ("https://raw.githubusercontent.com/muschellij2/open_ms_data/"
                "65704901f60650824565aa5a4818611aa89716f4/")
_MSLESSEG_URL = ("https://raw.githubusercontent.com/srozenblum/YOLO-MSLesSeg/"
                 "a3fea651c9b41685aee779ebf578f8a217176c4d/demo/MSLesSeg-Dataset/")

_OMS = "open_ms_data/cross_sectional/MNI"
_OMS_FLAIR = "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
_OMS_T1 = "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
_OMS_GT = "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"

#: relative path in the mirror -> SHA256 (from the public repositories at the pinned commits)
FILES: dict[str, str] = {
    f"{_OMS}/patient07/{_OMS_FLAIR}": "2f884f00d4e9cbca061a5fd2f988547df312d86194b331f4ca511cf852f775db",
    f"{_OMS}/patient07/{_OMS_T1}": "0d9e0c933140e64ba42931f5ed7aece2a7cc7001fe6c8d753720c487f5e1b8b1",
    f"{_OMS}/patient07/{_OMS_GT}": "811e8c906d572e8675c67c98176d0e883ec87655ebea89f31da407a18fb1aae7",
    f"{_OMS}/patient19/{_OMS_FLAIR}": "6e4191c583abdb818f2de9fd47a876c2a71451f1c1672e443874af1fe78b02ad",
    f"{_OMS}/patient19/{_OMS_T1}": "24ea608f6817c9799888491988f9ec9464f0f2faa02f512e8c2e07466f705781",
    f"{_OMS}/patient19/{_OMS_GT}": "1cf465372d5e647fb5a2f1ac062fe314e7aa7f0873c68108617530541f2362c4",
    "mslesseg_demo/train/P18/T1/P18_T1_FLAIR.nii.gz": "ef5a1fa3b028b29cd7f9f06184b00af9a247bc3a11776ec46665e0265e4d79a4",
    "mslesseg_demo/train/P18/T1/P18_T1_T1.nii.gz": "fa42058cf1a98b8e3f80446ecc757a0e322d51fe262ca66d7213d51f770997cb",
    "mslesseg_demo/train/P18/T1/P18_T1_MASK.nii.gz": "edffa9c5f3032398c05da1f744b0e4b3b34664e6b533403c37fc5cad24bb4bdd",
    "mslesseg_demo/train/P39/T1/P39_T1_FLAIR.nii.gz": "a39116653d9fc15dce80e9e420048db8ca507bbe737062f077e0115ee3094e2e",
    "mslesseg_demo/train/P39/T1/P39_T1_T1.nii.gz": "a7e53f6a75a56171fdd5449fb72d1697cc5039c52eb4ce9017b2ea42c4e31f86",
    "mslesseg_demo/train/P39/T1/P39_T1_MASK.nii.gz": "9d45239a254e7b8d1d8004f9245a0cd3320faeaa16c389bdf8057c0e395de5c4",
}


@dataclass(frozen=True)
class SubjectFiles:
    """Relative paths of one public subject: FLAIR, MPRAGE (T1-weighted) and lesion mask."""

    name: str
    flair: str
    mprage: str
    mask: str


#: subject name -> files. ``patient07`` is the demo scan.
SUBJECTS: dict[str, SubjectFiles] = {
    **{f"patient{p}": SubjectFiles(f"patient{p}", f"{_OMS}/patient{p}/{_OMS_FLAIR}",
                                   f"{_OMS}/patient{p}/{_OMS_T1}", f"{_OMS}/patient{p}/{_OMS_GT}")
       for p in ("07", "19")},
    **{s: SubjectFiles(s, f"mslesseg_demo/train/{s}/T1/{s}_T1_FLAIR.nii.gz",
                       f"mslesseg_demo/train/{s}/T1/{s}_T1_T1.nii.gz",
                       f"mslesseg_demo/train/{s}/T1/{s}_T1_MASK.nii.gz")
       for s in ("P18", "P39")},
}
DEMO_SUBJECT = "patient07"


def url_for(relpath: str) -> str:
    """Public download URL of a registry file at its pinned commit."""
    if relpath.startswith("open_ms_data/"):
        return _OPEN_MS_URL + relpath[len("open_ms_data/"):]
    if relpath.startswith("mslesseg_demo/"):
        return _MSLESSEG_URL + relpath[len("mslesseg_demo/"):]
    raise DataError(f"unknown registry file: {relpath}")


def sha256sum(path: str | os.PathLike) -> str:
    """SHA256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local mirror folder: the argument, else ``$INSTANCE_SALIENCY_DATA``, else ``None``."""
    d = data_dir if data_dir not in (None, "") else os.environ.get(ENV_VAR) or None
    return Path(d) if d else None


def _verify(path: Path, relpath: str) -> Path:
    expected = FILES[relpath]
    got = sha256sum(path)
    if got != expected:
        raise DataError(f"checksum mismatch for {path}: SHA256 {got[:12]}…, expected "
                        f"{expected[:12]}… (file left untouched)")
    return path


def fetch(relpath: str, data_dir_: str | os.PathLike | None = None) -> Path:
    """Return a verified local path of a registry file.

    Parameters
    ----------
    relpath : str
        Relative path as in :data:`FILES`.
    data_dir_ : path, optional
        Local mirror folder; defaults to ``$INSTANCE_SALIENCY_DATA``.

    Raises
    ------
    DataError
        Unknown file, file absent from the mirror, checksum mismatch, or download failure
        (offline with no mirror: the message names ``INSTANCE_SALIENCY_DATA``).
    """
    if relpath not in FILES:
        raise DataError(f"unknown registry file: {relpath}")
    mirror = data_dir(data_dir_)
    if mirror is not None:
        path = mirror / relpath
        if not path.is_file():
            raise DataError(f"{path} not found in the local mirror {mirror} "
                            f"(set by {ENV_VAR} or --data-dir)")
        return _verify(path, relpath)
    import pooch

    cache = Path(pooch.os_cache("instance-saliency"))
    target = cache / relpath
    if target.is_file():  # never re-download silently over an existing file
        return _verify(target, relpath)
    try:
        out = pooch.retrieve(url_for(relpath), known_hash=f"sha256:{FILES[relpath]}",
                             fname=target.name, path=target.parent, progressbar=False)
    except ValueError as e:  # pooch's hash mismatch
        raise DataError(f"checksum mismatch downloading {url_for(relpath)}: {e}") from None
    except Exception as e:  # network errors of any kind
        raise DataError(f"cannot download {url_for(relpath)} ({type(e).__name__}); offline? "
                        f"Set {ENV_VAR} to a local mirror folder") from None
    return Path(out)


def subject_key(name) -> str:
    """A subject name as it is compared with the scans a model member trained on
    (``trained_on``): case-insensitive, so that a manifest's ``p39`` is the public ``P39``."""
    return str(name).casefold()


def saw_any(trained_on, subjects) -> bool:
    """Whether a model (member) whose training scans are ``trained_on`` saw any of
    ``subjects``, names compared by :func:`subject_key` (case-insensitive)."""
    keys = {subject_key(s) for s in subjects}
    return any(subject_key(t) in keys for t in trained_on or ())


def canonical_subject(name: str) -> str:
    """The registry's spelling of a public subject name given in any case (``p39`` → ``P39``).

    Raises
    ------
    DataError
        Not a public subject of :data:`SUBJECTS`.
    """
    for known in SUBJECTS:
        if subject_key(known) == subject_key(name):
            return known
    raise DataError(f"unknown subject {name!r}; known: {', '.join(SUBJECTS)}")


def fetch_subject(name: str = DEMO_SUBJECT, data_dir_: str | os.PathLike | None = None
                  ) -> dict[str, Path]:
    """Verified paths ``{"flair", "mprage", "mask"}`` of a public subject (see :data:`SUBJECTS`;
    the name in any case)."""
    name = canonical_subject(name)
    s = SUBJECTS[name]
    return {k: fetch(getattr(s, k), data_dir_) for k in ("flair", "mprage", "mask")}
