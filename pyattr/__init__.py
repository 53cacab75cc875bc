"""pyattr: where does a language model keep its refusals?

Fast safety attribution by pruning and low-rank modification (Wei et al., ICML 2024) on any
Hugging Face decoder model. See README.md for the workflow.
"""

from . import ops, scores
from ._version import __version__
from .calibrate import calibrate
from .covariance import CovarianceStats, NonFiniteActivationError, StreamingCovariance
from .edit import prune, restore, rewind
from .lowrank import (
    Eigenbasis,
    RankEdit,
    edit_ranks,
    eigenbases,
    load_eigenbases,
    save_eigenbases,
    subspace_similarity,
)
from .masks import Mask, load_mask, save_mask
from .models import LinearLayer, find_linear_layers, input_groups
from .plan import plan_calibration
from .selection import (
    SetDifference,
    matrix_topk_mask,
    nm_mask,
    set_difference_mask,
    snip_mask,
    topk_mask,
    wanda_mask,
)
from .stats import Stats, load_stats, save_stats

__all__ = [
    "CovarianceStats",
    "Eigenbasis",
    "LinearLayer",
    "Mask",
    "NonFiniteActivationError",
    "RankEdit",
    "SetDifference",
    "Stats",
    "StreamingCovariance",
    "__version__",
    "calibrate",
    "edit_ranks",
    "eigenbases",
    "find_linear_layers",
    "input_groups",
    "load_eigenbases",
    "load_mask",
    "load_stats",
    "matrix_topk_mask",
    "nm_mask",
    "ops",
    "plan_calibration",
    "prune",
    "restore",
    "rewind",
    "save_eigenbases",
    "save_mask",
    "save_stats",
    "scores",
    "set_difference_mask",
    "snip_mask",
    "subspace_similarity",
    "topk_mask",
    "wanda_mask",
]
