"""A longer fuzzing run (hypothesis) for the splitter, the loop detector, the boxed extractor and the image
loader, complementing ``tests/test_properties.py`` with properties it does not state:

* splitter: realistic token streams (markers arrive split across tokens) fed one token at a time give the
  same thought/answer as the whole text; forcing the answer at a random token never loses or duplicates
  text;
* loop detector, at its *default* settings: text that never repeats is never flagged; any span of 20-400
  characters repeated back to back is flagged whatever the chunking; memory stays bounded;
* boxed extractor: a last ``\\boxed{...}`` with arbitrarily nested, escaped braces is returned exactly; a
  truncated trailing ``\\boxed{`` falls back to the previous complete one;
* image loader: every *valid* image (any Pillow mode and format, EXIF orientation, any size down to 1x1
  and strips like 3000x2) loads, upright, RGB, sides multiples of 28, within ``max_pixels``, aspect kept;
  a PNG/GIF/BMP header declaring any width/height is refused (or loaded) without decoding a bomb.

Each test counts its cases; ``pytest tests/test_fuzz.py -s`` prints the totals.  Marked slow (it still runs
in CI; about 30-60 s on 2 cores).
"""

from __future__ import annotations

import io
import itertools
import math
import struct
import zlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qvq_local.boxed import extract_boxed
from qvq_local.errors import InputError
from qvq_local.loops import LoopDetector, LoopSettings
from qvq_local.splitter import DEFAULT_ANSWER_MARKERS, ThoughtAnswerSplitter, split_text

pytestmark = pytest.mark.slow

COUNTS: Counter[str] = Counter()
LONG = settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
MEDIUM = settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(
        f"\n[fuzz] cases run: {dict(COUNTS)}, total {sum(COUNTS.values())}, crashes found: 0 "
        "(a crash fails the test)"
    )


# ------------------------------------------------------------------------------------------ splitter
# Tokens the way a BPE tokenizer cuts QVQ-style output: markers arrive in pieces.
TOKENS = [
    "**",
    "Final",
    " Final",
    " Answer",
    "Answer",
    "**\n\n",
    ":**",
    ":",
    "</",
    "think",
    ">",
    "<",
    "</think>",
    "<think>",
    "\\",
    "boxed",
    "{",
    "}",
    "\\boxed{",
    " x",
    " =",
    " 3",
    ".",
    "\n",
    "\n\n",
    " ",
    "Wait",
    ",",
    " the",
    " angle",
    " is",
    " 45",
    "°",
    "字",
    "答案",
    "🙂",
    "\r\n",
    "\t",
    "answer",
    "final",
    "*",
    "**Final",
    " Answer**",
    "Final Answer",
    "**Final Answer**",
    "**Final answer:**",
    "\u200b",
    "\ufeff",
]
token_streams = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=4)), max_size=80)


def _feed(tokens, force_at=None):
    splitter = ThoughtAnswerSplitter()
    pieces = []
    for i, tok in enumerate(tokens):
        if force_at is not None and i == force_at:
            pieces += splitter.force_answer()
        pieces += splitter.feed(tok)
    if force_at is not None and force_at >= len(tokens):
        pieces += splitter.force_answer()
    pieces += splitter.finish()
    phases = [p for p, _ in pieces]
    assert phases == sorted(phases, key=lambda p: p == "answer"), "answer went back to thought"
    assert all(text for _, text in pieces), "empty piece"
    thought = "".join(t for p, t in pieces if p == "thought")
    answer = "".join(t for p, t in pieces if p == "answer")
    return thought, answer, splitter


@LONG
@given(token_streams)
def test_fuzz_token_streams_split_like_the_whole_text(tokens):
    COUNTS["splitter_streams"] += 1
    thought, answer, splitter = _feed(tokens)
    assert (thought, answer, splitter.marker) == split_text("".join(tokens))


def _squash(s: str) -> str:
    return "".join(s.split())


SAFE_TOKENS = [t for t in TOKENS if not any(m in t for m in DEFAULT_ANSWER_MARKERS)]


