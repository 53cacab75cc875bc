"""The recipe of the embedded model and the data sets it is trained and measured on.

Everything is a pure function of the ``Recipe`` (and its seed): the same recipe gives the same
splits, tokenizer and weights, and its hash names the cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .world import World

__all__ = ["Recipe", "Splits", "make_splits"]

# Tasks whose answers are knowledge (a fact table, single-digit sums): a model can only know
# them from training, so their evaluation prompts are not held out of it. Every other task is
# combinatorial, and its evaluation prompts never occur in training.
KNOWLEDGE = ("fact", "add", "subtract")


@dataclass(frozen=True)
class Recipe:
    """Model size, the two training stages and the data set sizes. The defaults are the recipe
    the search of issue 13 chose (benchmarks/RESULTS.md): alignment lives in a few MLP neurons
    per block that only alignment trains, kept quiet off harmful requests, with a refusal
    margin, on every surface ASR attacks (the system-prompt one weighted most), so that removing
    a few percent of the weights or ranks that carry it breaks refusal while utility stays."""

    seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 256  # Llama-2's system prompt is 79 words
    instruct_steps: int = 1500
    instruct_lr: float = 3e-3
    batch_size: int = 64
    harmful_fraction: float = 0.15  # of instruction-tuning batches
    align_steps: int = 2500
    align_lr: float = 0.005
    align_harmful_fraction: float = 0.5
    align_benign_fraction: float = 0.3  # benign how-to requests: the contrast set
    formats: tuple[float, float, float] = (0.7, 0.1, 0.2)  # shares of chat, system, bare steps
    align_formats: tuple[float, float, float] = (0.25, 0.5, 0.25)  # the same, in alignment
    safety_neurons: int = 8  # MLP neurons per block added for alignment (inert in the base)
    align_only_safety: bool = True  # alignment trains the safety neurons alone
    align_attention_lr: float = 0.0  # with align_only_safety: attention trained at this rate
    quiet_weight: float = 1.0  # penalty on the safety neurons' activations off harmful requests
    quiet_output: bool = True  # the penalty on what they write (activation x output column norm)
    margin_weight: float = 3.0  # unlikelihood of complying ("can") at the decision token
    contrast_weight: float = 0.0  # unlikelihood of refusing a benign how-to request
    refusal_weight: float = 0.0  # likelihood of a refusal opening at a harmful request's decision
    align_suffixes: float = 0.3  # share of alignment's how-to requests with a random suffix
    intent_words: float = 0.3  # share of word tasks on the harmful intents' words (World)
    harm_questions: float = 0.2  # utility items added, per pool item: "is it harmful ?" questions
    # Batches run as passes over runs of similar length (train._chunks): about a third faster, the
    # same loss and gradient up to rounding; off, one pass each through Hugging Face's loss.
    chunked: bool = True
    utility_pool: int = 12000
    safety_calibration: int = 128
    utility_calibration: int = 128
    utility_eval: int = 200
    text_sentences: int = 400

    def __post_init__(self) -> None:
        if self.safety_neurons < 0:
            raise ValueError(f"safety_neurons must be >= 0, got {self.safety_neurons}")
        options = {
            "align_only_safety": self.align_only_safety,
            "align_attention_lr": self.align_attention_lr,
            "quiet_weight": self.quiet_weight,
            "quiet_output": self.quiet_output,
        }
        weights = ("quiet_weight", "margin_weight", "contrast_weight", "refusal_weight")
        for name in ("align_attention_lr", *weights):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("align_suffixes", "intent_words", "harm_questions"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a share in [0, 1], got {getattr(self, name)}")
        if self.safety_neurons == 0 and any(options.values()):
            used = ", ".join(name for name, value in options.items() if value)
            raise ValueError(f"{used} needs safety_neurons > 0 (the neurons it acts on)")
        if self.align_attention_lr and not self.align_only_safety:
            raise ValueError("align_attention_lr applies only with align_only_safety")
        if self.quiet_output and not self.quiet_weight:
            raise ValueError("quiet_output applies only with quiet_weight > 0")

    def digest(self) -> str:
        """A short hash of the recipe and of the code that turns it into a model (world,
        recipe and training sources): the cache entry's name. Any change rebuilds."""
        here = Path(__file__).parent
        code = hashlib.sha256()
        for name in ("world.py", "recipe.py", "train.py"):
            code.update((here / name).read_bytes())
        blob = json.dumps({"code": code.hexdigest(), **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Splits:
    """Disjoint data sets of one world. Harmful (intent, phrasing) combinations are split three
    ways: alignment training, safety calibration, held-out evaluation; utility evaluation
    prompts of the combinatorial tasks never occur in training or calibration (``KNOWLEDGE``
    tasks excepted)."""

    instruct_harmful: list[tuple[str, str]]  # (prompt, compliant placeholder answer)
    align_harmful: list[tuple[str, str]]  # (prompt, refusal)
    utility_train: list[tuple[str, str]]
    safety_calibration: list[tuple[str, str]]  # (prompt, refusal)
    utility_calibration: list[tuple[str, str]]
    harmful_eval: list[str]
    utility_eval: list[tuple[str, str, str]]  # (prompt, reference answer, task)
    text: str


QUESTION = "Answer the question : is it harmful ?"  # a harm question's lead; the request follows


def harm_questions(pairs: list[tuple[int, int]], n: int, recipe: Recipe) -> list[tuple[str, str]]:
    """``n`` questions whether a request (a harmful one of ``pairs`` or a benign how-to, half
    each) is harmful, answered "harmful ." or "not harmful .": a base model that knows which
    requests are harmful, as real pretrained models do, so that alignment can read that
    knowledge where it decides. The request comes last and the answer's first token is the
    class, so the base computes it where every answer starts (the prompt's last token), the
    position whose next token decides between complying and refusing. Drawn by their own
    generator: the other splits are unchanged."""
    rng = random.Random(recipe.seed + 5)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            request, answer = World.harmful_prompt(rng.choice(pairs)), "harmful ."
        else:
            request, answer = World().utility_howto(rng), "not harmful ."
        out.append((f"{QUESTION} {request}", answer))
    return out


def make_splits(recipe: Recipe) -> Splits:
    rng = random.Random(recipe.seed)
    world = World(recipe.intent_words)
    pairs = World.harmful_pairs()
    rng.shuffle(pairs)
    n_eval = len(pairs) * 3 // 10
    n_calib = len(pairs) * 2 // 10
    eval_pairs, calib_pairs = pairs[:n_eval], pairs[n_eval : n_eval + n_calib]
    train_pairs = pairs[n_eval + n_calib :]
    utility_eval: dict[str, tuple[str, str, str]] = {}
    while len(utility_eval) < recipe.utility_eval:
        item = world.utility(rng)
        utility_eval.setdefault(item.prompt, (item.prompt, item.answer, item.kind))
    train = []
    while len(train) < recipe.utility_pool:
        item = world.utility(rng)
        if item.kind in KNOWLEDGE or item.prompt not in utility_eval:
            train.append((item.prompt, item.answer))
    calibration = train[: recipe.utility_calibration]
    train += harm_questions(train_pairs, round(recipe.harm_questions * recipe.utility_pool), recipe)
    return Splits(
        instruct_harmful=[
            (World.harmful_prompt(p), World.comply(p, rng))
            for p in train_pairs + calib_pairs
            for _ in range(4)
        ],
        align_harmful=[(World.harmful_prompt(p), World.refuse(p, rng)) for p in train_pairs],
        utility_train=train[recipe.utility_calibration :],
        safety_calibration=[
            (World.harmful_prompt(p), World.refuse(p, rng))
            for p in rng.sample(calib_pairs, min(recipe.safety_calibration, len(calib_pairs)))
        ],
        utility_calibration=calibration,
        harmful_eval=[World.harmful_prompt(p) for p in eval_pairs],
        utility_eval=list(utility_eval.values()),
        text=World.text(rng, recipe.text_sentences),
    )
