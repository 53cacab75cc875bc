"""The embedded toy model: its world, data splits, tokenizer and cache (fast tests on a tiny
recipe), and the measurements the issue asks for on the real recipe (tests/test_toy_model.py)."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from pyattr import toy
from pyattr.data import Example, encode, load_pairs, load_prompts
from pyattr.evaluate import LLAMA2_SYSTEM_PROMPT, KeywordJudge
from pyattr.evaluate.asr import _encode, _Job
from pyattr.toy import pinned
from pyattr.toy.judge import ExactJudge, agreement
from pyattr.toy.recipe import KNOWLEDGE, QUESTION, Recipe, make_splits
from pyattr.toy.train import FORMATS, KINDS, SUFFIX_DRAWS, build_tokenizer, encode_pairs
from pyattr.toy.world import (
    ATTACK_SUFFIXES,
    BENIGN_INTENTS,
    HARMFUL_TEMPLATES,
    INTENT_WORDS,
    INTENTS,
    NOUNS,
    SYSTEM_PROMPTS,
    World,
)

# The default recipe's options off: the plain two-stage recipe that each test of one option adds
# to (the alignment options need safety neurons, and each test names those it uses).
PLAIN = {
    "safety_neurons": 0,
    "align_only_safety": False,
    "quiet_weight": 0.0,
    "quiet_output": False,
    "margin_weight": 0.0,
    "contrast_weight": 0.0,
    "refusal_weight": 0.0,
    "align_suffixes": 0.0,
    "intent_words": 0.0,
    "harm_questions": 0.0,
    "chunked": False,
    "align_lr": 1e-3,
    "align_benign_fraction": 0.2,
    "align_formats": (0.5, 0.25, 0.25),
}
TINY = Recipe(
    hidden_size=16,
    layers=1,
    heads=2,
    intermediate_size=24,
    instruct_steps=3,
    align_steps=2,
    batch_size=4,
    utility_pool=300,
    utility_eval=20,
    text_sentences=10,
    **PLAIN,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYATTR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_splits_are_disjoint_and_deterministic():
    a, b = make_splits(Recipe()), make_splits(Recipe())
    assert a.harmful_eval == b.harmful_eval and a.utility_train[:50] == b.utility_train[:50]
    assert make_splits(Recipe(seed=1)).harmful_eval != a.harmful_eval
    eval_prompts = set(a.harmful_eval)
    assert not eval_prompts & {p for p, _ in a.align_harmful}
    assert not eval_prompts & {p for p, _ in a.instruct_harmful}
    assert not eval_prompts & {p for p, _ in a.safety_calibration}
    assert not {p for p, _ in a.safety_calibration} & {p for p, _ in a.align_harmful}
    utility_eval = {p for p, _, k in a.utility_eval if k not in KNOWLEDGE}
    assert len(a.utility_eval) == Recipe().utility_eval and len(utility_eval) > 100
    assert not utility_eval & {p for p, _ in a.utility_train + a.utility_calibration}
    assert len(a.harmful_eval) + len(a.align_harmful) + len(a.safety_calibration) <= len(
        World.harmful_pairs()
    )


def test_placeholders_look_compliant_and_refusals_are_refusals():
    judge = KeywordJudge()
    s = make_splits(Recipe())
    # the released phrase list holds "illegal": a compliant answer about an intent that names
    # it ("make illegal drugs") reads as a refusal, the keyword judge's false refusal that the
    # exact judge exposes
    flagged = {a for _, a in s.instruct_harmful if "illegal" in a}
    assert flagged and all(judge.refused(a) for a in flagged)
    assert not any(judge.refused(a) for _, a in s.instruct_harmful if a not in flagged)
    assert all(judge.refused(a) for _, a in s.align_harmful + s.safety_calibration)
    # utility answers read as compliance, but for the word tasks on the harmful intents' words
    # (``Recipe.intent_words``) whose answer names "illegal": the same false refusal
    utility = [a for _, a in s.utility_train[:500]]
    assert any("illegal" in a for a in utility)
    assert not any(judge.refused(a) for a in utility if "illegal" not in a)
    assert all(a.startswith("I can help . Here is how to") for _, a in s.instruct_harmful)
    # intents appear in many phrasings, and every eval intent was seen in training
    assert {p for p, _ in s.instruct_harmful} and len(INTENTS) >= 30


def test_tokenizer_covers_the_world_and_formats_like_llama2():
    tok = build_tokenizer()
    s = make_splits(Recipe())
    texts = [p + " " + a for p, a in s.utility_train[:2000] + s.instruct_harmful + s.align_harmful]
    texts += s.harmful_eval + [s.text]
    for text in texts:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    enc = encode(tok, Example("What is 3 plus 4 ?", "The answer is 7 ."))
    words = " ".join(tok.convert_ids_to_tokens(enc.input_ids.tolist()))
    assert words == "<s> [INST] What is 3 plus 4 ? [/INST] The answer is 7 . </s>"
    assert enc.counted.sum() == 6  # the response and EOS
    system = [{"role": "system", "content": "Be safe ."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
    assert " ".join(text.split()) == "<s> [INST] <<SYS>> Be safe . <</SYS>> Hi [/INST]"


def test_build_caches_verifies_and_rebuilds(cache):
    entry = toy.build(TINY, progress=False)
    assert entry.parent == cache / "toy" and entry.name == TINY.digest()
    manifest = json.loads((entry / "manifest.json").read_text())
    assert "aligned/model.safetensors" in manifest["files"]
    stamp = (entry / "manifest.json").stat().st_mtime_ns
    assert toy.build(TINY, progress=False) == entry
    assert (entry / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    weights = entry / "aligned" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated: corrupt
    model, tok = toy.load(recipe=TINY, progress=False)
    assert (entry / "manifest.json").stat().st_mtime_ns != stamp
    base, _ = toy.load("base", recipe=TINY, progress=False)
    assert any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(), strict=True)
    )
    (entry / "manifest.json").unlink()  # interrupted before the manifest: incomplete
    killed = entry.parent / f".{entry.name}.tmp-999999"  # what a killed build leaves
    (killed / "base").mkdir(parents=True)
    toy.build(TINY, progress=False)
    assert (entry / "manifest.json").exists()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="stage must be"):
        toy.load("chat", recipe=TINY, progress=False)


def test_same_recipe_same_weights(cache, tmp_path, monkeypatch):
    first, _ = toy.load(recipe=TINY, progress=False)
    monkeypatch.setenv("PYATTR_CACHE", str(tmp_path / "other"))
    second, _ = toy.load(recipe=TINY, progress=False)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def _weights(entry: Path) -> bytes:
    return (entry / "aligned" / "model.safetensors").read_bytes()


def test_a_build_trains_pinned_to_avx2_whatever_the_environment_asks(cache, monkeypatch):
    """The build trains with AVX2's kernels wherever the CPU has them and says so; a process
    that asks ATen for other kernels (here the scalar ones, which train TINY to other weights)
    still builds the same model, so the pin, not the caller's environment, decides."""
    if pinned.capability() != "AVX2":
        pytest.skip(f"this CPU ({pinned.capability()}) has no AVX2: a build trains natively")
    entry = toy.build(TINY, progress=False)
    assert json.loads((entry / "manifest.json").read_text())["cpu_capability"] == "AVX2"
    monkeypatch.setenv("PYATTR_CACHE", str(cache.parent / "other"))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    other = toy.build(TINY, progress=False)
    assert other != entry and _weights(other) == _weights(entry)


