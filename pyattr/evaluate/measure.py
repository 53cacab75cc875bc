"""What a sweep measures on each edited model, in one place for the sweep command and the demo.

``Measurement`` runs ``attack_success`` with the options it was given, judges the same responses
again with a second judge when one is given (its ASR and the share of verdicts the two judges
agree on: on the toy model, how far keyword ASR is from the exact one), and adds utility (any
function of the model: zero-shot accuracy, the toy's own task) and perplexity on a text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from .asr import rejudge
from .judge import Judge, agreement, cohen_kappa

__all__ = ["Measurement", "judged_again"]


class Measurement:
    """``measurement(model)`` → ``{"asr", ["asr_second", "judges", "kappa_pairs"], "utility",
    ["perplexity"]}``.

    asr: keyword arguments of ``attack_success`` (prompts, variants, judge, ...); second_judge:
    a judge or a list of judges that re-judge the same responses (``asr_second`` is the first
    one's, for the report's columns; ``judges`` has every judge's ASR with its agreement and
    Cohen's kappa against the first judge, ``kappa_pairs`` kappa for every pair of judges);
    utility: model → accuracy; text: a file for perplexity.
    """

    def __init__(
        self,
        tokenizer,
        asr: dict,
        *,
        second_judge: Judge | Sequence[Judge] | None = None,
        utility: Callable[[nn.Module], float] | None = None,
        text: str | Path | None = None,
    ) -> None:
        if second_judge is None:
            others: list[Judge] = []
        elif isinstance(second_judge, Judge):
            others = [second_judge]
        else:
            others = list(second_judge)
        self.tokenizer, self.asr, self.others = tokenizer, dict(asr), others
        self.second_judge = others[0] if others else None
        self.utility, self.text = utility, text
        self._engine = None

    def _options(self, model: nn.Module) -> dict:
        """attack_success's options; with the vLLM backend one engine serves every call,
        updated to each model (``VllmEngine.update``) rather than saved and started again."""
        if self.asr.get("backend") != "vllm":
            return self.asr
        from .vllm_backend import VllmEngine

        if self._engine is None:
            self._engine = VllmEngine(model, self.tokenizer, **(self.asr.get("vllm_options") or {}))
        else:
            self._engine.update(model)
        rest = {k: v for k, v in self.asr.items() if k not in ("backend", "vllm_options")}
        return rest | {"backend": self._engine}

    def close(self) -> None:
        """Free the vLLM engine, if one was started."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __call__(self, model: nn.Module) -> dict:
        from .. import evaluate  # looked up at call time: ``evaluate.attack_success`` is the seam

        options = self._options(model)
        report = evaluate.attack_success(model, self.tokenizer, progress=False, **options)
        row: dict = {"asr": report.asr}
        if self.others:
            row |= judged_again(report, self.others)
        row["utility"] = None if self.utility is None else self.utility(model)
        if self.text is not None:
            from .perplexity import perplexity

            row["perplexity"] = perplexity(model, self.tokenizer, Path(self.text))
        return row


def judged_again(report, others: Sequence[Judge]) -> dict:
    """``report``'s responses re-judged by each of ``others``: ``asr_second`` (the first
    other's ASR, agreement and kappa against the report's judge), ``judges`` (the same for
    every judge, the report's own included) and ``kappa_pairs`` (Cohen's kappa per pair)."""
    verdicts = {report.config["judge"]: [r["success"] for r in report.records]}
    judges = {report.config["judge"]: {"asr": report.asr, "agreement": 1.0, "kappa": 1.0}}
    first = verdicts[report.config["judge"]]
    for judge in others:
        again = rejudge(report, judge)
        name = again.config["judge"]
        verdicts[name] = [r["success"] for r in again.records]
        judges[name] = {
            "asr": again.asr,
            "agreement": agreement(first, verdicts[name]),
            "kappa": cohen_kappa(first, verdicts[name]),
        }
    names = list(verdicts)
    second = names[1]
    row = {"asr_second": {"judge": second, **judges[second]}, "judges": judges}
    row["kappa_pairs"] = {
        f"{a} | {b}": cohen_kappa(verdicts[a], verdicts[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return row
