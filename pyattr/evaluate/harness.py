"""Zero-shot utility with lm-evaluation-harness on the model in memory (DESIGN.md, "utility").

The edited model is wrapped in lm-eval's ``HFLM`` as it is, so it is never saved just to be
evaluated. The default tasks are the paper's six; ``include_path`` adds a folder of task YAML files
of your own (a local data file makes a task that runs offline). Task names are checked before
anything runs, and their data is loaded once before any model work (``check_tasks``), so a task
whose data set is not on this machine (offline, never downloaded) is one clear error at the
start, not a network traceback after an hour of generation. lm-eval is an optional extra:
``pip install 'pyattr[eval]'``.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from ..io import atomic_write
from ..models import context_length

__all__ = ["PAPER_TASKS", "TaskDataError", "check_tasks", "zero_shot"]

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa")
FORMAT = "pyattr.utility/1"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(
            f"zero-shot utility needs lm-evaluation-harness ({exc}); install it with "
            "`pip install 'pyattr[eval]'` (or `pip install lm-eval`)"
        ) from None
    return lm_eval, HFLM, TaskManager


class TaskDataError(OSError):
    """A task's data set could not be loaded (offline and not cached, a missing local file)."""


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None):
    """Check task names and load each task's data (lm-eval caches it), before any model work.
    Returns the ``TaskManager`` to evaluate with. Unknown names are a ``ValueError`` with the
    closest matches; data that cannot be loaded is a ``TaskDataError`` naming the task."""
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("no tasks to evaluate")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"no task folder {include_path}")
    _, _, TaskManager = _lm_eval()
    manager = None
    if include_path is not None:  # indexing lm-eval's own thousands of tasks takes a while
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown lm-eval task {name!r}{hint}")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name in tasks:
        try:
            if hasattr(manager, "load"):
                manager.load([name])
            else:  # lm-eval before 0.4.10
                from lm_eval.tasks import get_task_dict

                get_task_dict([name], manager)
        except OSError as exc:  # ConnectionError offline, FileNotFoundError for a local file
            hint = (
                ". Run it once with internet access (the data is then cached, and "
                "HF_DATASETS_OFFLINE=1 uses the cache), or give a task of your own with local "
                "data (--include-path)"
                if isinstance(exc, ConnectionError)
                else ""
            )
            raise TaskDataError(
                f"lm-eval task {name!r}: its data could not be loaded ({exc}){hint}"
            ) from None
    return manager


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    include_path: str | Path | None = None,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict:
    """Accuracy of ``model`` on each lm-eval task and their mean.

    limit: the first ``limit`` documents of each task (a fraction below 1 takes that share).
    Returns ``{"tasks": {name: {metric: value}}, "mean_acc": float, "config": {...}}`` and, with
    ``out``, writes it there as JSON (temporary file, then rename).
    """
    tasks = list(dict.fromkeys(tasks))
    if limit is not None and not limit > 0:
        raise ValueError(f"limit must be positive, got {limit}")
    manager = check_tasks(tasks, include_path)
    lm_eval, HFLM, _ = _lm_eval()
    was_training = model.training
    model.eval()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=context_length(model),
        )
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    per_task: dict[str, dict[str, float]] = {}
    for name in tasks:
        metrics = results["results"][name]
        per_task[name] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and isinstance(value, (int, float)) and "stderr" not in key
        }
        if "acc" not in per_task[name]:
            raise ValueError(f"lm-eval task {name!r} reports no accuracy: {sorted(per_task[name])}")
    report = {
        "format": FORMAT,
        "tasks": per_task,
        "mean_acc": sum(m["acc"] for m in per_task.values()) / len(per_task),
        "config": {
            "tasks": tasks,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "batch_size": batch_size,
            "seed": seed,
            "lm_eval": getattr(lm_eval, "__version__", "unknown"),
            "n_samples": {
                name: counts.get("effective", counts.get("original"))
                for name, counts in results.get("n-samples", {}).items()
            },
        },
    }
    if out is not None:
        atomic_write(out, json.dumps(report, indent=2) + "\n")
    return report
