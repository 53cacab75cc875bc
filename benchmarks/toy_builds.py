"""The toy's tests on other builds of the default toy, without another CPU.

Every x86-64 CPU with AVX2 builds the same default toy (a build pins AVX2's kernels,
``pyattr.toy.pinned``), but a CPU without AVX2 rounds otherwise and trains other weights, and so
may Intel's MKL (not measured); a test that holds on one build only can then turn CI red there
with no change to the code (``benchmarks/RESULTS.md``). This script runs the test files that
read the default toy (``TOY_TESTS``) against scratch caches (``$PYATTR_CACHE``) whose default
entry holds another build:

- ``default``: the default entry itself, the reference;
- ``weights:S``: recipe seed S's weights under the default's data and name: a stand-in for another
  CPU's build, and a harsher one (seed S aligned on some of the default's held-out prompts);
- ``seed:S``: seed S's weights with its own data (another draw of the recipe, issue 13's seeds);
- ``entry:PATH``: a cache entry of the default built elsewhere (another machine's
  ``~/.cache/pyattr/toy/<digest>``, copied here): the real check.

Seed S's models are read from ``--models`` (a ``benchmarks.toy_search --out`` folder), and trained
there first when missing (about 7 minutes a seed on 2 cores).

    python -m benchmarks.toy_builds --models /tmp/search --builds weights:1 seed:1 --out /tmp/b

Under ``--out``: ``caches/<build>`` (the scratch caches), ``logs/<build>.log`` (pytest's output),
``junit/<build>.xml``, and the report ``toy_builds.md`` and ``toy_builds.json``, written
atomically: per build, tests passed, failed and skipped, each failure's first line and each
skip's reason. The exit status is 1 when a test failed on any build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from benchmarks.common import header, table
from benchmarks.toy_search import parse_set

ROOT = Path(__file__).resolve().parents[1]

# The test files that read the default toy (``toy.load()`` or ``toy.data()`` of ``Recipe()``,
# or the demo on it); ``tests/test_benchmark_scripts.py`` checks that no such file is missing.
TOY_TESTS = (
    "tests/test_toy_model.py",
    "tests/test_direction_toy.py",
    "tests/test_cli.py",
    "tests/test_readme.py",
    "tests/test_asr.py",
    "tests/test_gqa.py",
    "tests/test_harness.py",
    "tests/test_offload.py",
    "tests/test_sequential.py",
    "tests/test_sources.py",
)
KINDS = ("default", "weights", "seed", "entry")


@dataclasses.dataclass(frozen=True)
class Build:
    """One build to test: ``kind`` (``KINDS``), the recipe seed (weights, seed) or the entry's
    path (entry), and ``label``, its folder name under ``--out``."""

    kind: str
    seed: int | None = None
    path: Path | None = None

    @property
    def label(self) -> str:
        if self.kind == "entry":
            return "entry-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.name)
        return self.kind if self.seed is None else f"{self.kind}-{self.seed}"


def parse_build(spec: str, recipe) -> Build:
    """``default``, ``weights:S``, ``seed:S`` or ``entry:PATH`` (a complete entry of ``recipe``),
    with a message naming what is wrong otherwise, before any build is tested."""
    kind, sep, value = spec.partition(":")
    if kind not in KINDS or (kind == "default") == bool(sep):
        raise SystemExit(f"a build is default, weights:S, seed:S or entry:PATH, got {spec!r}")
    if kind == "default":
        return Build(kind)
    if kind == "entry":
        path = Path(value).expanduser()
        if not path.is_dir():
            raise SystemExit(f"entry:{value}: no such folder")
        _check_entry(path, recipe)
        return Build(kind, path=path.resolve())
    try:
        seed = int(value)
    except ValueError:
        raise SystemExit(f"{kind}:S takes a recipe seed (an integer), got {value!r}") from None
    if seed == recipe.seed:
        raise SystemExit(f"{spec}: seed {seed} is the default's own build: name it 'default'")
    return Build(kind, seed=seed)


def _other_seed(recipe, seed: int, models: Path | None):
    """(tokenizer, base, aligned) of ``recipe`` at ``seed``, read from ``models`` or trained
    into it (``benchmarks.toy_search``'s store)."""
    from benchmarks.toy_search import _train

    other = dataclasses.replace(recipe, seed=seed)
    return _train(other, models)


def _check_entry(source: Path, recipe) -> None:
    """Refuse, with the reason, a cache entry that is damaged or of another recipe or training
    code than ``recipe``'s."""
    from pyattr import toy
    from pyattr.toy.pinned import capability

    if not toy._valid(source):
        raise SystemExit(f"{source} is not a complete toy cache entry (a manifest checksum fails)")
    theirs = json.loads((source / "recipe.json").read_text())
    ours = json.loads(json.dumps(dataclasses.asdict(recipe)))
    if theirs != ours:
        fields = sorted(k for k in ours.keys() | theirs.keys() if theirs.get(k) != ours.get(k))
        raise SystemExit(f"{source} is a build of another recipe (fields differ: {fields})")
    if source.name != recipe.digest():
        raise SystemExit(
            f"{source} is named {source.name}, this code's build of the recipe "
            f"{recipe.digest()}: it was trained by other training code"
        )
    if not toy._current(source):
        trained = json.loads((source / "manifest.json").read_text()).get("cpu_capability")
        raise SystemExit(
            f"{source} was trained with {trained} kernels, a build here pins "
            f"{capability()}'s: the tests would rebuild it (an entry from before the pin)"
        )


def make_cache(build: Build, recipe, out: Path, models: Path | None) -> Path:
    """The scratch cache of ``build``: a folder for ``$PYATTR_CACHE`` whose entry of ``recipe``
    holds that build (written anew each run, atomically)."""
    from pyattr import toy
    from pyattr.toy.recipe import make_splits

    cache = out / "caches" / build.label
    entry = cache / "toy" / recipe.digest()
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(cache, ignore_errors=True)
    entry.parent.mkdir(parents=True)
    if build.kind == "entry":
        shutil.copytree(build.path, tmp)
    elif build.kind == "default":
        shutil.copytree(toy.build(recipe), tmp)
    else:
        tok, base, aligned = _other_seed(recipe, build.seed, models)
        data = recipe if build.kind == "weights" else dataclasses.replace(recipe, seed=build.seed)
        what = "weights" if build.kind == "weights" else "weights and data"
        about = {"stand_in": f"recipe seed {build.seed}'s {what} under the default's name"}
        toy._write_entry(tmp, recipe, make_splits(data), (tok, base, aligned), about)
    tmp.rename(entry)
    return cache


def read_junit(path: Path) -> dict:
    """Passed, failed (with each failure's first line) and skipped (with each reason) tests of
    a pytest JUnit XML report; errors count as failures."""
    passed, failed, skipped = [], {}, {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure")
        bad = case.find("error") if bad is None else bad
        skip = case.find("skipped")
        if bad is not None:
            lines = (bad.get("message") or bad.text or "").strip().splitlines()
            failed[name] = (lines[0] if lines else "")[:300]
        elif skip is not None:
            skipped[name] = (skip.get("message") or "").strip()
        else:
            passed.append(name)
    return {"passed": passed, "failed": failed, "skipped": skipped}


def run_tests(build: Build, cache: Path, out: Path, tests: list[str]) -> dict:
    """The test files against ``cache`` in a fresh pytest process, as a row."""
    xml, log = out / "junit" / f"{build.label}.xml", out / "logs" / f"{build.label}.log"
    for folder in (xml.parent, log.parent):
        folder.mkdir(parents=True, exist_ok=True)
    xml.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider"]
    command += ["--junitxml", str(xml), *tests]
    env = {**os.environ, "PYATTR_CACHE": str(cache)}
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.run(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.perf_counter() - start
    manifest = json.loads(next((cache / "toy").glob("*/manifest.json")).read_text())
    row = {"build": build.label, "seconds": round(seconds, 1), "exit": code}
    row["cpu_capability"] = manifest.get("cpu_capability", "")
    row["stand_in"] = manifest.get("stand_in", "")
    if not xml.exists():  # pytest stopped before reporting (a usage or collection error)
        return row | {
            "passed": [],
            "failed": {"pytest": f"exit {code}, no report: see {log}"},
            "skipped": {},
        }
    tests_row = read_junit(xml)
    if code not in (0, 1) and not tests_row["failed"]:  # no tests ran, or pytest stopped itself
        tests_row["failed"]["pytest"] = f"exit {code} (5: no tests collected): see {log}"
    return row | tests_row


def report(rows: list[dict]) -> str:
    """The markdown report: a row per build, then each build's failures and skip reasons."""
    lines = [
        {
            "build": r["build"],
            "what": r["stand_in"] or f"a build on {r['cpu_capability'] or 'an unnamed CPU'}",
            "passed": len(r["passed"]),
            "failed": len(r["failed"]),
            "skipped": len(r["skipped"]),
            "seconds": f"{r['seconds']:.0f}",
        }
        for r in rows
    ]
    columns = [("build", "build"), ("what", "what it is"), ("passed", "passed")]
    columns += [("failed", "failed"), ("skipped", "skipped"), ("seconds", "s")]
    parts = [f"# The toy's tests on other builds · {header('cpu')}", "", table(lines, columns)]
    for r in rows:
        if r["failed"]:
            parts += ["", f"## {r['build']}: failed", ""]
            parts += [f"- `{name}`: {message}" for name, message in r["failed"].items()]
        reasons = Counter(r["skipped"].values())
        if reasons:
            parts += ["", f"## {r['build']}: skipped", ""]
            parts += [f"- {count} x {reason}" for reason, count in reasons.items()]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--builds", nargs="+", required=True, help="default, weights:S, seed:S, entry:PATH"
    )
    parser.add_argument("--models", type=Path, help="toy_search's --out folder: seed S's models")
    parser.add_argument(
        "--tests", nargs="+", default=list(TOY_TESTS), help="test files or node ids"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], help="Recipe fields, key=value (the script's own tests)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for caches, logs and the report"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    """Each build's scratch cache and test run, in the order given; the report is printed and
    written under ``--out``. Returns the rows (``run_tests``)."""
    from tqdm.auto import tqdm

    from pyattr.io import atomic_write
    from pyattr.toy.recipe import Recipe

    args = parse_args(argv)
    recipe = dataclasses.replace(Recipe(), **parse_set(args.set))
    builds = [parse_build(spec, recipe) for spec in args.builds]
    if args.models is None and any(b.seed is not None for b in builds):
        raise SystemExit("weights:S and seed:S read seed S's models from --models: give a folder")
    labels = [b.label for b in builds]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"a build is named twice: {labels}")
    rows = []
    for build in tqdm(builds, desc="toy builds", unit="build", dynamic_ncols=True):
        cache = make_cache(build, recipe, args.out, args.models)
        rows.append(run_tests(build, cache, args.out, args.tests))
        r = rows[-1]
        print(
            f"{build.label}: {len(r['passed'])} passed, {len(r['failed'])} failed, "
            f"{len(r['skipped'])} skipped in {r['seconds']:.0f} s",
            flush=True,
        )
    text = report(rows)
    atomic_write(args.out / "toy_builds.md", text)
    atomic_write(args.out / "toy_builds.json", json.dumps(rows, indent=1) + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(r["failed"] for r in main()) else 0)
