"""GGUF metadata keys are gguf-py's own constants (``Keys.*``, ``MODEL_ARCH_NAMES``), never retyped strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")


def _key_patterns() -> list[re.Pattern]:
    """One pattern per dotted key in ``gguf.Keys`` (``{arch}``-style parts match any one word)."""
    keys: list[str] = []

    def walk(cls: type) -> None:
        for value in vars(cls).values():
            if isinstance(value, str) and "." in value:
                keys.append(value)
            elif isinstance(value, type):
                walk(value)

    walk(gguf.Keys)
    assert len(keys) > 100  # the table was found
    return [re.compile("^" + re.sub(r"\\\{\w+\\\}", r"[^.]+", re.escape(k)) + "$") for k in keys]


PATTERNS = _key_patterns()
MMPROJ_ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]


def _reads_gguf(tree: ast.Module) -> bool:
    """The module imports gguf or qvq's GGUF reader (anywhere, lazily too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "gguf" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "gguf":
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qvq_local.formats.gguf"):
            return True
    return False


def _retyped_keys(source: str) -> list[tuple[int, str]]:
    """(line, text) for each string constant or f-string (placeholders as ``X``) that spells a gguf key or,
    in a module that works with GGUF files, the mmproj architecture (elsewhere "clip" is a video clip);
    docstrings are prose and do not count."""
    tree = ast.parse(source)
    gguf_module = _reads_gguf(tree)
    prose = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) in prose or id(node) in parts:
                continue
            text = node.value
        else:
            continue
        if (gguf_module and text == MMPROJ_ARCH) or any(p.match(text) for p in PATTERNS):
            hits.append((node.lineno, text))
    return hits


def test_no_module_retypes_a_gguf_key():
    root = Path(__file__).resolve().parents[1]
    sources = [*(root / "qvq_local").rglob("*.py"), *(root / "convert").rglob("*.py")]
    offenders = [
        f"{path.relative_to(root)}:{line}: {text!r}"
        for path in sources
        for line, text in _retyped_keys(path.read_text(encoding="utf-8"))
    ]
    assert len(sources) > 30
    assert offenders == [], "use gguf's Keys constants instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ('meta.get("general.architecture")', True),
        ('key = f"{arch}.context_length"', True),
        ('KEYS = {"temperature": "general.sampling.temp"}', True),
        ('import gguf\nif arch == "clip": pass', True),
        ('from qvq_local.formats.gguf import read_gguf_header\nif arch == "clip": pass', True),
        ('settings["clip"] = clip.info  # a video clip, in a module that reads no GGUF', False),
        ('"""Reads general.architecture and clip.vision.patch_size."""\nx = 1', False),
        ('meta.get(Keys.General.ARCHITECTURE); msg = "a clip of the image"', False),
        ('path = "config.json"; name = "generation_config.json"', False),
    ],
)
def test_the_guard_sees_retyped_keys_and_only_those(source, found):
    assert bool(_retyped_keys(source)) is found
