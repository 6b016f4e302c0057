"""Assertion helpers shared by the test modules (imported as ``from helpers import ...``).

:func:`assert_error` is the one way the suite checks an error's wording.  qvq-local's messages start with
the file's path, and pytest names its temporary folders after the test (``test_truncated_shard0/``), so a
plain ``match="truncated"`` passes when the word is only in the path.  The helper removes every path
first, then looks for the words.

:func:`oriented_pair` builds the images the EXIF tests need: an asymmetric upright picture and the stored
pixels that EXIF orientation ``n`` turns into it, from the EXIF definitions (not from Pillow's code).
"""

from __future__ import annotations

import os
import re
import tempfile

import pytest

# Temporary roots whose paths are removed wherever they appear in a message (pytest's tmp_path lives here).
_TEMP_ROOTS = sorted({tempfile.gettempdir(), os.path.realpath(tempfile.gettempdir())}, key=len, reverse=True)
_TEMP_PATH = re.compile("(?:" + "|".join(re.escape(r) for r in _TEMP_ROOTS) + r")[^\s:'\"()]*")


def _message(error) -> tuple[str, list[str]]:
    """The text of ``error`` (a pytest ExceptionInfo, an exception or a string) and the paths it carries."""
    if isinstance(error, pytest.ExceptionInfo):
        error = error.value
    paths = []
    if isinstance(error, BaseException):
        carried = getattr(error, "path", None)
        if carried:
            paths.append(str(carried))
        error = str(error)
    return str(error), paths


def without_paths(text: str, *paths) -> str:
    """``text`` with each of ``paths`` (as given and resolved) and any temporary-folder path replaced by
    ``<path>``."""
    names = set()
    for p in paths:
        if p is None:
            continue
        names.add(str(p))
        names.add(os.path.realpath(p))
    for name in sorted(names, key=len, reverse=True):  # longest first: a folder must not eat its file
        text = text.replace(name, "<path>")
    return _TEMP_PATH.sub("<path>", text)


def assert_error(error, *words: str, path=None) -> str:
    """Assert an error message is one line, names ``path`` (when given) and says each of ``words`` outside
    any path.

    ``error``: ``pytest.raises``' ExceptionInfo, the exception, or the message text (e.g. a CLI's
    ``error:`` line).  ``words`` are regular expressions, matched case-insensitively against the message
    with every path removed (``path``, the exception's own ``.path``, anything under the temporary folder).
    Returns that path-free message.
    """
    text, carried = _message(error)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    if path is not None:
        assert str(path) in text or os.path.realpath(path) in text, f"{path} is not named in: {text}"
    bare = without_paths(text, path, *carried)
    for word in words:
        assert re.search(word, bare, re.IGNORECASE), f"{word!r} not in the message (paths removed): {bare!r}"
    return bare


# ------------------------------------------------------------------------------------------ EXIF orientation
def upright_quadrants(width: int = 48, height: int = 80):
    """A ``height`` x ``width`` uint8 grey image whose four quadrants are 0, 80, 160 and 240 (top-left,
    top-right, bottom-left, bottom-right): every flip and rotation of it looks different."""
    import numpy as np

    arr = np.empty((height, width), dtype=np.uint8)
    h2, w2 = height // 2, width // 2
    arr[:h2, :w2], arr[:h2, w2:], arr[h2:, :w2], arr[h2:, w2:] = 0, 80, 160, 240
    return arr


def stored_for_orientation(upright, orientation: int):
    """The stored pixels that a viewer honouring EXIF ``orientation`` (1-8) displays as ``upright``.

    From the EXIF 2.3 table: 2 mirror left-right, 3 rotate 180, 4 mirror top-bottom, 5 transpose (mirror
    along the top-left diagonal), 6 rotate 90 clockwise to display, 7 transverse, 8 rotate 90
    counter-clockwise to display.  The stored pixels are the inverse transform of the upright ones.
    """
    import numpy as np

    inverse = {
        1: lambda a: a,
        2: np.fliplr,
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, 1),  # displayed = stored turned clockwise, so store it turned back
        7: lambda a: np.rot90(a, 2).T,
        8: lambda a: np.rot90(a, -1),
    }
    return np.ascontiguousarray(inverse[orientation](upright))


def quadrant_levels(img) -> list[float]:
    """Mean grey level in the middle half of each quadrant (TL, TR, BL, BR) of a PIL image."""
    import numpy as np

    grey = np.asarray(img.convert("L"), dtype=np.float32)
    h, w = grey.shape
    out = []
    for top in (0, h // 2):
        for left in (0, w // 2):
            qh, qw = h // 2, w // 2
            out.append(
                float(grey[top + qh // 4 : top + 3 * qh // 4, left + qw // 4 : left + 3 * qw // 4].mean())
            )
    return out


def assert_upright(img, upright, tolerance: float = 25) -> None:
    """``img`` (any size) shows ``upright``: same orientation of the long side, same quadrant levels."""
    h, w = upright.shape
    assert (img.width >= img.height) == (w >= h), (img.size, (w, h))
    expected = quadrant_levels(_pil(upright))
    got = quadrant_levels(img)
    assert all(abs(a - b) <= tolerance for a, b in zip(got, expected)), f"quadrants {got} != {expected}"


def _pil(arr):
    from PIL import Image

    return Image.fromarray(arr)


def oriented_pair(orientation: int, width: int = 48, height: int = 80):
    """(upright array, stored PIL image in mode L) for EXIF ``orientation``."""
    upright = upright_quadrants(width, height)
    return upright, _pil(stored_for_orientation(upright, orientation))
