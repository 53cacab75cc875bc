"""kill -9 at every writing stage of the command line (issue 18): no file or folder that looks
complete but is not, and the rerun ends with exactly what an uninterrupted run writes.

Each command runs in a child process whose writes are instrumented to SIGKILL the process at
the most dangerous moment of a chosen write: just before the rename that publishes a finished
temporary file (``os.replace``) or model folder (``Path.rename``), or in the middle of a line
of a resumable results log (half a JSON record on disk). The parent then checks what is left
and reruns the same command to completion. Reference outputs come from uninterrupted runs of
the same commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

DRIVER = """
import os, pathlib, signal, sys
mode, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = 0

def die_on(count):
    global calls
    calls += 1
    if calls == count:
        os.kill(os.getpid(), signal.SIGKILL)

if mode == "replace":  # before a finished temporary file is renamed into place
    replace = os.replace
    def patched(*a, **k):
        die_on(at)
        return replace(*a, **k)
    os.replace = patched
elif mode == "rename":  # before a model folder is moved
    rename = pathlib.Path.rename
    def patched(self, *a, **k):
        die_on(at)
        return rename(self, *a, **k)
    pathlib.Path.rename = patched
elif mode == "record":  # half a JSON line into a results log, then the kill
    import json
    from pyattr.io import RecordLog
    append = RecordLog.append
    def patched(self, records):
        records = list(records)
        global calls
        calls += 1
        if calls == at:
            with self.path.open("a") as f:
                f.write(json.dumps(records[0])[:20])
            os.kill(os.getpid(), signal.SIGKILL)
        return append(self, records)
    RecordLog.append = patched
from pyattr.__main__ import main
sys.exit(main(args))
"""


def run(tmp: Path, args: list[str], kill: tuple[str, int] | None = None) -> int:
    """Run ``pyattr ARGS`` in a child process, killed at ``kill`` = (mode, call number)."""
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    mode, at = kill or ("none", 0)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(driver), mode, str(at), *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if kill is None:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def killed(tmp: Path, args: list[str], kill: tuple[str, int]) -> None:
    code = run(tmp, args, kill)
    assert code == -signal.SIGKILL, f"not killed at {kill}: exit code {code}"


def tensors(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupt")


FILE_STAGES = [
    ("stats", ["calibrate", "--collect", "norms", "covariance"], "s.safetensors"),
    ("mask", ["mask", "--safety", "ref_s.safetensors", "--q", "0.05"], "m.safetensors"),
    ("eigen", ["lowrank", "eigen", "--stats", "ref_s.safetensors", "--keep", "8"], "e.safetensors"),
]


def test_files_are_never_published_half_written(work):
    """Statistics, masks and eigenbases: killed just before the rename, the output does not
    exist (only a temporary that the next write removes once stale); the rerun writes the
    uninterrupted run's file byte for byte."""
    run(work, ["calibrate", "--collect", "norms", "covariance", "--out", "ref_s.safetensors"])
    for name, args, out in FILE_STAGES:
        run(work, [*args, "--out", f"ref_{out}"])
        killed(work, [*args, "--out", out], ("replace", 1))
        assert not (work / out).exists(), name
        run(work, [*args, "--out", out])  # byte for byte what the uninterrupted run wrote
        assert (work / out).read_bytes() == (work / f"ref_{out}").read_bytes(), name


def test_model_folders_are_replaced_whole(work):
    """prune: killed before the new folder is renamed into place there is no ``pruned/``, only
    its temporary; killed while replacing an earlier output, the earlier folder survives beside
    (``.pruned.old``) and loading ``pruned/`` says where it is; every rerun writes the same
    weights as an uninterrupted run."""
    if not (work / "ref_m.safetensors").exists():
        run(work, ["calibrate", "--collect", "norms", "--out", "ref_s.safetensors"])
        run(
            work,
            ["mask", "--safety", "ref_s.safetensors", "--q", "0.05", "--out", "ref_m.safetensors"],
        )
    prune = ["prune", "--mask", "ref_m.safetensors"]
    run(work, [*prune, "--out", "ref_pruned"])
    killed(work, [*prune, "--out", "pruned"], ("rename", 1))
    assert not (work / "pruned").exists() and (work / ".pruned.partial").is_dir()
    run(work, [*prune, "--out", "pruned"])
    weights = "model.safetensors"
    assert same_tensors(work / "pruned" / weights, work / "ref_pruned" / weights)
    assert not (work / ".pruned.partial").exists()
    killed(work, [*prune, "--out", "pruned"], ("rename", 1))  # moving the old folder aside
    assert (work / "pruned").is_dir() and (work / ".pruned.partial").is_dir()
    killed(work, [*prune, "--out", "pruned"], ("rename", 2))  # old moved aside, new not in place
    assert not (work / "pruned").exists() and (work / ".pruned.old").is_dir()
    from pyattr.__main__ import main

    with pytest.raises(SystemExit, match=r"interrupted, and the folder it replaced is kept at"):
        main(["eval", "asr", "--model", str(work / "pruned"), "--prompts", "p.csv"])
    run(work, [*prune, "--out", "pruned"])
    assert same_tensors(work / "pruned" / weights, work / "ref_pruned" / weights)
    assert not (work / ".pruned.old").exists() and not (work / ".pruned.partial").exists()