@LONG
@given(st.lists(st.one_of(st.sampled_from(SAFE_TOKENS), st.text(max_size=4)), max_size=60), token_streams)
def test_fuzz_forcing_the_answer_keeps_every_character(before, after):
    """Forced at a token before any marker: nothing is lost or duplicated (whitespace aside)."""
    head = "".join(before)
    assume(not any(m in head for m in DEFAULT_ANSWER_MARKERS))
    COUNTS["splitter_forced"] += 1
    thought, answer, splitter = _feed(before + after, force_at=len(before))
    if head.lstrip().startswith("<think>"):  # an opening <think> before the force is dropped
        head = head.lstrip()[len("<think>") :]
    assert _squash(thought) == _squash(head), (thought, head)
    assert _squash(answer) == _squash("".join(after)), (answer, after)
    assert splitter.marker is None


# ------------------------------------------------------------------------------------------ loop detector
@MEDIUM
@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=50, max_value=400),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
)
def test_fuzz_non_repeating_text_is_never_a_loop(start, n_words, chunks):
    """Distinct numbered words (no span repeats, no sentence repeats) are never flagged at the defaults."""
    COUNTS["loop_clean"] += 1
    words = [f"w{start + i}{'.' if i % 9 == 8 else ''}" for i in range(n_words)]
    text = " ".join(words)
    det = LoopDetector()
    for size, i in zip(itertools.cycle(chunks), itertools.count()):
        pos = sum(itertools.islice(itertools.cycle(chunks), i))
        if pos >= len(text):
            break
        assert det.feed(text[pos : pos + size]) is None, text
    assert det.detected is None


@MEDIUM
@given(
    st.text(min_size=20, max_size=150).filter(lambda u: len(set(u)) > 1),
    st.text(max_size=80),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
)
def test_fuzz_any_repeated_span_is_a_loop(unit, prefix, chunks):
    COUNTS["loop_repeated"] += 1
    s = LoopSettings()
    copies = max(s.repeats, -(-s.min_chars // len(unit))) + 2
    text = prefix + unit * copies
    det = LoopDetector()
    pos, k = 0, 0
    while pos < len(text):
        size = chunks[k % len(chunks)]
        det.feed(text[pos : pos + size])
        pos, k = pos + size, k + 1
        assert len(det._tail) <= det._window + 4 * s.check_every + size  # bounded memory
    assert det.detected is not None, (unit, prefix)


@MEDIUM
@given(st.lists(st.text(max_size=64), max_size=200))
def test_fuzz_loop_detector_any_chunks(chunks):
    COUNTS["loop_random"] += 1
    det = LoopDetector()
    reported = [info for info in (det.feed(c) for c in chunks) if info is not None]
    assert len(reported) <= 1 and (det.detected is None) == (not reported)


# ------------------------------------------------------------------------------------------ boxed
leaf = st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",)), max_size=6)
braced = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map("".join),
        inner.map(lambda s: "{" + s + "}"),
        st.tuples(inner, inner).map(lambda ab: "\\frac{" + ab[0] + "}{" + ab[1] + "}"),
        inner.map(lambda s: "\\{" + s + "\\}"),
    ),
    max_leaves=12,
)
no_box_text = st.text(max_size=60).filter(lambda t: "\\boxed" not in t and not t.endswith("\\"))


@LONG
@given(
    no_box_text,
    braced,
    no_box_text.filter(lambda t: "{" not in t and "}" not in t and "\\" not in t),
    st.sampled_from(["", " ", "\n", "  \t"]),
)
def test_fuzz_last_box_with_nested_braces(before, content, after, gap):
    COUNTS["boxed_nested"] += 1
    assume(before.count("{") == before.count("}") and "\\" not in before)
    text = f"{before}\\boxed{gap}{{{content}}}{after}"
    assert extract_boxed(text) == content.strip(), text


@LONG
@given(braced, braced, st.text(max_size=20))
def test_fuzz_truncated_box_falls_back(first, second, tail):
    COUNTS["boxed_truncated"] += 1
    text = f"So \\boxed{{{first}}}. Checking again: \\boxed{{{second}" + tail.replace("}", "")
    assume("\\" not in tail)
    assert extract_boxed(text) == first.strip(), text


# ------------------------------------------------------------------------------------------ images
FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"],
    "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
    "JPEG": ["L", "RGB", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "GIF": ["P", "L"],
    "BMP": ["1", "L", "P", "RGB"],
}
CASES = [(fmt, mode) for fmt, modes in FORMAT_MODES.items() for mode in modes]
# EXIF orientation on TIFF is covered by test_exif_rotated_tiff_is_upright below (it found a bug there;
# keeping it out of the random run lets the rest of the run count).
EXIF_FORMATS = ("JPEG", "PNG", "WEBP")
sizes = st.one_of(
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.tuples(st.integers(1000, 3000), st.integers(1, 3)),  # strips, both ways
    st.tuples(st.integers(1, 3), st.integers(1000, 3000)),
)


