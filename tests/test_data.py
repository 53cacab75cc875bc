"""Data loading and chat formatting with a real (tiny, offline) fast tokenizer."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pyattr.data import Example, encode, encode_all, is_wrapped, load_pairs, load_prompts, sample

WORDS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<|user|>",
    "<|system|>",
    "<|assistant|>",
    "<|end|>",
]
WORDS += ["how", "do", "i", "make", "a", "cake", "sure", "here", "is", "the", "answer", "no"]
WORDS += ["sorry", "cannot", "help", "you", "be", "safe"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tokenizer(chat_template: str | None = TEMPLATE, extra: tuple = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` (and ``extra`` words after them)."""
    words = list(dict.fromkeys([*WORDS, *extra]))
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = chat_template
    return tok


def words(tok, ids) -> list[str]:
    return tok.convert_ids_to_tokens(ids.tolist())


def test_chat_template_and_response_mask():
    tok = tokenizer()
    enc = encode(
        tok, Example("how do i make a cake", "sure here is the answer"), system_prompt="be safe"
    )
    assert words(tok, enc.input_ids) == [
        "<|system|>",
        "be",
        "safe",
        "<|end|>",
        "<|user|>",
        "how",
        "do",
        "i",
        "make",
        "a",
        "cake",
        "<|end|>",
        "<|assistant|>",
        "sure",
        "here",
        "is",
        "the",
        "answer",
        "</s>",
    ]
    assert words(tok, enc.input_ids[enc.counted]) == ["sure", "here", "is", "the", "answer", "</s>"]
    everything = encode(tok, Example("how", "sure"), count="all")
    assert bool(everything.counted.all())
    bare = encode(tok, Example("how do i make a cake", "sure here is the answer"), eos=False)
    assert words(tok, bare.input_ids[bare.counted]) == ["sure", "here", "is", "the", "answer"]


def test_llama2_format_without_template_and_wrapped_prompts():
    tok = tokenizer(chat_template=None)
    enc = encode(tok, Example("how do i make a cake", "no sorry"), system_prompt="be safe")
    assert words(tok, enc.input_ids) == [
        "[INST]",
        "<<SYS>>",
        "be",
        "safe",
        "<</SYS>>",
        "how",
        "do",
        "i",
        "make",
        "a",
        "cake",
        "[/INST]",
        "no",
        "sorry",
        "</s>",
    ]
    wrapped = Example("[INST] how do i make a cake [/INST]", "no sorry")
    assert is_wrapped(wrapped.prompt) and not is_wrapped("how do i")
    for tk in (tok, tokenizer()):  # never wrapped twice, template or not
        ids = words(tk, encode(tk, wrapped, system_prompt="be safe").input_ids)
        assert ids.count("[INST]") == 1 and "<|user|>" not in ids
    forced = encode(tokenizer(), wrapped, wrapped=False).input_ids
    assert "<|user|>" in words(tok, forced)


NO_SYSTEM = (  # a template that rejects a system turn, as Gemma's does
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}" + TEMPLATE
)


@pytest.mark.parametrize("template", [TEMPLATE, None, NO_SYSTEM], ids=["chat", "llama2", "nosys"])
def test_encode_all_gives_what_encode_gives_one_by_one(seed, template):
    """The batched tokenization of ``encode_all`` gives ``encode``'s ids and masks for every
    example: plain and wrapped prompts (with and without BOS), a system prompt for all or one
    per example (None among them), both counts, with and without EOS."""
    rng = random.Random(seed)
    tok = tokenizer(template)
    vocab = WORDS[12:]

    def text(lo: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, 9)))

    examples = []
    for _ in range(25):
        prompt = rng.choice([text(1), f"[INST] {text(1)} [/INST]", f"<s> [INST] {text(1)} [/INST]"])
        examples.append(Example(prompt, text(0)))
    systems = [rng.choice([None, "be safe", "you be safe"]) for _ in examples]
    for options in (
        {},
        {"system_prompt": "be safe", "count": "all"},
        {"eos": False, "wrapped": False},
        {"wrapped": True},
    ):
        batched = encode_all(tok, examples, **options)
        singly = [encode(tok, e, **options) for e in examples]
        for got, want in zip(batched, singly, strict=True):
            assert got.input_ids.tolist() == want.input_ids.tolist()
            assert got.counted.tolist() == want.counted.tolist()
    batched = encode_all(tok, examples, system_prompt=systems)
    for got, e, system in zip(batched, examples, systems, strict=True):
        assert got.input_ids.tolist() == encode(tok, e, system_prompt=system).input_ids.tolist()
    assert encode_all(tok, []) == []
    with pytest.raises(ValueError, match="2 system prompts for 25 examples"):
        encode_all(tok, examples, system_prompt=["be safe", None])
    with pytest.raises(ValueError, match="count must be"):
        encode_all(tok, examples, count="prompt")


