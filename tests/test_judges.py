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
