"""What `pip install .` ships: every package of the source tree and the data the code reads at run time.

An editable install (``make install``) imports from the source tree and hides a package left out of
pyproject's list; a wheel does not: ``qvq_local.speculate`` once went missing from it, and every
``qvq ask`` of a normal install failed on import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    found = set()
    for folder, package in (("qvq_local", "qvq_local"), ("convert", "qvq_local.convert")):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join([package, *parts]))
    return found


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert set(config["packages"]) == _source_packages()
    for package, folder in config["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), package
    for package, patterns in config.get("package-data", {}).items():
        folder = ROOT / config["package-dir"][package]
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern} matches no file"


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_published_replies(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"  # a copy: a build leaves build/ and *.egg-info where it runs
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("qvq_local", "convert"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("qvq_local-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"qvq_local/{p.relative_to(ROOT / 'qvq_local')}" for p in (ROOT / "qvq_local").rglob("*.py")}
    expected |= {
        f"qvq_local/convert/{p.relative_to(ROOT / 'convert')}" for p in (ROOT / "convert").rglob("*.py")
    }
    assert expected - names == set()
    assert "qvq_local/speculate/replies/qvq72b_preview_blog.json" in names
