"""Imported at start-up by every Python process of the torchrun tests (test_distributed.py puts
this folder first on their PYTHONPATH); does nothing outside a rank or without IS_TEST_ARCH.

In a rank (``RANK`` set by torchrun) it registers the tests' hand-set model under the
architecture name ``$IS_TEST_ARCH`` (checkpoints name their architecture, and the ranks are new
processes), and it can make the rank ``$IS_TEST_FAIL_RANK`` fail right after (``kill``: SIGKILL,
as a lost node would) or instead of (``raise``: an ordinary Python error) explaining its first
subject, as ``$IS_TEST_FAIL_HOW`` says.
"""

import os

if os.environ.get("IS_TEST_ARCH") and "RANK" in os.environ:
    import signal
    import sys

    sys.path.insert(0, os.environ["IS_TEST_HELPERS"])
    from _helpers import Detector  # noqa: E402

    from instance_saliency import cohort, models  # noqa: E402

    models.ARCHITECTURES[os.environ["IS_TEST_ARCH"]] = Detector
    if os.environ.get("IS_TEST_FAIL_RANK") == os.environ["RANK"]:
        _real = cohort.explain
        _how = os.environ.get("IS_TEST_FAIL_HOW", "kill")

        def _failing(*args, **kwargs):
            if _how == "raise":
                raise RuntimeError("injected failure")
            result = _real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result

        cohort.explain = _failing
