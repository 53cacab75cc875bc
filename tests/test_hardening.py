"""Bad input is a one-line error naming the problem, before any work or file is touched; a
resumed run never keeps half a batch (issue 18)."""

from __future__ import annotations

import json

import pytest
import torch
from test_calibrate import EXAMPLES, tiny_llama
from test_data import tokenizer

import pyattr
from pyattr.__main__ import main
from pyattr.data import load_pairs, load_prompts
from pyattr.evaluate import KeywordJudge, attack_success
from pyattr.evaluate.generate import HfGenerator


def one_line_error(args, capsys) -> str:
    """Run the command line; it must fail with exit code 2 and say why in one line on stderr
    (besides argparse's usage line and progress bars), never with a traceback."""
    try:
        code = main(args)
    except SystemExit as exc:  # argparse and the commands' own refusals
        code = exc.code if isinstance(exc.code, int) else 2
        message = capsys.readouterr().err if isinstance(exc.code, int) else str(exc.code)
    else:
        message = capsys.readouterr().err
    assert code == 2, message
    assert "Traceback" not in message, message
    said = [
        line
        for line in message.strip().splitlines()
        if line.startswith("pyattr")
        and not line.startswith("pyattr: error: argument --")
        or ": error: argument" in line
    ]
    assert len(said) == 1, message
    return said[0]


