"""Session-wide test settings (kept minimal)."""

import os

import torch

# The tests run tiny models; on a small, shared CPU extra intra-op threads only add contention
# (measured: ~3x slower wall time with 2 threads under load). Override with TEST_TORCH_THREADS.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))
