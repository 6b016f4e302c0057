"""The prompt, rendered from the model's own chat template: one question, after any earlier turns.

Why the model's own template: QVQ (and every Qwen2-VL derivative) was trained on one exact layout of
system/user/assistant turns and vision blocks; a hand-written prompt that differs by a newline costs
quality.  The template is Jinja code shipped inside the model folder, i.e. untrusted input, so it is
rendered in Jinja's immutable sandbox (no attribute access to ``__class__`` and friends, no mutation of
the objects passed in), with the two helpers Hugging Face templates rely on (``raise_exception`` and
``strftime_now``) and the same whitespace options transformers uses (``trim_blocks``, ``lstrip_blocks``).

Earlier turns of a conversation (:class:`qvq_local.conversation.Turn`, checked already) are rendered before
the question as the template renders them: user turns with their vision blocks, assistant turns as the
text given (the caller passes only their answers).

Models that ship no template get their family's fallback template
(:attr:`~qvq_local.families.base.Family.fallback_chat_template`), which renders one turn exactly as the
family's published template does.  What the prompt must look like (the image block, the control tokens a
question may not contain, the default system prompt) is asked of the family: the model's where it is
known, the default family where none is at hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from qvq_local.conversation import ASSISTANT, Turn, image_count
from qvq_local.errors import InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY, Family


class _FamilySystemPrompt:
    """The default of ``build_prompt(system=...)``: the family's own system prompt."""

    def __repr__(self) -> str:
        return "FAMILY_SYSTEM_PROMPT"


#: ``build_prompt``'s default system prompt: the family's (QVQ's for the default family).
FAMILY_SYSTEM_PROMPT = _FamilySystemPrompt()

# Files that may carry a chat template, in the order they are tried (newest transformers layout first).
_TEMPLATE_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer_config.json",
    "processor_config.json",
)


class ChatTemplate(str):
    """A chat template string that remembers the file it came from, so errors can name that file."""

    source: str | None = None

    def __new__(cls, text: str, source: str | Path | None = None):
        obj = super().__new__(cls, text)
        obj.source = str(source) if source is not None else None
        return obj


def _template_from_value(value: object) -> str | None:
    """A ``chat_template`` entry is a string, or a list of ``{"name", "template"}`` (pick "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        chosen = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
        return chosen if isinstance(chosen, str) else None
    return None


def find_chat_template(model_dir: str | Path) -> tuple[str, Path] | None:
    """Return ``(template, file it came from)`` for the first template found in ``model_dir``, or None."""
    folder = Path(model_dir)
    for name in _TEMPLATE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read the chat template: {exc}", path=path) from exc
        if name.endswith(".jinja"):
            if text.strip():
                return text, path
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"not valid JSON ({exc.msg} at line {exc.lineno})", path=path) from exc
        template = _template_from_value(data.get("chat_template")) if isinstance(data, dict) else None
        if template:
            return template, path
    return None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The model's own Jinja chat template, or None when the folder ships none.

    Looked up in ``chat_template.jinja``, ``chat_template.json``, ``tokenizer_config.json`` and
    ``processor_config.json``, in that order.  The result is a ``str`` that also carries ``.source``
    (the file), which :func:`build_prompt` names in its errors.  Callers pass None on to
    :func:`build_prompt`, which then uses the family's fallback template.
    """
    found = find_chat_template(model_dir)
    return ChatTemplate(found[0], found[1]) if found else None


def _user_content(
    text: str, n_images: int, *, videos: int = 0, frame_labels: Sequence[str] | None = None
) -> list[dict]:
    """A user turn's parts: its images (each after its label where a clip's frames go in as images),
    its clips, then its text."""
    content: list[dict] = []
    for i in range(n_images):
        if frame_labels:
            content.append({"type": "text", "text": frame_labels[i]})
        content.append({"type": "image"})
    content += [{"type": "video"} for _ in range(videos)]
    if text:
        content.append({"type": "text", "text": text})
    return content


def build_messages(
    question: str,
    n_images: int,
    system: str | None,
    history: Sequence[Turn] = (),
    *,
    videos: int = 0,
    frame_labels: Sequence[str] | None = None,
) -> list[dict]:
    """The conversation in Hugging Face's multimodal message form: the system turn, the earlier turns
    (assistant replies as plain strings, as the templates expect them), then the question: its images,
    then ``videos`` clips, then its text.  ``frame_labels``: a clip given as images, one label (its time)
    written before each of the question's ``n_images`` images."""
    messages: list[dict] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in history:
        if turn.role == ASSISTANT:
            messages.append({"role": ASSISTANT, "content": turn.text})
        else:
            messages.append({"role": turn.role, "content": _user_content(turn.text, len(turn.images))})
    content = _user_content(question, n_images, videos=videos, frame_labels=frame_labels)
    messages.append({"role": "user", "content": content})
    return messages


