"""Property-based tests (hypothesis) for the splitter, the loop detector, the boxed extractor, the controller
and the image loader: streaming equals splitting at once, and no input crashes them.

The slow test at the end runs thousands of cases and prints how many ran (``pytest -m slow -s``).
"""

from __future__ import annotations

import io
import itertools
import random

import pytest
from fakes import ScriptedSession
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvq_local.boxed import extract_boxed
from qvq_local.errors import InputError
from qvq_local.events import Finished, TextDelta
from qvq_local.loops import LoopDetector, LoopSettings
from qvq_local.reasoning import ReasoningConfig, run_reasoning
from qvq_local.splitter import DEFAULT_ANSWER_MARKERS, ThoughtAnswerSplitter, split_text

FAST = settings(max_examples=200, deadline=None, database=None)

# pieces that make markers, near-markers and their parts likely
FRAGMENTS = [
    "**Final Answer**",
    "**Final Answer:**",
    "**Final answer**",
    "</think>",
    "<think>",
    "**答案**",
    "**最终答案：**",
    "**答案:**",
    "答案",
    "最终",
    "：",
    "**",
    "*",
    "Final",
    " Answer",
    "Answer",
    ":",
    "<",
    "</",
    "think",
    ">",
    "/",
    "\n",
    "\n\n",
    " ",
    "  ",
    "\t",
    "a",
    "bc",
    ".",
    "é",
    "字",
    "🙂",
    "\\boxed{",
    "}",
    "{",
    "\\",
    "x = 3.",
    "Wait,",
    "\r\n",
]
texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=30).map("".join),
)


def split_into(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def stream_split(text: str, cuts: list[int], markers=DEFAULT_ANSWER_MARKERS):
    splitter = ThoughtAnswerSplitter(markers)
    pieces = []
    for part in split_into(text, cuts):
        pieces += splitter.feed(part)
    pieces += splitter.finish()
    thought = "".join(t for p, t in pieces if p == "thought")
    answer = "".join(t for p, t in pieces if p == "answer")
    # pieces never go back from answer to thought, and none is empty
    phases = [p for p, _ in pieces]
    assert phases == sorted(phases, key=lambda p: p == "answer")
    assert all(t for _, t in pieces)
    return thought, answer, splitter.marker


def check_split(text, cuts, markers=DEFAULT_ANSWER_MARKERS):
    assert stream_split(text, cuts, markers) == split_text(text, markers)


@FAST
@given(texts, st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_streamed_split_equals_whole_split(text, cuts):
    check_split(text, cuts)


@FAST
@given(
    st.lists(st.text(alphabet="ab<>", min_size=1, max_size=4), min_size=1, max_size=3),
    st.text(alphabet="ab<> \n", max_size=60),
    st.lists(st.integers(min_value=0, max_value=100), max_size=20),
)
def test_streamed_split_with_overlapping_custom_markers(markers, text, cuts):
    markers = tuple(m for m in markers if m.strip()) or ("a",)
    check_split(text, cuts, markers)


@FAST
@given(texts, st.integers(min_value=1, max_value=8))
def test_loop_detector_never_crashes(text, chunk):
    det = LoopDetector(
        LoopSettings(
            min_span=2, max_span=30, min_chars=10, check_every=1, sentence_min_chars=3, sentence_repeats=2
        )
    )
    first = None
    for i in range(0, len(text) * 3, chunk):
        info = det.feed((text * 3)[i : i + chunk])
        if info is not None:
            assert first is None  # reported once
            first = info
    assert det.detected == first


@FAST
@given(st.text(max_size=20).filter(lambda s: len(s) >= 2), st.integers(min_value=3, max_value=10))
def test_loop_detector_sees_any_exact_repetition(unit, copies):
    det = LoopDetector(
        LoopSettings(
            min_span=1, max_span=40, repeats=3, min_chars=1, check_every=1, sentence_min_chars=10_000
        )
    )
    prefix = "x" * 3 + "\u2603"
    for ch in prefix + unit * (copies + 3):
        det.feed(ch)
    assert det.detected is not None


@FAST
@given(texts)
def test_extract_boxed_never_crashes(text):
    out = extract_boxed(text)
    assert out is None or out in text


@FAST
@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=30), texts)
def test_extract_boxed_finds_a_final_box(content, before):
    assert extract_boxed(before + " \\boxed{" + content + "}") == content.strip()
    nested = "\\frac{" + content + "}{2}"
    assert extract_boxed(before + "\\boxed{" + nested + "} done") == nested.strip()