def _make_image(fmt: str, mode: str, size: tuple[int, int], orientation: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("I;16",):
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.int32))
    elif mode == "F":
        img = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), mode="RGB").convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if orientation != 1 and fmt in EXIF_FORMATS:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


@MEDIUM
@given(
    st.sampled_from(CASES),
    sizes,
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
    st.sampled_from([28 * 28, 56 * 56, 100_000, 448 * 448, 1_000_000]),
)
def test_fuzz_valid_images_load_bounded_and_upright(tmp_path, case, size, orientation, seed, max_pixels):
    from qvq_local.images import load_image

    COUNTS["images_valid"] += 1
    fmt, mode = case
    try:
        data = _make_image(fmt, mode, size, orientation, seed)
    except (OSError, ValueError, KeyError, TypeError):
        COUNTS["images_unwritable_combination"] += 1
        assume(False)  # Pillow cannot write this combination
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    img, info = load_image(path, max_pixels=max_pixels)
    w, h = img.size
    assert img.mode == "RGB" and (w, h) == info.size
    assert w % 28 == 0 and h % 28 == 0 and w >= 28 and h >= 28
    assert w * h <= max(max_pixels, 28 * 28)
    rotated = orientation in (5, 6, 7, 8) and fmt in EXIF_FORMATS
    ow, oh = (size[1], size[0]) if rotated else size
    assert info.original_size == (ow, oh), (fmt, mode, orientation)
    if min(w, h) >= 112 and max(w, h) < (max_pixels // 28) // 28 * 28:  # not clamped: aspect kept
        assert abs(math.log((w / h) / (ow / oh))) <= 0.3, (size, (w, h))
    if w > h * 1.5:
        assert ow > oh  # a landscape source stays landscape
    if h > w * 1.5:
        assert oh > ow


def _png_with_size(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def _gif_with_size(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (4, 4)).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp_with_size(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


# Declared sizes: tiny, ordinary, or far beyond the decode limit.  (Between 4 and 179 megapixels a header
# is legitimately decoded, which would make this run slow and memory-hungry, so that band is left out.)
declared = st.one_of(st.integers(0, 2000), st.integers(60_000, 2**31 - 1))


@MEDIUM
@given(st.sampled_from(["png", "gif", "bmp"]), declared, declared)
def test_fuzz_declared_sizes_never_decode_a_bomb(tmp_path, kind, width, height):
    from qvq_local.images import MAX_SOURCE_PIXELS, load_image

    COUNTS["images_declared_size"] += 1
    if kind == "gif":
        width, height = width % 65536, height % 65536
    if kind == "bmp":
        width, height = min(width, 2**31 - 1), min(height, 2**31 - 1)
    assume(width * height <= 4_000_000 or width * height > MAX_SOURCE_PIXELS)
    make = {"png": _png_with_size, "gif": _gif_with_size, "bmp": _bmp_with_size}[kind]
    path = tmp_path / f"declared.{kind}"
    path.write_bytes(make(width, height))
    try:
        img, info = load_image(path)
    except InputError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        if width * height > MAX_SOURCE_PIXELS:
            assert "too large" in str(err) or "corrupt" in str(err) or "not a readable" in str(err), str(err)
        return
    assert width * height <= MAX_SOURCE_PIXELS
    assert img.mode == "RGB" and img.size == info.size


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "RGB", "I;16"])
def test_exif_rotated_tiff_is_upright(tmp_path, mode, orientation):
    """Found by the fuzz run above: a TIFF carrying an EXIF orientation must come out upright whatever its
    mode (a scanner's greyscale TIFF as much as a phone's RGB one).  The picture has four grey quadrants,
    so every orientation is checked for direction, not just for size."""
    import numpy as np
    from helpers import assert_upright, oriented_pair
    from PIL import Image

    from qvq_local.images import load_image

    upright, img = oriented_pair(orientation, width=40, height=80)
    img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257) if mode == "I;16" else img.convert(mode)
    assert img.mode == mode
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "scan.tiff"
    img.save(path, "TIFF", exif=exif.tobytes())
    out, info = load_image(path, max_pixels=10_000)
    assert info.original_size == (40, 80), info
    assert_upright(out, upright)
