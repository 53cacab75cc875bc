"""Model-based judges on tiny local models: batched verdicts equal a direct, one-pair-at-a-time
computation, and they plug into ``attack_success``."""

from __future__ import annotations

import pytest
import torch
import transformers
from test_calibrate import tiny_config, tiny_llama
from test_data import tokenizer

from pyattr.evaluate import CausalLMJudge, ClassifierJudge, Judge, attack_success

PROMPTS = ["how do i make a cake", "help", "make a cake", "how do i", "sure", "i make the cake"]
RESPONSES = ["sure here is the answer", "sorry", "no", "cannot help you", "sure", "the cake is"]


def tiny_classifier(pad: bool = True):
    tok = tokenizer()
    torch.manual_seed(1)
    config = tiny_config(
        num_labels=3,
        id2label={0: "benign", 1: "harmful", 2: "unsure"},
        label2id={"benign": 0, "harmful": 1, "unsure": 2},
        pad_token_id=tok.pad_token_id if pad else None,
    )
    model = transformers.LlamaForSequenceClassification(config).double().eval()
    return model, tok


@torch.no_grad()
def direct_logits(model, tok, text: str) -> torch.Tensor:
    ids = torch.tensor([tok(text)["input_ids"]])
    return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("pad", [True, False])
def test_classifier_judge_equals_each_pair_on_its_own(pad):
    model, tok = tiny_classifier(pad)
    template = "{prompt} answer {response}"
    judge = ClassifierJudge(model, tok, harmful_label="harmful", template=template, batch_size=4)
    assert isinstance(judge, Judge) and judge.harmful_label == 1
    assert judge.batch_size == (4 if pad else 1)  # without a pad id a decoder cannot batch
    direct = torch.stack(
        [
            direct_logits(model, tok, template.format(prompt=p, response=r))
            for p, r in zip(PROMPTS, RESPONSES, strict=True)
        ]
    )
    logits = judge.logits(PROMPTS, RESPONSES)
    torch.testing.assert_close(logits, direct, rtol=1e-9, atol=1e-9)
    assert judge.successes(PROMPTS, RESPONSES) == (direct.argmax(-1) == 1).tolist()
    ranked = direct.softmax(-1)[:, 1].sort().values
    threshold = float(ranked[2:4].mean())  # between two pairs, far from either in float32
    by_probability = ClassifierJudge(
        model, tok, harmful_label=1, threshold=threshold, template=template
    )
    expected = (direct.softmax(-1)[:, 1] > threshold).tolist()
    assert by_probability.successes(PROMPTS, RESPONSES) == expected
    assert 0 < sum(expected) < len(expected)


def test_classifier_judge_text_pairs_and_bad_options():
    model, tok = tiny_classifier()
    judge = ClassifierJudge(model, tok, harmful_label=1)
    with torch.no_grad():
        direct = torch.stack(
            [
                model(**tok(p, r, return_tensors="pt")).logits[0]
                for p, r in zip(PROMPTS, RESPONSES, strict=True)
            ]
        )
    torch.testing.assert_close(judge.logits(PROMPTS, RESPONSES), direct)
    with pytest.raises(ValueError, match="no label 'unsafe'"):
        ClassifierJudge(model, tok, harmful_label="unsafe")
    with pytest.raises(ValueError, match="not one of 3 labels"):
        ClassifierJudge(model, tok, harmful_label=3)
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
        ClassifierJudge(model, tok, threshold=1.5)
    with pytest.raises(ValueError, match="6 prompts but 2 responses"):
        judge.successes(PROMPTS, RESPONSES[:2])
    with pytest.raises(ValueError, match="over the classifier's 64"):
        judge.successes(["cake " * 40], ["cake " * 40])


@pytest.mark.parametrize("template", ["{prompt} answer {response} is", None])
def test_causal_lm_judge_compares_two_answer_tokens(template):
    model, tok = tiny_llama(torch.float64), tokenizer()
    judge = CausalLMJudge(model, tok, template=template, yes="sure", no="no", batch_size=4)
    yes, no = tok.convert_tokens_to_ids(["sure", "no"])
    expected = []
    for p, r in zip(PROMPTS, RESPONSES, strict=True):
        if template is None:
            chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        else:
            text = template.format(prompt=p, response=r)
        last = direct_logits(model, tok, text)[-1]
        expected.append(float(torch.softmax(last[[yes, no]], 0)[0]))
    got = judge.probabilities(PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)  # left padding changes nothing
    assert judge.successes(PROMPTS, RESPONSES) == [q > 0.5 for q in expected]


