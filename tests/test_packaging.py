"""A wheel built from the checkout holds every subpackage and runs outside the checkout: a
non-editable install must be able to run the demo's code paths, not only the editable one."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["pyattr", "pyattr.evaluate", "pyattr.toy", "pyattr.kernels", "pyattr._C"]


def test_a_built_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q"]
    subprocess.run([*build, "-w", str(dist), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("pyattr-*.whl")
    # torch and the other dependencies come from this interpreter's site-packages; pyattr
    # itself only from the wheel (the environment's own site-packages come first)
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(tmp_path / "env")
    python = tmp_path / "env" / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(install, check=True, cwd=tmp_path)
    imports = "; ".join(f"import {name}" for name in SUBPACKAGES)
    code = f"{imports}; import pyattr.demo, pyattr.cli; print(pyattr.__file__)"
    where = subprocess.run(
        [str(python), "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True
    ).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "env"), where  # the wheel's, not the checkout's
    helped = subprocess.run(
        [str(tmp_path / "env" / "bin" / "pyattr"), "--help"],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "demo" in helped.stdout and "sweep" in helped.stdout
