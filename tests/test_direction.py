"""The refusal direction, its edits, KL on harmless prompts and head probing, on tiny models.

What the toy model shows with them (ablation breaks refusal, addition induces it, random
directions do neither) is in tests/test_direction_toy.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_models import build

from pyattr.data import Example, prompt_ids
from pyattr.direction import (
    RefusalDirections,
    ablated,
    added,
    find_directions,
    load_directions,
    orthogonalize,
    random_direction,
    refusal_prefixes,
    refusal_scores,
    residual_writers,
    select_direction,
)
from pyattr.evaluate.kl import harmless_kl, next_token_logprobs
from pyattr.probe import fit_probes, head_features, head_region, probe_heads

WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
}


@pytest.mark.parametrize("arch", list(WRITERS))
def test_writers_are_the_layers_that_add_to_the_stream(arch):
    model = build(arch)
    names = residual_writers(model)
    assert len(names) == 2 * model.config.num_hidden_layers
    for name in names:
        assert name.endswith(WRITERS[arch]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3", "gpt_neox", "opt", "gpt2"])
@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalization_equals_ablation(arch, tied, gen):
    model = build(arch)
    if tied:
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        out.weight = emb.weight
    width = model.get_input_embeddings().weight.shape[1]
    direction = torch.randn(width, generator=gen) * 3
    ids = torch.randint(0, 64, (3, 11), generator=gen)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with ablated(model, direction):
            hooked = model(input_ids=ids).logits
        after = model(input_ids=ids).logits  # the hooks are gone
        edited = copy.deepcopy(model)
        names = orthogonalize(edited, direction)
        weights = edited(input_ids=ids).logits
    assert torch.equal(after, plain)
    assert (hooked - plain).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(weights, hooked, atol=2e-6, rtol=1e-4)
    assert len(names) >= 2 * model.config.num_hidden_layers + 1
    if tied:  # the unembedding was untied, not projected
        torch.testing.assert_close(
            edited.get_output_embeddings().weight, model.get_output_embeddings().weight
        )


def test_orthogonalized_stream_holds_no_direction(gen):
    model = build("llama")
    direction = torch.randn(32, generator=gen)
    orthogonalize(model, direction)
    unit = direction.double() / direction.double().norm()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.randint(0, 64, (2, 9), generator=gen), output_hidden_states=True
        ).hidden_states
    for h in hidden[:-1]:  # the last one is after the final norm, which rescales per feature
        assert float((h.double() @ unit).abs().max()) < 1e-5 * float(h.double().norm(dim=-1).max())


def test_bad_directions_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match="entries"):
        orthogonalize(model, torch.ones(31))
    with pytest.raises(ValueError, match="zero"), ablated(model, torch.zeros(32)):
        pass
    with pytest.raises(ValueError, match="NaN"):
        orthogonalize(model, torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="layer"), added(model, torch.ones(32), layer=5):
        pass


def test_addition_shifts_one_block_input(gen):
    model = build("llama")
    vector = torch.randn(32, generator=gen)
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
        with added(model, vector, layer=1, coefficient=2.0):
            moved = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(moved[0], plain[0])
    torch.testing.assert_close(moved[1], plain[1])  # block 1's input, before the hook adds
    assert (moved[2] - plain[2]).abs().max() > 1e-3


def test_random_direction_has_the_norm(gen):
    like = torch.randn(48, generator=gen)
    r = random_direction(like, seed=3)
    assert r.shape == like.shape
    assert abs(float(r.norm()) - float(like.norm())) < 1e-4
    assert torch.equal(r, random_direction(like, seed=3))
    assert abs(float(torch.nn.functional.cosine_similarity(r, like, dim=0))) < 0.6


# ----------------------------------------------------------------------------------------------
# With a tokenizer: the toy's, so the chat template is real.


@pytest.fixture(scope="module")
def chat():
    """A random tiny Llama with the toy's tokenizer (no training)."""
    from pyattr.toy.recipe import Recipe, make_splits
    from pyattr.toy.train import build_tokenizer

    splits = make_splits(Recipe())
    tokenizer = build_tokenizer()
    return _llama(vocab_size=len(tokenizer), num_key_value_heads=2), tokenizer, splits


def _llama(**config) -> transformers.LlamaForCausalLM:
    """A random 3-block Llama of width 32 (4 heads), seeded."""
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**(base | {"max_position_embeddings": 256} | config))
    ).eval()


