"""instance-saliency: instance-level quantitative saliency for 3D lesion segmentation.

Explains a segmentation network one lesion (connected component) at a time with signed,
per-modality SmoothGrad and Grad-CAM++ maps, and turns them into per-lesion numbers.

Method: Spagnolo et al., "Instance-level quantitative saliency in multiple sclerosis lesion
segmentation", arXiv:2406.09335.
"""

__version__ = "0.1.0"

from .errors import InstanceSaliencyError, InputError  # noqa: E402,F401
