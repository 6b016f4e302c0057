"""Code from outside the package that adds to qvq-local (a backend, a model family), found and run once per
process.

A plugin is a function that registers what it adds through the registries' own hooks (a backend:
``qvq_local.backends.registry.register(spec)``; a family: ``qvq_local.families.register(family)`` with its
GGUF converter and checkpoint writer classes, ``qvq_local.convert.gguf_converter.register`` and
``qvq_local.convert.synth_writer.register``).  Two ways to name one:

* ``QVQ_PLUGINS``: comma-separated ``module`` or ``module:function`` names; a bare module names its
  function ``qvq_plugin``.  An environment variable, so a child process (a bench worker, ``qvq serve``
  started by a script) runs the same plugins as its parent;
* the ``qvq_local.plugins`` entry-point group of an installed distribution
  (``[project.entry-points."qvq_local.plugins"] name = "package.module:function"``, or a module).

Importing a plugin's module registers nothing by itself: its function does, so a module can also be
imported for other reasons (a test file that is its own plugin) without side effects.

:func:`load` runs each plugin once; the backend registry and the family registry each call it when first
imported, so anything that reads either (the converter's and synthesiser's registries import the family
one) sees the plugins.  A plugin that fails (its module is missing, it raises) is left
out with one ``warning:`` line on stderr; :func:`failures` lists them (``qvq doctor`` can show them).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

ENV_VAR = "QVQ_PLUGINS"
ENTRY_POINT_GROUP = "qvq_local.plugins"
#: The function a plugin module named without ``:function`` provides.
HOOK = "qvq_plugin"

_done: set[str] = set()
_failures: dict[str, str] = {}
_loading = False


def names_from_env(value: str | None = None) -> list[str]:
    """The plugins ``QVQ_PLUGINS`` names, in order, without blanks or repeats."""
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    out: list[str] = []
    for part in raw.split(","):
        name = part.strip()
        if name and name not in out:
            out.append(name)
    return out


def _resolve(name: str) -> Callable[[], Any]:
    module_name, _, attr = name.partition(":")
    target: Any = importlib.import_module(module_name.strip())
    attr = attr.strip() or HOOK
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{attr} is not a function")
    return target


def _run(name: str, find: Callable[[], Any]) -> None:
    if name in _done:
        return
    _done.add(name)
    try:
        target = find()
        if not callable(target):  # an entry point naming a module
            target = getattr(target, HOOK)
        target()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not break qvq
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _failures[name] = reason
        print(f"warning: plugin {name} not loaded ({reason})", file=sys.stderr)


def load() -> None:
    """Run every plugin named by ``QVQ_PLUGINS`` and the entry points, each once (idempotent)."""
    global _loading
    if _loading:  # a plugin that reads a registry while it registers: the ones before it are there
        return
    _loading = True
    try:
        for name in names_from_env():
            _run(name, lambda name=name: _resolve(name))
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _run(f"{ep.name} ({ep.value})", ep.load)
    finally:
        _loading = False


def failures() -> dict[str, str]:
    """The plugins that could not be loaded, with why (one line each)."""
    return dict(_failures)


__all__ = ["ENTRY_POINT_GROUP", "ENV_VAR", "HOOK", "failures", "load", "names_from_env"]
