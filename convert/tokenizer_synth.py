"""A Qwen2-style tokenizer trained in-process, for synthetic checkpoints.

No hub is reachable, so the tokenizer of a synthetic checkpoint is built here: a byte-level BPE trained
with ``tokenizers`` on a small built-in corpus (or Qwen's real vocabulary, ``tokenizer_qwen``),
pre-tokenised with the Qwen2 regex, followed by the family's special tokens in their order.  The base
vocabulary can be padded with filler entries so that the special tokens land on the real Qwen ids
(``<|endoftext|>`` = 151643 ...).  A filler is the concatenation of two trained tokens that no merge
produces: it never comes out of encoding, but it decodes to word-like text, so a random model's output
stays readable.

Builds the files every Qwen repository has in common (``tokenizer.json``, ``vocab.json``,
``merges.txt``); a family's writer (``convert/synth_<family>.py``) adds its ``tokenizer_config.json`` and
chat template.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from qvq_local.errors import InputError
from qvq_local.families import DEFAULT_FAMILY

# The pre-tokeniser pattern of Qwen2's tokenizer.json.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A small corpus in the register QVQ writes in: questions about images, step-by-step reasoning, answers.
_CORPUS = """\
Let me look at the image carefully. The chart shows five bars and a red line above them.
The first bar is about 40 units tall, the second is 90, the third is 60,
the fourth is 120 and the fifth is 75.
So the tallest bar is the fourth one. Wait, let me double-check that by comparing the heights again.
Yes, 120 is larger than 90, 75, 60 and 40, so the fourth bar is the tallest.
The question asks for the difference between the largest and the smallest values: 120 - 40 = 80.
**Final Answer**
\\[ \\boxed{80} \\]
Alright, I have this geometry problem here. There is a triangle ABC with a right angle at C.
The sides AC and BC measure 3 and 4, so by the Pythagorean theorem the hypotenuse AB is 5.
Hmm, but I should make sure I read the figure correctly: the label near the top says 3, not 8.
Now, the area of the triangle is one half times the base times the height, which is 0.5 * 3 * 4 = 6.
Therefore, the answer is 6 square units. I think that is correct.
What is shown in this picture? I see a table with a cup of coffee, a laptop and a small plant.
The plant is green and sits in a white pot on the left side of the table.
To solve this, I need to count the objects one by one: first the cup, then the laptop, then the plant.
That makes three objects in total. But maybe the question means only the electronic devices?
In that case the answer would be one, the laptop. Let me reread the question to be sure.
The question says "how many objects are on the table", so the answer is three.
Step 1: identify the variables. Step 2: write the equation. Step 3: solve for x.
If 2x + 5 = 17, then 2x = 12 and x = 6. Checking: 2 * 6 + 5 = 17. Correct.
The graph of y = x^2 is a parabola that opens upward with its vertex at the origin (0, 0).
At x = 3 the value is 9, and at x = -3 it is also 9, because the function is even.
Percentages: 25% of 80 is 20, and 50% of 80 is 40, so 75% of 80 is 60.
The map shows a river flowing from the mountains in the north to the sea in the south.
There are two bridges across the river and a small town on the eastern bank.
I'm not entirely sure about the scale of the map, but it seems that one centimetre equals one kilometre.
Let's think step by step. First, we observe; second, we reason; third, we conclude.
Question: Which of the following options is correct? (A) 12 (B) 15 (C) 18 (D) 21
Since the sum of the angles in a triangle is 180 degrees, and two angles are 60 and 75, the third is 45.
So the correct option is (C)... no, wait, the question asks for the third angle, which is 45 degrees.
None of the options is 45, so maybe I misread the numbers. Looking again, the angles are 60 and 102.
Then the third angle is 180 - 60 - 102 = 18, which is option (C).
The image is a photograph of a street at night; the lights of the cars form long bright streaks.
This is a question about physics: a ball is thrown upward at 20 metres per second.
With g = 10 m/s^2 it reaches its highest point after 2 seconds, at a height of 20 metres.
我们来仔细看看这张图片。图中有一只猫坐在窗台上。
答案是三。
Numbers such as 1, 2, 3, 10, 100, 1000, 3.14 and 2.718 appear in many problems.
def area(width, height):
    return width * height
