"""Zero-shot utility through lm-evaluation-harness, offline: a local task (YAML and a JSON file
written here) on the toy model gives the accuracy this test computes on its own."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch

from pyattr import toy
from pyattr.evaluate.harness import PAPER_TASKS, zero_shot

pytest.importorskip("lm_eval")

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def world():
    return toy.load(progress=False)


def documents(seed: int) -> list[dict]:
    """Two-way choices between a held-out answer and the same answer with one word swapped for
    a word of another answer; half the questions lack the chat wrapper. Every third asks
    another item's question and offers two other items' true answers, the label a coin toss:
    the model cannot know it, so the accuracy is not 1 (whatever the model) and an off-by-one
    in the scoring shows."""
    rng = random.Random(seed)
    items = [json.loads(line) for line in toy.data(progress=False)["utility_eval"].open()]
    items = rng.sample(items, 48)
    docs = []
    for i, item in enumerate(items):
        right = item["answer"].split()
        wrong = list(right)
        position = rng.randrange(len(wrong))
        donor = items[(i + 1) % len(items)]["answer"].split()
        wrong[position] = rng.choice([w for w in donor if w != right[position]] or ["the"])
        label = rng.randrange(2)
        if i % 3 == 0:
            wrong = donor  # another item's true answer: nothing in the question tells them apart
        choices = [" ".join(right), " ".join(wrong)][:: -1 if label else 1]
        prompt = items[(i + 5) % len(items)]["prompt"] if i % 3 == 0 else item["prompt"]
        question = f"<s> [INST] {prompt} [/INST]" if i % 2 else prompt
        docs.append({"question": question, "choices": choices, "label": label})
    return docs


@torch.no_grad()
def expected_accuracy(model, tok, docs: list[dict]) -> float:
    """Choose the choice with the highest summed log-likelihood after the question (lm-eval's
    ``acc``, with its one-space delimiter; ties to the first choice)."""
    hits = 0
    for doc in docs:
        context = tok(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            continuation = tok(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + continuation])
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            positions = range(len(context) - 1, ids.shape[1] - 1)
            scores.append(sum(float(logp[p, ids[0, p + 1]]) for p in positions))
        hits += max(range(len(scores)), key=lambda c: (scores[c], -c)) == doc["label"]
    return hits / len(docs)


def test_local_task_on_the_toy_model_matches_an_independent_count(world, tmp_path, seed):
    model, tok = world
    docs = documents(seed)
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    (tmp_path / "toy.yaml").write_text(TASK.format(name="toy_choice", data=tmp_path / "docs.json"))
    out = tmp_path / "results" / "utility.json"
    report = zero_shot(model, tok, ["toy_choice"], include_path=tmp_path, batch_size=7, out=out)
    expected = expected_accuracy(model, tok, docs)
    assert 0.4 < expected < 1.0  # the task separates right from wrong, not perfectly
    assert report["tasks"]["toy_choice"]["acc"] == pytest.approx(expected, abs=1e-12)
    assert report["mean_acc"] == report["tasks"]["toy_choice"]["acc"]
    assert json.loads(out.read_text()) == report
    assert [p.name for p in out.parent.iterdir()] == ["utility.json"]  # no temporary left
    limited = zero_shot(model, tok, ["toy_choice"], include_path=tmp_path, limit=10)
    assert limited["config"]["n_samples"]["toy_choice"] == 10
    assert limited["tasks"]["toy_choice"]["acc"] == pytest.approx(
        expected_accuracy(model, tok, docs[:10]), abs=1e-12
    )
    assert not model.training


def test_bad_tasks_are_named_before_anything_runs(world, tmp_path, monkeypatch):
    model, tok = world
    (tmp_path / "toy.yaml").write_text(TASK.format(name="toy_choice", data=tmp_path / "x.json"))
    with pytest.raises(ValueError, match="task 'toy_choise'; did you mean toy_choice"):
        zero_shot(model, tok, ["toy_choise"], include_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="no task folder"):
        zero_shot(model, tok, ["toy_choice"], include_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="limit must be positive"):
        zero_shot(model, tok, ["toy_choice"], include_path=tmp_path, limit=0)
    with pytest.raises(ValueError, match="no tasks"):
        zero_shot(model, tok, [])
    assert PAPER_TASKS == ("boolq", "rte", "hellaswag", "winogrande", "arc_challenge", "openbookqa")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'pyattr\[eval\]'"):
        zero_shot(model, tok, ["toy_choice"], include_path=tmp_path)
