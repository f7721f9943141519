"""Input channels by name: matching the images a user gives to the channels a model declares.

Names are compared case-insensitively, ignoring spaces, ``-``, ``_`` and ``.``, with the usual
synonyms of the field: FLAIR = T2-FLAIR; T1 = T1w = MPRAGE = T1-weighted (the seed paper's
"MPRAGE" is a T1-weighted sequence); T2 = T2w; PD = PDw.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from ..errors import InputError

#: canonical key -> names that mean it
SYNONYMS = {
    "flair": ("flair", "t2flair", "flairt2", "t2wflair"),
    "t1": ("t1", "t1w", "mprage", "t1mprage", "t1weighted", "mpr", "t13d", "t1w3d"),
    "t1c": ("t1c", "t1ce", "t1gd", "t1contrast", "t1post"),
    "t2": ("t2", "t2w", "t2weighted"),
    "pd": ("pd", "pdw"),
}
_LOOKUP = {alias: key for key, names in SYNONYMS.items() for alias in names}


def canonical(name: str) -> str:
    """Canonical key of a channel name (``"T1w"`` and ``"MPRAGE"`` -> ``"t1"``)."""
    s = re.sub(r"[\s\-_.]", "", str(name).lower())
    return _LOOKUP.get(s, s)


def column_name(name: str) -> str:
    """The channel's name as used in table columns (lowercase, alphanumeric and ``_``)."""
    return re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_") or "channel"


def match_channels(model_channels: Sequence[str], given: Mapping[str, object],
                   model_source: str = "the model") -> list:
    """Order the given images by the model's channels.

    Parameters
    ----------
    model_channels : sequence of str
        The model's input channel names, in order.
    given : mapping of str -> path
        Image per user-given name (``--image NAME=FILE``, ``--flair``, ``--mprage``).

    Returns
    -------
    list
        The given values in the model's channel order.

    Raises
    ------
    InputError
        A model channel without an image, an image for a channel the model does not have, or
        two images for one channel; the message lists the model's channels.
    """
    want = [canonical(c) for c in model_channels]
    listing = ", ".join(model_channels)
    by_key: dict = {}
    for name, value in given.items():
        key = canonical(name)
        if key not in want:
            raise InputError(f"{model_source} has no input channel {name!r}; its channels are: "
                             f"{listing} (give each with --image NAME=FILE)")
        if key in by_key:
            raise InputError(f"two images given for channel {name!r} of {model_source}")
        by_key[key] = value
    missing = [c for c, k in zip(model_channels, want) if k not in by_key]
    if missing:
        raise InputError(f"{model_source} needs the channel(s) {', '.join(missing)}; its "
                         f"channels are: {listing} (give each with --image NAME=FILE)")
    return [by_key[k] for k in want]


def parse_image_options(images: Sequence[str] | None, flair=None, mprage=None) -> dict:
    """``--image NAME=FILE`` (repeatable) and the ``--flair`` / ``--mprage`` shortcuts as one
    ``{name: file}`` mapping.

    Raises
    ------
    InputError
        An ``--image`` value without ``=``, an empty name or file, or no image at all.
    """
    out: dict = {}
    for item in images or []:
        name, sep, path = str(item).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"--image expects NAME=FILE (e.g. FLAIR=flair.nii.gz), got {item!r}")
        if name.strip() in out:
            raise InputError(f"--image {name.strip()} given twice")
        out[name.strip()] = path.strip()
    for name, path in (("FLAIR", flair), ("MPRAGE", mprage)):
        if path is not None:
            if any(canonical(k) == canonical(name) for k in out):
                raise InputError(f"{name} given twice (--{name.lower()} and --image)")
            out[name] = path
    if not out:
        raise InputError("no input image: give --flair/--mprage or --image NAME=FILE")
    return out
