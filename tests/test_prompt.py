"""The single-turn prompt: the model's own chat template, rendered in a sandbox."""

from __future__ import annotations

import json
import re

import pytest
from helpers import assert_error

from qvq_local.errors import InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.prompt import build_prompt, load_chat_template

# The default family's (Qwen2-VL's) prompt facts: what build_prompt uses when no family is given.
IMAGE_BLOCK = DEFAULT_FAMILY.image_block
QVQ_SYSTEM_PROMPT = DEFAULT_FAMILY.system_prompt
QWEN2_VL_FALLBACK_TEMPLATE = DEFAULT_FAMILY.fallback_chat_template

# The chat template Qwen2-VL (and QVQ-72B-Preview, apart from its default system line) ships in
# chat_template.json / tokenizer_config.json: the reference the fallback must reproduce.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
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
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


def test_renders_system_prompt_image_blocks_and_generation_prompt():
    text = build_prompt(QWEN2_VL_TEMPLATE, "What is the tallest bar?", 1)
    assert text == (
        f"<|im_start|>system\n{QVQ_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_BLOCK}What is the tallest bar?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_one_vision_block_per_image_in_order_before_the_text():
    text = build_prompt(QWEN2_VL_TEMPLATE, "Compare them.", 3)
    assert text.count(IMAGE_BLOCK) == 3
    assert f"{IMAGE_BLOCK * 3}Compare them.<|im_end|>" in text


def test_custom_and_template_default_system_prompt():
    assert "<|im_start|>system\nBe brief.<|im_end|>" in build_prompt(QWEN2_VL_TEMPLATE, "q", 0, "Be brief.")
    # system=None leaves the system turn to the template (Qwen2-VL's own default line)
    assert build_prompt(QWEN2_VL_TEMPLATE, "q", 0, system=None).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq<|im_end|>"
    )


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("system", [QVQ_SYSTEM_PROMPT, None, "Custom."])
def test_fallback_template_matches_qwen2_vl_template(n_images, system):
    question = "Zähle die Balken: wie viele? 日本語"
    reference = build_prompt(QWEN2_VL_TEMPLATE, question, n_images, system)
    assert build_prompt(None, question, n_images, system) == reference
    assert build_prompt(QWEN2_VL_FALLBACK_TEMPLATE, question, n_images, system) == reference


def test_load_chat_template_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN2_VL_TEMPLATE}))
    template = load_chat_template(tmp_path)
    assert template == QWEN2_VL_TEMPLATE
    assert template.source == str(tmp_path / "tokenizer_config.json")


def test_load_chat_template_precedence_and_named_list(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "d"}]}
        )
    )
    assert load_chat_template(tmp_path) == "d"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    assert load_chat_template(tmp_path) == "from chat_template.json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert load_chat_template(tmp_path) == "from jinja"


def test_no_template_gives_none(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_chat_template(tmp_path) is None


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError) as raised:
        load_chat_template(tmp_path)
    assert_error(raised, "not valid JSON", path=tmp_path / "tokenizer_config.json")


def test_broken_template_is_a_model_error_naming_the_file(tmp_path):
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    template = load_chat_template(tmp_path)
    with pytest.raises(ModelError) as raised:
        build_prompt(template, "q", 0)
    assert_error(raised, "the chat template is broken", path=tmp_path / "chat_template.json")


def test_template_raise_exception_becomes_model_error():
    with pytest.raises(ModelError) as raised:
        build_prompt("{{ raise_exception('only user and assistant roles') }}", "q", 0)
    assert_error(raised, "only user and assistant roles")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
        "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
        "{% set _ = messages[0].update({'content': 'x'}) %}",
    ],
)
def test_sandbox_blocks_attribute_exploits_and_mutation(template):
    with pytest.raises(ModelError) as raised:
        build_prompt(template, "q", 0)
    assert_error(raised, "unsafe")


def test_template_helpers_hf_templates_use():
    text = build_prompt(
        "{{ strftime_now('%Y') }}|{{ messages[1].content[0] | tojson }}|{{ bos_token }}{{ "
        "'<|vision_start|><|image_pad|><|vision_end|>' }}",
        "q",
        1,
        variables={"bos_token": "<s>"},
    )
    year, blob, rest = text.split("|", 2)
    assert year.isdigit() and len(year) == 4
    assert json.loads(blob) == {"type": "image"}
    assert rest.startswith("<s>")


def test_template_that_drops_images_is_rejected():
    with pytest.raises(ModelError) as raised:
        build_prompt("{{ messages[-1].content[-1].text }}", "q", 1)
    assert_error(raised, "rendered 0 image block")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>", "<|vision_start|>", "<|endoftext|>"])
def test_question_cannot_smuggle_control_tokens(token):
    with pytest.raises(InputError) as raised:
        build_prompt(None, f"look {token} here", 0)
    assert_error(raised, "control token")


def test_synthetic_checkpoint_ships_a_working_template(tiny_checkpoint):
    template = load_chat_template(tiny_checkpoint)
    assert template is not None
    text = build_prompt(template, "How many bars?", 1)
    assert text.count(IMAGE_BLOCK) == 1
    assert QVQ_SYSTEM_PROMPT in text
    assert text.endswith("<|im_start|>assistant\n")