print(area(3, 4))  # prints 12
"""


@dataclass(frozen=True)
class TrainedBpe:
    vocab: dict[str, int]  # token -> id, ids 0..n-1
    merges: list[tuple[str, str]]


@functools.lru_cache(maxsize=1)
def _train(max_vocab: int = 1024) -> TrainedBpe:
    """Train the byte-level BPE on the built-in corpus (deterministic; cached per process)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repeat the corpus so that frequent pairs clearly outrank rare ones.
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return TrainedBpe(vocab=dict(model["vocab"]), merges=merges)


def build_vocab(base_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The trained vocabulary padded with unreachable filler entries up to ``base_size`` ids."""
    import numpy as np

    trained = _train()
    vocab = dict(sorted(trained.vocab.items(), key=lambda kv: kv[1]))
    if len(vocab) > base_size:
        raise ValueError(f"base vocabulary {base_size} is smaller than the trained {len(vocab)} tokens")
    pieces = [t for t in vocab if len(t) > 1] or list(vocab)
    rng = np.random.default_rng(20241224)  # fixed: the tokenizer does not depend on the weight seed
    next_id = len(vocab)
    while next_id < base_size:
        want = base_size - next_id
        a = rng.integers(0, len(pieces), size=want + 64)
        b = rng.integers(0, len(pieces), size=want + 64)
        for i, j in zip(a.tolist(), b.tolist()):
            token = pieces[i] + pieces[j]
            if token not in vocab:
                vocab[token] = next_id
                next_id += 1
                if next_id == base_size:
                    break
    return vocab, list(trained.merges)


#: Tokenizer kinds a synthetic checkpoint can carry: the small one trained here, or Qwen's real one.
KINDS = ("trained", "qwen")


def vocab_and_merges(kind: str, base_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The base vocabulary (ids 0..base_size-1) and merges of tokenizer ``kind``."""
    if kind == "trained":
        return build_vocab(base_size)
    if kind == "qwen":
        from . import tokenizer_qwen

        real = DEFAULT_FAMILY.base_vocab  # every Qwen family's: the specials start right after it
        if base_size != real:
            raise InputError(f"the real Qwen tokenizer has {real} base tokens, not {base_size}")
        return tokenizer_qwen.load()
    raise InputError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")


@functools.lru_cache(maxsize=4)
def build_tokenizer_json(
    base_size: int, kind: str, special_tokens: tuple[str, ...], pattern: str = QWEN2_PATTERN
) -> str:
    """tokenizer.json text: Qwen2's normaliser / decoder, the pre-tokeniser splitting on ``pattern`` (the
    family's regex; Qwen2's by default), the BPE, then ``special_tokens`` (a family's, in id order from
    ``base_size``).

    Built once per process, kind and family (the real vocabulary takes a few seconds).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab, merges = vocab_and_merges(kind, base_size)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    for k, t in enumerate(special_tokens):
        got = tok.token_to_id(t)
        if got != base_size + k:  # would break every id in config.json: fail loudly
            raise RuntimeError(f"special token {t} got id {got}, expected {base_size + k}")
    return tok.to_str(pretty=False)


def special_ids(special_tokens: tuple[str, ...], base_size: int) -> dict[str, int]:
    """The ids of ``special_tokens`` appended in order after a base vocabulary of ``base_size`` ids."""
    return {t: base_size + k for k, t in enumerate(special_tokens)}


def vocab_files(kind: str, base_size: int) -> dict[str, str]:
    """vocab.json and merges.txt (the slow tokenizer's files) of the ``kind`` BPE, as text."""
    vocab, merges = vocab_and_merges(kind, base_size)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }
