"""Training the embedded model: a word-level tokenizer with a Llama-2 style chat template, a
small ``LlamaForCausalLM``, instruction tuning (the base model) and alignment (the chat model).

The loss counts response tokens only, formatted exactly as calibration formats them
(``pyattr.data.encode``), so the model is calibrated on the format it was trained on.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..data import Encoded, Example, encode_all
from .recipe import Recipe, Splits
from .world import BENIGN_INTENTS, World, system_prompt_for

__all__ = [
    "FORMATS",
    "TRAIN_THREADS",
    "build_model",
    "build_tokenizer",
    "encode_pairs",
    "train_stage",
]

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
    config.intermediate_size += recipe.safety_neurons
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:  # the safety neurons write nothing until alignment
            layer.mlp.down_proj.weight[:, recipe.intermediate_size :] = 0
    return model


def _neuron_masks(model, first: int) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per MLP weight, 1 where instruction tuning may change it: everything but the safety
    neurons (from ``first`` on): their rows of the gate and up projections and columns of the
    down projection stay as initialised, so they write nothing until alignment."""
    out = {}
    for layer in model.model.layers:
        mlp = layer.mlp
        for lin, dim in ((mlp.gate_proj, 0), (mlp.up_proj, 0), (mlp.down_proj, 1)):
            mask = torch.ones_like(lin.weight)
            mask.narrow(dim, first, lin.weight.shape[dim] - first).zero_()
            out[lin.weight] = mask
    return out


class _SplitMLP(torch.nn.Module):
    """A Llama MLP split at neuron ``first``: the neurons before it as frozen (detached) copies,
    those from it on (the safety neurons) as parameters of their own. Alignment that trains the
    safety neurons alone then computes no gradient for the frozen weights (masking the full
    weights' gradients, the same update, computes all of them). ``safety`` holds the last
    forward's activations of the safety neurons; ``merge`` writes them back into the MLP."""

    def __init__(self, mlp: torch.nn.Module, first: int) -> None:
        super().__init__()
        lins = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(lin.bias is not None for lin in lins):
            raise ValueError("the split MLP supports bias-free projections (Llama's) only")
        gate, up, down = (lin.weight.detach() for lin in lins)
        self.original, self.first, self.act = (mlp,), first, mlp.act_fn
        self.frozen = (gate[:first].contiguous(), up[:first].contiguous())
        self.frozen += (down[:, :first].contiguous(),)
        self.gate = torch.nn.Parameter(gate[first:].clone())
        self.up = torch.nn.Parameter(up[first:].clone())
        self.down = torch.nn.Parameter(down[:, first:].clone())
        self.safety: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.nn.functional.linear
        gate, up, down = self.frozen
        hidden = self.act(linear(x, gate)) * linear(x, up)
        self.safety = self.act(linear(x, self.gate)) * linear(x, self.up)
        return linear(hidden, down) + linear(self.safety, self.down)

    @torch.no_grad()
    def merge(self) -> torch.nn.Module:
        """The original MLP with the trained safety neurons written back."""
        (mlp,) = self.original
        mlp.gate_proj.weight[self.first :] = self.gate
        mlp.up_proj.weight[self.first :] = self.up
        mlp.down_proj.weight[:, self.first :] = self.down
        return mlp


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
SUFFIX_DRAWS = 4  # random suffixes per request in alignment's suffixed sources


def encode_pairs(
    tokenizer, pairs, form: str = "chat", rng: random.Random | None = None
) -> list[Encoded]:
    """(prompt, answer) pairs as training sequences in one of the surfaces ASR attacks:
    ``chat`` (the chat wrapper, no system prompt), ``system`` (the wrapper with a system prompt
    drawn by ``rng``: Llama-2's default half of the time) or ``bare`` (BOS, the prompt's text,
    then the answer: what the Adv-Decoding variant feeds the model)."""
    if form == "chat":
        return encode_all(tokenizer, [Example(p, a) for p, a in pairs])
    if form == "system":
        rng = rng or random.Random(0)
        systems = [system_prompt_for(rng) for _ in pairs]
        return encode_all(tokenizer, [Example(p, a) for p, a in pairs], system_prompt=systems)
    if form == "bare":
        bos = tokenizer.bos_token
        examples = [Example(f"{bos} {p}", a) for p, a in pairs]
        return encode_all(tokenizer, examples, wrapped=True)
    raise ValueError(f"form must be one of {FORMATS}, got {form!r}")


# examples, share of the steps, rows per batch, kind: "harmful" requests, the benign how-to
# "contrast" of alignment, or "other"
Source = tuple[list[Encoded], float, int, str]
KINDS = ("harmful", "contrast", "other")


# Tokens of padding one more forward pass costs as much as: the batch of a step is cut into
# runs of similar length where that saves more padding than this (measured on the toy, 2 CPU
# threads: a random batch pads to about 1.9x its tokens, cut into 2-3 runs to 1.1-1.2x).
CHUNK_COST = 200


def _chunks(lengths: list[int], cost: float = CHUNK_COST) -> list[list[int]]:
    """Indices of a batch's sequences cut into runs that each pad to their longest, minimising
    the padded tokens plus ``cost`` per run: an exact dynamic programme over the sequences
    sorted by length (an optimal cut never interleaves lengths), ties kept in batch order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        width = lengths[order[j - 1]]
        for i in range(j):
            total = best[i] + (j - i) * width + cost
            if total < best[j]:
                best[j], cut[j] = total, i
    runs, j = [], len(order)
    while j:
        runs.append(order[cut[j] : j])
        j = cut[j]
    return runs[::-1]


def _chunk_loss(
    model: transformers.LlamaForCausalLM,
    chunk: list[Encoded],
    batch: tuple[int, int, int] | None,
    pad: int,
    terms: dict[str, tuple],
    activations: Callable[[], list[torch.Tensor]],
) -> torch.Tensor:
    """One run's share of a batch's loss, so that the runs' losses sum to the whole batch's:
    cross-entropy summed over the run's predicted tokens over ``batch`` (rows, predicted
    tokens, counted tokens of the whole batch), with logits computed at those positions only;
    ``batch`` None: the run is the whole batch, through Hugging Face's loss (logits at every
    position), as builds before runs were. ``terms``, the options of ``train_stage`` that apply
    to the batch: "decision" (token ids, weight) adds the weight times -log(1 - p) at the
    response's second token, p the summed probability of the ids, averaged over the batch's
    rows; "refusal" (token ids, weight) adds the weight times -log p at the same token, p the
    ids' summed probability (a refusal opening), averaged likewise; "quiet" (weight, output)
    adds the weight times the mean square of ``activations()`` (per block, the safety neurons'
    last activations) over the batch's counted tokens."""
    ids, attention, labels = _collate(chunk, pad)
    first = (labels != -100).float().argmax(1)  # the response's first token, "I"
    rows = torch.arange(len(chunk))
    if batch is None:
        out = model(input_ids=ids, attention_mask=attention, labels=labels)
        loss, decision = out.loss, out.logits[rows, first]
        batch = (len(chunk), 0, int((labels != -100).sum()))
    else:
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
        targets = labels[:, 1:]
        at = targets != -100
        logits = model.lm_head(hidden[:, :-1][at])
        loss = torch.nn.functional.cross_entropy(logits, targets[at], reduction="sum") / batch[1]
        wanted = "decision" in terms or "refusal" in terms
        decision = model.lm_head(hidden[rows, first]) if wanted else None
    if "decision" in terms:
        tokens, weight = terms["decision"]
        p = decision.softmax(-1)[:, list(tokens)].sum(-1)
        loss = loss + weight * -torch.log1p(-p.clamp(max=1 - 1e-6)).sum() / batch[0]
    if "refusal" in terms:
        tokens, weight = terms["refusal"]
        p = decision.softmax(-1)[:, list(tokens)].sum(-1)
        loss = loss + weight * -torch.log(p.clamp(min=1e-6)).sum() / batch[0]
    if "quiet" in terms:
        weight, width = terms["quiet"]
        keep = (labels != -100).unsqueeze(-1).to(loss.dtype)  # what calibration counts
        total = sum((a.pow(2) * keep).sum() for a in activations())
        loss = loss + weight * total / (batch[2] * width)
    return loss


