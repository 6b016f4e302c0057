"""Language lock (qvq_local/lang.py): scripts, the decision, the token masks, and both backends.

The backend tests run the random tiny model that carries Qwen's real vocabulary: unlocked it happily
writes CJK, Cyrillic, Arabic ... tokens (most of the vocabulary), which makes "no masked character in
the locked thought" a strong check.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from fakes import FAKE_BACKEND_WITH_VOCABULARY, ScriptedSession

from qvq_local import lang
from qvq_local.backends.base import TokenMask
from qvq_local.errors import InputError
from qvq_local.reasoning import ReasoningConfig, run_reasoning

EN_Q = "Which bar in the chart is the highest?"
ZH_Q = "图中哪个柱子最高？求x的值。"
EN_ALLOWED = frozenset({"latin", "greek"})
ZH_ALLOWED = frozenset({"han", "latin", "greek"})


def scripts_in(text: str) -> set[str]:
    return {s for c in text if (s := lang.char_script(c)) is not None}


# ------------------------------------------------------------------------------------------ scripts
@pytest.mark.parametrize(
    "char, script",
    [
        ("a", "latin"),
        ("É", "latin"),
        ("ª", "latin"),
        ("中", "han"),
        ("。", "han"),
        ("，", "han"),  # fullwidth comma: Chinese punctuation
        ("ア", "kana"),
        ("ｱ", "kana"),  # halfwidth katakana inside the fullwidth block
        ("한", "hangul"),
        ("б", "cyrillic"),
        ("ع", "arabic"),
        ("π", "greek"),
        ("µ", "greek"),
        ("𠀀", "han"),  # CJK extension B
        ("𐌰", "historic"),  # Gothic
        ("7", None),
        ("×", None),
        ("ℝ", None),  # letterlike: notation
        ("𝔢", None),  # mathematical alphanumerics
        ("²", None),
        ("ʰ", None),  # modifier letter
        ("😀", None),
        (" ", None),
    ],
)
def test_char_script(char, script):
    assert lang.char_script(char) == script


def test_question_scripts_treat_short_latin_runs_as_symbols():
    assert lang.question_scripts(EN_Q) == {"latin"}
    assert lang.question_scripts(ZH_Q) == {"han"}  # the "x" is a variable
    assert lang.question_scripts("三角形ABC的面积") == {"han"}
    assert lang.question_scripts("这张 chart 显示什么") == {"han", "latin"}
    assert lang.question_scripts("x + y = 3?") == set()
    assert lang.question_scripts("この図は何ですか") == {"kana", "han"}


def test_decide_modes():
    assert lang.decide(EN_Q, "auto").allowed == EN_ALLOWED
    assert lang.decide(ZH_Q, "auto").allowed == ZH_ALLOWED
    assert lang.decide("这张 chart 显示什么", "auto") is None  # two scripts: auto does not lock
    assert lang.decide("这张 chart 显示什么", "on").allowed == ZH_ALLOWED
    assert lang.decide("x + y = 3?", "auto") is None
    assert lang.decide("x + y = 3?", "on").allowed == EN_ALLOWED
    assert lang.decide(EN_Q, "off") is None
    with pytest.raises(InputError, match="unknown language lock 'yes'; choose one of auto, on, off"):
        lang.decide(EN_Q, "yes")


@pytest.mark.parametrize(
    "piece, scripts",
    [
        (b" Hello", {"latin"}),
        (b"\\frac", {"latin"}),
        (b" 12", set()),
        ("答案".encode(), {"han"}),
        (b"\xe4", {"han"}),  # lead byte of U+4000..U+4FFF: only ideographs can follow
        (b"\xe7\xad", {"han"}),  # first two bytes of 答
        (b"\xd0", {"cyrillic"}),
        (b"\xe3", {"han", "kana", "hangul"}),  # U+3000..U+3FFF
        (b"\xf0\x9f\x98", set()),  # the start of an emoji
        (b"\xad\x94", set()),  # continuation bytes only: the lead decided
        (" 的x".encode(), {"han", "latin"}),
    ],
)
def test_piece_scripts_include_cut_off_characters(piece, scripts):
    assert lang.piece_scripts(piece) == scripts


# ------------------------------------------------------------------------------------------ masks on the real vocabulary
@pytest.fixture(scope="module")
def qwen_pieces(qwen_tokenizer):
    from qvq_local.formats.byte_level import byte_level_to_bytes

    n = qwen_tokenizer.get_vocab_size()
    specials = {qwen_tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>")}
    pieces = [byte_level_to_bytes(qwen_tokenizer.id_to_token(i)) for i in range(n)]
    for i in specials:
        pieces[i] = b""
    return pieces


@pytest.fixture(scope="module")
def qwen_scripts(qwen_pieces):
    t = time.perf_counter()
    table = lang.VocabScripts(qwen_pieces)
    print(f"\nscript table of {len(qwen_pieces)} tokens: {time.perf_counter() - t:.2f} s")
    return table


def test_english_mask_bans_every_token_that_can_write_cjk(qwen_scripts, qwen_pieces, qwen_tokenizer):
    mask = qwen_scripts.mask(EN_ALLOWED)
    banned = set(mask.ids.tolist())
    assert mask.ids.dtype == np.int32 and list(mask.ids) == sorted(banned)
    # every token whose text holds a CJK character, decoded independently of lang.py
    for tid, piece in enumerate(qwen_pieces):
        text = piece.decode("utf-8", "ignore")
        if any(
            0x4E00 <= ord(c) <= 0x9FFF or 0x3040 <= ord(c) <= 0x30FF or 0xAC00 <= ord(c) <= 0xD7AF
            for c in text
        ):
            assert tid in banned, (tid, piece)
    enc = qwen_tokenizer.encode
    for text in ("答案", "我们", "。", "，"):
        assert set(enc(text).ids) <= banned, text
    for text in ("Hello world", " 12345", "$$ \\boxed{-29} $$", "def f(x):\n    return x", "α + β = π", "🎉"):
        assert not set(enc(text).ids) & banned, text
    assert {qwen_tokenizer.token_to_id("<|im_end|>"), qwen_tokenizer.token_to_id("<|endoftext|>")}.isdisjoint(
        banned
    )
    assert "han" in mask.label and "latin" not in mask.label
    assert qwen_scripts.mask(EN_ALLOWED) is mask  # computed once per script set


def test_chinese_mask_keeps_latin_digits_latex_and_code(qwen_scripts, qwen_tokenizer):
    mask = qwen_scripts.mask(ZH_ALLOWED)
    banned = set(mask.ids.tolist())
    enc = qwen_tokenizer.encode
    for text in (
        "我们来看图中的柱子。",
        "答案是 $\\dfrac{\\sqrt{3}}{2}$ cm",
        "def area(width, height):\n    return width * height",
        "x = 12345, 选项B",
        "the answer",
    ):
        assert not set(enc(text).ids) & banned, text
    for text in ("これは", "한국어", "привет", "مرحبا"):
        assert set(enc(text).ids) & banned, text


# ------------------------------------------------------------------------------------------ the controller
def test_controller_masks_only_while_thinking():
    mask = TokenMask(ids=np.array([5, 9], dtype=np.int32), label="han")
    session = ScriptedSession("Let me think about it. **Final Answer** The answer is 5.")
    events = list(run_reasoning(session, ReasoningConfig(loop=None), thought_mask=mask))
    result = events[-1].result
    assert result.answer == "The answer is 5."
    marker_step = next(
        i
        for i, _ in enumerate(session.generated)
        if "**Final Answer**" in "".join(session.generated[: i + 1])
    )
    assert session.banned[: marker_step + 1] == [mask] * (marker_step + 1)
    assert session.banned[marker_step + 1 :] and all(b is None for b in session.banned[marker_step + 1 :])


def test_controller_without_mask_passes_none():
    session = ScriptedSession("A thought.\n\nAn answer.")
    list(
        run_reasoning(session, ReasoningConfig(loop=None), thought_mask=TokenMask(ids=np.zeros(0, np.int32)))
    )
    assert session.banned and all(b is None for b in session.banned)


def test_api_records_the_lock_and_builds_the_table_once(sample_image, qwen_pieces):
    from test_api import FakeLoaded

    from qvq_local.model import Model

    class PiecesLoaded(FakeLoaded):
        calls = 0

        def token_pieces(self):
            PiecesLoaded.calls += 1
            return qwen_pieces

    loaded = PiecesLoaded(thought="Looking.\n\n**Final Answer**\n\n5", answer=None)
    model = Model(loaded, name="fake", spec=FAKE_BACKEND_WITH_VOCABULARY, quantization="none")
    first = model.ask(sample_image, EN_Q)
    second = model.ask(sample_image, ZH_Q)
    off = model.ask(sample_image, EN_Q, lang_lock="off")
    assert PiecesLoaded.calls == 1
    assert first.settings["lang_lock"]["scripts"] == ["greek", "latin"]
    assert first.settings["lang_lock"]["masked_tokens"] > 20000
    assert second.settings["lang_lock"]["scripts"] == ["greek", "han", "latin"]
    assert off.settings["lang_lock"] == {"mode": "off", "scripts": None}
    assert isinstance(loaded.sessions[0].banned[0], TokenMask)
    assert all(b is None for b in loaded.sessions[2].banned)
    with pytest.raises(InputError, match="unknown language lock"):
        model.ask(sample_image, EN_Q, lang_lock="maybe")


def test_cli_rejects_a_bad_lang_lock_before_loading(tmp_path, sample_image):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    res = CliRunner().invoke(
        app, ["ask", str(sample_image), "q", "--lang-lock", "sometimes", "-m", str(tmp_path)]
    )
    assert res.exit_code == InputError.exit_code
    assert "--lang-lock must be one of auto, on, off, got 'sometimes'" in res.output


# ------------------------------------------------------------------------------------------ both backends
def _load(request, backend: str):
    from qvq_local.api import load

    if backend == "llama":
        pytest.importorskip("llama_cpp")
        pair = request.getfixturevalue("qwen_tiny_gguf_f16")  # F16: AMX CPUs crash on Q4/Q8 decoding
        return load(pair.model, backend="llama")
    pytest.importorskip("mlx_vlm")
    return load(request.getfixturevalue("qwen_tiny_mlx"), backend="mlx")


BACKENDS = [pytest.param("llama", marks=pytest.mark.llama), pytest.param("mlx", marks=pytest.mark.mlx)]
SAMPLE = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 3, "loop_detection": False}


def _thought_ids(model, image, question, lock, budget=120):
    """Ask; return the Result and the ids each step() produced while thinking."""
    steps: list[tuple[int, bool]] = []
    original = model.loaded.new_session

    def spy(*args, **kwargs):
        session = original(*args, **kwargs)
        step = session.step

        def recording(banned=None):
            token = step(banned) if banned is not None else step()
            steps.append((token.id, banned is not None))
            return token

        session.step = recording
        return session

    model.loaded.new_session = spy
    try:
        result = model.ask(image, question, think_budget=budget, answer_budget=4, lang_lock=lock, **SAMPLE)
    finally:
        model.loaded.new_session = original
    return result, steps


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_lock_holds_in_the_backend(request, backend, sample_image):
    with _load(request, backend) as model:
        free, free_steps = _thought_ids(model, sample_image, EN_Q, "off")
        locked, steps = _thought_ids(model, sample_image, EN_Q, "on")
        zh, zh_steps = _thought_ids(model, sample_image, ZH_Q, "on")
        table = model._vocab_scripts
    en_mask, zh_mask = table.mask(EN_ALLOWED), table.mask(ZH_ALLOWED)
    # unlocked, the random model writes other scripts: the check below can fail
    assert scripts_in(free.thought) - EN_ALLOWED, free.thought[:200]
    assert not any(banned for _, banned in free_steps)
    # locked: no thought token is a masked id, and the thought holds no character of a masked script
    thought_ids = [tid for tid, banned in steps if banned]
    assert len(thought_ids) >= 120
    assert not set(thought_ids) & set(en_mask.ids.tolist())
    assert scripts_in(locked.thought) <= EN_ALLOWED, locked.thought[:300]
    assert locked.settings["lang_lock"]["mode"] == "on"
    # a Chinese question: Han and Latin stay, kana / hangul / Cyrillic ... do not
    zh_thought_ids = [tid for tid, banned in zh_steps if banned]
    assert not set(zh_thought_ids) & set(zh_mask.ids.tolist())
    assert scripts_in(zh.thought) <= ZH_ALLOWED
    assert {"han", "latin"} <= scripts_in(zh.thought)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_on_then_off_keeps_the_sampler_state(request, backend, sample_image):
    """Greedy with a strong repetition penalty: masking ids the model would not pick, for the first
    steps only, must give the same tokens as no mask (the penalty history and the chain survive)."""
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    with _load(request, backend) as model:
        loaded = model.loaded
        text = build_prompt(loaded.chat_template, EN_Q, 0, None)
        sampling = SamplingParams(temperature=0.0, top_k=1, repetition_penalty=1.5, seed=0)

        def run(mask, n_masked):
            session = loaded.new_session(sampling, n_ctx=512)
            session.prefill(Prompt(text=text, images=[]))
            ids = [session.step(mask).id if i < n_masked else session.step().id for i in range(40)]
            session.close()
            return ids

        plain = run(None, 0)
        unused = np.setdiff1d(np.arange(1000, 150000, dtype=np.int32), np.array(plain, dtype=np.int32))
        assert run(TokenMask(ids=unused), 20) == plain
        assert run(TokenMask(ids=np.zeros(0, np.int32)), 40) == plain
        # and a mask that bans the greedy choice does change it
        assert run(TokenMask(ids=np.array([plain[0]], dtype=np.int32)), 1)[0] != plain[0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_measures_the_lock_cost_per_token(request, backend):
    """``qvq bench`` reports the lock's per-token cost (the worker's own function, on the real vocabulary)."""
    from io import StringIO

    from rich.console import Console

    from qvq_local.bench.qvq_path import _lang_lock_cost
    from qvq_local.bench.report import render_tables

    with _load(request, backend) as model:
        cost = _lang_lock_cost(model, steps=16, rounds=2)
    assert cost["masked_tokens"] > 40000 and cost["table_s"] > 0
    assert cost["step_ms_off"] > 0 and cost["step_ms_on"] > 0
    assert cost["overhead_ms"] == pytest.approx(cost["step_ms_on"] - cost["step_ms_off"])
    out = StringIO()
    render_tables(
        {"backends": {backend: {"available": True, "qvq": {"ok": True, "sizes": {}, "lang_lock": cost}}}},
        Console(file=out, width=200),
    )
    assert (
        f"{backend}: language lock (English question, {cost['masked_tokens']} tokens masked" in out.getvalue()
    )
    print(
        f"\n{backend}: lock table {cost['table_s']:.2f} s; step {cost['step_ms_off']:.2f} ms unlocked,"
        f" {cost['step_ms_on']:.2f} ms locked ({cost['overhead_ms']:+.2f} ms/token)"
    )
