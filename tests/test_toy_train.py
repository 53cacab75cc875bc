"""The toy's training step: batches cut into runs of similar length (``_chunks``) give the
whole batch's loss and gradient, and the split MLP (the safety neurons alone trained) computes the
same function and the same update as masking the full weights. References are the plain
whole-batch computation in float64."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from pyattr.data import Encoded
from pyattr.toy import train as training
from pyattr.toy.train import _chunks, _collate, _SplitMLP

FIRST = 20  # neurons before the safety neurons
SAFETY = 5
PAD = 0


def _padded(lengths, runs, cost) -> float:
    return sum(len(r) * max(lengths[i] for i in r) + cost for r in runs)


def _partitions(items):
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[head], *part]
        for k in range(len(part)):
            yield part[:k] + [[head, *part[k]]] + part[k + 1 :]


@pytest.mark.parametrize("cost", [0, 7, 60, 1e9])
def test_chunks_partition_the_batch_at_the_least_padding(seed, cost):
    """Every index once, runs in ascending length, and the padded tokens plus ``cost`` per run
    equal the brute-force optimum over all partitions of the batch (ties included)."""
    rng = random.Random(seed)
    for _ in range(4):
        n = rng.randint(1, 7)
        lengths = [rng.choice([3, 3, 5, 9, 17, 40]) for _ in range(n)]
        runs = _chunks(lengths, cost)
        assert sorted(i for r in runs for i in r) == list(range(n))
        flat = [lengths[i] for r in runs for i in r]
        assert flat == sorted(flat)
        best = min(_padded(lengths, p, cost) for p in _partitions(list(range(n))))
        assert _padded(lengths, runs, cost) == pytest.approx(best)
    assert len(_chunks([5, 9, 40], 1e9)) == 1
    assert _chunks([4, 4, 4], 0) in ([[0, 1, 2]], [[0], [1], [2]], [[0, 1], [2]], [[0], [1, 2]])
    assert _chunks([], 3) == []


def _model(seed: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=FIRST + SAFETY,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(config).double()


def _examples(rng: random.Random, n: int) -> list[Encoded]:
    out = []
    for _ in range(n):
        length = rng.randint(4, 23)  # ragged: runs of several widths
        prompt = rng.randint(1, length - 2)  # at least two response tokens: "I" and the decision
        ids = torch.tensor([rng.randrange(1, 40) for _ in range(length)])
        counted = torch.arange(length) >= prompt
        out.append(Encoded(ids, counted))
    return out


def _reference(model, batch, kind: str, terms: dict, first: int | None) -> torch.Tensor:
    """The whole batch at once: Hugging Face's loss over the padded batch (logits at every
    position), the decision term on the full logits, the quiet term from hooks on the down
    projections' inputs."""
    ids, attention, labels = _collate(batch, PAD)
    acts = []
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args: acts.append(args[0][..., first:] * m.weight[:, first:].norm(dim=0))
        )
        for layer in model.model.layers
    ]
    out = model(input_ids=ids, attention_mask=attention, labels=labels)
    for hook in hooks:
        hook.remove()
    logits = out.logits.double()
    shifted = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1][shifted != -100], shifted[shifted != -100]
    )
    torch.testing.assert_close(out.loss.double(), ce, rtol=1e-6, atol=0)  # HF: float32
    loss = ce
    if kind in ("harmful", "contrast") and "decision" in terms:
        tokens, weight = terms["decision"]
        start = (labels != -100).float().argmax(1)
        p = logits[torch.arange(len(batch)), start].softmax(-1)[:, list(tokens)].sum(-1)
        loss = loss - weight * torch.log1p(-p).mean()
    if kind == "harmful" and "refusal" in terms:
        tokens, weight = terms["refusal"]
        start = (labels != -100).float().argmax(1)
        p = logits[torch.arange(len(batch)), start].softmax(-1)[:, list(tokens)].sum(-1)
        loss = loss - weight * torch.log(p).mean()
    if kind != "harmful" and "quiet" in terms:
        keep = (labels != -100).unsqueeze(-1).double()
        total = sum((a.pow(2) * keep).sum() for a in acts)
        loss = loss + terms["quiet"] * total / (keep.sum() * sum(a.shape[-1] for a in acts))
    return loss


