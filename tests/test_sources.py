"""The paper's data sets (issue 17 item 1): fetched from a local HTTP server on 127.0.0.1 that
serves stand-in files in the published formats (no third-party data, no internet): every entry
converted and verified, checksum mismatches, downloads cut short and killed mid-way keep
nothing, the first fetch pins the digest, offline use names each file and where it goes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pyattr import sources
from pyattr.__main__ import main


def advbench_csv(rows: int = 520) -> bytes:
    lines = ["goal,target"] + [
        f'"Write a placeholder request number {i}","Sure, here is placeholder {i}"'
        for i in range(rows)
    ]
    return ("\n".join(lines) + "\n").encode()


ALPACA = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Pick a lock.", "input": "", "output": "I'm sorry, I cannot help with that."},
    {"instruction": "Summarise.", "input": "A long text", "output": "However short, it is."},
]
PROMPT_UTILS = b"""
def apply_prompt_template(dataset):
    gcg_list = [
        "suffix one {\\\\ whatever}",
        "suffix two \xe2\x80\x98quoted\xe2\x80\x99",
        "suffix three [{| (\\\\<var {% [{",
    ]
    return [p + gcg_list[0] for p in dataset]
"""


class Server:
    """Serves ``files`` (path -> bytes); ``mode`` per path: "cut" announces more bytes than it
    sends, "hang" sends half and then waits, "missing" answers 404."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.mode: dict[str, str] = {}
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits.append(self.path)
                body, mode = server.files.get(self.path), server.mode.get(self.path)
                if body is None or mode == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode in ("cut", "hang"):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    if mode == "hang":
                        time.sleep(30)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    s.files.update(
        {
            "/harmful_behaviors.csv": advbench_csv(),
            "/SFT_aligned_llama2-7b-chat-hf_train_short.csv": (
                b'prompt,response\n"[INST] a request [/INST]","I cannot do that."\n'
            ),
            "/alpaca_data_cleaned.json": json.dumps(ALPACA).encode(),
            "/prompt_utils.py": PROMPT_UTILS,
        }
    )
    yield s
    s.close()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_every_published_entry_is_fetched_converted_and_pinned(tmp_path, server):
    folder = tmp_path / "data"
    published = [n for n, s in sources.REGISTRY.items() if s.url is not None]
    paths = {n: sources.fetch(n, folder=folder, mirror=server.url) for n in published}
    with paths["advbench"].open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 520 and rows[0]["goal"].startswith("Write a placeholder")
    with paths["alpaca-no-safety"].open(encoding="utf-8") as f:
        pairs = list(csv.DictReader(f))
    assert [p["prompt"] for p in pairs] == [
        "Name a colour.",
        "Add the numbers.\n\n2 and 3",
        "Summarise.\n\nA long text",
    ]  # the refusal row goes
    suffixes = json.loads(paths["gcg-suffixes"].read_text(encoding="utf-8"))
    assert suffixes == [
        "suffix one {\\ whatever}",
        "suffix two ‘quoted’",
        "suffix three [{| (\\<var {% [{",
    ]
    record = json.loads((folder / "advbench.csv.source.json").read_text())
    assert record["sha256"] == hashlib.sha256(advbench_csv()).hexdigest()
    assert record["url"] == f"{server.url}/harmful_behaviors.csv"
    assert leftovers(folder) == []
    server.close()  # offline from here: the cache answers, verified against its record
    assert sources.fetch("advbench", folder=folder, mirror=server.url) == paths["advbench"]
    assert sources.path_of("advbench", folder) == paths["advbench"]
    paths["advbench"].write_text("goal\nedited by hand\n")
    with pytest.raises(ValueError, match="changed since it was fetched"):
        sources.path_of("advbench", folder)


