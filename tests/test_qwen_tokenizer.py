"""The real Qwen tokenizer (convert/tokenizer_qwen.py), built from dashscope's ``qwen.tiktoken``.

Checks, against sources that are not this project's code: the ids the issue quotes from Qwen2-VL's
vocabulary, tiktoken's own BPE over the same ranks (the reference encoder of the file's format), and
llama.cpp's tokeniser reading the converted GGUF.  Skipped when dashscope is not installed (dev extra).
"""

from __future__ import annotations

import json
import re

import pytest
from qvq_local.convert import synthetic, tokenizer_qwen

from qvq_local.errors import InputError
from qvq_local.families import DEFAULT_FAMILY

QWEN_BASE_VOCAB = DEFAULT_FAMILY.base_vocab
SPECIAL_TOKENS = DEFAULT_FAMILY.special_tokens

pytestmark = pytest.mark.skipif(not tokenizer_qwen.available(), reason="needs dashscope (dev extra)")

# English, Chinese, mixed, LaTeX, code, emoji, CRLF and long digits, and a few tokeniser edge cases.
TEXTS = {
    "english": "Let me look at the image carefully. The fourth bar is the tallest, isn't it? I'd say so.",
    "chinese": "我们来仔细看看这张图片。图中有一只猫坐在窗台上，答案是三。",
    "mixed": "所以 the answer 是 42，对吧？Let me 再检查一下 (double-check) 这个 result.",
    "latex": "**Final Answer**\n\n$$ \\boxed{-29} $$ and \\[ \\dfrac{\\sqrt{3}}{2} \\text{ cm}^2 \\]",
    "code": "def area(width, height):\n    return width * height\n\nprint(area(3, 4))  # prints 12\n",
    "emoji": "Great job 🎉👍🏽 — 👨‍👩‍👧 family ✅ ❤️",
    "crlf": "line one\r\nline two\r\n\r\n  indented\r\n",
    "digits": "12345678901234567890 and 3.14159265358979 and 1,000,000",
    "spaces": "  multiple   spaces\n\n\n\ttabs\t\there   ",
    "contractions": "I'M DON'T you'll we've HE'D",
    "answer_zh": "**答案**\n\n1. 第一个结果是 $x=3$\n2. 第二个结果是 B",
}


@pytest.fixture(scope="module")
def ranks():
    return tokenizer_qwen.read_ranks(tokenizer_qwen.vocab_file())


def test_ids_quoted_in_the_issue(qwen_tokenizer):
    ids = qwen_tokenizer.encode
    assert ids("Hello").ids == [9707]
    assert ids(" world").ids == [1879]
    assert ids("Hello world").ids == [9707, 1879]
    assert ids("system").ids == [8948]
    assert ids("user").ids == [872]
    assert ids("\n").ids == [198]
    assert [qwen_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(151643, 151657))
    assert qwen_tokenizer.get_vocab_size() == QWEN_BASE_VOCAB + len(SPECIAL_TOKENS)


def test_merges_are_one_per_multibyte_token_in_rank_order(ranks):
    vocab, merges = tokenizer_qwen.load()
    assert len(vocab) == QWEN_BASE_VOCAB
    assert len(merges) == QWEN_BASE_VOCAB - 256  # 151387, the length of Qwen2's merges.txt
    # the merge list is in the rank order of the tokens it makes
    made = [vocab[a + b] for a, b in merges]
    assert made == sorted(made) and len(set(made)) == len(made)
    assert merges[:4] == [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("i", "n"), ("Ġ", "t")]


def test_pattern_is_the_one_dashscope_ships():
    from qvq_local.convert.tokenizer_synth import QWEN2_PATTERN

    source = (tokenizer_qwen.vocab_file().parent.parent / "tokenizers" / "qwen_tokenizer.py").read_text()
    shipped = re.search(r'PAT_STR = r"""(.*?)"""', source).group(1)
    assert shipped == QWEN2_PATTERN


