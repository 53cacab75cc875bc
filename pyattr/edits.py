"""Edits: one registry entry per kind of change a sweep makes to a model.

The sweep (``pyattr.sweep``), the demo, the command line and the report share this vocabulary.
A point of a sweep is an edit's name and its parameters; the edit checks them before any work
and applies itself to a copy of the editor's model:

    none            the model as it is
    top             prune the top-q safety weights (score, q; sequential: block by block as the
                    released code, from the editor's calibration pairs)
    set_difference  prune top_q(safety) \\ top_p(utility) (score, p, q)
    random_weights  a random region as large as that set difference (score, p, q; seed: which
                    draw, 0 by default)
    actsvd_remove   remove the top r safety ranks (r)
    actsvd_keep     keep only the top r safety ranks (r)
    orthogonal      W ← W − (I − Π_u) Π_s W (r_u and r_s, or keep_u and keep_s)
    random_ranks    random directions of the orthogonal projection's ranks (as orthogonal; seed)
    finetune        a fine-tuning attack on n harmful pairs for ``steps`` steps, with a region
                    (frozen: none, set_difference with score/p/q, top_safety with score/q, or
                    random_weights with score/p/q/seed: the freeze's control) kept bit for bit
    rewind          copy a region (region: set_difference, top_safety or random_weights, with
                    score/p/q/seed, found on the source) back from the editor's source model:
                    rewinding an attacked model's safety-critical weights to the aligned ones
    direction       the editor's refusal direction orthogonalised out of every weight writing
                    to the residual stream (``pyattr.direction``): one rank of the stream
    random_direction  a random direction of the same norm, orthogonalised alike (seed)

``score`` names a method of ``pyattr.scores``; ranks are amounts (``pyattr.counts``). Every
edit reports what it removed as a fraction of weights or of ranks (``unit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ._registry import Registry

if TYPE_CHECKING:
    from .sweep import Editor

__all__ = ["Edit", "REGIONS", "get", "is_control", "names", "register", "row_edit", "row_score"]

# The regions a fine-tuning attack may freeze, and a rewind may copy back: random_weights, a
# random region as large as the set difference, tells what the choice of the weights adds to
# what their count does.
REGIONS = ("none", "set_difference", "random_weights", "top_safety")


@dataclass(frozen=True)
class Edit:
    """One kind of edit. apply(editor, model, params) edits ``model`` (a copy of the editor's)
    in place and returns the fraction of weights or ranks it removed; ``control_of``: the edit
    this one is the random control of (its report colour follows it); ``layerwise``: it edits
    through ``pyattr.offload`` one layer at a time, so it can edit a model in place, offloaded
    or too large to copy (fine-tuning and the direction edits cannot)."""

    name: str
    label: str
    unit: str
    required: tuple[str, ...]
    apply: Callable[[Editor, nn.Module, dict], float]
    optional: tuple[str, ...] = ()
    control_of: str | None = None
    layerwise: bool = True

    def check(self, params: dict) -> None:
        """Refuse missing or unknown parameters, naming them, before any work."""
        missing = [k for k in self.required if k not in params]
        unknown = [k for k in params if k not in self.required + self.optional]
        if missing or unknown:
            what = []
            if missing:
                what.append(f"missing {missing}")
            if unknown:
                what.append(f"unknown {unknown}")
            raise ValueError(
                f"edit {self.name!r}: {' and '.join(what)}; it takes {list(self.required)}"
                + (f" and optionally {list(self.optional)}" if self.optional else "")
            )


_REGISTRY: Registry[Edit] = Registry("edit")
register, names, get = _REGISTRY.register, _REGISTRY.names, _REGISTRY.get


def is_control(edit: str, params: dict) -> bool:
    """Whether a point is a random control, drawn (``sweep.draws_of``) and pooled
    (``report.pool_draws``) as one: the control of another edit (random weights, ranks, a
    random direction), or a fine-tuning attack or rewind whose region is random weights (the
    freeze's and the rewind's control). Edits of files from other versions are not."""
    if edit not in names():
        return False
    if get(edit).control_of is not None:
        return True
    return edit in ("finetune", "rewind") and "random_weights" in (
        params.get("frozen"),
        params.get("region"),
    )


def row_edit(row: dict) -> str:
    """The edit of a results row, also from files written before the edit was called
    ``edit`` (``method``)."""
    return row["edit"] if "edit" in row else row["method"]


def row_score(params: dict, default: str = "") -> str:
    """The score method of a point's parameters, also from files written before it was
    called ``score`` (``method``, or ``like`` for random controls)."""
    return params.get("score", params.get("method", params.get("like", default)))


# ----------------------------------------------------------------------------------------------


def _mask(editor: Editor, model: nn.Module, region: str, p: dict):
    """The region ``set_difference`` (score, p, q), ``top_safety`` (score, q) or
    ``random_weights`` (score, p, q, seed: a random region as large as that set difference,
    layer by layer) of ``model``."""
    from .masks import random_like
    from .masks import region as masks_region

    needs = {"set_difference": ("p", "q"), "top_safety": ("q",), "random_weights": ("p", "q")}
    needs = needs.get(region, ())
    missing = [k for k in needs if k not in p]
    if missing:
        raise ValueError(f"the {region} region needs {missing} in the point's parameters")
    score = row_score(p, "wanda")
    if region == "set_difference":
        if editor.utility is None:
            raise ValueError("a set difference needs the utility statistics")
        safety, utility = editor.safety, editor.utility
        return masks_region(model, safety, utility, score=score, q=p["q"], p=p["p"])[0]
    if region == "top_safety":
        return masks_region(model, editor.safety, score=score, q=p["q"])[0]
    if region == "random_weights":
        return random_like(_mask(editor, model, "set_difference", p), seed=p.get("seed", 0))
    raise ValueError(f"region must be one of {REGIONS[1:]}, got {region!r}")


def _sequential_top(editor: Editor, model: nn.Module, p: dict) -> float:
    """The released code's top-down pruning (``pyattr.sequential``) on the editor's
    calibration pairs: each block's region found after the blocks above it are pruned."""
    from .sequential import sequential_region

    if editor.calibration is None:
        raise ValueError(
            "sequential points need the pairs to calibrate on: Editor(..., calibration="
            "(tokenizer, pairs))"
        )
    tokenizer, pairs = editor.calibration
    mask = sequential_region(
        model, tokenizer, pairs, score=row_score(p, "wanda"), q=p["q"], progress=False
    )
    return mask.sparsity()["overall"]


def _pruned(region: str, random: bool = False):
    def apply(editor: Editor, model: nn.Module, p: dict) -> float:
        from .edit import prune

        if p.get("sequential"):
            return _sequential_top(editor, model, p)
        mask = _mask(editor, model, "random_weights" if random else region, p)
        prune(model, mask)
        return mask.sparsity()["overall"]

    return apply


def _actsvd(mode: str):
    def apply(editor: Editor, model: nn.Module, p: dict) -> float:
        from .lowrank import edit_ranks

        return edit_ranks(model, mode, editor.bases[0], r=p["r"]).fraction

    return apply


_RANKS = ("r_u", "r_s", "keep_u", "keep_s")


def _orthogonal(random: bool):
    def apply(editor: Editor, model: nn.Module, p: dict) -> float:
        from .lowrank import edit_ranks, remove_random

        if editor.utility is None:
            raise ValueError("the orthogonal projection needs the utility statistics")
        safety, utility = editor.bases
        ranks = {k: p[k] for k in _RANKS if k in p}
        report = edit_ranks(model, "orthogonal", safety, utility, apply=not random, **ranks)
        if random:
            remove_random(model, report, seed=p.get("seed", 0))
        return report.fraction

    return apply


def _finetune(editor: Editor, model: nn.Module, p: dict) -> float:
    from .data import sample
    from .finetune import finetune

    if editor.attack is None:
        raise ValueError(
            "finetune points need what to train on: Editor(..., attack=Attack(tokenizer, "
            "pairs)) (on the command line, --attack-data)"
        )
    frozen = p.get("frozen", "none")
    if frozen not in REGIONS:
        raise ValueError(f"frozen must be one of {REGIONS}, got {frozen!r}")
    mask = None if frozen == "none" else _mask(editor, model, frozen, p)
    a = editor.attack
    finetune(
        model,
        a.tokenizer,
        sample(a.pairs, p["n"], seed=a.seed),
        frozen=mask,
        steps=p["steps"],
        lr=a.lr,
        batch_size=min(a.batch_size, p["n"]),
        optimizer=a.optimizer,
        seed=a.seed,
        progress=False,
    )
    return 0.0


def _rewind(editor: Editor, model: nn.Module, p: dict) -> float:
    """The region is found on the source (the aligned model the statistics describe), whose
    weights it copies back into the edited one."""
    from .edit import rewind

    if editor.source is None:
        raise ValueError("rewind points need the model to copy from: Editor(..., source=model)")
    mask = _mask(editor, editor.source, p["region"], p)
    rewind(model, editor.source, mask)
    return mask.sparsity()["overall"]


def _direction(random: bool):
    def apply(editor: Editor, model: nn.Module, p: dict) -> float:
        from .direction import orthogonalize, random_direction

        if editor.direction is None:
            raise ValueError(
                "direction points need the refusal direction: Editor(..., direction=r) (on the "
                "command line, --direction from `pyattr direction`)"
            )
        r = random_direction(editor.direction, p.get("seed", 0)) if random else editor.direction
        orthogonalize(model, r)
        return 1.0 / r.shape[0]

    return apply


_SCORE = ("score",)
for _edit in (
    Edit("none", "baseline", "weights", (), lambda editor, model, p: 0.0),
    Edit(
        "top",
        "top safety weights",
        "weights",
        ("q",),
        _pruned("top_safety"),
        ("score", "sequential"),
    ),
    Edit(
        "set_difference",
        "set difference",
        "weights",
        ("p", "q"),
        _pruned("set_difference"),
        _SCORE,
    ),
    Edit(
        "random_weights",
        "random weights",
        "weights",
        ("p", "q"),
        _pruned("set_difference", random=True),
        ("score", "seed"),
        control_of="set_difference",
    ),
    Edit("actsvd_remove", "ActSVD: top safety ranks removed", "ranks", ("r",), _actsvd("remove")),
    Edit("actsvd_keep", "ActSVD: top safety ranks kept", "ranks", ("r",), _actsvd("keep")),
    Edit("orthogonal", "orthogonal projection", "ranks", (), _orthogonal(False), _RANKS),
    Edit(
        "random_ranks",
        "random directions",
        "ranks",
        (),
        _orthogonal(True),
        (*_RANKS, "seed"),
        control_of="orthogonal",
    ),
    Edit(
        "finetune",
        "fine-tuning attack",
        "weights",
        ("n", "steps"),
        _finetune,
        ("frozen", "score", "p", "q", "seed"),
        layerwise=False,
    ),
    Edit("rewind", "rewinding", "weights", ("region", "q"), _rewind, ("score", "p", "seed")),
    Edit(
        "direction",
        "refusal direction orthogonalised",
        "ranks",
        (),
        _direction(False),
        layerwise=False,
    ),
    Edit(
        "random_direction",
        "random direction",
        "ranks",
        (),
        _direction(True),
        ("seed",),
        control_of="direction",
        layerwise=False,
    ),
):
    register(_edit)