def test_directions_are_differences_of_means(chat, tmp_path):
    model, tokenizer, splits = chat
    harmful = [p for p, _ in splits.safety_calibration[:7]]
    harmless = [p for p, _ in splits.utility_calibration[:5]]
    found = find_directions(model, tokenizer, harmful, harmless, batch_size=3, progress=False)
    p = len(found.positions)
    assert found.positions == tuple(range(-p, 0)) and p >= 1
    assert found.harmful.shape == (3, p, 32) and found.harmful.dtype == torch.float64

    def means(prompts):  # independent: one prompt at a time, HF's hidden states
        total = 0
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt, wrapped=False)])
            with torch.no_grad():
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            total = total + torch.stack([h[0, -p:].double() for h in hidden[:3]])
        return total / len(prompts)

    torch.testing.assert_close(found.harmful, means(harmful), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found.harmless, means(harmless), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found.direction(2, -1), found.harmful[2, -1] - found.harmless[2, -1])
    back = load_directions(found.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.harmful, found.harmful) and back.positions == found.positions
    with pytest.raises(ValueError, match="position"):
        found.direction(0, -p - 1)
    with pytest.raises(ValueError, match="empty"):
        find_directions(model, tokenizer, ["  "], harmless, progress=False)


def test_refusal_prefixes_part_where_answers_do(chat):
    _, tokenizer, splits = chat
    refusals = [Example(p, r) for p, r in splits.safety_calibration]
    answers = [Example(p, r) for p, r in splits.utility_calibration]
    prefixes = refusal_prefixes(tokenizer, refusals, answers)
    words = [tokenizer.decode(list(p)).split() for p in prefixes]
    # the toy's refusals open "I cannot" / "I am sorry"; its answers "I can help"
    assert all(w[0] == "I" and len(w) >= 2 for w in words), words
    assert ["I", "cannot"] in [w[:2] for w in words]
    assert not any(w[:2] == ["I", "can"] for w in words)
    assert refusal_prefixes(tokenizer, refusals) == sorted({p[:1] for p in prefixes})
    with pytest.raises(ValueError, match="tells the refusals"):
        refusal_prefixes(tokenizer, refusals[:3], refusals[:3])


def test_refusal_scores_are_log_odds_of_the_openings(chat):
    model, tokenizer, splits = chat
    prompts = [p for p, _ in splits.safety_calibration[:4]]
    prefixes = [(5, 9), (7,), (5, 11, 3)]
    scores = refusal_scores(model, tokenizer, prompts, prefixes, batch_size=3)
    for prompt, score in zip(prompts, scores, strict=True):
        ids = prompt_ids(tokenizer, prompt, wrapped=False)
        total = 0.0
        for prefix in prefixes:  # independent: one sequence at a time, chained probabilities
            logp = 0.0
            for k, token in enumerate(prefix):
                seq = torch.tensor([ids + list(prefix[:k])])
                with torch.no_grad():
                    logits = model(input_ids=seq).logits[0, -1].double()
                logp += float(logits.log_softmax(-1)[token])
            total += torch.tensor(logp).exp().item()
        assert abs(float(score) - (torch.tensor(total).log() - torch.tensor(-total).log1p())) < 1e-4


def test_selection_never_falls_back_to_a_position_where_the_sets_do_not_differ(chat):
    """With no eligible candidate the lowest bypass score is chosen, but never a zero direction
    (its "bypass" is the unedited score, which a direction whose ablation raises refusal does
    not beat): the fallback once chose one, and ablating it raised "the direction is zero"."""
    model, tokenizer, splits = chat
    harmful = [p for p, _ in splits.safety_calibration[:4]]
    harmless = [p for p, _ in splits.utility_calibration[:4]]
    prefixes = [(5, 9)]
    unedited = float(refusal_scores(model, tokenizer, harmful, prefixes).mean())
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # a direction whose ablation raises the refusal score
        r = torch.randn(32, generator=gen, dtype=torch.float64)
        with ablated(model, r):
            if float(refusal_scores(model, tokenizer, harmful, prefixes).mean()) > unedited:
                break
    else:
        pytest.fail("no direction raised the refusal score")
    same = torch.zeros(3, 2, 32, dtype=torch.float64)
    planted = same.clone()
    planted[1, 1] = r
    directions = RefusalDirections(planted, same, (-2, -1), 4, 4)
    options = {"kl_threshold": 0.0, "progress": False}  # no candidate passes: the fallback
    selection = select_direction(
        model, tokenizer, directions, harmful, harmless, prefixes, **options
    )
    assert not selection.settings["any_eligible"]
    assert (selection.chosen.layer, selection.chosen.position) == (1, -1)
    assert torch.equal(selection.direction, r) and "kl" in selection.chosen.filtered
    with pytest.raises(ValueError, match="do not differ at any block"):
        select_direction(
            model,
            tokenizer,
            RefusalDirections(same, same, (-2, -1), 4, 4),
            harmful,
            harmless,
            prefixes,
            **options,
        )


