"""The built-in task files ship inside the wheel: installed outside the checkout, `tasks list` shows them all."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(dest: Path) -> Path:
    """``pip wheel`` of a copy of the project (the checkout stays free of build/ and egg-info)."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "florence_kit", src / "florence_kit", ignore=ignore)
    shutil.copytree(ROOT / "tasks", src / "tasks", ignore=ignore)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if out.returncode != 0 and "No module named" in out.stderr and "setuptools" in out.stderr:
        pytest.skip("setuptools is not installed in this environment: cannot build the wheel here")
    assert out.returncode == 0, out.stderr[-2000:]
    return next(dest.glob("florence_kit-*.whl"))


def test_wheel_ships_the_builtin_tasks_and_lists_them_outside_the_checkout(tmp_path: Path):
    from florence_kit.tasks.registry import BUILTIN_DIR, all_tasks

    wheel = build_wheel(tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("florence_kit/builtin_tasks/")}
    expected = {"florence_kit/builtin_tasks/" + p.relative_to(BUILTIN_DIR).as_posix()
                for p in BUILTIN_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert expected and expected <= shipped
    with zipfile.ZipFile(wheel) as zf:  # the licence travels with the wheel and its metadata names it
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        licence = zf.read(next(n for n in names if n.endswith("licenses/LICENSE"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert any(n.endswith("licenses/NOTICE") for n in names)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    # the wheel alone in the new environment; its dependencies are read from this one's site-packages
    # (a path line, so this environment's editable-install hooks are not loaded there)
    purelib = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    code = "import sys; from florence_kit.cli import main; sys.argv = ['florence-kit', 'tasks', 'list']; main()"
    out = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    where = subprocess.run([str(bin_dir / "python"), "-c", "import florence_kit; print(florence_kit.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(Path(purelib)), where  # the installed copy, not the checkout
    listed = {line.split("\t")[0] for line in out.stdout.splitlines() if line.strip()}
    missing = set(all_tasks()) - listed
    assert not missing, f"tasks missing from the installed wheel's list: {sorted(missing)}"