token_lists = st.lists(st.sampled_from(FRAGMENTS + ["word", " the", " sentence.", "\n\n"]), max_size=120)


@FAST
@given(
    token_lists,
    st.lists(st.sampled_from(FRAGMENTS), max_size=20),
    st.one_of(st.none(), st.integers(min_value=1, max_value=60)),
    st.integers(min_value=0, max_value=10),
    st.one_of(st.none(), st.integers(min_value=1, max_value=150)),
    st.integers(min_value=12, max_value=400),
)
def test_controller_invariants(thought, answer, budget, grace, max_tokens, n_ctx):
    session = ScriptedSession(thought, answer, n_ctx=n_ctx, prompt_tokens=10)
    cfg = ReasoningConfig(think_budget=budget, grace_tokens=grace, max_tokens=max_tokens, answer_budget=40)
    events = list(run_reasoning(session, cfg))
    assert isinstance(events[-1], Finished) and sum(isinstance(e, Finished) for e in events) == 1
    result = events[-1].result
    assert len(session.fed) <= 1 and len(result.forced) == len(session.fed)
    assert session.n_past <= session.n_ctx
    if max_tokens is not None:
        assert session.steps <= max_tokens
    if budget is not None and result.forced and result.forced[0].reason == "budget":
        assert result.thought_tokens <= budget + grace
    if result.settings["answer_source"] != "last_paragraph":
        deltas = [e for e in events if isinstance(e, TextDelta)]
        assert "".join(e.text for e in deltas if e.phase == "thought") == result.thought
        assert "".join(e.text for e in deltas if e.phase == "answer") == result.answer
        assert sum(e.tokens for e in deltas) == result.thought_tokens + result.answer_tokens
    assert result.stop_reason in ("answer", "budget", "loop", "max_tokens")


# ------------------------------------------------------------------------------------ image loader


def _seed_images() -> list[bytes]:
    from PIL import Image

    out = []
    img = Image.new("RGB", (30, 20), (10, 200, 30))
    for fmt, kwargs in (
        ("PNG", {}),
        ("JPEG", {"quality": 80}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {}),
    ):
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def mutated_images():
    """Real image files with bytes flipped, cut or inserted: the inputs that reach the decoders."""

    def mutate(args):
        seed, ops = args
        data = bytearray(SEEDS[seed % len(SEEDS)])
        for kind, pos, value in ops:
            if not data:
                break
            pos %= len(data)
            if kind == 0:
                data[pos] = value
            elif kind == 1:
                del data[pos:]
            else:
                data[pos:pos] = bytes([value]) * (value % 7 + 1)
        return bytes(data)

    op = st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255))
    return st.tuples(st.integers(0, 100), st.lists(op, min_size=1, max_size=6)).map(mutate)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _load_or_input_error(path) -> None:
    try:
        img, info = __import__("qvq_local.images", fromlist=["load_image"]).load_image(path)
    except InputError as err:
        assert str(path) in str(err) and "\n" not in str(err)
        return
    assert img.mode == "RGB" and img.size == info.size
    assert img.size[0] % 28 == 0 and img.size[1] % 28 == 0


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2000), mutated_images()), st.sampled_from([".png", ".jpg", ".gif", ""]))
def test_load_image_random_bytes_only_input_errors(fuzz_dir, data, suffix):
    path = fuzz_dir / f"case{random.randrange(10**9)}{suffix}"
    path.write_bytes(data)
    try:
        _load_or_input_error(path)
    finally:
        path.unlink()


# ------------------------------------------------------------------------------------- many cases


@pytest.mark.slow
def test_fuzz_many_cases(fuzz_dir, record_property, capsys):
    """Thousands of cases across the splitter, boxed extractor and image loader; prints the counts."""
    counts = {"split": 0, "boxed": 0, "images": 0}

    @settings(max_examples=2000, deadline=None, database=None)
    @given(texts, st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
    def many_splits(text, cuts):
        counts["split"] += 1
        check_split(text, cuts)
        out = extract_boxed(text)
        counts["boxed"] += 1
        assert out is None or out in text

    @settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.binary(max_size=4000), mutated_images()))
    def many_images(data):
        counts["images"] += 1
        path = fuzz_dir / f"many{counts['images']}.png"
        path.write_bytes(data)
        try:
            _load_or_input_error(path)
        finally:
            path.unlink()

    many_splits()
    many_images()
    for name, n in counts.items():
        record_property(f"{name}_cases", n)
    with capsys.disabled():
        print(f"\nfuzz cases run (0 crashes): {counts}")
    assert counts["split"] >= 1000 and counts["images"] >= 500