def _check_user_text(text: str, what: str, family: Family) -> None:
    """Refuse a control token in user text: the tokenizer would parse it as a special, so a literal image
    pad would desynchronise the image count and an end-of-turn token would close the user turn early."""
    for token in family.special_tokens:
        if token in text:
            raise InputError(f"the {what} contains the model's control token {token}; remove it")


def _sandbox():
    """A fresh immutable sandbox configured like transformers' chat-template renderer."""
    from datetime import datetime

    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: object) -> None:
        raise TemplateError(str(message))

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, **_: object) -> str:
        # Unlike Jinja's built-in filter this does not HTML-escape, matching transformers.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render_chat_template(
    chat_template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    source: str | Path | None = None,
    variables: Mapping[str, object] | None = None,
) -> str:
    """Render ``chat_template`` in the sandbox; any template failure becomes a ModelError naming ``source``."""
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    where = source
    env = _sandbox()
    context = {"bos_token": "", "eos_token": "", **(variables or {})}
    try:
        template = env.from_string(chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except SecurityError as exc:
        raise ModelError(
            f"the chat template tried an unsafe operation and was stopped: {exc}", path=where
        ) from exc
    except TemplateError as exc:
        raise ModelError(f"the chat template is broken: {exc}", path=where) from exc
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        raise ModelError(f"the chat template failed to render: {exc!r}", path=where) from exc


def build_prompt(
    chat_template: str | None,
    question: str,
    n_images: int,
    system: str | None | _FamilySystemPrompt = FAMILY_SYSTEM_PROMPT,
    *,
    family: Family | None = None,
    source: str | Path | None = None,
    variables: Mapping[str, object] | None = None,
    history: Sequence[Turn] = (),
    videos: int = 0,
    frame_labels: list[str] | None = None,
) -> str:
    """Render the prompt for ``question`` about ``n_images`` images (and ``videos`` clips), after the
    turns of ``history``.

    ``chat_template`` is the model's own template (see :func:`load_chat_template`); None selects the
    family's fallback template.  ``system`` defaults to the family's system prompt (QVQ's for the
    default family; none for a family without one); None leaves the system turn to the template's own
    default.  ``family`` is the model's (None: the default family).  ``source`` names the template's file
    in error messages (default: the template's own ``.source``); ``variables`` adds template variables
    such as ``bos_token``.  ``history``: earlier turns (:func:`qvq_local.conversation.check_history`'s),
    each user turn with its images' vision blocks before its text.  The result ends with the assistant
    turn's opening and holds one vision block per image, the history's first (the family's image block);
    a template that renders a different number of image blocks raises ModelError.  ``videos``: clips after
    the question's images, one video block each (the family's); ``frame_labels``: a clip as images, each
    image's time written before it (one label per image of the question).
    """
    family = family or DEFAULT_FAMILY
    if system is FAMILY_SYSTEM_PROMPT:
        system = family.system_prompt or None  # a family without one (Qwen3-VL) gets no system turn
    if n_images < 0:
        raise ValueError("n_images must be >= 0")
    _check_user_text(question, "question", family)
    if system is not None:
        _check_user_text(system, "system prompt", family)
    for i, turn in enumerate(history):
        _check_user_text(turn.text, f"{turn.role} turn history[{i}]", family)
    if chat_template is None:
        chat_template, source = family.fallback_chat_template, f"built-in {family.name} template"
    elif source is None:
        source = getattr(chat_template, "source", None)
    if frame_labels is not None and len(frame_labels) != n_images:
        raise ValueError(f"{len(frame_labels)} frame labels for {n_images} images")
    text = render_chat_template(
        chat_template,
        build_messages(question, n_images, system, history, videos=videos, frame_labels=frame_labels),
        add_generation_prompt=True,
        source=source,
        variables=variables,
    )
    rendered_images = text.count(family.image_pad)
    all_images = n_images + image_count(history)
    if rendered_images != all_images:
        raise ModelError(
            f"the chat template rendered {rendered_images} image block(s) for {all_images} image(s);"
            f" it is not a {family.name} style template",
            path=source,
        )
    rendered_videos = text.count(family.video_pad)
    if rendered_videos != videos:
        raise ModelError(
            f"the chat template rendered {rendered_videos} video block(s) for {videos} clip(s);"
            f" it is not a {family.name} style template",
            path=source,
        )
    return text