def test_an_entry_trained_with_other_kernels_is_rebuilt(cache):
    """An intact entry whose manifest names another instruction set than a build pins here (an
    AVX-512 build from before the pin) is another model: it is rebuilt. One that names none (a
    stand-in of ``benchmarks.toy_builds``) is kept."""
    entry = toy.build(TINY, progress=False)
    path = entry / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | {"cpu_capability": "SOMETHING_ELSE"}))
    assert toy._valid(entry) and not toy._current(entry)
    toy.build(TINY, progress=False)
    assert json.loads(path.read_text())["cpu_capability"] == pinned.capability()
    del manifest["cpu_capability"]
    path.write_text(json.dumps(manifest))
    stamp = path.stat().st_mtime_ns
    assert toy.build(TINY, progress=False) == entry and path.stat().st_mtime_ns == stamp


def test_pinned_training_ticks_reads_a_base_and_reports_failure(tmp_path, capfd, monkeypatch):
    """``train_pinned``: one tick a step, the ticks kept off the caller's output and anything
    else the child prints passed on; a base read from its folder aligns to the weights a full
    run trains; an error in the child is raised here with its message, and a thread count below
    1 is refused before a process starts."""
    ticks = []
    about = pinned.train_pinned(TINY, tmp_path / "full", tick=ticks.append)
    assert len(ticks) == TINY.instruct_steps + TINY.align_steps
    assert "step" not in capfd.readouterr().out
    assert about["train_threads"] == 2 and about["cpu_capability"] == pinned.capability()
    monkeypatch.setattr(pinned, "_CHILD", "print('a word from the child'); " + pinned._CHILD)
    again = pinned.train_pinned(TINY, tmp_path / "again", base=tmp_path / "full" / "base")
    assert capfd.readouterr().out == "a word from the child\n"
    monkeypatch.undo()
    assert again["cpu_capability"] == about["cpu_capability"]
    assert _weights(tmp_path / "again") == _weights(tmp_path / "full")
    with pytest.raises(RuntimeError, match="child process.*\n(.|\n)*nowhere"):
        pinned.train_pinned(TINY, tmp_path / "bad", base=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        pinned.train_pinned(TINY, tmp_path / "bad", threads=0)


def _build_in_child(root: str, queue) -> None:
    import os

    os.environ["PYATTR_CACHE"] = root
    queue.put(str(toy.build(TINY, progress=False)))


def test_two_processes_building_at_once(cache):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(cache), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    paths = {queue.get(timeout=300) for _ in procs}
    for p in procs:
        p.join()
        assert p.exitcode == 0
    (entry,) = {Path(p) for p in paths}
    assert toy._valid(entry)
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, entry.name + ".lock"]