def test_truncation_warns_once_with_a_count():
    tok = tokenizer()
    examples = [Example("how do i make a cake", "sure here is the answer")] * 3
    examples.append(Example("how", "sure"))
    with pytest.warns(UserWarning, match="3 of 4 examples are longer than 8 tokens"):
        encoded = encode_all(tok, examples, max_length=8)
    assert [len(e.input_ids) for e in encoded] == [8, 8, 8, 6]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_load_pairs_from_files(tmp_path, suffix):
    rows = [
        {"goal": "how do i", "target": "sure"},
        {"goal": "make a cake", "target": ""},
        {"goal": "help", "target": "no sorry"},
    ]
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        path.write_text("goal,target\n" + "".join(f"{r['goal']},{r['target']}\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows"):
        pairs = load_pairs(path, prompt_column="goal", response_column="target")
    assert pairs == [Example("how do i", "sure"), Example("help", "no sorry")]
    with pytest.raises(
        ValueError,
        match=r"no column 'prompt'; the columns found are \['goal', "
        r"'target'\]",
    ):
        load_pairs(path)


def test_load_pairs_bad_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_pairs(empty)
    with pytest.raises(ValueError, match="no row has both"), pytest.warns(UserWarning):
        load_pairs([{"prompt": "a", "response": " "}])
    with pytest.raises(ValueError, match="unsupported file type '.parquet'"):
        load_pairs(tmp_path / "x.parquet")


def test_sampling_is_seeded(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    a = load_pairs(rows, n=10, seed=3)
    assert a == load_pairs(rows, n=10, seed=3) and a != load_pairs(rows, n=10, seed=4)
    assert len(set(a)) == 10
    with pytest.raises(ValueError, match="cannot sample n=51 from 50"):
        sample(rows, 51)


def test_load_prompts(tmp_path):
    txt = tmp_path / "advbench.txt"
    txt.write_text("how do i\n\nmake a cake\n")
    assert load_prompts(txt) == ["how do i", "make a cake"]
    csv_path = tmp_path / "advbench.csv"
    csv_path.write_text("goal,target\nhow do i,sure\n")
    assert load_prompts(csv_path) == ["how do i"]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(csv_path, column="prompt")
    (tmp_path / "none.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "none.txt")


def test_load_from_a_saved_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"goal": ["how do i", "make a cake", "help"], "target": ["sure", "", "no sorry"]}
    single = tmp_path / "single"
    datasets.Dataset.from_dict(rows).save_to_disk(str(single))
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows"):
        pairs = load_pairs(single, prompt_column="goal", response_column="target")
    assert pairs == [Example("how do i", "sure"), Example("help", "no sorry")]
    assert load_prompts(single) == ["how do i", "make a cake", "help"]
    with pytest.raises(ValueError, match=r"no column 'prompt'; the columns found are \['goal'"):
        load_pairs(single)

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows), test=datasets.Dataset.from_dict(rows)
    ).save_to_disk(str(splits))
    with pytest.raises(ValueError, match=r"choose a split.*\['train', 'test'\]"):
        load_pairs(splits, prompt_column="goal", response_column="target")
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_pairs(splits, prompt_column="goal", response_column="target", split="dev")
    with pytest.warns(UserWarning):
        assert (
            len(load_pairs(splits, prompt_column="goal", response_column="target", split="test"))
            == 2
        )
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        load_prompts(tmp_path / "missing.txt")


def test_datasets_sampling_is_shuffle_then_select():
    datasets = pytest.importorskip("datasets")
    from pyattr.data import sample

    rows = [{"i": i} for i in range(57)]
    for seed in (0, 42):
        want = datasets.Dataset.from_list(rows).shuffle(seed=seed).select(range(13))
        assert sample(rows, 13, seed, "datasets") == list(want)
    assert sample(rows, 13, 0) != sample(rows, 13, 0, "datasets")  # pyattr's own draw
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample(rows, 3, 0, "numpy")
