"""Run on every rank by test_distributed.py (``torchrun ... train_ranks.py MANIFEST VAL OUT RUNS``):
the trainings of RUNS (JSON: name -> keyword arguments of ``train``; ``"validate": true`` adds
the subjects of VAL) into OUT/<name>, in one launch."""

import json
import sys

from instance_saliency.cli import _load_manifest_subjects
from instance_saliency.training import train

manifest, val_manifest, out, runs = sys.argv[1:5]
subjects = _load_manifest_subjects(manifest)
val = _load_manifest_subjects(val_manifest)
for name, kw in json.loads(runs).items():
    kw = dict(kw)
    train(subjects, val if kw.pop("validate", False) else [], f"{out}/{name}", progress=False,
          **kw)
