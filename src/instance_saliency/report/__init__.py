"""Figures and the HTML report (last stage of the pipeline: display only).

Nothing here changes saliency values: colour ranges, grey-level windows and transparency are
applied to copies for drawing. Every file is written atomically (temporary name, then rename).
"""

from .figures import distance_profile_figure, instance_figure, modality_share_figure
from .html import write_report

__all__ = [
    "instance_figure",
    "distance_profile_figure",
    "modality_share_figure",
    "write_report",
]
