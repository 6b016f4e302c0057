"""A Qwen2-style tokenizer trained in-process, for synthetic checkpoints.

No hub is reachable, so the tokenizer files of a synthetic checkpoint are built here: a byte-level BPE
trained with ``tokenizers`` on a small built-in corpus, pre-tokenised with the Qwen2 regex, followed by
the Qwen special tokens in their original order.  The base vocabulary can be padded with filler entries so
that the special tokens land on the real Qwen ids (``<|endoftext|>`` = 151643 ...).  A filler is the
concatenation of two trained tokens that no merge produces: it never comes out of encoding, but it
decodes to word-like text, so a random model's output stays readable.

Writes the same files a real Qwen2-VL repository has: ``tokenizer.json``, ``vocab.json``, ``merges.txt``,
``tokenizer_config.json`` (with the chat template and ``added_tokens_decoder``) and ``chat_template.json``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from qvq_local.errors import InputError
from qvq_local.families.qwen2vl import BASE_VOCAB as QWEN_BASE_VOCAB
from qvq_local.families.qwen2vl import SPECIAL_TOKENS
from qvq_local.families.qwen2vl import SYSTEM_PROMPT as QVQ_SYSTEM_PROMPT

# The pre-tokeniser pattern of Qwen2's tokenizer.json.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Qwen2-VL's chat template (chat_template.json of Qwen2-VL-*-Instruct), with QVQ's default system prompt.
# Image parts render as <|vision_start|><|image_pad|><|vision_end|>; the processor expands the pad.
def chat_template(system_prompt: str = QVQ_SYSTEM_PROMPT) -> str:
    """The Qwen2-VL chat template with this default system prompt (Qwen2.5-VL ships the same template
    with "You are a helpful assistant.")."""
    return _TEMPLATE_HEAD + system_prompt + _TEMPLATE_TAIL


_TEMPLATE_HEAD = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n"
)
_TEMPLATE_TAIL = (
    "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATE = chat_template()

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

        if base_size != QWEN_BASE_VOCAB:
            raise InputError(f"the real Qwen tokenizer has {QWEN_BASE_VOCAB} base tokens, not {base_size}")
        return tokenizer_qwen.load()
    raise InputError(f"unknown tokenizer {kind!r}; choose one of {', '.join(KINDS)}")


@functools.lru_cache(maxsize=4)
def build_tokenizer_json(base_size: int, kind: str = "trained") -> str:
    """tokenizer.json text: Qwen2 normaliser / pre-tokeniser / decoder, the BPE, then the specials.

    Built once per process and kind (the real vocabulary takes a few seconds).
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
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for k, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != base_size + k:  # would break every id in config.json: fail loudly
            raise RuntimeError(f"special token {t} got id {got}, expected {base_size + k}")
    return tok.to_str(pretty=False)


def special_ids(base_size: int) -> dict[str, int]:
    return {t: base_size + k for k, t in enumerate(SPECIAL_TOKENS)}


def tokenizer_config(
    base_size: int,
    model_max_length: int,
    template: str = CHAT_TEMPLATE,
    processor_class: str = "Qwen2VLProcessor",
) -> dict:
    """tokenizer_config.json as Qwen2-VL ships it (eos <|im_end|>, pad <|endoftext|>, no bos)."""
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in special_ids(base_size).items()
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": processor_class,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def vocab_files(kind: str, base_size: int) -> dict[str, str]:
    """vocab.json and merges.txt (the slow tokenizer's files) of the ``kind`` BPE, as text."""
    vocab, merges = vocab_and_merges(kind, base_size)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    }


def write_tokenizer_files(
    folder: Path,
    base_size: int,
    model_max_length: int,
    kind: str = "trained",
    system_prompt: str = QVQ_SYSTEM_PROMPT,
    processor_class: str = "Qwen2VLProcessor",
) -> None:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json and chat_template.json (the
    template's default system prompt and the processor class are the family's)."""
    template = chat_template(system_prompt)
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(build_tokenizer_json(base_size, kind), encoding="utf-8")
    for name, text in vocab_files(kind, base_size).items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            tokenizer_config(base_size, model_max_length, template, processor_class),
            indent=2,
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
