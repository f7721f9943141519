"""Regenerate docs/cohort_example in one command: explain the four public scans, analyse, copy.

    make cohort-example                      # same as: python tools/cohort_example.py
    python tools/cohort_example.py [--model DIR] [--run runs/cohort_example] [--device cuda]

Steps: (1) fetch and verify the four public subjects of :mod:`instance_saliency.datasets`
(open_ms_data patient07 and patient19, MSLesSeg P18 and P39; the local mirror named by
``INSTANCE_SALIENCY_DATA`` is used when set); (2) ``instance-saliency cohort`` into a fresh run
folder (exact sliding-window mode, SmoothGrad N = 4 as the demo, Grad-CAM++ at the default
layer; per-lesion tables include the map features used for FP flagging; each subject explained
by the members of the shipped ensemble that never saw it); (2b) ``instance-saliency check`` on
the ``--checks`` largest predicted lesions of each subject (settings :data:`CHECK_ARGS`); (3)
``instance-saliency analyze --n-boot 1000 --fit-flagger`` (statistics, figures, the cohort
report, the baseline-versus-saliency flagging comparison and a JSON flagger fitted on all four
subjects); (4) copy ``stats.md``, ``stats.json``, ``cohort_instances.csv``,
``cohort_report.html``, ``flagger.json`` and ``figures/*.png`` into ``docs/cohort_example``
(each file written under a temporary name, then renamed). ``docs/cohort_example/README.md`` is
not touched: its findings are written by a person after reading the new ``stats.md``.

A run folder that already exists is refused (old runs may lack columns) unless ``--resume``
(then finished subjects with the same parameters are kept, as ``cohort`` does).
Exit status: 0 when everything was regenerated, 1 when a subject failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("patient07", "patient19", "P18", "P39")
#: settings of the per-lesion checks on the cohort (a reduced version of `check`'s defaults,
#: so that the four scans' checks take tens of minutes on 2 CPU cores, not hours)
CHECK_ARGS = ("--methods", "smoothgrad,gradcampp,hirescam", "--n-samples", "4", "--stages", "2",
              "--steps", "4", "--random-orders", "1", "--baselines", "background",
              "--context-mm", "0:12:2", "--quiet")
COPIED = ("stats.md", "stats.json", "cohort_instances.csv", "cohort_report.html",
          "flagger.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: the shipped model)")
    p.add_argument("--run", default=str(ROOT / "runs" / "cohort_example"),
                   help="cohort run folder (default runs/cohort_example)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "cohort_example"),
                   help="where the tables and figures go (default docs/cohort_example)")
    p.add_argument("--data-dir", help="local mirror of the public scans")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue an existing run folder")
    p.add_argument("--checks", type=int, default=3, metavar="K",
                   help="run `instance-saliency check` on the K largest predicted lesions of "
                   "each subject before the analysis, with the reduced settings CHECK_ARGS "
                   "(default 3; 0 = no checks)")
    a = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from instance_saliency import cli, datasets
    from instance_saliency.errors import InstanceSaliencyError
    from instance_saliency.io import atomic_write_bytes

    run, docs = Path(a.run), Path(a.docs)
    try:
        if run.exists() and not a.resume:
            raise InstanceSaliencyError(f"{run} exists; delete it or pass --resume")
        paths = {s: datasets.fetch_subject(s, a.data_dir) for s in SUBJECTS}
        run.parent.mkdir(parents=True, exist_ok=True)
        manifest = run.parent / f"{run.name}.manifest.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subject", "flair", "mprage", "mask"])
            for s, fp in paths.items():
                w.writerow([s, fp["flair"], fp["mprage"], fp["mask"]])
    except InstanceSaliencyError as e:
        print(f"cohort_example: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    model = ["--model", a.model] if a.model else []
    rc = cli.main(["cohort", "--data", str(manifest), "--out", str(run), "--allow-outside-root",
                   "--n-samples", "4", "--no-figures", "--quiet", "--n-boot", "1000",
                   "--device", a.device, *model])
    if rc != 0:
        return rc
    if a.checks > 0:
        rc = cli.main(["check", str(run), *CHECK_ARGS, "--max-lesions", str(a.checks)])
        if rc != 0:
            return rc
    rc = cli.main(["analyze", str(run), "--n-boot", "1000", "--fit-flagger",
                   str(run / "flagger.json")])
    if rc != 0:
        return rc
    (docs / "figures").mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        atomic_write_bytes(docs / name, (run / name).read_bytes())
    for png in sorted((run / "figures").glob("*.png")):
        atomic_write_bytes(docs / "figures" / png.name, png.read_bytes())
    stale = [q.name for q in (docs / "figures").glob("*.png")
             if not (run / "figures" / q.name).exists()]
    if stale:
        print(f"cohort_example: note: figures no longer produced, left in place: {stale}")
    print(f"docs/cohort_example regenerated from {run}; now update its README findings from "
          f"{docs / 'stats.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
