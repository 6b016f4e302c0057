"""JSON read strictly, as I-JSON (RFC 7493) has it: the one reader for JSON that comes from outside.

Python's ``json.loads`` accepts more than JSON: the tokens ``NaN``, ``Infinity`` and ``-Infinity``, numbers
beyond a double's range (``1e400`` becomes infinity), strings holding lone UTF-16 surrogates (``"\\ud800"``
decodes to a str that cannot be encoded as UTF-8 again), and nesting until the interpreter's recursion
limit breaks (a ``RecursionError``, not a ``ValueError``).  Each of those got through a range check or
crashed later, far from the input (issue 22).  :func:`loads` refuses all of them at the door with a
:class:`JsonError` whose message says what and where, so callers turn it into their own error (the server's
400, the settings file's one-line error).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: Containers inside containers: far beyond any request or settings file, far below the recursion limit.
MAX_DEPTH = 64

_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonError(ValueError):
    """Not strict JSON.  ``path`` names the value at fault (``messages[0].content``) where one is known."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate in ``text`` as ``U+D800``, or None.  Such a str is not text: it
    cannot be encoded as UTF-8 (a JSON ``"\ud800"`` escape makes one, and so does Python for command-line
    bytes that are not UTF-8)."""
    found = _SURROGATE.search(text)
    return f"U+{ord(found.group()):04X}" if found else None


def _refuse_constant(token: str) -> Any:
    raise JsonError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonError(f"the number {text[:40]} is out of range (beyond a double's)")
    return value


def loads(
    data: bytes | str, *, max_depth: int = MAX_DEPTH, max_values: int | None = None, surrogates: bool = False
) -> Any:
    """Decode ``data`` as strict JSON.  ``max_depth``: the deepest nesting of arrays and objects;
    ``max_values``: the most commas, brackets and braces the text may hold (counted before parsing, so a
    body of a million tiny values costs nothing); ``surrogates``: whether a string (or key) may hold a lone
    surrogate.  Raises :class:`JsonError` with a one-line message."""
    if max_values is not None:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        count = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
        if count > max_values:
            raise JsonError(f"too many JSON values (over {max_values:,})")
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except JsonError:
        raise
    except RecursionError:
        raise JsonError(f"nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError:
        raise JsonError("not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise JsonError(f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except ValueError:  # int() refusing a number of thousands of digits
        raise JsonError("not valid JSON (a number with too many digits)") from None
    _check(value, max_depth, surrogates)
    return value


def _check(root: Any, max_depth: int, surrogates: bool) -> None:
    """One walk, without recursion: the depth of every container, and every string and key."""
    stack: list[tuple[Any, int, tuple | None]] = [(root, 0, None)]
    while stack:
        value, depth, trail = stack.pop()
        if isinstance(value, str):
            if not surrogates and _SURROGATE.search(value):
                _surrogate_error(value, trail, key=False)
            continue
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        if depth >= max_depth:
            raise JsonError(f"nested more than {max_depth} levels deep")
        for key, item in items:
            here = (trail, key)
            if isinstance(key, str) and not surrogates and _SURROGATE.search(key):
                _surrogate_error(key, here, key=True)
            if isinstance(item, (dict, list)) or (isinstance(item, str) and not surrogates):
                stack.append((item, depth + 1, here))


def _surrogate_error(text: str, trail: tuple | None, *, key: bool) -> None:
    point = lone_surrogate(text)
    path = _path(trail)
    where = f"the key {path}" if key else (path or "the value")
    raise JsonError(
        f"{where} holds a lone UTF-16 surrogate ({point}), which is not text: send valid Unicode", path
    )


def _path(trail: tuple | None) -> str | None:
    """``messages[0].content`` from the linked trail ``((None, "messages"), 0), "content")``."""
    keys: list = []
    while trail is not None:
        trail, key = trail
        keys.append(key)
    text = ""
    for key in reversed(keys):
        if isinstance(key, int):
            text += f"[{key}]"
            continue
        shown = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", key[:40]) + (
            "..." if len(key) > 40 else ""
        )
        text += f".{shown}" if text else shown
    return text or None


__all__ = ["MAX_DEPTH", "JsonError", "loads", "lone_surrogate"]