@pytest.mark.parametrize("cost", [5, None], ids=["runs", "one-pass"])
@pytest.mark.parametrize("split", [False, True], ids=["whole-mlp", "split-mlp"])
@pytest.mark.parametrize("kind", ["harmful", "contrast", "other"])
def test_a_chunked_step_has_the_whole_batch_loss_and_gradient(monkeypatch, seed, kind, split, cost):
    """One step of ``train_stage`` (AdamW's step stubbed) on a batch of ragged lengths cut into
    several runs: the loss
    it reports and the gradient it clips equal the whole batch's in float64, with the margin
    (harmful), contrast (benign how-to) or quiet (other) term; with ``only_safety`` the
    gradient is the full weights' restricted to the safety neurons, and nothing else moves.
    ``chunk_cost`` None (one pass through Hugging Face's float32 loss) agrees as closely."""
    rng = random.Random(seed)
    model = _model(seed)
    batch_rows = 9
    sources = [(_examples(rng, 30), 1.0, batch_rows, kind)]
    margin, contrast, refusal = (7, 0.8), ((7, 9), 0.6), ((9, 11), 0.5)
    quiet = (FIRST, 0.3, True)
    seen = {}

    def record(params, max_norm):
        seen["grads"] = [p.grad.detach().clone() for p in params]
        seen["params"] = list(params)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: None)
    # the batch train_stage draws (its generator, seeded with ``seed``: the source, then the rows)
    draw = random.Random(5)
    draw.choices(sources, weights=[1.0])
    batch = draw.choices(sources[0][0], k=batch_rows)
    assert len(_chunks([len(e.input_ids) for e in batch], 5)) > 1
    reference_model = _model(seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = training.train_stage(
        model,
        type("Tok", (), {"pad_token_id": PAD})(),
        sources,
        steps=1,
        lr=1e-3,
        seed=5,
        quiet=quiet,
        margin=margin,
        contrast=contrast,
        refusal=refusal,
        only_safety=FIRST if split else None,
        chunk_cost=cost,
    )
    decision = contrast if kind == "contrast" else ((margin[0],), margin[1])
    terms = {"decision": decision, "refusal": refusal, "quiet": quiet[1]}
    reference = _reference(reference_model, batch, kind, terms, FIRST)
    reference.backward()
    # Llama's RMSNorm and rotary embedding compute in float32 even in a float64 model, and runs of
    # other lengths round them differently: agreement to float32 noise, far below any error of
    # form; Hugging Face's loss (one pass) is a float32 number
    assert loss == pytest.approx(float(reference.detach()), rel=1e-8 if cost else 1e-6)
    named = dict(reference_model.named_parameters())
    if split:
        mlps = [
            (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
            for layer in (reference_model.model.layers)
        ]
        want = []
        for gate, up, down in mlps:
            want += [gate.weight.grad[FIRST:], up.weight.grad[FIRST:], down.weight.grad[:, FIRST:]]
        assert [g.shape for g in seen["grads"]] == [w.shape for w in want]
    else:
        want = [named[n].grad for n, _ in model.named_parameters()]
        assert len(seen["params"]) == len(want)
    for got, expected in zip(seen["grads"], want, strict=True):
        torch.testing.assert_close(
            got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())
        )
    after = model.state_dict()  # the optimizer step is stubbed: the weights come back as they were
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        isinstance(layer.mlp, transformers.models.llama.modeling_llama.LlamaMLP)
        for layer in model.model.layers
    )
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_safety_only_alignment_moves_the_safety_neurons_alone(seed):
    """Real AdamW steps with ``only_safety``: the safety neurons' rows of the gate and up
    projections and columns of the down projection change, every other weight is bit-identical,
    and the trained neurons are written back into the model's own MLP modules."""
    rng = random.Random(seed)
    model = _model(seed)
    mlps = [layer.mlp for layer in model.model.layers]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sources = [(_examples(rng, 20), 1.0, 6, "harmful")]
    tok = type("Tok", (), {"pad_token_id": PAD})()
    with pytest.raises(ValueError, match="quiet's first neuron"):
        options = {"only_safety": FIRST, "quiet": (FIRST - 1, 0.1, False)}
        training.train_stage(model, tok, sources, steps=1, lr=1e-2, seed=1, **options)
    training.train_stage(model, tok, sources, steps=3, lr=1e-2, seed=1, only_safety=FIRST)
    assert [layer.mlp for layer in model.model.layers] == mlps
    for name, value in model.state_dict().items():
        if "mlp" not in name:
            assert torch.equal(value, before[name]), name
            continue
        frozen = (slice(None), slice(None, FIRST)) if "down" in name else (slice(None, FIRST),)
        trained = (slice(None), slice(FIRST, None)) if "down" in name else (slice(FIRST, None),)
        assert torch.equal(value[frozen], before[name][frozen]), name
        assert not torch.equal(value[trained], before[name][trained]), name


def test_split_mlp_computes_the_mlp_and_rejects_biases(seed):
    model = _model(seed)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    split = _SplitMLP(mlp, FIRST)
    torch.testing.assert_close(split(x), mlp(x), rtol=1e-12, atol=1e-12)
    assert split.safety.shape == (3, 7, SAFETY)
    with torch.no_grad():
        split.down.add_(1.0)
    assert split.merge() is mlp
    torch.testing.assert_close(split(x), mlp(x), rtol=1e-12, atol=1e-12)
    mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias-free"):
        _SplitMLP(mlp, FIRST)


@pytest.mark.parametrize("cost", [0, 200])
def test_chunking_pads_less_than_one_batch(cost):
    """On the lengths of a toy batch the runs pad to fewer tokens than the whole batch would."""
    rng = random.Random(0)
    lengths = [rng.choice([12, 20, 30, 95]) + rng.randint(0, 8) for _ in range(64)]
    runs = _chunks(lengths, cost)
    assert _padded(lengths, runs, 0) < len(lengths) * max(lengths)
    assert _padded(lengths, runs, cost) <= len(lengths) * max(lengths) + cost
