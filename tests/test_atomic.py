"""The one atomic-write helper: complete or absent, never half-written, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from qvq_local import atomic


def test_write_text_replaces_whole_file_with_umask_permissions(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    old_umask = os.umask(0o022)
    try:
        atomic.write_text(target, "new contents\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new contents\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_failure_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_suffix_reaches_the_temporary_name(tmp_path):
    with atomic.atomic_path(tmp_path / "chart.png", suffix=".png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "chart.png").read_bytes() == b"\x89PNG"


def test_replace_dir_swaps_a_finished_folder_onto_an_existing_output(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    partial = atomic.partial_dir(out)
    assert partial.parent == tmp_path and partial.name.startswith(".model.partial-")
    assert atomic.partial_dir(out) != partial  # unique per call: two conversions never share one
    partial.mkdir()
    (partial / "new.bin").write_text("new")
    atomic.replace_dir(partial, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # neither the partial nor the old copy is left


def test_replace_dir_onto_nothing_or_a_file(tmp_path):
    first = atomic.partial_dir(tmp_path / "a")
    first.mkdir()
    atomic.replace_dir(first, tmp_path / "a")
    assert (tmp_path / "a").is_dir()
    (tmp_path / "b").write_text("a file where the folder goes")
    second = atomic.partial_dir(tmp_path / "b")
    second.mkdir()
    atomic.replace_dir(second, tmp_path / "b")
    assert (tmp_path / "b").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