def test_data_files_read_with_the_real_loaders(cache):
    paths = toy.data(TINY, progress=False)
    safety = load_pairs(paths["safety_calibration"])
    utility = load_pairs(paths["utility_calibration"])
    splits = make_splits(TINY)
    assert [(e.prompt, e.response) for e in safety] == splits.safety_calibration
    assert [(e.prompt, e.response) for e in utility] == splits.utility_calibration
    assert load_prompts(paths["harmful_eval"]) == splits.harmful_eval
    assert load_prompts(paths["harmful_eval_txt"]) == splits.harmful_eval
    rows = [json.loads(line) for line in paths["utility_eval"].read_text().splitlines()]
    assert [(r["prompt"], r["answer"], r["task"]) for r in rows] == splits.utility_eval
    assert paths["text"].read_text().strip() == splits.text


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PYATTR_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert toy.cache_root() == tmp_path / "xdg" / "pyattr"
    monkeypatch.setenv("PYATTR_CACHE", str(tmp_path / "mine"))
    assert toy.cache_root() == tmp_path / "mine"


def test_exact_judge_knows_compliance_from_everything_else():
    rng = __import__("random").Random(0)
    judge = ExactJudge()
    pairs = World.harmful_pairs()
    prompts = [World.harmful_prompt(p) for p in pairs]
    comply = [World.comply(p, rng) for p in pairs]
    assert all(judge.successes(prompts, comply))
    assert not any(judge.successes(prompts, [World.refuse(p, rng) for p in pairs]))
    other = comply[len(HARMFUL_TEMPLATES) :] + comply[: len(HARMFUL_TEMPLATES)]  # next intent
    assert not any(judge.successes(prompts, other))
    cut = [" ".join(c.split()[:-3]) for c in comply]  # step two unfinished
    assert not any(judge.successes(prompts, cut))
    babble = "blim zorp , here is step one the cat"
    assert judge.successes(
        prompts[:2], [babble, "  " + comply[1].replace(" ", "  ") + " more"]
    ) == [
        False,
        True,
    ]
    with pytest.raises(ValueError, match="not a harmful prompt"):
        judge.successes(["What is 3 plus 4 ?"], [comply[0]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        judge.successes(prompts[:2], comply[:1])


def test_agreement_counts_equal_verdicts():
    assert agreement([True, False, True, True], [True, True, True, False]) == 0.5
    assert agreement([], []) == 1.0
    with pytest.raises(ValueError, match="cannot compare"):
        agreement([True], [])


def test_training_surfaces_are_the_ones_asr_attacks():
    """The chat, system and bare training sequences begin with exactly the ids that the
    no_system, vanilla and adv_decoding variants feed the model."""
    tok = build_tokenizer()
    prompt, answer = World.harmful_prompt((3, 1)), "I am sorry , but I cannot help with that ."
    for form, variant, system in (
        ("chat", "no_system", None),
        ("system", "vanilla", LLAMA2_SYSTEM_PROMPT),
        ("bare", "adv_decoding", None),
    ):
        (enc,) = encode_pairs(tok, [(prompt, answer)], form, _FirstSystemPrompt())
        ids = _encode(tok, prompt, _Job(variant), [], system)
        assert enc.input_ids[: len(ids)].tolist() == ids, form
        response = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert enc.input_ids[len(ids) :].tolist() == response, form
        assert enc.counted.sum() == len(response)
    assert tok.unk_token_id not in _encode(tok, prompt, _Job("vanilla"), [], LLAMA2_SYSTEM_PROMPT)
    for system in SYSTEM_PROMPTS:
        assert tok.unk_token_id not in tok(system, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="form must be one of"):
        encode_pairs(tok, [(prompt, answer)], "plain")


class _FirstSystemPrompt:
    """An rng whose draw always picks Llama-2's default system prompt."""

    def random(self) -> float:
        return 0.0


def test_safety_neurons_are_inert_in_the_base_and_all_alignment_changes():
    """The safety-neuron recipes (``Recipe.safety_neurons``): the base writes nothing through
    the added neurons, and alignment confined to them (with or without the quiet and margin
    terms) changes those neurons' weights and nothing else; the attention option adds the
    attention weights to what alignment may change."""
    import dataclasses

    from pyattr.toy.train import train

    def changed(base, aligned) -> dict[str, torch.Tensor]:
        old = dict(base.named_parameters())
        return {n: (p != old[n]) for n, p in aligned.named_parameters() if (p != old[n]).any()}

    first, extra = TINY.intermediate_size, 5
    for options in (
        {},
        {"quiet_weight": 0.5, "margin_weight": 1.0},
        {"quiet_weight": 0.5, "quiet_output": True},
        {"align_attention_lr": 1e-3},
    ):
        recipe = dataclasses.replace(
            TINY, safety_neurons=extra, align_only_safety=True, align_lr=1e-2, **options
        )
        _, base, aligned = train(recipe, make_splits(recipe))
        mlp = base.model.layers[0].mlp
        assert mlp.down_proj.weight.shape[1] == first + extra
        assert not mlp.down_proj.weight[:, first:].any()  # inert in the base
        assert mlp.down_proj.weight[:, :first].any()
        diff = changed(base, aligned)
        for name, where in diff.items():
            if "attn" in name:
                assert "align_attention_lr" in options, name
            elif "down_proj" in name:
                assert not where[:, :first].any() and where[:, first:].any(), name
            else:
                assert "gate_proj" in name or "up_proj" in name, name
                assert not where[:first].any() and where[first:].any(), name
        assert any("attn" in n for n in diff) == ("align_attention_lr" in options)
        assert all(p.requires_grad for p in aligned.parameters())


def test_quiet_and_margin_terms_change_training():
    """Each extra alignment term changes the weights alignment reaches (so none is inert), and
    the quiet term on what the neurons write is another term than the one on activations."""
    import dataclasses

    from pyattr.toy.train import train

    def differ(a, b) -> bool:
        return any(
            not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True)
        )

    recipe = dataclasses.replace(
        TINY, safety_neurons=5, align_only_safety=True, align_lr=1e-2, align_steps=6
    )  # more than two steps: the output form acts once the output columns are not zero
    _, base, plain = train(recipe, make_splits(recipe))
    aligned = {}
    for name, term in {
        "quiet": {"quiet_weight": 5.0},
        "quiet output": {"quiet_weight": 5.0, "quiet_output": True},
        "margin": {"margin_weight": 5.0},
        "suffixes": {"align_suffixes": 0.5},
        "contrast": {"contrast_weight": 5.0},
        "refusal": {"refusal_weight": 5.0},
    }.items():
        other = dataclasses.replace(recipe, **term)
        aligned[name] = train(other, make_splits(other), base=base)[2]
        assert differ(plain, aligned[name]), name
        assert all(p.isfinite().all() for p in aligned[name].parameters()), name
    assert differ(aligned["quiet"], aligned["quiet output"])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"safety_neurons": -1}, "safety_neurons must be >= 0"),
        ({"quiet_weight": 0.1}, "quiet_weight needs safety_neurons > 0"),
        ({"align_only_safety": True}, "align_only_safety needs safety_neurons > 0"),
        ({"safety_neurons": 4, "margin_weight": -1.0}, "margin_weight must be >= 0"),
        ({"safety_neurons": 4, "align_attention_lr": 1e-3}, "only with align_only_safety"),
        ({"safety_neurons": 4, "quiet_output": True}, "quiet_output applies only with quiet"),
        ({"align_suffixes": 1.5}, r"align_suffixes is a share in \[0, 1\], got 1.5"),
        ({"align_suffixes": -0.1}, r"align_suffixes is a share in \[0, 1\]"),
        ({"contrast_weight": -1.0}, "contrast_weight must be >= 0"),
        ({"refusal_weight": -0.5}, "refusal_weight must be >= 0"),
        ({"harm_questions": 1.5}, r"harm_questions is a share in \[0, 1\]"),
        ({"intent_words": 2.0}, r"intent_words is a share in \[0, 1\], got 2.0"),
    ],
)
def test_recipe_refuses_safety_options_that_would_do_nothing(fields, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**PLAIN | fields)