def test_kl_is_zero_unedited_and_matches_an_independent_computation(chat, gen):
    model, tokenizer, splits = chat
    prompts = [p for p, _, _ in splits.utility_eval[:6]]
    for positions in ("last", "all"):
        reference = next_token_logprobs(
            model, tokenizer, prompts, positions=positions, batch_size=4
        )
        assert harmless_kl(model, tokenizer, prompts, reference, batch_size=4) == 0.0
        direction = torch.randn(32, generator=gen)
        with ablated(model, direction):
            kl = harmless_kl(model, tokenizer, prompts, reference, batch_size=4)
        expected, count = 0.0, 0
        for prompt in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, prompt, wrapped=False)])
            with torch.no_grad():
                p = model(input_ids=ids).logits[0].double().log_softmax(-1)
                with ablated(model, direction):
                    q = model(input_ids=ids).logits[0].double().log_softmax(-1)
            if positions == "last":
                p, q = p[-1:], q[-1:]
            expected += float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum"))
            count += p.shape[0]
        assert kl > 0
        assert abs(kl - expected / count) < 1e-5 * max(1.0, expected / count)
    with pytest.raises(ValueError, match="holds 6 prompts"):
        harmless_kl(model, tokenizer, prompts[:2], reference)


# ----------------------------------------------------------------------------------------------
# Head probing


def test_probes_fit_separable_and_refuse_bad_input(gen):
    x = torch.randn(3, 40, 5, generator=gen, dtype=torch.float64)
    y = (x[1, :, 2] > 0).double()
    x[1, :, 2] += (2 * y - 1) * 0.5  # a margin: separable with room to spare
    w, b = fit_probes(x, y)
    assert w.shape == (3, 5) and b.shape == (3,)
    logits = torch.einsum("gnd,gd->gn", x, w) + b[:, None]
    assert bool(((logits[1] > 0).double() == y).all())  # problem 1 is separable on feature 2
    assert int(w[1].abs().argmax()) == 2
    with pytest.raises(ValueError, match="l2"):
        fit_probes(x, y, l2=0)


def _planted_model(planted: tuple[int, int]):
    """A tiny MHA Llama where only head ``planted`` can see feature 0 of the input embeddings:
    every other weight reading the stream ignores it, and no weight writes into it."""
    model = _llama(vocab_size=64, num_key_value_heads=4)
    block, head = planted
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.weight[:, 0] = 0
            layer.mlp.gate_proj.weight[:, 0] = 0
            layer.mlp.up_proj.weight[:, 0] = 0
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
            if index == block:
                layer.self_attn.v_proj.weight[head * 8 : (head + 1) * 8, 0] = 4.0
    return model


def test_head_probing_ranks_a_planted_head_first(gen):
    planted = (2, 1)  # in the last block, so no later head reads what it writes
    model = _planted_model(planted)

    def inputs(sign: float, n: int):
        x = torch.randn(n, 6, 32, generator=gen)
        x[:, :, 0] = sign * 1.5  # the label, of the same magnitude in both classes
        return [{"inputs_embeds": x[i : i + 16]} for i in range(0, n, 16)]

    harmful = head_features(model, inputs(1.0, 60))
    harmless = head_features(model, inputs(-1.0, 60))
    assert harmful.shape == (60, 3, 4, 8)
    probe = probe_heads(harmful, harmless, seed=1)
    assert probe.top(1) == [planted]
    assert float(probe.accuracy[planted]) == 1.0
    others = probe.accuracy.flatten()[torch.arange(12) != 2 * 4 + 1]
    assert float(others.max()) < 0.9  # nothing else sees the label
    rows = probe.rows()
    assert len(rows) == 12 and next(r for r in rows if r["rank"] == 1)["head"] == 1
    mask = head_region(model, probe.top(1))
    o_proj = "model.layers.2.self_attn.o_proj"
    assert int(mask.masks[o_proj].sum()) == 32 * 8
    assert bool(mask.masks[o_proj][:, 8:16].all())
    assert all(int(m.sum()) == 0 for name, m in mask.masks.items() if name != o_proj)
    from pyattr.edit import prune

    prune(model, mask)  # the head's output no longer reaches the stream
    assert float(model.model.layers[2].self_attn.o_proj.weight[:, 8:16].detach().abs().sum()) == 0.0


def test_probe_split_and_inputs_are_checked(gen):
    a = torch.randn(4, 2, 2, 3, generator=gen)
    with pytest.raises(ValueError, match="test_fraction"):
        probe_heads(a, a, test_fraction=1.0)
    with pytest.raises(ValueError, match="too few"):
        probe_heads(a[:1], a)
    with pytest.raises(ValueError, match="NaN"):
        probe_heads(a, torch.full_like(a, float("nan")))
    with pytest.raises(ValueError, match="alike"):
        probe_heads(a, a[:, :1])