def test_hub_entries_follow_hf_endpoint(tmp_path, server, monkeypatch):
    server.files["/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json"] = (
        json.dumps(ALPACA).encode()
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    sources.fetch("alpaca-no-safety", folder=tmp_path)
    assert server.hits == ["/datasets/yahma/alpaca-cleaned/resolve/main/alpaca_data_cleaned.json"]


def test_a_bad_download_keeps_nothing(tmp_path, server):
    folder = tmp_path / "data"
    server.mode["/harmful_behaviors.csv"] = "cut"
    with pytest.raises(sources.FetchError, match=r"cut short \(\d+ of \d+ bytes\)"):
        sources.fetch("advbench", folder=folder, mirror=server.url)
    assert not (folder / "advbench.csv").exists() and leftovers(folder) == []
    server.mode.clear()
    with pytest.raises(sources.FetchError, match="not the 00 asked for"):
        sources.fetch("advbench", folder=folder, mirror=server.url, sha256="00")
    server.files["/harmful_behaviors.csv"] = advbench_csv(519)
    with pytest.raises(sources.FetchError, match="519 rows, the published set has 520"):
        sources.fetch("advbench", folder=folder, mirror=server.url)
    server.files["/prompt_utils.py"] = b"x = 1\n"
    with pytest.raises(sources.FetchError, match="no list of strings named gcg_list"):
        sources.fetch("gcg-suffixes", folder=folder, mirror=server.url)
    assert sorted(p.name for p in folder.iterdir()) == []


def test_the_first_fetch_pins_the_published_bytes(tmp_path, server):
    folder = tmp_path / "data"
    first = sources.fetch("advbench", folder=folder, mirror=server.url)
    before = first.read_bytes()
    server.files["/harmful_behaviors.csv"] = advbench_csv().replace(b"number 3", b"number 9")
    with pytest.raises(sources.FetchError, match="recorded at its first fetch"):
        sources.fetch("advbench", folder=folder, mirror=server.url, force=True)
    assert first.read_bytes() == before and leftovers(folder) == []


def test_a_registry_entry_with_a_pinned_checksum(tmp_path, server):
    body = b"prompt,response\nq,a\n"
    server.files["/mine.csv"] = body
    entries = [
        {
            "name": "mine",
            "url": f"{server.url}/mine.csv",
            "filename": "mine.csv",
            "sha256": hashlib.sha256(body).hexdigest(),
            "columns": ["prompt", "response"],
        }
    ]
    registry_file = tmp_path / "registry.json"
    registry_file.write_text(json.dumps(entries))
    registry = sources.load_registry(registry_file)
    assert sources.fetch("mine", folder=tmp_path / "d", registry=registry).read_bytes() == body
    server.files["/mine.csv"] = b"prompt,response\nq,b\n"
    with pytest.raises(sources.FetchError, match="pinned in the registry"):
        sources.fetch("mine", folder=tmp_path / "e", registry=registry)
    registry_file.write_text(json.dumps([{"name": "x", "filename": "x", "colour": 1}]))
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        sources.load_registry(registry_file)


FETCH = """
import sys
from pyattr import sources
sources.fetch("advbench", folder=sys.argv[1], mirror=sys.argv[2])
"""


def test_a_download_killed_midway_leaves_no_file_and_is_cleaned_up(tmp_path, server):
    folder = tmp_path / "data"
    server.mode["/harmful_behaviors.csv"] = "hang"
    child = subprocess.Popen([sys.executable, "-c", FETCH, str(folder), server.url])
    deadline = time.monotonic() + 60
    while not list(folder.glob(".advbench.csv.download-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (partial,) = folder.glob(".advbench.csv.download-*")
    while partial.stat().st_size == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (folder / "advbench.csv").exists()  # half a download never looks complete
    server.mode.clear()
    sources.fetch("advbench", folder=folder, mirror=server.url)
    assert (folder / "advbench.csv").read_bytes() == advbench_csv()
    assert leftovers(folder) == []  # the dead download's temporary file is gone


def test_the_command_line_offline_and_online(tmp_path, server, capsys):
    folder = str(tmp_path / "data")
    assert main(["data", "list", "--data-dir", folder]) == 0
    table = capsys.readouterr().out
    assert "| advbench | prompts | no |" in table and "pyattr data safety" in table
    assert main(["data", "fetch", "advbench", "--data-dir", folder, "--mirror", server.url]) == 0
    assert "advbench: " in capsys.readouterr().out
    assert main(["data", "path", "advbench", "--data-dir", folder]) == 0
    assert capsys.readouterr().out.strip().endswith("advbench.csv")
    offline = "http://127.0.0.1:9"  # the discard port: nothing listens
    assert main(["data", "fetch", "gcg-suffixes", "--data-dir", folder, "--mirror", offline]) == 2
    err = capsys.readouterr().err
    assert "cannot download" in err and "gcg-suffixes: gcg-suffixes.json (published at" in err
    assert f"put the files in {folder}" in err
    assert main(["data", "path", "gcg-suffixes", "--data-dir", folder]) == 2
    assert "gcg-suffixes.json" in capsys.readouterr().err
    assert main(["data", "fetch", "safety", "--data-dir", folder]) == 0
    assert "pyattr data safety --model M" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="name the data sets"):
        main(["data", "fetch"])


def test_a_safety_set_made_by_the_model_itself(tmp_path, capsys):
    """The aligned toy refuses its held-out harmful prompts: the safety set keeps those
    refusals, every kept response is one the judge calls a refusal, and what was dropped is
    written beside; on the utility instructions the answers are kept."""
    from pyattr import toy
    from pyattr.evaluate import KeywordJudge

    files = toy.data(progress=False)
    out, dropped = tmp_path / "safety.csv", tmp_path / "dropped.csv"
    args = ["data", "safety", "--prompts", str(files["harmful_eval"]), "--n", "40"]
    args += ["--max-new-tokens", "24", "--out", str(out), "--dropped", str(dropped)]
    assert main(args) == 0
    said = capsys.readouterr().out
    with out.open(encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
    with dropped.open(encoding="utf-8") as f:
        rest = list(csv.DictReader(f))
    assert len(kept) + len(rest) == 40 and f"kept {len(kept)} of 40" in said
    assert len(kept) >= 30  # the aligned toy refuses nearly all of them
    judge = KeywordJudge()
    assert all(judge.refused(r["response"]) for r in kept)
    assert not any(judge.refused(r["response"]) for r in rest if r["response"].strip())
    util = tmp_path / "utility.csv"
    prompts = tmp_path / "instructions.csv"
    rows = [json.loads(line) for line in files["utility_calibration"].read_text().splitlines()]
    with prompts.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt"]] + [[r["prompt"]] for r in rows[:30]])
    args = ["data", "utility", "--prompts", str(prompts), "--max-new-tokens", "24"]
    assert main([*args, "--out", str(util)]) == 0
    with util.open(encoding="utf-8") as f:
        answers = list(csv.DictReader(f))
    assert len(answers) >= 25 and not any(judge.refused(r["response"]) for r in answers)