def train_stage(
    model: transformers.LlamaForCausalLM,
    tokenizer,
    sources: list[Source],
    *,
    steps: int,
    lr: float,
    seed: int,
    tick: Callable[[int], None] | None = None,
    masks: dict[torch.nn.Parameter, torch.Tensor] | None = None,
    only_safety: int | None = None,
    quiet: tuple[int, float, bool] = (0, 0.0, False),
    rates: dict[torch.nn.Parameter, float] | None = None,
    margin: tuple[int, float] = (0, 0.0),
    contrast: tuple[tuple[int, ...], float] = ((), 0.0),
    refusal: tuple[tuple[int, ...], float] = ((), 0.0),
    chunk_cost: float | None = CHUNK_COST,
) -> float:
    """AdamW with warm-up and cosine decay; returns the last loss.

    - Each step draws one source of ``sources`` (examples, share, rows, kind) with probability
      ``share`` and a batch of ``rows`` from it: sources of long sequences (a system prompt)
      take fewer rows, so every step costs about the same.
    - The batch runs as a few forward and backward passes over runs of similar length
      (``_chunks`` with ``chunk_cost``), whose gradients sum to the whole batch's; None: one
      pass through Hugging Face's loss, the same up to rounding (``Recipe.chunked``).
    - ``masks``: parameters whose updates are confined to the entries where the mask is 1.
    - ``only_safety`` (the first safety neuron): every parameter frozen but the safety neurons
      (``_SplitMLP``) and those of ``rates``, trained at their own rate.
    - ``quiet`` (first safety neuron, weight, output): the weight times the mean squared
      activation of the neurons from the first on, over the counted tokens, is added to the
      loss of batches that are not harmful (``output``: each activation times its output
      column's norm, what the neuron writes, so that shrinking activations while growing output
      weights does not evade the term: that product is Wanda's score).
    - ``margin`` (token id, weight): the weight times -log(1 - p(token)) at the response's
      second token (the decision: "I can" or "I cannot") is added to the loss of harmful
      batches; ``contrast`` (token ids, weight): the same with the summed probability of those
      tokens (the refusals' second words) on the benign how-to contrast batches, against
      over-refusal; ``refusal`` (token ids, weight): the weight times -log p, p the summed
      probability of the ids (the refusals' second words), on harmful batches, so that the
      refusal's mass does not leak to other words once complying is unlikely.
    """
    first, weight, output = quiet
    if only_safety is not None and weight > 0 and first != only_safety:
        raise ValueError(f"quiet's first neuron ({first}) must be only_safety's ({only_safety})")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    layers = model.model.layers
    handles = [p.register_hook(lambda g, m=m: g * m) for p, m in (masks or {}).items()]
    rates = rates or {}
    split: list[_SplitMLP] = []
    captured: list[torch.Tensor] = []
    width = sum(layer.mlp.down_proj.weight.shape[1] - first for layer in layers)  # quiet's
    try:
        if only_safety is not None:
            for p in model.parameters():
                p.requires_grad_(p in rates)
            for layer in layers:
                split.append(_SplitMLP(layer.mlp, only_safety))
                layer.mlp = split[-1]
        elif weight > 0:

            def capture(module, args) -> None:
                captured.append(args[0][..., first:])

            handles += [layer.mlp.down_proj.register_forward_pre_hook(capture) for layer in layers]

        def activations() -> list[torch.Tensor]:
            if split:
                acts = [(m.safety, m.down) for m in split]
            else:
                downs = [layer.mlp.down_proj.weight[:, first:] for layer in layers]
                acts = list(zip(captured, downs, strict=True))
            return [a * w.norm(dim=0) if output else a for a, w in acts]

        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p not in rates], "lr": lr}]
        groups += [{"params": [p], "lr": rate} for p, rate in rates.items()]
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        warmup = max(1, steps // 20)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        loss = float("nan")
        for step in range(steps):
            (source,) = rng.choices(sources, weights=[s[1] for s in sources])
            batch = rng.choices(source[0], k=source[2])
            terms: dict[str, tuple] = {}
            if margin[1] > 0 and source[3] == "harmful":
                terms["decision"] = ((margin[0],), margin[1])
            if contrast[1] > 0 and source[3] == "contrast":
                terms["decision"] = contrast
            if refusal[1] > 0 and source[3] == "harmful":
                terms["refusal"] = refusal
            if weight > 0 and source[3] != "harmful":
                terms["quiet"] = (weight, width)
            runs, sizes = [range(len(batch))], None  # one pass: Hugging Face's loss
            if chunk_cost is not None:
                runs = _chunks([len(e.input_ids) for e in batch], chunk_cost)
                predicted = sum(int(e.counted[1:].sum()) for e in batch)
                sizes = (len(batch), predicted, sum(int(e.counted.sum()) for e in batch))
            loss = 0.0
            for run in runs:
                captured.clear()
                chunk = [batch[i] for i in run]
                part = _chunk_loss(model, chunk, sizes, tokenizer.pad_token_id, terms, activations)
                part.backward()
                loss += float(part.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if tick is not None:
                tick(step)
    finally:
        for handle in handles:
            handle.remove()
        for layer, m in zip(layers[: len(split)], split, strict=True):
            layer.mlp = m.merge()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return loss


def _mean_length(examples: list[Encoded]) -> float:
    return sum(len(e.input_ids) for e in examples) / len(examples)


# Threads of the CPU reductions while training. The weights depend on how many there are (a
# parallel sum splits its work by thread count, and alignment amplifies the rounding: the same
# recipe trained with 1 and with 2 threads ends up to 1.7 apart in a weight, and 0.06 against
# 0.15 in vanilla ASR), so a build pins the count: the same recipe gives the same weights on any
# number of cores. The instruction set still matters (AVX2 and AVX-512 round differently).
TRAIN_THREADS = 2


@contextlib.contextmanager
def pinned_threads(n: int = TRAIN_THREADS):
    """Run the body with ``n`` intra-op threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    recipe: Recipe,
    splits: Splits,
    tick: Callable[[int], None] | None = None,
    base: transformers.LlamaForCausalLM | None = None,
    threads: int = TRAIN_THREADS,
):
    """Both stages, with ``threads`` threads whatever the machine has (another count rounds as
    another machine would: a recipe search's probe of robustness); returns (tokenizer, base
    model, aligned model). Stage 1, instruction tuning:
    utility tasks (benign how-to requests among them), and harmful requests answered compliantly
    (with placeholder text). Stage 2, alignment: a copy of the base taught to refuse harmful
    requests while it keeps answering the utility tasks, with benign how-to requests, phrased
    like the harmful ones, as a contrast set (``recipe.align_benign_fraction`` of the steps), so
    that the intent, not the phrasing, decides. Both stages train every surface (``FORMATS``)
    with the shares of ``recipe.formats``, so that the base complies and the aligned model
    refuses on each; ``recipe.align_suffixes`` of alignment's how-to requests, harmful and
    benign, carry a random suffix (``World.suffix``, never an attack's), the Adv-Suffix surface.
    ``base`` skips stage 1 (a base trained before with the same recipe); the
    aligned model is then the one a full build makes."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    with pinned_threads(threads):
        return _train(recipe, splits, tick, base)


def _train(recipe, splits, tick, base):
    tok = build_tokenizer()
    r = recipe
    rng = random.Random(r.seed + 2)
    forms = [f for i, f in enumerate(FORMATS) if r.formats[i] > 0 or r.align_formats[i] > 0]
    pool = splits.utility_train
    utility = {
        f: encode_pairs(tok, pool if f == "chat" else pool[: r.utility_pool // 3], f, rng)
        for f in forms
    }
    howto = [
        (p, a)
        for p, a in pool
        if World.intent_of(p, BENIGN_INTENTS) is not None and a.startswith("I can help")
    ]  # benign how-to requests (not the questions whether one is harmful)
    reference = _mean_length(utility["chat"])

    Mix = list[tuple[list[tuple[str, str]] | None, float, str]]

    def sources(mix: Mix, formats) -> list[Source]:
        """Per surface, each (pairs, share, kind) of ``mix``; None stands for the utility
        pool."""
        shares = dict(zip(FORMATS, formats, strict=True))
        out = []
        for f in forms:
            for pairs, share, kind in mix:
                if share <= 0:
                    continue
                examples = utility[f] if pairs is None else encode_pairs(tok, pairs, f, rng)
                rows = max(4, round(r.batch_size * reference / _mean_length(examples)))
                if shares[f] > 0:
                    out.append((examples, share * shares[f], min(rows, r.batch_size), kind))
        return out

    cost = CHUNK_COST if r.chunked else None

    def stage(model, mix, formats, steps: int, lr: float, seed: int, **options):
        batches = sources(mix, formats)
        options |= {"steps": steps, "lr": lr, "seed": seed, "tick": tick, "chunk_cost": cost}
        train_stage(model, tok, batches, **options)
        return model

    first = r.intermediate_size
    h = r.harmful_fraction
    # Stage 1's batches are drawn even when ``base`` is given: they consume ``rng`` (system
    # prompts), so alignment draws the same data, and a given base aligns as a full build would.
    instruct = sources([(None, 1 - h, "other"), (splits.instruct_harmful, h, "harmful")], r.formats)
    if base is None:
        base = build_model(r, tok)
        masks = _neuron_masks(base, first) if r.safety_neurons else None
        train_stage(
            base,
            tok,
            instruct,
            steps=r.instruct_steps,
            lr=r.instruct_lr,
            seed=r.seed,
            tick=tick,
            masks=masks,
            chunk_cost=cost,
        )
    h, b = r.align_harmful_fraction, r.align_benign_fraction
    s = r.align_suffixes
    mix = [
        (None, 1 - h - b, "other"),
        (howto, b * (1 - s), "contrast"),
        (splits.align_harmful, h * (1 - s), "harmful"),
    ]
    if s > 0:  # the Adv-Suffix surface: the intent decides whatever words follow the request
        srng = random.Random(r.seed + 3)  # its own draws: the other sources' data are unchanged

        def suffixed(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
            return [(World.suffix(p, srng), a) for p, a in pairs for _ in range(SUFFIX_DRAWS)]

        mix += [(suffixed(howto), b * s, "contrast")]
        mix += [(suffixed(splits.align_harmful), h * s, "harmful")]
    aligned = copy.deepcopy(base)
    options = {}
    if r.safety_neurons and r.align_only_safety:
        options = {"only_safety": first}
        if r.align_attention_lr > 0:
            attention = [layer.self_attn for layer in aligned.model.layers]
            options["rates"] = {p: r.align_attention_lr for a in attention for p in a.parameters()}
    if r.safety_neurons and r.quiet_weight > 0:
        options["quiet"] = (first, r.quiet_weight, r.quiet_output)
    if r.margin_weight > 0:
        options["margin"] = (tok.convert_tokens_to_ids("can"), r.margin_weight)
    refusing = tuple(tok.convert_tokens_to_ids(w) for w in ("cannot", "am"))
    if r.contrast_weight > 0:
        options["contrast"] = (refusing, r.contrast_weight)
    if r.refusal_weight > 0:
        options["refusal"] = (refusing, r.refusal_weight)
    aligned = stage(aligned, mix, r.align_formats, r.align_steps, r.align_lr, r.seed + 1, **options)
    return tok, base, aligned
