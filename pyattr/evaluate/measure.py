"""What a sweep measures on each edited model, in one place for the sweep command and the demo.

``Measurement`` runs ``attack_success`` with the options it was given, judges the same responses
again with a second judge when one is given (its ASR and the share of verdicts the two judges
agree on: on the toy model, how far keyword ASR is from the exact one), and adds utility (any
function of the model: zero-shot accuracy, the toy's own task) and perplexity on a text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from .asr import rejudge
from .judge import Judge, agreement, cohen_kappa

__all__ = ["Measurement"]


class Measurement:
    """``measurement(model)`` → ``{"asr", ["asr_second"], "utility", ["perplexity"]}``.

    asr: keyword arguments of ``attack_success`` (prompts, variants, judge, ...); second_judge:
    re-judges the same responses; utility: model → accuracy; text: a file for perplexity.
    """

    def __init__(
        self,
        tokenizer,
        asr: dict,
        *,
        second_judge: Judge | None = None,
        utility: Callable[[nn.Module], float] | None = None,
        text: str | Path | None = None,
    ) -> None:
        self.tokenizer, self.asr, self.second_judge = tokenizer, dict(asr), second_judge
        self.utility, self.text = utility, text

    def __call__(self, model: nn.Module) -> dict:
        from .. import evaluate  # looked up at call time: ``evaluate.attack_success`` is the seam

        report = evaluate.attack_success(model, self.tokenizer, progress=False, **self.asr)
        row: dict = {"asr": report.asr}
        if self.second_judge is not None:
            second = rejudge(report, self.second_judge)
            first_verdicts = [r["success"] for r in report.records]
            second_verdicts = [r["success"] for r in second.records]
            row["asr_second"] = {
                "judge": second.config["judge"],
                "asr": second.asr,
                "agreement": agreement(first_verdicts, second_verdicts),
                "kappa": cohen_kappa(first_verdicts, second_verdicts),
            }
        row["utility"] = None if self.utility is None else self.utility(model)
        if self.text is not None:
            from .perplexity import perplexity

            row["perplexity"] = perplexity(model, self.tokenizer, Path(self.text))
        return row
