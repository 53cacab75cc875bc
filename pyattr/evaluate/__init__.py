"""Evaluation: what the model does after an edit (DESIGN.md, "ASR" and "utility")."""

from .asr import (
    LLAMA2_SYSTEM_PROMPT,
    VARIANTS,
    AsrReport,
    attack_success,
    load_suffixes,
    rejudge,
)
from .classifier import CausalLMJudge, ClassifierJudge
from .generate import generate
from .harness import PAPER_TASKS, check_tasks, zero_shot
from .judge import REFUSAL_PHRASES, Judge, KeywordJudge, agreement, cohen_kappa
from .measure import Measurement
from .perplexity import perplexity

__all__ = [
    "LLAMA2_SYSTEM_PROMPT",
    "PAPER_TASKS",
    "REFUSAL_PHRASES",
    "VARIANTS",
    "AsrReport",
    "CausalLMJudge",
    "ClassifierJudge",
    "Judge",
    "KeywordJudge",
    "Measurement",
    "agreement",
    "cohen_kappa",
    "attack_success",
    "generate",
    "load_suffixes",
    "perplexity",
    "rejudge",
    "zero_shot",
    "check_tasks",
]
