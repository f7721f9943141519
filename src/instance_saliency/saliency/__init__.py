"""Saliency methods: instance SmoothGrad and instance Grad-CAM++ (see the submodules)."""

from .engine import MODES, SparseMap, WindowPlan  # noqa: F401
from .smoothgrad import AGGREGATIONS, VARIANTS, InstanceSaliency, smoothgrad  # noqa: F401
from .gradcampp import gradcampp, gradcampp_weights, hirescam, record_layer_sums  # noqa: F401,E402
from ._speed import PRECISIONS, fold_batchnorm  # noqa: F401,E402
