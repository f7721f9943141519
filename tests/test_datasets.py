"""Public-scan registry and fetcher (instance_saliency.datasets): checksums, local mirror,
offline behaviour and the pooch cache. No test touches the network."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pooch
import pytest

from instance_saliency import datasets
from instance_saliency.datasets import (
    DEMO_SUBJECT,
    ENV_VAR,
    FILES,
    SUBJECTS,
    fetch,
    fetch_subject,
    sha256sum,
    url_for,
)
from instance_saliency.errors import DataError

from _helpers import DATA, needs_data

OPEN_MS_COMMIT = "65704901f60650824565aa5a4818611aa89716f4"
MSLESSEG_COMMIT = "a3fea651c9b41685aee779ebf578f8a217176c4d"
# the smallest file of the registry (a lesion mask, ~29 kB)
SMALL = "mslesseg_demo/train/P18/T1/P18_T1_MASK.nii.gz"


def _sums(folder: Path) -> dict:
    out = {}
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        out[name[2:] if name.startswith("./") else name] = digest
    return out


@pytest.fixture
def no_env(monkeypatch):
    """No mirror from the environment (the Makefile exports one)."""
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture
def mirror(tmp_path):
    """A mirror holding only SMALL, copied from the shared data, laid out by relative path."""
    if DATA is None:
        pytest.skip(f"real scans not found (set {ENV_VAR})")
    m = tmp_path / "mirror"
    (m / SMALL).parent.mkdir(parents=True)
    shutil.copyfile(DATA / SMALL, m / SMALL)
    return m


# ------------------------------------------------------------------ registry


@needs_data
def test_registry_equals_sha256sums():
    sums = _sums(DATA)
    assert len(sums) == 12
    assert FILES == sums


@needs_data
def test_shared_files_match_registry():
    # the registry's checksums are those of the files themselves (masks: cheap to hash)
    for rel in FILES:
        if "MASK" in rel or "GOLD_STANDARD" in rel:
            assert sha256sum(DATA / rel) == FILES[rel], rel


def test_registry_shape():
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in FILES.values())
    assert len(set(FILES.values())) == len(FILES)
    assert set(SUBJECTS) == {"patient07", "patient19", "P18", "P39"}
    assert DEMO_SUBJECT == "patient07"
    used = {getattr(s, k) for s in SUBJECTS.values() for k in ("flair", "mprage", "mask")}
    assert used == set(FILES)  # every file belongs to exactly one subject role
    s = SUBJECTS["patient07"]
    assert s.flair.endswith("patient07/FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_"
                            "regtoMNI.nii.gz")
    assert "/T1_N4_" in s.mprage and "/GOLD_STANDARD_" in s.mask
    assert SUBJECTS["P39"].mask == "mslesseg_demo/train/P39/T1/P39_T1_MASK.nii.gz"


def test_url_for_pinned_commits():
    rel = ("open_ms_data/cross_sectional/MNI/patient07/GOLD_STANDARD_N4_noneck_reduced_"
           "winsor_regtoFLAIR_regtoMNI.nii.gz")
    assert url_for(rel) == (
        f"https://raw.githubusercontent.com/muschellij2/open_ms_data/{OPEN_MS_COMMIT}/"
        "cross_sectional/MNI/patient07/GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_"
        "regtoMNI.nii.gz")
    assert url_for(SMALL) == (
        f"https://raw.githubusercontent.com/srozenblum/YOLO-MSLesSeg/{MSLESSEG_COMMIT}/"
        "demo/MSLesSeg-Dataset/train/P18/T1/P18_T1_MASK.nii.gz")
    for rel in FILES:
        u = url_for(rel)
        assert u.startswith("https://raw.githubusercontent.com/")
        commit = OPEN_MS_COMMIT if rel.startswith("open_ms_data/") else MSLESSEG_COMMIT
        assert f"/{commit}/" in u
        assert u.endswith(rel.split("/", 1)[1])
    with pytest.raises(DataError, match="unknown registry file"):
        url_for("elsewhere/x.nii.gz")


def test_unknown_file_and_subject(tmp_path):
    with pytest.raises(DataError, match="unknown registry file"):
        fetch("open_ms_data/not_there.nii.gz", tmp_path)
    with pytest.raises(DataError, match="unknown subject 'patient99'"):
        fetch_subject("patient99", tmp_path)


def test_sha256sum_hand(tmp_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert sha256sum(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big"
    big.write_bytes(b"\x00" * (3 << 20) + b"x")  # several 1 MiB blocks
    import hashlib

    assert sha256sum(big) == hashlib.sha256(big.read_bytes()).hexdigest()


# ------------------------------------------------------------------ local mirror


def test_mirror_verified(mirror, no_env, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("pooch.retrieve must not be called with a mirror")

    monkeypatch.setattr(pooch, "retrieve", no_download)
    assert fetch(SMALL, mirror) == mirror / SMALL
    # the environment variable is used when no argument is given
    monkeypatch.setenv(ENV_VAR, str(mirror))
    assert fetch(SMALL) == mirror / SMALL
    # an explicit argument wins over the environment
    monkeypatch.setenv(ENV_VAR, str(mirror.parent / "elsewhere"))
    assert fetch(SMALL, mirror) == mirror / SMALL


@pytest.mark.parametrize("corruption", ["flip", "truncate", "append"])
def test_mirror_corrupted(mirror, no_env, corruption):
    p = mirror / SMALL
    data = bytearray(p.read_bytes())
    if corruption == "flip":
        data[len(data) // 2] ^= 0xFF
    elif corruption == "truncate":
        data = data[:-1]
    else:
        data += b"\x00"
    p.write_bytes(bytes(data))
    mtime = p.stat().st_mtime_ns
    with pytest.raises(DataError) as ei:
        fetch(SMALL, mirror)
    msg = str(ei.value)
    assert "checksum" in msg and str(p) in msg and "\n" not in msg
    assert FILES[SMALL][:12] in msg  # the expected digest is shown
    assert sha256sum(p)[:12] in msg  # and the one found
    # the corrupted file is left exactly as it was
    assert p.read_bytes() == bytes(data)
    assert p.stat().st_mtime_ns == mtime


def test_mirror_missing_file(mirror, no_env):
    rel = SUBJECTS["P18"].flair  # not copied into the mirror
    with pytest.raises(DataError) as ei:
        fetch(rel, mirror)
    msg = str(ei.value)
    assert str(mirror / rel) in msg and "not found" in msg and ENV_VAR in msg
    # fetch_subject fails on the first missing file, the mirror is not modified
    with pytest.raises(DataError, match="not found"):
        fetch_subject("P18", mirror)
    assert sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*")
                  if p.is_file()) == [SMALL]


def test_mirror_empty_folder_does_not_fall_back_to_download(tmp_path, no_env, monkeypatch):
    called = []
    monkeypatch.setattr(pooch, "retrieve", lambda *a, **k: called.append(a))
    with pytest.raises(DataError, match="not found in the local mirror"):
        fetch(SMALL, tmp_path)
    assert called == []


@needs_data
def test_fetch_subject_from_shared_mirror(no_env):
    paths = fetch_subject("P18", DATA)
    assert paths == {"flair": DATA / SUBJECTS["P18"].flair,
                     "mprage": DATA / SUBJECTS["P18"].mprage,
                     "mask": DATA / SUBJECTS["P18"].mask}


# ------------------------------------------------------------------ cache / download


@pytest.fixture
def cache(tmp_path, no_env, monkeypatch):
    c = tmp_path / "cache"
    c.mkdir()
    monkeypatch.setattr(pooch, "os_cache", lambda project: c)
    return c


def test_offline_without_mirror(cache, monkeypatch):
    calls = []

    def offline(url, known_hash=None, fname=None, path=None, **kw):
        calls.append((url, known_hash, fname, Path(path)))
        import requests

        raise requests.exceptions.ConnectionError("Failed to establish a new connection")

    monkeypatch.setattr(pooch, "retrieve", offline)
    with pytest.raises(DataError) as ei:
        fetch(SMALL)
    msg = str(ei.value)
    assert ENV_VAR in msg and url_for(SMALL) in msg and "ConnectionError" in msg
    assert "\n" not in msg
    # it asked for the pinned URL and hash, into the cache, under the relative path
    assert calls == [(url_for(SMALL), f"sha256:{FILES[SMALL]}", "P18_T1_MASK.nii.gz",
                      (cache / SMALL).parent)]
    assert not any(p.is_file() for p in cache.rglob("*"))
    # the same for a whole subject
    with pytest.raises(DataError, match=ENV_VAR):
        fetch_subject("patient07")


def test_offline_os_error(cache, monkeypatch):
    def fail(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(pooch, "retrieve", fail)
    with pytest.raises(DataError, match=ENV_VAR):
        fetch(SMALL)


def test_download_hash_mismatch(cache, monkeypatch):
    def bad_hash(*a, **k):
        raise ValueError("SHA256 hash of downloaded file (abc) does not match the known hash")

    monkeypatch.setattr(pooch, "retrieve", bad_hash)
    with pytest.raises(DataError, match="checksum mismatch downloading"):
        fetch(SMALL)


def test_download_into_cache(cache, monkeypatch):
    """A successful (simulated) download returns pooch's path; the next call uses the cache."""
    if DATA is None:
        pytest.skip(f"real scans not found (set {ENV_VAR})")
    calls = []

    def fake_retrieve(url, known_hash=None, fname=None, path=None, **kw):
        calls.append(url)
        out = Path(path) / fname
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DATA / SMALL, out)
        return str(out)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    assert fetch(SMALL) == cache / SMALL
    assert calls == [url_for(SMALL)]
    assert fetch(SMALL) == cache / SMALL  # cached and verified: no second download
    assert calls == [url_for(SMALL)]


def test_cached_file_bad_checksum_untouched(cache, monkeypatch):
    target = cache / SMALL
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the real mask")
    called = []
    monkeypatch.setattr(pooch, "retrieve", lambda *a, **k: called.append(a))
    with pytest.raises(DataError) as ei:
        fetch(SMALL)
    assert "checksum" in str(ei.value) and str(target) in str(ei.value)
    assert called == []  # not re-downloaded over it
    assert target.read_bytes() == b"not the real mask"


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert datasets.data_dir() is None
    assert datasets.data_dir("") is None
    monkeypatch.setenv(ENV_VAR, "")  # what the Makefile exports without a mirror
    assert datasets.data_dir() is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert datasets.data_dir() == tmp_path
    assert datasets.data_dir(tmp_path / "x") == tmp_path / "x"