def test_causal_lm_judge_bad_options():
    model, tok = tiny_llama(torch.float64), tokenizer()
    with pytest.raises(ValueError, match="needs both"):
        CausalLMJudge(model, tok, template="{prompt} only")
    with pytest.raises(ValueError, match="cannot encode the answer word 'unsafe'"):
        CausalLMJudge(model, tok, template="{prompt} {response}")
    with pytest.raises(ValueError, match="begin with the same token"):
        CausalLMJudge(model, tok, template="{prompt} {response}", yes="no", no="no no")
    with pytest.raises(ValueError, match="has no chat template"):
        CausalLMJudge(model, tokenizer(chat_template=None), yes="sure", no="no")
    judge = CausalLMJudge(model, tok, template="{prompt} {response}", yes="sure", no="no")
    with pytest.raises(ValueError, match="judge input 0 has 80 tokens, over the judge's context"):
        judge.successes(["cake " * 40], ["cake " * 40])


def test_a_model_judge_inside_attack_success():
    model, tok = tiny_llama(torch.float32), tokenizer()
    judge = CausalLMJudge(tiny_llama(torch.float64), tok, yes="sure", no="no", name="tiny judge")
    report = attack_success(
        model, tok, PROMPTS, judge=judge, max_new_tokens=5, system_prompt=None, progress=False
    )
    responses = [r["response"] for r in report.records]
    assert [r["success"] for r in report.records] == judge.successes(PROMPTS, responses)
    assert report.config["judge"] == "tiny judge"
    assert report.asr["vanilla"] == sum(judge.successes(PROMPTS, responses)) / len(PROMPTS)


def test_cohen_kappa_against_a_hand_count():
    from pyattr.evaluate import cohen_kappa

    a = [True, True, False, False, True, False, True, True]
    b = [True, False, False, False, True, True, True, True]
    # p_o = 6/8; p_a = 5/8, p_b = 5/8: p_e = 25/64 + 9/64 = 34/64; κ = (48/64 − 34/64) / (30/64)
    assert cohen_kappa(a, b) == pytest.approx(14 / 30)
    assert cohen_kappa(a, a) == 1.0
    assert cohen_kappa([True] * 4, [True] * 4) == 1.0  # constant and equal
    assert cohen_kappa([True, False], [False, True]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="cannot compare 2 verdicts with 1"):
        cohen_kappa([True, False], [True])


# ----------------------------------------------------------------------------------------------
# Judges by name (--judge KIND:PATH), on tiny local model folders


def _judge_tokenizer():
    """A word-level tokenizer that knows the answer words of every model judge."""
    return tokenizer(extra=("safe", "unsafe", "Yes", "No", "1", "2", "3", "4", "5", "Answer:"))


