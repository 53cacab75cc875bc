"""A wheel built from the checkout holds every subpackage and runs outside the checkout: a
non-editable install must be able to run the demo's code paths, not only the editable one."""

from __future__ import annotations

import os
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


def test_the_checkout_root_does_not_shadow_hugging_faces_kernels(tmp_path):
    # Run from the checkout, its kernels/ folder is first on sys.path as a top-level "kernels";
    # transformers (5.25+) imports Hugging Face's package of that name, which must win.
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("MARK = 'hub'\n")
    (other / "layer.py").write_text("MARK = 'hub layer'\n")
    code = (
        "import kernels, kernels.layer, pyattr.kernels.row_topk; "
        "print(kernels.MARK, kernels.layer.MARK, pyattr.kernels.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{other.parent}"}
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout.split()
    assert out[:3] == ["hub", "hub", "layer"], out
    assert Path(out[3]) == ROOT / "kernels" / "__init__.py"
    # with no other "kernels" anywhere, the folder imports as itself and does nothing
    env["PYTHONPATH"] = str(ROOT)
    alone = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; "
    alone += "import kernels; print(kernels.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", alone], check=True, cwd=ROOT, env=env, capture_output=True, text=True
    ).stdout.strip()
    assert Path(where) == ROOT / "kernels" / "__init__.py"