@pytest.mark.parametrize(
    "stage",
    [
        ["eval", "asr", "--variants", "vanilla", "no_system", "--batch-size", "16"],
        ["sweep", "--safety", "ref_s.safetensors", "--utility", "ref_u.safetensors"],
    ],
    ids=["eval-asr", "sweep"],
)
def test_results_logs_resume_to_the_uninterrupted_result(work, stage):
    """ASR and sweep logs killed in the middle of a record: the rerun drops the cut line,
    keeps every finished record unchanged, and ends with the uninterrupted run's records."""
    quick = ["--max-new-tokens", "12"]
    if stage[0] == "sweep":
        for name, toy_set in (("ref_s", "safety"), ("ref_u", "utility")):
            if not (work / f"{name}.safetensors").exists():
                run(work, ["calibrate", "--toy-set", toy_set, "--out", f"{name}.safetensors"])
        quick += ["--top", "0.02", "0.05", "--variants", "vanilla"]
    ref, out = f"ref_{stage[0]}", f"cut_{stage[0]}"
    run(work, [*stage, *quick, "--out", ref])
    log = "results.jsonl" if stage[0] == "sweep" else "responses.jsonl"
    killed(work, [*stage, *quick, "--out", out], ("record", 2))
    partial = log if stage[0] == "sweep" else f"{log}.partial"  # ASR publishes on completion
    assert not (work / out / "summary.json").exists()
    lines = (work / out / partial).read_text().splitlines()
    finished = [json.loads(line) for line in lines[1:-1]]
    assert finished and not lines[-1].endswith("}")  # records on disk, then the cut line
    run(work, [*stage, *quick, "--out", out])
    expected = [json.loads(x) for x in (work / ref / log).read_text().splitlines()[1:]]
    got = [json.loads(x) for x in (work / out / log).read_text().splitlines()[1:]]
    strip = ("seconds", "timings", "elapsed")

    def clean(rows):  # records in any order (a resumed run appends what was left)
        kept = [{k: v for k, v in r.items() if k not in strip} for r in rows]
        return sorted(json.dumps(r, sort_keys=True) for r in kept)

    assert clean(got) == clean(expected)
    assert set(clean(finished)) <= set(clean(got))
    assert sorted(p.name for p in (work / out).iterdir() if p.name.endswith("partial")) == []


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys):
    """Writes that fail with ENOSPC (simulated at the write itself: mounting a small tmpfs
    needs privileges CI does not have): one line naming the error and the file, the previous
    complete output untouched, no temporary file or folder left behind."""
    import errno

    import pyattr.io
    from pyattr.__main__ import main

    def full(*args, **kwargs):
        target = Path(args[1])
        target.write_bytes(b"\0" * 100)  # some bytes reached the disk before it filled
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", "--collect", "norms", "--out", str(stats)]) == 0
    before = stats.read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(pyattr.io, "save_file", full)
    assert main(["calibrate", "--collect", "norms", "--out", str(stats)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and ".s.safetensors." in err
    assert stats.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    monkeypatch.undo()

    import transformers

    def full_model(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full_model)
    mask = ["mask", "--score", "magnitude", "--q", "0.01", "--out", str(tmp_path / "m.st")]
    assert main(mask) == 0
    capsys.readouterr()
    assert main(["prune", "--mask", str(tmp_path / "m.st"), "--out", str(tmp_path / "p")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.st", "s.safetensors"]