@pytest.mark.parametrize("name", list(TEXTS))
def test_hf_ids_equal_tiktoken_over_the_same_ranks(name, qwen_tokenizer, ranks):
    tiktoken = pytest.importorskip("tiktoken")
    import unicodedata

    from qvq_local.convert.tokenizer_synth import QWEN2_PATTERN

    enc = tiktoken.Encoding("qwen", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    text = TEXTS[name]
    ids = qwen_tokenizer.encode(text).ids
    assert ids == enc.encode(unicodedata.normalize("NFC", text))  # dashscope normalises to NFC too
    assert qwen_tokenizer.decode(ids) == text


def test_malformed_vocab_file_is_one_line_error(tmp_path):
    bad = tmp_path / "qwen.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(InputError, match=r"line 2 is not 'base64 rank'") as err:
        tokenizer_qwen.read_ranks(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    gap = tmp_path / "gap.tiktoken"
    gap.write_bytes(b"IQ== 0\nIg== 2\n")
    with pytest.raises(InputError, match="without gaps"):
        tokenizer_qwen.read_ranks(gap)


# ------------------------------------------------------------------------------------------ synth
def test_default_tokenizer_per_shape(monkeypatch):
    assert synthetic.default_tokenizer("tiny") == "trained"
    for shape in ("2b", "7b", "72b"):
        assert synthetic.default_tokenizer(shape) == "qwen"
    monkeypatch.setattr(tokenizer_qwen, "vocab_file", lambda: None)
    assert synthetic.default_tokenizer("2b") == "trained"
    with pytest.raises(InputError, match="needs the dashscope package") as err:
        synthetic.with_tokenizer("tiny", "qwen")
    assert "pip install dashscope" in str(err.value)


def test_unknown_tokenizer_kind():
    with pytest.raises(InputError, match="unknown tokenizer 'gpt2'; choose one of trained, qwen"):
        synthetic.with_tokenizer("tiny", "gpt2")


def test_tiny_with_the_real_tokenizer_grows_its_embedding(qwen_tiny_checkpoint, qwen_tokenizer_json):
    from qvq_local.convert.checkpoint import open_checkpoint

    config = json.loads((qwen_tiny_checkpoint / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["hidden_size"] == 256
    assert config["eos_token_id"] == 151645 and config["image_token_id"] == 151655
    gen = json.loads((qwen_tiny_checkpoint / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    assert (qwen_tiny_checkpoint / "tokenizer.json").read_text() == qwen_tokenizer_json
    merges = (qwen_tiny_checkpoint / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and merges[1] == "Ġ Ġ" and len(merges) == 1 + 151387
    vocab = json.loads((qwen_tiny_checkpoint / "vocab.json").read_text())
    assert vocab["Hello"] == 9707 and len(vocab) == QWEN_BASE_VOCAB
    ckpt = open_checkpoint(qwen_tiny_checkpoint)  # the loader's consistency checks pass
    assert ckpt.text.vocab_size == 151936


def test_synth_cli_tokenizer_option(tmp_path):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    out = tmp_path / "t"
    res = CliRunner().invoke(app, ["synth", str(out), "--tokenizer", "trained"])
    assert res.exit_code == 0, res.output
    assert "trained tokenizer" in res.output
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1280
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "u"), "--tokenizer", "sentencepiece"])
    assert bad.exit_code == InputError.exit_code
    assert "unknown tokenizer 'sentencepiece'" in bad.output


# ------------------------------------------------------------------------------------------ GGUF parity
@pytest.mark.llama
@pytest.mark.parametrize("name", list(TEXTS))
def test_gguf_tokenizer_matches_hf_ids(name, gguf_vocab, qwen_tokenizer):
    """llama.cpp's tokenisation of the converted real vocabulary equals the Hugging Face tokenizer's."""
    llama = gguf_vocab
    text = TEXTS[name]
    ids = qwen_tokenizer.encode(text).ids
    assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
    assert llama.detokenize(ids).decode("utf-8") == text


@pytest.mark.llama
def test_gguf_special_tokens_at_their_ids(gguf_vocab, qwen_tokenizer):
    llama = gguf_vocab
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello<|im_end|>\n"
    ids = qwen_tokenizer.encode(text).ids
    assert ids[:2] == [151644, 872] and 151655 in ids
    assert llama.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids


@pytest.fixture(scope="module")
def gguf_vocab(qwen_tiny_gguf_f16):
    """llama.cpp's tokeniser of the converted real-vocabulary GGUF (vocabulary only, no weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(model_path=str(qwen_tiny_gguf_f16.model), vocab_only=True, verbose=False)
    yield llama
    llama.close()


# ------------------------------------------------------------------------------------------ the controller, real lengths
EN_REPLY = (
    "So I've got this problem here. The chart shows the temperatures for each day of the week, and I need "
    "the difference between the lowest and the highest reading.\n\nLooking at the bars: Monday is -12, "
    "Tuesday is 3, Wednesday is 17, and the lowest is Saturday at -12... wait, no, Sunday is -12 and "
    "Saturday is -9. So the highest is 17 and the lowest is -12.\n\nThe difference is -12 - 17 = -29.\n\n"
    "**Final Answer**\n\n$$ \\boxed{-29} $$"
)
ZH_THOUGHT = (
    "好的，我来仔细看看这张图片。图中有五个柱子，分别代表不同的数值。第一个柱子大约是40，第二个是90，"
    "第三个是60，第四个是120，第五个是75。所以最高的是第四个柱子。等一下，我再确认一下比例尺。"
) * 3


def _real_token_texts(tokenizer, text: str) -> list[str]:
    """The text each real Qwen token adds when streamed (a split character comes out whole)."""
    import codecs

    from qvq_local.formats.byte_level import byte_level_to_bytes

    decoder = codecs.getincrementaldecoder("utf-8")()
    ids = tokenizer.encode(text).ids
    return [decoder.decode(byte_level_to_bytes(tokenizer.id_to_token(i))) for i in ids]


def _real_session(tokenizer, thought: str, answer: str | None = None, **kwargs):
    from fakes import ScriptedSession

    class RealLengths(ScriptedSession):
        def count_tokens(self, text: str) -> int:
            return len(tokenizer.encode(text).ids)

    answer_texts = None if answer is None else _real_token_texts(tokenizer, answer)
    return RealLengths(_real_token_texts(tokenizer, thought), answer_texts, **kwargs)


def test_controller_counts_real_tokens_of_an_english_reply(qwen_tokenizer):
    from qvq_local.reasoning import ReasoningConfig, run_reasoning

    texts = _real_token_texts(qwen_tokenizer, EN_REPLY)
    assert "".join(texts) == EN_REPLY and len(texts) == len(qwen_tokenizer.encode(EN_REPLY).ids)
    marker_end = next(k for k in range(len(texts)) if "**Final Answer**" in "".join(texts[: k + 1])) + 1
    session = _real_session(qwen_tokenizer, EN_REPLY)
    result = list(run_reasoning(session, ReasoningConfig(loop=None)))[-1].result
    assert result.stop_reason == "answer" and result.boxed == "-29"
    # the token that completes the marker is the first answer token; the ones before it are thought
    assert result.thought_tokens == marker_end - 1
    assert result.answer_tokens == len(texts) - marker_end + 1
    assert result.thought.endswith("-12 - 17 = -29.")


def test_controller_budget_with_real_chinese_token_lengths(qwen_tokenizer):
    from qvq_local.reasoning import ReasoningConfig, run_reasoning
    from qvq_local.splitter import DEFAULT_FORCED_TEXT

    n_zh = len(qwen_tokenizer.encode(ZH_THOUGHT).ids)
    assert n_zh > 100  # Chinese runs are many real tokens (the fake tokenizer would call each run one)
    session = _real_session(qwen_tokenizer, ZH_THOUGHT, "$$ \\boxed{4} $$", prompt_tokens=50)
    cfg = ReasoningConfig(think_budget=60, grace_tokens=16, loop=None)
    result = list(run_reasoning(session, cfg))[-1].result
    forced = result.forced[0]
    assert forced.reason == "budget" and 60 <= forced.at_token <= 60 + 16
    assert result.thought_tokens == forced.at_token
    fed = len(qwen_tokenizer.encode(session.fed[0]).ids)
    assert fed == len(qwen_tokenizer.encode(DEFAULT_FORCED_TEXT.lstrip("\n")).ids) or fed == len(
        qwen_tokenizer.encode(DEFAULT_FORCED_TEXT).ids
    )
    # the context bookkeeping is in real tokens: prompt + every step + the forced text
    assert session.n_past == 50 + session.steps + fed  # (the fake gives its final EOS a cell too)
    assert result.answer == "$$ \\boxed{4} $$" and result.boxed == "4"
    # and a context too small for the forced text in real tokens stops instead of overflowing
    small = _real_session(qwen_tokenizer, ZH_THOUGHT, prompt_tokens=50, n_ctx=50 + 40)
    tight = list(run_reasoning(small, ReasoningConfig(think_budget=None, answer_reserve=8, loop=None)))[
        -1
    ].result
    assert small.n_past <= 90
    assert tight.forced and tight.thought_tokens <= 40 - len(qwen_tokenizer.encode(DEFAULT_FORCED_TEXT).ids)
