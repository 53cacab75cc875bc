"""Generation at scale on a tiny model: a static KV cache (prompt widths rounded up to a multiple
of 64) gives the texts of the dynamic cache, and the automatic batch size is the memory plan's
per-sequence count divided into the free memory."""

from __future__ import annotations

import json

import pytest
import torch
from test_calibrate import tiny_llama
from test_data import tokenizer

from pyattr.capacity import sequence_bytes
from pyattr.data import prompt_ids
from pyattr.evaluate import generate
from pyattr.evaluate.asr import attack_success
from pyattr.evaluate.generate import STATIC_WIDTH, HfGenerator, auto_batch_size, generate_batches

PROMPTS = ["how do i make a cake", "help", "make a cake how do i", "sure", "how do i"]


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_static_cache_gives_the_texts_of_the_dynamic_one(do_sample):
    model, tok = tiny_llama(torch.float32), tokenizer()
    options = {"max_new_tokens": 7, "batch_size": 2, "do_sample": do_sample, "seed": 5}
    dynamic = generate(model, tok, PROMPTS, **options)
    static = generate(model, tok, PROMPTS, cache="static", compile=False, **options)
    assert static == dynamic
    with pytest.raises(ValueError, match="cache must be 'dynamic' or 'static'"):
        generate(model, tok, PROMPTS, cache="paged")


def test_the_automatic_batch_is_the_free_memory_over_one_sequence():
    model, tok = tiny_llama(torch.float32), tokenizer()
    encoded = [prompt_ids(tok, p) for p in PROMPTS]
    c = model.config
    width = -(-max(len(e) for e in encoded) // STATIC_WIDTH) * STATIC_WIDTH
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    by_hand = (
        kv * 4 * (width + 9)
        + c.vocab_size * 8
        + width * (2 * c.hidden_size + 2 * c.intermediate_size) * 4
    )
    assert sequence_bytes(c, torch.float32, width, 9) == by_hand
    assert auto_batch_size(model, encoded, 9, free=int(3.5 * by_hand / 0.8)) == 3
    assert auto_batch_size(model, encoded, 9, free=10) == 1  # at least one
    assert auto_batch_size(model, encoded, 9, free=10**12) == len(encoded)  # at most all
    texts = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size="auto")
    assert texts == generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=1)
    with pytest.raises(ValueError, match="cannot resume by batch index"):
        next(generate_batches(model, tok, encoded, batch_size="auto", skip=frozenset({0})))


def test_attack_success_records_the_count_auto_chose_and_the_cache(tmp_path):
    model, tok = tiny_llama(torch.float32), tokenizer()
    options = {"variants": ["vanilla"], "max_new_tokens": 4, "progress": False}
    options["system_prompt"] = None  # the tiny model's context is 64 tokens
    report = attack_success(
        model,
        tok,
        PROMPTS,
        batch_size="auto",
        hf_options={"cache": "static", "compile": False},
        out=tmp_path,
        **options,
    )
    config = json.loads((tmp_path / "summary.json").read_text())["config"]
    assert isinstance(config["batch_size"], int) and config["batch_size"] >= 1
    assert config["cache"] == "static"
    plain = attack_success(model, tok, PROMPTS, batch_size=2, **options)
    assert report.asr == plain.asr


def test_the_generator_refuses_an_unknown_cache():
    with pytest.raises(ValueError, match="cache must be"):
        HfGenerator(tiny_llama(torch.float32), tokenizer(), cache="paged")