def _folder(tmp_path, name, model, tok):
    model.save_pretrained(tmp_path / name)
    tok.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def _tiny_lm(tok, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=1024,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _graded_reference(model, tok, template, prompts, responses):
    """Expected grade of each pair, one pair at a time, from the full softmax."""
    ids = [tok.convert_tokens_to_ids(g) for g in "12345"]
    out = []
    for p, r in zip(prompts, responses, strict=True):
        x = torch.tensor([tok(template.format(prompt=p, response=r))["input_ids"]])
        with torch.no_grad():
            probs = model(input_ids=x).logits[0, -1].double().softmax(-1)[ids]
        probs = probs / probs.sum()
        out.append(float((probs * torch.arange(5, dtype=torch.float64)).sum() / 4))
    return out


def test_every_judge_kind_loads_from_a_folder(tmp_path):
    from pyattr.evaluate.judges import HARMBENCH_TEMPLATE, GradedJudge, load_judge

    tok = _judge_tokenizer()
    lm = _folder(tmp_path, "lm", _tiny_lm(tok), tok)
    classifier, ctok = tiny_classifier()
    cls = _folder(tmp_path, "cls", classifier.float(), ctok)

    judge = load_judge(f"classifier:{cls}")
    assert judge.name == f"classifier:{cls}" and judge.harmful_label == 1
    direct = ClassifierJudge(classifier.float(), ctok, harmful_label=1)
    assert judge.successes(PROMPTS, RESPONSES) == direct.successes(PROMPTS, RESPONSES)

    model = _tiny_lm(tok)
    guard = load_judge(f"llamaguard:{lm}")
    expected = CausalLMJudge(model, tok).probabilities(PROMPTS, RESPONSES)
    assert guard.probabilities(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-6)
    harm = load_judge(f"harmbench:{lm}")
    direct = CausalLMJudge(model, tok, template=HARMBENCH_TEMPLATE, yes="Yes", no="No")
    assert harm.probabilities(PROMPTS, RESPONSES) == pytest.approx(
        direct.probabilities(PROMPTS, RESPONSES), abs=1e-6
    )
    graded = load_judge(f"strongreject:{lm}")  # a merged grader: a plain model folder
    assert isinstance(graded, GradedJudge)
    reference = _graded_reference(model, tok, graded.template, PROMPTS, RESPONSES)
    assert graded.scores(PROMPTS, RESPONSES) == pytest.approx(reference, abs=1e-6)


def test_strongreject_lora_judge_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from pyattr.evaluate.judges import load_judge

    tok = _judge_tokenizer()
    base = _folder(tmp_path, "base", _tiny_lm(tok), tok)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    tuned = peft.get_peft_model(_tiny_lm(tok), lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 3.0)  # a trained adapter is not the identity
    tuned.save_pretrained(tmp_path / "adapter")
    judge = load_judge(f"strongreject:{tmp_path / 'adapter'}@{base}")
    reference = _graded_reference(tuned.eval(), tok, judge.template, PROMPTS, RESPONSES)
    scores = judge.scores(PROMPTS, RESPONSES)
    assert scores == pytest.approx(reference, abs=1e-5)
    assert all(0 <= s <= 1 for s in scores)
    plain = _graded_reference(_tiny_lm(tok), tok, judge.template, PROMPTS, RESPONSES)
    assert max(abs(a - b) for a, b in zip(scores, plain, strict=True)) > 1e-3  # the adapter acts
    assert judge.successes(PROMPTS, RESPONSES) == [s > 0.5 for s in scores]
    with pytest.raises(FileNotFoundError, match="name one with strongreject:ADAPTER@BASE"):
        load_judge(f"strongreject:{tmp_path / 'adapter'}@{tmp_path / 'nothing'}")


def test_judge_specs_are_checked_before_anything_loads(tmp_path):
    from pyattr.evaluate.judges import GradedJudge, check_judge_spec, load_judge

    for good in ("keyword", "released", "toy-exact", "auto", "harmbench:/x"):
        assert check_judge_spec(good) == good
    for bad in ("llama", "harmbench:", "gpt4:/x", ":x"):
        with pytest.raises(ValueError, match="KIND:PATH"):
            check_judge_spec(bad)
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        load_judge(f"classifier:{tmp_path}")
    tok = _judge_tokenizer()
    with pytest.raises(ValueError, match="distinct tokens"):
        GradedJudge(_tiny_lm(tok), tok, grades=("1", "1"))
    with pytest.raises(ValueError, match="needs both"):
        GradedJudge(_tiny_lm(tok), tok, template="{prompt}")


def test_several_judges_give_per_judge_asr_and_pairwise_kappa(tmp_path, capsys):
    import json

    from pyattr.__main__ import main
    from pyattr.evaluate import KeywordJudge, Measurement, cohen_kappa

    model, tok = tiny_llama(torch.float32), tokenizer()
    judge = CausalLMJudge(tiny_llama(torch.float64), tok, yes="sure", no="no", name="lm")
    options = {"prompts": PROMPTS, "judge": KeywordJudge(), "max_new_tokens": 4}
    options |= {"system_prompt": None}
    row = Measurement(tok, options, second_judge=[KeywordJudge.released(), judge])(model)
    released = KeywordJudge.released().name
    assert list(row["judges"]) == ["keyword", released, "lm"]
    assert row["asr_second"]["judge"] == released
    report = attack_success(model, tok, progress=False, **options)
    verdicts = [r["success"] for r in report.records]
    lm = judge.successes(PROMPTS, [r["response"] for r in report.records])
    assert row["judges"]["lm"]["asr"]["vanilla"] == sum(lm) / len(lm)
    assert row["judges"]["lm"]["kappa"] == pytest.approx(cohen_kappa(verdicts, lm))
    pairs = {f"keyword | {released}", "keyword | lm", f"{released} | lm"}
    assert set(row["kappa_pairs"]) == pairs
    from pyattr.report import summary_rows

    flat = summary_rows([{"edit": "none", "params": {}, "removed": 0, "unit": "weights", **row}])
    assert "ASR vanilla (lm)" in flat[0] and "Cohen's kappa (lm)" in flat[0]

    # the command line: several judges at once, a model judge among them
    cls, ctok = tiny_classifier()
    folder = _folder(tmp_path, "cls", cls.float(), ctok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["eval", "asr", "--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.txt")]
    args += ["--max-new-tokens", "4", "--no-system-prompt", "--out", str(tmp_path / "asr")]
    assert main([*args, "--judge", "keyword", "released", f"classifier:{folder}"]) == 0
    judged = json.loads((tmp_path / "asr" / "judges.json").read_text())
    assert list(judged["judges"]) == ["keyword", released, f"classifier:{folder}"]
    assert f"judge classifier:{folder}: ASR vanilla" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--judge", "keyword", "gpt4:/x"])
