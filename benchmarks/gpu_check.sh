#!/usr/bin/env bash
# GPU check (issue 15): exact instance SmoothGrad (N = 50) + Grad-CAM++ of every lesion of the
# demo scan on one GPU, in fp32 and bf16: wall time (goal: under 60 s in fp32), peak GPU memory,
# and the maximum relative difference to CPU maps of 3 lesions. Finishes within 10 minutes
# (the whole run is stopped at GPU_CHECK_TIMEOUT seconds, default 590; results are printed as
# they come).
#
#   benchmarks/gpu_check.sh                # on a machine with a CUDA GPU
#   benchmarks/gpu_check.sh --dry-run      # anywhere: small sizes on the CPU (seconds)
#
# Python: $PYTHON, else .venv/bin/python of the checkout, else python3 (it needs torch with
# CUDA, monai, nibabel, numpy, scipy, connected-components-3d). Data: $INSTANCE_SALIENCY_DATA,
# else ../shared/data or ./shared/data beside the checkout. Extra options go to
# benchmarks/bench_gpu.py (e.g. --n 10, --precisions fp32, --sw-batch-size 16).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu_check: $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count())')"
exec timeout "${GPU_CHECK_TIMEOUT:-590}" "$PY" benchmarks/bench_gpu.py "$@"
