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


def test_task_data_that_cannot_be_loaded_is_one_error_before_any_model_work(
    world, tmp_path, monkeypatch, capsys
):
    """A task whose data is missing (a local file gone; offline, the Hub's data never
    downloaded) is a TaskDataError naming the task, raised by ``check_tasks`` before the
    model is touched: the command line prints one line, and a sweep stops before it loads the
    model or writes anything."""
    from lm_eval.tasks import TaskManager

    from pyattr.__main__ import main
    from pyattr.evaluate.harness import TaskDataError, check_tasks

    (tmp_path / "tasks").mkdir()
    task = TASK.format(name="toy_gone", data=tmp_path / "gone.json")
    (tmp_path / "tasks" / "gone.yaml").write_text(task)
    with pytest.raises(TaskDataError, match=r"task 'toy_gone': its data could not be loaded"):
        check_tasks(["toy_gone"], tmp_path / "tasks")
    rc = main(["eval", "utility", "--tasks", "toy_gone", "--include-path", str(tmp_path / "tasks")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "toy_gone" in err and len(err.splitlines()) == 1
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tmp_path / "no-model"), "--safety", "s", "--utility", "u"]
    args += ["--prompts", "p.csv", "--top", "0.1", "--tasks", "toy_gone"]
    rc = main([*args, "--include-path", str(tmp_path / "tasks"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "toy_gone" in err and "no-model" not in err and not out.exists()

    def offline(self, specs):  # what datasets raises offline for a Hub data set never cached
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub (LocalEntryNotFound)")

    monkeypatch.setattr(TaskManager, "load", offline)
    with pytest.raises(TaskDataError, match=r"'boolq'.*super_glue.*with internet access"):
        check_tasks(["boolq"])


def test_sweep_measures_a_local_task(world, tmp_path, capsys):
    """``sweep --tasks NAME --include-path DIR`` reports the task's accuracy as each point's
    utility, equal to ``zero_shot`` on the same model."""
    from pyattr.__main__ import main

    model, tok = world
    docs = documents(0)[:12]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    (tmp_path / "t.yaml").write_text(TASK.format(name="toy_choice", data=tmp_path / "docs.json"))
    assert main(["calibrate", "--collect", "norms", "--out", str(tmp_path / "s")]) == 0
    utility = ["--toy-set", "utility", "--collect", "norms", "--out", str(tmp_path / "u")]
    assert main(["calibrate", *utility]) == 0
    sweep = ["sweep", "--safety", str(tmp_path / "s"), "--utility", str(tmp_path / "u")]
    sweep += ["--top", "0.01", "--variants", "vanilla", "--max-new-tokens", "8"]
    sweep += ["--tasks", "toy_choice", "--include-path", str(tmp_path)]
    assert main([*sweep, "--out", str(tmp_path / "sweep")]) == 0
    rows = (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()
    base = next(json.loads(r) for r in rows if json.loads(r).get("edit") == "none")
    expected = zero_shot(model, tok, ["toy_choice"], include_path=tmp_path)["mean_acc"]
    assert base["utility"] == pytest.approx(expected, abs=1e-12)
