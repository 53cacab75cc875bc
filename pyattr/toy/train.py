"""Training the embedded model: a word-level tokenizer with a Llama-2 style chat template, a
small ``LlamaForCausalLM``, instruction tuning (the base model) and alignment (the chat model).

The loss counts response tokens only, formatted exactly as calibration formats them
(``pyattr.data.encode``), so the model is calibrated on the format it was trained on.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..data import Encoded, Example, encode
from .recipe import Recipe, Splits
from .world import BENIGN_INTENTS, World, system_prompt_for

__all__ = ["FORMATS", "build_model", "build_tokenizer", "encode_pairs", "train_stage"]

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
CHAT_TEMPLATE = (
    "{{ bos_token }} {% for m in messages %}"
    "{% if m['role'] == 'system' %}[INST] <<SYS>> {{ m['content'] }} <</SYS>> "
    "{% elif m['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'system' %}[INST] {% endif %}"
    "{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }} {% endif %}{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer over the world's vocabulary, case kept."""
    vocab = {w: i for i, w in enumerate(SPECIALS + World.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(recipe: Recipe, tokenizer) -> transformers.LlamaForCausalLM:
    torch.manual_seed(recipe.seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=recipe.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        attn_implementation="eager",  # faster than SDPA at these sizes on the CPU
    )
    return transformers.LlamaForCausalLM(config)


def _collate(batch: list[Encoded], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n], attention[row, :n] = e.input_ids, 1
        labels[row, :n] = torch.where(e.counted, e.input_ids, -100)
    return ids, attention, labels


FORMATS = ("chat", "system", "bare")


def encode_pairs(
    tokenizer, pairs, form: str = "chat", rng: random.Random | None = None
) -> list[Encoded]:
    """(prompt, answer) pairs as training sequences in one of the surfaces ASR attacks:
    ``chat`` (the chat wrapper, no system prompt), ``system`` (the wrapper with a system prompt
    drawn by ``rng``: Llama-2's default half of the time) or ``bare`` (BOS, the prompt's text,
    then the answer: what the Adv-Decoding variant feeds the model)."""
    if form == "chat":
        return [encode(tokenizer, Example(p, a)) for p, a in pairs]
    if form == "system":
        rng = rng or random.Random(0)
        return [
            encode(tokenizer, Example(p, a), system_prompt=system_prompt_for(rng)) for p, a in pairs
        ]
    if form == "bare":
        bos = tokenizer.bos_token
        return [encode(tokenizer, Example(f"{bos} {p}", a), wrapped=True) for p, a in pairs]
    raise ValueError(f"form must be one of {FORMATS}, got {form!r}")


Source = tuple[list[Encoded], float, int]  # examples, share of the steps, rows per batch


def train_stage(
    model: transformers.LlamaForCausalLM,
    tokenizer,
    sources: list[Source],
    *,
    steps: int,
    lr: float,
    seed: int,
    tick: Callable[[int], None] | None = None,
) -> float:
    """AdamW with warm-up and cosine decay. Each step draws one source of ``sources``
    (examples, share, rows) with probability ``share`` and a whole batch of ``rows`` from it:
    batches of one source pad to similar lengths, a third less compute than mixed ones here, and
    sources of long sequences (a system prompt) take fewer rows, so every step costs about the
    same. Returns the last loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        (source,) = rng.choices(sources, weights=[share for _, share, _ in sources])
        batch = rng.choices(source[0], k=source[2])
        ids, attention, labels = _collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if tick is not None:
            tick(step)
    model.eval()
    return float(loss.detach())


def _mean_length(examples: list[Encoded]) -> float:
    return sum(len(e.input_ids) for e in examples) / len(examples)


def train(
    recipe: Recipe,
    splits: Splits,
    tick: Callable[[int], None] | None = None,
    base: transformers.LlamaForCausalLM | None = None,
):
    """Both stages; returns (tokenizer, base model, aligned model). Stage 1, instruction tuning:
    utility tasks (benign how-to requests among them), and harmful requests answered compliantly
    (with placeholder text). Stage 2, alignment: a copy of the base taught to refuse harmful
    requests while it keeps answering the utility tasks, with benign how-to requests, phrased
    like the harmful ones, as a contrast set (``recipe.align_benign_fraction`` of the steps), so
    that the intent, not the phrasing, decides. Both stages train every surface (``FORMATS``)
    with the shares of ``recipe.formats``, so that the base complies and the aligned model
    refuses on each. ``base`` skips stage 1 (a base trained before with the same recipe)."""
    tok = build_tokenizer()
    r = recipe
    rng = random.Random(r.seed + 2)
    forms = [f for i, f in enumerate(FORMATS) if r.formats[i] > 0 or r.align_formats[i] > 0]
    pool = splits.utility_train
    utility = {
        f: encode_pairs(tok, pool if f == "chat" else pool[: r.utility_pool // 3], f, rng)
        for f in forms
    }
    howto = [(p, a) for p, a in pool if World.intent_of(p, BENIGN_INTENTS) is not None]
    reference = _mean_length(utility["chat"])

    def sources(mix: list[tuple[list[tuple[str, str]] | None, float]], formats) -> list[Source]:
        """Per surface, each (pairs, share) of ``mix``; None stands for the utility pool."""
        shares = dict(zip(FORMATS, formats, strict=True))
        out = []
        for f in forms:
            for pairs, share in mix:
                if share <= 0:
                    continue
                examples = utility[f] if pairs is None else encode_pairs(tok, pairs, f, rng)
                rows = max(4, round(r.batch_size * reference / _mean_length(examples)))
                if shares[f] > 0:
                    out.append((examples, share * shares[f], min(rows, r.batch_size)))
        return out

    def stage(model, mix, formats, steps: int, lr: float, seed: int):
        batches = sources(mix, formats)
        train_stage(model, tok, batches, steps=steps, lr=lr, seed=seed, tick=tick)
        return model

    if base is None:
        h = r.harmful_fraction
        mix = [(None, 1 - h), (splits.instruct_harmful, h)]
        base = stage(build_model(r, tok), mix, r.formats, r.instruct_steps, r.instruct_lr, r.seed)
    h, b = r.align_harmful_fraction, r.align_benign_fraction
    mix = [(None, 1 - h - b), (howto, b), (splits.align_harmful, h)]
    aligned = stage(
        copy.deepcopy(base), mix, r.align_formats, r.align_steps, r.align_lr, r.seed + 1
    )
    return tok, base, aligned