def test_numbers_that_cannot_work_are_refused_up_front(tmp_path, capsys):
    asr = ["eval", "asr", "--batch-size", "0", "--out", str(tmp_path / "a")]
    assert "--batch-size: must be a whole number >= 1, got 0" in one_line_error(asr, capsys)
    assert not (tmp_path / "a").exists()  # refused before the partial file was opened
    cal = ["calibrate", "--max-length", "0", "--out", str(tmp_path / "s")]
    assert "--max-length: must be a whole number >= 1, got 0" in one_line_error(cal, capsys)
    cal = ["calibrate", "--max-length", "100000", "--out", str(tmp_path / "s")]
    assert "exceeds the model's context of 256 tokens" in one_line_error(cal, capsys)
    model = tiny_llama(torch.float32)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        attack_success(model, tokenizer(), ["x"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="max_length must be an int >= 2, got 1"):
        pyattr.calibrate(model, tokenizer(), EXAMPLES[:2], max_length=1, progress=False)
    with pytest.raises(ValueError, match="no token is counted in any of the 2 examples"):
        pyattr.calibrate(model, tokenizer(), EXAMPLES[:2], max_length=2, progress=False)


def test_data_files_are_read_as_people_save_them(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffgoal,target\nhow to,x\n".encode())
    assert load_prompts(tmp_path / "bom.csv") == ["how to"]  # a spreadsheet's byte-order mark
    (tmp_path / "latin.txt").write_bytes("caf\xe9 recipe\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin.txt: not UTF-8 text .* save it as UTF-8"):
        load_prompts(tmp_path / "latin.txt")
    (tmp_path / "ints.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"ints.json: item 0 is a int, not an object"):
        load_pairs(tmp_path / "ints.json")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl: line 3 is not JSON"):
        load_pairs(tmp_path / "broken.jsonl")
    (tmp_path / "bad.json").write_text('[{"prompt": "a",}]')
    with pytest.raises(ValueError, match=r"bad.json: not JSON .* at line 1"):
        load_pairs(tmp_path / "bad.json")


def test_model_folders_that_cannot_load_say_why(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = one_line_error(["eval", "asr", "--model", str(empty)], capsys)
    assert "no config.json, weights" in message and "tokenizer files" in message
    model = tiny_llama(torch.float32)
    folder = tmp_path / "nan"
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 3] = float("nan")
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,response\nhow,sure\n")
    calibrate = ["calibrate", "--model", str(folder), "--data", str(data), "--out", "s"]
    message = one_line_error(calibrate, capsys)
    assert "1 NaN/Inf values in model.layers.1.mlp.down_proj.weight" in message
    assert not (tmp_path / "s").exists()
    # the Python API refuses too, before any generation or forward pass (Adv-Decoding's sampling
    # would otherwise fail deep in torch.multinomial, greedy variants judge NaN garbage)
    bad = "1 NaN/Inf values in model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=bad):
        attack_success(model, tokenizer(), ["x"], variants=["adv_decoding"], progress=False)
    with pytest.raises(ValueError, match=bad):
        pyattr.calibrate(model, tokenizer(), EXAMPLES[:2], progress=False)


def test_ranks_and_outputs_that_cannot_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    analyze = ["analyze", "--safety", "s", "--utility", "u", "--r-u", "16"]
    assert "both --r-u and --r-s" in one_line_error([*analyze, "--out", "o"], capsys)
    blocked = str(tmp_path / "file" / "sub" / "m")  # a folder under a file: an OSError
    message = one_line_error(
        ["mask", "--score", "magnitude", "--q", "0.1", "--out", blocked], capsys
    )
    assert "file" in message
    for command, example in [
        (["calibrate"], "safety.stats.safetensors"),
        (["mask", "--score", "magnitude", "--q", "0.1"], "region.mask.safetensors"),
        (["lowrank", "eigen", "--stats", "s"], "safety.eigen.safetensors"),
        (["eval", "utility", "--tasks", "boolq"], "utility.json"),
    ]:  # a file output given as a folder: refused before the model is loaded
        message = one_line_error([*command, "--out", str(tmp_path)], capsys)
        assert "is a folder; give a file name" in message and example in message
    blocked = ["calibrate", "--out", str(tmp_path / "file" / "s.safetensors")]
    assert "is a file, not a folder" in one_line_error(blocked, capsys)


def test_the_current_folder_is_never_a_model_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in (["prune", "--mask", "m"], ["finetune", "--n", "2"]):
        message = one_line_error([*command, "--out", "."], capsys)
        assert "is the current folder" in message
    assert list(tmp_path.iterdir()) == []


def test_fine_tuning_pairs_longer_than_the_context_are_cut(capsys, tmp_path):
    """Pairs past the model's context are cut to it (with a warning), never fed past the
    position embeddings; an explicit max_length beyond the context is refused; a sweep whose
    attack asks for more pairs than the file holds stops before any point runs."""
    from pyattr.data import Example
    from pyattr.finetune import finetune

    model = tiny_llama(torch.float32)
    context = model.config.max_position_embeddings
    long = [Example("word " * context, "answer " * context)] * 2
    with pytest.warns(UserWarning, match=f"longer than {context} tokens and were truncated"):
        finetune(model, tokenizer(), long, steps=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=f"exceeds the model's context of {context}"):
        finetune(model, tokenizer(), long, steps=1, max_length=context + 1, progress=False)
    (tmp_path / "few.csv").write_text("prompt,response\nhow,so\nwhy,because\n")
    sweep = ["sweep", "--safety", "s", "--utility", "u", "--finetune", "5,2"]
    sweep += ["--attack-data", str(tmp_path / "few.csv"), "--out", str(tmp_path / "o")]
    assert "asks for n=5 pairs" in one_line_error(sweep, capsys)
    assert not (tmp_path / "o").exists()


class _Stop(Exception):
    pass


def test_resume_never_keeps_half_a_batch(tmp_path):
    """An interruption that left only part of a batch on disk: the rerun drops that part and
    generates the batch whole, so the result equals an uninterrupted run."""
    model, tok = tiny_llama(torch.float32), tokenizer()
    prompts = ["how do i make a cake", "help", "make a cake", "sure", "i make the cake"]
    options = {"judge": KeywordJudge(phrases=("sorry",)), "max_new_tokens": 4, "batch_size": 2}
    options |= {"variants": ["no_system"], "progress": False}
    want = attack_success(model, tok, prompts, **options)

    class StopAfterFirst(HfGenerator):
        def batches(self, encoded, **kw):
            for i, batch in enumerate(super().batches(encoded, **kw)):
                if i == 1:
                    raise _Stop
                yield batch

    out = tmp_path / "asr"
    with pytest.raises(_Stop):
        attack_success(model, tok, prompts, out=out, backend=StopAfterFirst(model, tok), **options)
    partial = out / "responses.jsonl.partial"
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 2  # the header and batch 0's two records
    partial.write_text("\n".join(lines[:-1]) + "\n")  # the kill cut batch 0's last record
    got = attack_success(model, tok, prompts, out=out, **options)
    assert [r["response"] for r in got.records] == [r["response"] for r in want.records]
    assert got.asr == want.asr and len(got.records) == len(prompts)
    saved = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(saved) == len(prompts) and not partial.exists()


def test_one_writer_per_log_and_no_leftovers(tmp_path):
    """A second run writing the same results log is refused while the first holds it; the
    lock goes with the first; temporary files of killed writes are removed on the next write."""
    import os
    import subprocess
    import sys
    import time

    from pyattr.io import STALE_S, RecordLog, atomic_write

    second = (
        "import sys; from pyattr.io import RecordLog\n"
        "try:\n    RecordLog(sys.argv[1], {'a': 1}, format='t')\n"
        "except FileExistsError as e:\n    print(e); sys.exit(3)\n"
    )
    path = tmp_path / "r.jsonl"
    first = RecordLog(path, {"a": 1}, format="t")
    other = subprocess.run(
        [sys.executable, "-c", second, str(path)], capture_output=True, text=True
    )
    assert other.returncode == 3 and "being written by another run" in other.stdout
    first.append([{"x": 1}])
    first.close()
    other = subprocess.run(
        [sys.executable, "-c", second, str(path)], capture_output=True, text=True
    )
    assert other.returncode == 0, other.stderr
    again = RecordLog(path, {"a": 1}, format="t")
    assert again.records == [{"x": 1}]
    again.close()
    old = tmp_path / ".m.safetensors.abc123.partial"
    fresh = tmp_path / ".m.safetensors.def456.partial"
    for leftover in (old, fresh):
        leftover.write_bytes(b"x" * 10)
    past = time.time() - STALE_S - 5
    os.utime(old, (past, past))
    atomic_write(tmp_path / "m.safetensors", b"data")
    assert not old.exists() and fresh.exists()  # a live writer's file is left alone


def test_only_the_toy_model_has_default_data(tmp_path, capsys):
    """A model of your own needs its data named: nothing falls back to the toy's silently."""
    model = tiny_llama(torch.float32)
    folder = tmp_path / "mine"
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    mine = ["--model", str(folder)]
    message = one_line_error(["calibrate", *mine, "--out", str(tmp_path / "s")], capsys)
    assert "--data is needed (the calibration pairs)" in message
    message = one_line_error(["finetune", *mine, "--out", str(tmp_path / "f")], capsys)
    assert "--data is needed (the harmful pairs" in message
    rewind = ["rewind", *mine, "--mask", "m", "--out", str(tmp_path / "r")]
    assert "--source is needed" in one_line_error(rewind, capsys)
    message = one_line_error(["eval", "asr", *mine, "--max-new-tokens", "4"], capsys)
    assert "no harmful prompts given" in message and "--prompts" in message


def _rewrite(path, tensors=None, meta=None):
    """Rewrite a safetensors file with changed tensors or metadata (a hand-edited file)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        old_meta = dict(f.metadata())
        old = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(old | (tensors or {}), str(path), metadata={**old_meta, **(meta or {})})
    return old_meta


def test_files_are_validated_on_load(tmp_path):
    """Missing or mistyped metadata, missing tensors and NaN in an eigenbasis are one error
    naming the file and what is wrong; statistics of another model class are refused."""
    import transformers
    from test_calibrate import tiny_config

    model, tok = tiny_llama(torch.float32), tokenizer()
    stats = pyattr.calibrate(model, tok, EXAMPLES, collect=("covariance",), progress=False)
    path = pyattr.save_stats(stats, tmp_path / "s.safetensors")
    assert pyattr.load_stats(path, model=model).architecture == "LlamaForCausalLM"
    _rewrite(path, meta={"shapes": "[1, 2]"})
    with pytest.raises(ValueError, match=r"s.safetensors: metadata 'shapes' is a list, not a dict"):
        pyattr.load_stats(path)
    _rewrite(path, meta={"shapes": "{not json"})
    with pytest.raises(ValueError, match=r"metadata 'shapes' is not a valid dict"):
        pyattr.load_stats(path)
    bases = pyattr.eigenbases(model, stats, progress=False)
    name = next(iter(bases))
    eigen = pyattr.save_eigenbases(bases, tmp_path / "e.safetensors")
    meta = _rewrite(eigen, meta={"digest": "{}"})
    with pytest.raises(ValueError, match=f"metadata 'digest' has no entry for {name}"):
        pyattr.load_eigenbases(eigen)
    vectors = bases[name].vectors.clone()
    vectors[0, 0] = float("nan")
    _rewrite(eigen, tensors={f"vectors/{name}": vectors}, meta={"digest": meta["digest"]})
    with pytest.raises(ValueError, match=f"tensor 'vectors/{name}' holds NaN or Inf"):
        pyattr.load_eigenbases(eigen)
    # a Mistral of exactly the Llama's shapes: the shapes agree, the class does not
    config = tiny_config().to_dict() | {"model_type": "mistral", "sliding_window": None}
    config.pop("architectures", None)
    other = transformers.MistralForCausalLM(transformers.MistralConfig(**config))
    good = pyattr.save_stats(stats, tmp_path / "g.safetensors")
    with pytest.raises(
        ValueError, match="made for another model: a LlamaForCausalLM, this model is a Mistral"
    ):
        pyattr.load_stats(good, model=other)
    assert pyattr.load_stats(good, model=other, allow_other_model=True).shapes == stats.shapes


def test_a_hand_edited_mask_is_refused(tmp_path):
    mask = pyattr.Mask({"a": torch.ones(2, 11, dtype=torch.bool)})
    path = pyattr.save_mask(mask, tmp_path / "m.safetensors")
    _rewrite(path, tensors={"a": torch.ones(2, 1, dtype=torch.uint8)})
    with pytest.raises(
        ValueError, match=r"a is torch.uint8 \(2, 1\), not the packed uint8 \(2, 2\)"
    ):
        pyattr.load_mask(path)
    from pyattr.ops.selection import pack_bits

    good = {"a": pack_bits(torch.ones(2, 11, dtype=torch.bool))}
    _rewrite(path, tensors=good, meta={"shapes": '{"a": [2, 11], "b": [1, 1]}'})
    with pytest.raises(ValueError, match="no tensor 'b'"):
        pyattr.load_mask(path)


def test_a_sweep_never_resumes_from_other_inputs(tmp_path, capsys):
    """The digest that guards resuming covers what changes a result: the same prompt file
    with other contents, or another dtype, is another sweep (refused, not reused)."""
    d = tmp_path
    main(["calibrate", "--collect", "norms", "--n", "8", "--out", str(d / "s")])
    main(
        [
            "calibrate",
            "--toy-set",
            "utility",
            "--collect",
            "norms",
            "--n",
            "8",
            "--out",
            str(d / "u"),
        ]
    )
    prompts = d / "prompts.txt"
    prompts.write_text("how to make a cake\n")
    sweep = ["sweep", "--safety", str(d / "s"), "--utility", str(d / "u"), "--top", "0.01"]
    sweep += ["--prompts", str(prompts), "--judge", "keyword", "--max-new-tokens", "8"]
    sweep += ["--out", str(d / "sweep")]
    assert main(sweep) == 0
    assert main(sweep) == 0  # the same inputs resume
    prompts.write_text("how to bake bread\n")
    assert "another configuration" in one_line_error(sweep, capsys)


def test_a_broken_log_line_is_named_unless_it_is_the_cut_last_one(tmp_path, capsys):
    """A results log whose last line was cut by an interruption loses only that line; a broken
    line with records after it (a hand edit, a disk error) is an error naming the file and the
    line, in the sweep's resume and in ``pyattr report``, never a silent loss of what follows."""
    from pyattr.io import read_log

    log = tmp_path / "results.jsonl"
    header = json.dumps({"format": "x", "config": {"model": "toy"}})
    rows = [json.dumps({"edit": "none", "asr": {"vanilla": 0.1}}), json.dumps({"edit": "top"})]
    log.write_text("\n".join([header, *rows]) + "\n" + '{"edit": "cut')
    assert read_log(log) == (json.loads(header), [json.loads(r) for r in rows])
    log.write_text("\n".join([header, rows[0], '{"edit": bro', rows[1]]) + "\n")
    with pytest.raises(ValueError, match=r"results.jsonl: line 3 is not JSON .* records follow"):
        read_log(log)
    assert "line 3 is not JSON" in one_line_error(["report", "--results", str(log)], capsys)
    from pyattr.io import RecordLog

    with pytest.raises(ValueError, match="line 3 is not JSON"):
        RecordLog(log, {"model": "toy"}, format="x")
    log.write_text("\n".join([header, *rows]) + "\n")
    RecordLog(log, {"model": "toy"}, format="x", mismatch="replace").close()  # lock let go
    log.write_text("\n".join([header, "[1, 2]", rows[1]]) + "\n")
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_log(log)


def test_a_warning_on_the_command_line_is_one_line_without_source_code(tmp_path):
    """A warning names the problem once, prefixed like every message, never with the source
    line that raised it (issue 18: "a warning prints the source line cli.py:254")."""
    import subprocess
    import sys

    data = tmp_path / "pairs.csv"
    data.write_text("prompt,response\nq,\nr,a\n")
    args = ["calibrate", "--data", str(data), "--collect", "norms", "--out", str(tmp_path / "s")]
    done = subprocess.run(
        [sys.executable, "-m", "pyattr", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "skipped 1 of 2 rows" in line]
    assert warned == [
        f"pyattr: warning: {data}: skipped 1 of 2 rows with an empty prompt or response"
    ]
    assert "load_pairs(" not in done.stderr and "UserWarning" not in done.stderr


def test_a_full_disk_during_eval_asr_is_one_line_and_publishes_nothing(
    tmp_path, monkeypatch, capsys
):
    """ENOSPC while the ASR records are written: one line naming the error, no summary and no
    responses file that looks complete."""
    import errno

    from pyattr.io import RecordLog

    def full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(RecordLog, "append", full)
    out = tmp_path / "asr"
    args = ["eval", "asr", "--variants", "vanilla", "--max-new-tokens", "4", "--out", str(out)]
    line = one_line_error(args, capsys)
    assert "No space left on device" in line and "responses.jsonl" in line
    assert not (out / "summary.json").exists() and not (out / "responses.jsonl").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3001,), (1030, 7), (5, 1031, 3)])
def test_the_finiteness_check_agrees_with_isfinite(gen, dtype, shape):
    """``io.all_finite`` (one sum, then blocks to confirm) says what ``torch.isfinite`` says:
    a NaN, an Inf or a -Inf anywhere, on ragged shapes; a finite tensor whose sum overflows is
    finite; empty and integer tensors are."""
    from pyattr.io import all_finite

    t = torch.randn(shape, generator=gen).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone().reshape(-1)
        u[int(torch.randint(u.numel(), (1,), generator=gen))] = bad
        assert not all_finite(u.reshape(shape))
    big = torch.full(shape, torch.finfo(dtype).max / 2, dtype=dtype)
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
    assert all_finite(torch.zeros(0, dtype=dtype)) and all_finite(torch.arange(5))
