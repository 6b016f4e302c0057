"""``--save FILE``: a Markdown transcript of one question, written atomically.

Why Markdown: a transcript is read by people (and pasted into issues); it holds the question, the image
names, the model and settings, the whole thought, the answer and the timings.  It is written once the
question finishes, and also when Ctrl-C stops it, then holding the partial thought and saying so.  It is
written to a temporary name in the same folder and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

from pathlib import Path

from qvq_local import atomic
from qvq_local.errors import InputError
from qvq_local.events import Event, Finished, Result
from qvq_local.render import forced_note

#: The settings a reader needs to reproduce a run (Result.settings holds more, e.g. loop thresholds).
SHOWN_SETTINGS = (
    "think_budget",
    "answer_budget",
    "grace_tokens",
    "think_limit",
    "max_pixels",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "n_ctx",
    "loop_detection",
    "answer_source",
    "system",
)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def render_transcript(result: Result, question: str) -> str:
    """The transcript's Markdown text."""
    lines = ["# QVQ transcript", ""]
    if result.stop_reason == "interrupted":
        lines += ["> **Interrupted**: the output below is partial.", ""]
    lines += ["## Question", "", question.strip(), ""]
    lines += ["## Images", ""]
    for info in result.images:
        w, h = info.size
        ow, oh = info.original_size
        resized = f" (resized from {ow}×{oh})" if (ow, oh) != (w, h) else ""
        tokens = f", {info.tokens} image tokens" if info.tokens else ""
        lines.append(f"- `{info.path}`: {w}×{h}{resized}{tokens}")
    if not result.images and result.clip is None:
        lines.append("- (none)")
    if result.clip is not None:
        clip = result.clip
        w, h = clip.frame_size
        sw, sh = clip.source_size
        how = "frames as images" if clip.mode == "frames" else "video"
        lines += [
            "",
            "## Clip",
            "",
            f"- `{clip.path}`: {clip.duration_s:.1f} s, {sw}×{sh}; {clip.frames} frames at {w}×{h} as {how},"
            f" {clip.tokens} tokens",
            "- sampled at (seconds): " + ", ".join(f"{t:.2f}" for t in clip.timestamps),
        ]
        lines += [f"- {note}" for note in clip.notes]
    lines += ["", "## Model and settings", ""]
    lines.append(f"- model: `{result.model}` ({result.backend}, {result.quantization})")
    for key in SHOWN_SETTINGS:
        if key not in result.settings:
            continue
        value = result.settings[key]
        if key == "system" and isinstance(value, str) and len(value) > 80:
            value = value[:77] + "..."
        lines.append(f"- {key}: {value}")
    lines.append(f"- stop reason: {result.stop_reason}")
    for forced in result.forced:
        lines.append(f"- {forced_note(forced)}")
    fence = _fence(result.thought)
    lines += [
        "",
        f"## Thought ({result.thought_tokens} tokens)",
        "",
        fence + "text",
        result.thought.rstrip("\n"),
        fence,
        "",
    ]
    lines += [f"## Answer ({result.answer_tokens} tokens)", "", result.answer.strip() or "(no answer)", ""]
    if result.boxed is not None:
        lines += [f"**Boxed answer:** `{result.boxed}`", ""]
    lines += ["## Timings", "", "| measure | value |", "|---|---|"]
    for key, value in vars(result.timings).items():
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += [f"| prompt tokens | {result.prompt_tokens} |", ""]
    return "\n".join(lines)


def write_transcript(path: str | Path, result: Result, question: str) -> Path:
    """Write the transcript to ``path`` atomically; raise InputError when the folder is not writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError("the folder for the transcript does not exist", path=folder)
    text = render_transcript(result, question)
    try:
        return atomic.write_text(path, text)
    except OSError as exc:
        raise InputError(f"cannot write the transcript: {exc.strerror or exc}", path=path) from exc


class TranscriptSink:
    """Listens to events and writes the transcript when ``Finished`` arrives (interrupted or not)."""

    def __init__(self, path: str | Path, question: str):
        self.path = Path(path)
        self.question = question
        self.written: Path | None = None

    def handle(self, event: Event) -> None:
        if isinstance(event, Finished):
            self.written = write_transcript(self.path, event.result, self.question)