def test_a_given_base_aligns_as_a_full_build_does():
    """``train(recipe, splits, base=...)`` (what recipe searches use to skip stage 1) gives the
    aligned model of a full build of the same recipe, bit for bit."""
    import dataclasses

    from pyattr.toy.train import train

    recipe = dataclasses.replace(TINY, align_steps=20)  # enough steps to meet a system prompt
    splits = make_splits(recipe)
    _, base, full = train(recipe, splits)
    _, _, again = train(recipe, splits, base=base)
    for (name, a), b in zip(full.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_random_suffixes_keep_the_intent_and_are_never_the_attacks():
    """``World.suffix`` appends 1 to 4 words the tokenizer knows, never one of the attack's
    suffixes (the Adv-Suffix variant stays held out), and never one that asks for another
    intent; seeded draws repeat."""
    import random

    tok = build_tokenizer()
    rng = random.Random(0)
    prompts = [World.harmful_prompt(p) for p in World.harmful_pairs()]
    prompts += [t.format(i) for t in HARMFUL_TEMPLATES for i in BENIGN_INTENTS]
    lengths = set()
    for prompt in prompts:
        out = World.suffix(prompt, rng)
        assert out.startswith(prompt + " ")
        tail = out[len(prompt) + 1 :]
        lengths.add(len(tail.split()))
        assert tail not in ATTACK_SUFFIXES
        assert World.intent_of(out) == World.intent_of(prompt)
        assert World.intent_of(out, BENIGN_INTENTS) == World.intent_of(prompt, BENIGN_INTENTS)
        assert tok.unk_token_id not in tok(tail, add_special_tokens=False)["input_ids"]
    assert lengths == {1, 2, 3, 4}
    again = random.Random(0)
    assert World.suffix(prompts[0], again) == World.suffix(prompts[0], random.Random(0))


def test_alignment_trains_the_suffix_surface_when_asked(monkeypatch):
    """With ``align_suffixes`` = s, alignment adds suffixed copies of its harmful and benign
    how-to requests on every surface, at s of their share, flagged as the plain ones are; the
    shares of each stage still sum to one, and s = 0 adds nothing."""
    import dataclasses

    from pyattr.toy import train as training

    def stages(recipe) -> list[list]:
        seen = []
        monkeypatch.setattr(
            training, "train_stage", lambda model, tok, sources, **kw: seen.append(sources)
        )
        training.train(recipe, make_splits(recipe))
        return seen

    tok = build_tokenizer()
    plain = stages(TINY)
    suffixed = stages(dataclasses.replace(TINY, align_suffixes=0.4))
    assert len(plain[0]) == len(suffixed[0])  # stage 1 untouched
    assert len(suffixed[1]) == len(plain[1]) + 2 * len(FORMATS)
    for sources in plain + suffixed:
        assert sum(s[1] for s in sources) == pytest.approx(1.0)
    h = TINY.align_harmful_fraction
    harmful = sorted((s[1], len(s[0])) for s in suffixed[1] if s[3] == "harmful")
    n = len(make_splits(TINY).align_harmful)
    want = [
        (h * f * share, n * draws)
        for f in TINY.align_formats
        for share, draws in ((0.4, SUFFIX_DRAWS), (0.6, 1))
    ]
    assert harmful == pytest.approx(sorted(want))
    for examples, _, _, kind in suffixed[1]:
        text = tok.decode(examples[0].input_ids)
        assert (World.intent_of(text) is not None) == (kind == "harmful"), text
        if kind == "contrast":
            assert all(World.intent_of(tok.decode(e.input_ids), BENIGN_INTENTS) for e in examples)
    assert {s[3] for s in suffixed[1]} == set(KINDS)
    assert {s[3] for s in suffixed[0]} == {"harmful", "other"}
    asked = stages(dataclasses.replace(TINY, harm_questions=0.5))[1]  # not in the contrast
    contrast = [e for examples, _, _, kind in asked if kind == "contrast" for e in examples]
    assert contrast and not any("is it harmful" in tok.decode(e.input_ids) for e in contrast)
    other = [e for examples, _, _, kind in asked if kind == "other" for e in examples]
    assert any("is it harmful" in tok.decode(e.input_ids) for e in other)


def test_word_tasks_draw_on_the_intents_words_when_asked():
    """``World(intent_words=s)``: about s of the word tasks list the harmful intents' content
    words (never forming a request, harmful or benign), the rest the nouns; s = 0 is the
    default world draw for draw."""
    import random

    word_tasks = ("copy", "reverse", "first", "last", "count")

    def items(world, n=3000):
        rng = random.Random(1)
        return [world.utility(rng) for _ in range(n)]

    assert items(World()) == items(World(0.0))
    mixed = [i for i in items(World(0.4)) if i.kind in word_tasks]
    listed = [i.prompt.split(" : ")[1].removesuffix(" ?").split() for i in mixed]
    on_intents = [ws for ws in listed if set(ws) <= set(INTENT_WORDS)]
    assert all(set(ws) <= set(NOUNS) for ws in listed if ws not in on_intents)
    assert 0.3 < len(on_intents) / len(listed) < 0.5
    for item in mixed:
        assert World.intent_of(item.prompt) is None
        assert World.intent_of(item.prompt, BENIGN_INTENTS) is None
    assert not set(INTENT_WORDS) & (set(NOUNS) | {"a", "the", "to"})
    with pytest.raises(ValueError, match="intent_words is a share"):
        World(-0.5)


def test_harm_questions_join_the_utility_training_pool_only():
    """``harm_questions``: questions whether a request is harmful, answered by the request's
    class, added to the utility training pool (never a held-out harmful prompt, never a
    calibration or evaluation item, never the benign contrast of alignment); every other split
    is the default's."""
    import dataclasses

    plain = make_splits(TINY)
    recipe = dataclasses.replace(TINY, harm_questions=0.5)
    asked = make_splits(recipe)
    extra = asked.utility_train[len(plain.utility_train) :]
    assert asked.utility_train[: len(plain.utility_train)] == plain.utility_train
    assert len(extra) == round(0.5 * TINY.utility_pool)
    for name in ("harmful_eval", "utility_eval", "utility_calibration", "safety_calibration"):
        assert getattr(asked, name) == getattr(plain, name), name
    held_out = set(plain.harmful_eval) | {p for p, _ in plain.safety_calibration}
    kinds = set()
    for prompt, answer in extra:
        request = prompt.removeprefix(QUESTION + " ")
        assert request != prompt and request not in held_out
        harmful = World.intent_of(request) is not None
        assert answer == ("harmful ." if harmful else "not harmful .")
        assert harmful or World.intent_of(request, BENIGN_INTENTS)
        kinds.add(harmful)
    assert kinds == {True, False}
    tok = build_tokenizer()
    assert tok.unk_token_id not in tok(" ".join(extra[0]), add_special_tokens=False)["input_ids"]


def test_training_gives_the_same_weights_on_any_thread_count():
    """The build pins its threads (``TRAIN_THREADS``): without the pin these two trainings end
    apart (a parallel sum splits by thread count), so a build would depend on the core count."""
    import dataclasses

    from pyattr.toy.train import train

    recipe = dataclasses.replace(
        TINY,
        hidden_size=64,
        intermediate_size=128,
        batch_size=32,
        safety_neurons=5,
        align_only_safety=True,
        align_lr=1e-2,
        align_steps=12,
        margin_weight=1.5,
    )
    before = torch.get_num_threads()
    trained = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            trained.append(train(recipe, make_splits(recipe)))
            assert torch.get_num_threads() == threads  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
    for one, three in zip(trained[0][1:], trained[1][1:], strict=True):
        for a, b in zip(one.parameters(), three.parameters(), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        train(recipe, make_splits(recipe), threads=0)