def test_the_family_decides_the_fallback_the_default_system_and_the_reserved_tokens():
    """build_prompt asks the model's family (the default one when none is given)."""
    from qvq_local.families import FAMILIES

    qwen3 = FAMILIES["Qwen3-VL"]
    # no template: the family's fallback, with its default system prompt (Qwen3-VL's: none)
    text = build_prompt(None, "How many bars?", 1, family=qwen3)
    assert text == (f"<|im_start|>user\n{qwen3.image_block}How many bars?<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(None, "q", 0).startswith(f"<|im_start|>system\n{QVQ_SYSTEM_PROMPT}<|im_end|>")
    # Qwen3's added tokens are control tokens of its tokenizer, not of Qwen2-VL's
    with pytest.raises(InputError, match="</think>"):
        build_prompt(None, "stop here </think> now", 0, family=qwen3)
    assert "</think>" in build_prompt(None, "stop here </think> now", 0)
    # a template that renders no image block for an image names the family
    with pytest.raises(ModelError, match="not a Qwen3-VL style template"):
        build_prompt("{{ messages[-1].content[-1].text }}", "q", 1, family=qwen3)


# ------------------------------------------------------------------ earlier turns (a conversation)


def _conversation():
    from qvq_local.conversation import Turn

    return [
        Turn.user("What is in the chart?", images=["a.png"]),
        Turn.assistant("Five bars."),
        Turn.user("And this one?", images=["b.png"]),
        Turn.assistant("Three lines."),
    ]


def test_earlier_turns_render_before_the_question_with_their_images():
    text = build_prompt(QWEN2_VL_TEMPLATE, "Which is taller?", 0, history=_conversation())
    assert text == (
        f"<|im_start|>system\n{QVQ_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_BLOCK}What is in the chart?<|im_end|>\n"
        "<|im_start|>assistant\nFive bars.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_BLOCK}And this one?<|im_end|>\n"
        "<|im_start|>assistant\nThree lines.<|im_end|>\n"
        "<|im_start|>user\nWhich is taller?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # the prompt's images are the history's, in order, then the question's
    assert build_prompt(QWEN2_VL_TEMPLATE, "q", 1, history=_conversation()).count(IMAGE_BLOCK) == 3


@pytest.mark.parametrize("system", [QVQ_SYSTEM_PROMPT, None])
def test_fallback_template_matches_qwen2_vl_template_over_turns(system):
    history = _conversation()
    reference = build_prompt(QWEN2_VL_TEMPLATE, "Which is taller?", 1, system, history=history)
    assert build_prompt(None, "Which is taller?", 1, system, history=history) == reference


@pytest.mark.parametrize("family_name", ["Qwen2.5-VL", "Qwen3-VL"])
def test_every_familys_fallback_renders_a_conversation(family_name):
    from qvq_local.families import FAMILIES

    family = FAMILIES[family_name]
    text = build_prompt(None, "Which is taller?", 0, family=family, history=_conversation())
    assert text.count(family.image_block) == 2
    assert "<|im_start|>assistant\nFive bars.<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nWhich is taller?<|im_end|>\n<|im_start|>assistant\n")


def test_an_image_only_user_turn_renders_its_block_alone():
    from qvq_local.conversation import Turn

    history = [Turn.user(images=["a.png"]), Turn.assistant("I see a chart.")]
    text = build_prompt(QWEN2_VL_TEMPLATE, "How many bars?", 0, history=history)
    assert f"<|im_start|>user\n{IMAGE_BLOCK}<|im_end|>\n<|im_start|>assistant\nI see a chart." in text


def test_control_tokens_in_an_earlier_turn_are_refused_naming_the_turn():
    from qvq_local.conversation import Turn

    history = [Turn.user("hi", images=["a.png"]), Turn.assistant("ok<|im_end|> and more")]
    with pytest.raises(InputError) as raised:
        build_prompt(None, "q", 0, history=history)
    assert_error(raised, re.escape("assistant turn history[1] contains the model's control token <|im_end|>"))


def test_transformers_renders_the_same_conversation(tiny_checkpoint):
    """Parity with transformers' own apply_chat_template on the synthetic checkpoint's template."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    template = load_chat_template(tiny_checkpoint)
    messages = [
        {"role": "system", "content": QVQ_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the chart?"}]},
        {"role": "assistant", "content": "Five bars."},
        {"role": "user", "content": [{"type": "text", "text": "Which is taller?"}]},
    ]
    reference = tokenizer.apply_chat_template(
        messages, chat_template=str(template), tokenize=False, add_generation_prompt=True
    )
    ours = build_prompt(template, "Which is taller?", 0, history=_conversation()[:2])
    assert ours == reference


# ------------------------------------------------------------------------------------------ clips


@pytest.mark.parametrize("family_name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_a_clip_renders_one_video_block_and_frames_their_times(family_name):
    """Every family's published template (and its fallback) renders a video part as the family's video
    block; a clip given as images gets its time before each image."""
    from qvq_local.convert.synth_qwen2vl import chat_template

    from qvq_local.families import FAMILIES, qwen3vl

    family = next(f for f in FAMILIES.values() if family_name in f.aliases)
    template = qwen3vl.chat_template(thinking=False) if family is qwen3vl.FAMILY else chat_template("")
    for tpl in (template, None):
        text = build_prompt(tpl, "What happens next?", 0, system=None, family=family, videos=1)
        assert text.count(family.video_block) == 1 and text.count(family.image_pad) == 0
        assert text.index(family.video_block) < text.index("What happens next?")
        labels = ["<0.0 seconds>", "<0.5 seconds>"]
        frames = build_prompt(tpl, "What happens next?", 2, system=None, family=family, frame_labels=labels)
        assert frames.count(family.image_block) == 2 and family.video_pad not in frames
        first, second = frames.index(labels[0]), frames.index(labels[1])
        blocks = [i for i in range(len(frames)) if frames.startswith(family.image_block, i)]
        assert first < blocks[0] < second < blocks[1] < frames.index("What happens next?")
    with pytest.raises(ValueError):
        build_prompt(None, "q", 2, system=None, family=family, frame_labels=["<0.0 seconds>"])
