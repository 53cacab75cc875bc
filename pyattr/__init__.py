"""pyattr: where does a language model keep its refusals?

Fast safety attribution by pruning and low-rank modification (Wei et al., ICML 2024) on any
Hugging Face decoder model. See README.md for the workflow.
"""

from . import ops, scoring
from .artifacts import Mask, load_mask, load_stats, prune, restore, save_mask, save_stats
from .calibrate import Stats, calibrate
from .covariance import CovarianceStats, NonFiniteActivationError, StreamingCovariance
from .lowrank import (
    Eigenbasis,
    RankEdit,
    edit_ranks,
    eigenbases,
    load_eigenbases,
    save_eigenbases,
    subspace_similarity,
)
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

__version__ = "0.1.0"

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
    "save_eigenbases",
    "save_mask",
    "save_stats",
    "scoring",
    "set_difference_mask",
    "snip_mask",
    "subspace_similarity",
    "topk_mask",
    "wanda_mask",
]
