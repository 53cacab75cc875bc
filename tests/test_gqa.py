"""A grouped-query Qwen2 (biases on q/k/v, k/v with a quarter of q's rows) through every stage:
statistics, masks, pruning, eigenbases and rank edits, ASR, the refusal direction, head
probes, frozen fine-tuning and rewinding. Llama-style GQA runs the whole paper preset in
tests/test_paper.py."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import pyattr
from pyattr.data import load_pairs
from pyattr.masks import region


@pytest.fixture(scope="module")
def qwen():
    from pyattr import toy
    from pyattr.toy.train import build_tokenizer

    tok = build_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    paths = toy.data(progress=False)
    safety = load_pairs(paths["safety_calibration"], n=12)
    utility = load_pairs(paths["utility_calibration"], n=12)
    collect = ("norms", "covariance", "snip")
    stats = [
        pyattr.calibrate(model, tok, pairs, collect=collect, progress=False)
        for pairs in (safety, utility)
    ]
    return model, tok, safety, utility, stats


def test_statistics_masks_and_pruning(qwen):
    model, _, _, _, (safety, utility) = qwen
    layers = {layer.name: layer for layer in pyattr.find_linear_layers(model)}
    k = layers["model.layers.0.self_attn.k_proj"]
    assert (k.d_out, k.d_in) == (16, 64)  # 2 kv heads of 8
    for score in ("wanda", "snip"):
        mask, counts = region(model, safety, utility, score=score, q=0.2, p=0.1)
        assert tuple(mask.masks[k.name].shape) == (16, 64)
        assert 0 < mask.sparsity()["overall"] <= 0.2
        pruned = copy.deepcopy(model)
        pyattr.prune(pruned, mask)
        for name, m in mask.masks.items():
            w = pyattr.models.layers_by_name(pruned)[name].weight
            assert bool((w[m] == 0).all())


def test_rank_fractions_are_per_layer_on_grouped_kv(qwen):
    model, _, _, _, (safety, utility) = qwen
    s, u = (pyattr.eigenbases(model, st, progress=False) for st in (safety, utility))
    k = "model.layers.0.self_attn.k_proj"
    q = "model.layers.0.self_attn.q_proj"
    assert s[k].rank == 16 and s[q].rank == 64  # R = min(d_out, d_in)
    edited = copy.deepcopy(model)
    report = pyattr.edit_ranks(edited, "orthogonal", s, u, r_u=0.5, r_s=0.75)
    per_layer = report.per_layer()
    # the same fractions of each layer's R: rank(ΔW) <= min(r_u, R − r_s) = R/4 on q and on k
    assert per_layer[k] <= 0.25 + 1e-9 and per_layer[q] <= 0.25 + 1e-9
    assert report.fraction > 0


def test_asr_direction_and_probes(qwen):
    from pyattr.direction import ablated, orthogonalize, refusal_direction
    from pyattr.evaluate import attack_success
    from pyattr.probe import head_features, probe_heads, prompt_batches

    model, tok, safety, utility, _ = qwen
    report = attack_success(
        model, tok, [e.prompt for e in safety[:4]], max_new_tokens=4, progress=False
    )
    assert 0 <= report.asr["vanilla"] <= 1
    _, found = refusal_direction(model, tok, safety, utility, batch_size=4, progress=False)
    ids = torch.tensor([tok(safety[0].prompt)["input_ids"]])
    with torch.no_grad(), ablated(model, found.direction):
        hooked = model(input_ids=ids).logits
    edited = copy.deepcopy(model)
    orthogonalize(edited, found.direction)  # tied embeddings: untied, the unembedding kept
    with torch.no_grad():
        torch.testing.assert_close(edited(input_ids=ids).logits, hooked, atol=1e-5, rtol=1e-4)
    assert not edited.config.tie_word_embeddings
    features = [
        head_features(model, prompt_batches(tok, [e.prompt for e in pairs], batch_size=5))
        for pairs in (safety, utility)
    ]
    assert features[0].shape == (12, 2, 8, 8)  # 8 query heads of 8, not the 2 kv heads
    probe = probe_heads(*features, test_fraction=0.25)
    assert probe.accuracy.shape == (2, 8)


def test_frozen_finetuning_and_rewinding(qwen):
    from pyattr.edit import rewind
    from pyattr.finetune import finetune

    model, tok, safety, utility, stats = qwen
    mask, _ = region(model, *stats, score="wanda", q=0.2, p=0.1)
    attacked = copy.deepcopy(model)
    finetune(attacked, tok, safety, frozen=mask, steps=2, lr=1e-2, batch_size=4, progress=False)
    before = pyattr.models.layers_by_name(model)
    after = pyattr.models.layers_by_name(attacked)
    moved = False
    for name, m in mask.masks.items():
        assert torch.equal(after[name].weight[m], before[name].weight[m])  # bit for bit
        moved |= not torch.equal(after[name].weight, before[name].weight)
    assert moved
    complement = pyattr.Mask({n: ~m for n, m in mask.masks.items()})
    rewind(attacked, model, complement)
    for name in mask.masks:
        assert torch.equal(after[name].weight, before[name].weight)
