"""Renderers: they draw the events of one question and decide nothing.

Three ways out, chosen by the CLI:

* :class:`LiveRenderer` on a terminal: a Rich ``Live`` panel with a header (model, backend,
  quantisation, images, the image detail), the thought as a scrolling tail, a status line (thought tokens against the
  budget, tokens/s, elapsed), visible marks where the budget forced the answer or a loop was cut, then
  the answer as Markdown with the ``\\boxed{}`` answer highlighted and a one-line summary.  Events only
  touch data; Rich's refresh thread draws at most ``refresh_per_second`` times, so thousands of tokens
  never cost thousands of redraws.  The tail keeps a bounded buffer of already-wrapped lines, so a frame
  costs the same at token 10 and at token 10,000.
* :class:`PlainRenderer` when output is piped: thought to stderr, answer to stdout, no control codes.
* :class:`JsonRenderer` for ``--json``: one OpenAI-style ``chat.completion`` object at the end, with the
  thought in a separate ``reasoning_content`` field (the format: :mod:`qvq_local.openai_format`).

Text from the model is untrusted: control characters (ESC and friends) are removed before it reaches a
terminal, so a model cannot move the cursor or retitle the window.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any

from qvq_local.events import (
    ChainEvent,
    ClipInfo,
    Event,
    Finished,
    Forced,
    ImageInfo,
    Result,
    Speculating,
    Started,
    TextDelta,
)
from qvq_local.openai_format import completion_dict

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self

# C0 controls except tab and newline, DEL, and the C1 range (which holds the 8-bit CSI, 0x9b).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` without terminal control characters (tab and newline kept)."""
    return _CONTROL.sub("", text)


def highlight_boxed_markdown(answer: str) -> str:
    """Markdown for display: each ``\\boxed{X}`` (with the ``$$``/``$``/``\\[ \\]`` that hold only it) becomes
    **X**, X being the same value as ``Result.boxed`` (one parser: :mod:`qvq_local.boxed`)."""
    from qvq_local.boxed import find_boxed

    out, last = [], 0
    for box in find_boxed(answer):
        out.append(answer[last : box.outer_start])
        out.append(f"**{box.value}**")
        last = box.outer_end
    out.append(answer[last:])
    return "".join(out)


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 60:
        return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"
    return f"{seconds:.1f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"


def _image_line(images: list[ImageInfo]) -> str:
    parts = []
    for info in images:
        name = info.path.rsplit("/", 1)[-1] if info.path else "image"
        w, h = info.size
        size = f"{w}×{h}"
        if tuple(info.original_size) != tuple(info.size):
            ow, oh = info.original_size
            size = f"{ow}×{oh}→{w}×{h}"
        tokens = f", {info.tokens} tokens" if info.tokens else ""
        parts.append(f"{name} ({size}{tokens})")
    return ", ".join(parts)


def clip_line(clip: ClipInfo) -> str:
    """The clip as the header shows it: name, length, frames sampled, frame size, tokens, decode time."""
    name = clip.path.rsplit("/", 1)[-1] if clip.path else "clip"
    w, h = clip.frame_size
    how = f"video as {clip.frames} frames" if clip.mode == "frames" else f"{clip.frames} frames"
    kind = "image" if clip.mode == "frames" else "video"
    return (
        f"{name} ({_fmt_seconds(clip.duration_s)}, {how}, {w}×{h}, {clip.tokens} {kind} tokens, "
        f"decoded in {_fmt_seconds(clip.decode_s)})"
    )


def media_line(images: list[ImageInfo], clip: ClipInfo | None) -> str:
    """The header's media part: the clip when there is one, else the images."""
    return clip_line(clip) if clip is not None else _image_line(images)


def forced_note(forced: Forced) -> str:
    """One line saying why and where the controller forced the answer."""
    if forced.reason == "loop":
        return f"reasoning loop detected at {forced.at_token} thought tokens: cut, answer forced"
    return f"thinking budget reached at {forced.at_token} tokens: answer forced"


def summary_line(result: Result) -> str:
    """One line of counts and timings for the end of a run."""
    t = result.timings
    parts = [f"stop: {result.stop_reason}"]
    parts.append(f"{result.thought_tokens} thought + {result.answer_tokens} answer tokens")
    if t.prefill_s:
        enc = f" (image {_fmt_seconds(t.image_encode_s)})" if t.image_encode_s else ""
        parts.append(f"prefill {_fmt_seconds(t.prefill_s)}{enc}")
    if t.first_token_s:
        parts.append(f"first token {_fmt_seconds(t.first_token_s)}")
    if t.decode_tok_s:
        parts.append(f"{t.decode_tok_s:.1f} tok/s")
    if t.forced_step_s:
        parts.append(f"forced step {_fmt_seconds(t.forced_step_s)}")
    spec = speculation_note(result.settings.get("speculation"))
    if spec:
        parts.append(spec)
    if t.total_s:
        parts.append(f"total {_fmt_seconds(t.total_s)}")
    return " · ".join(parts)


def speculation_note(report: dict | None) -> str | None:
    """``speculation: 1.47 tokens/step, 38% of guesses right``, ``speculation off (...)``, or None when
    none was asked for (``report``: ``Result.settings["speculation"]``)."""
    if not report:
        return None
    if report.get("mode") == "off":
        return "speculation off"
    if report.get("drafted"):
        note = f"speculation: {report.get('tokens_per_step', 0):.2f} tokens/step"
        note += f", {100 * report.get('acceptance', 0):.0f}% of guesses right"
        if report.get("plan") == "auto" and not report.get("k"):
            note += " (auto: off at the end, no gain here)"
        return note
    return "speculation: auto kept it off (no gain on this machine)" if report.get("plan") == "auto" else None


def speculation_status(event: Speculating | None) -> str:
    """The status line's part: `` · 1.47 tok/step`` while guesses are checked, `` · spec off`` when auto
    turned it off, nothing without speculation."""
    if event is None:
        return ""
    if event.on and event.steps:
        return f" · {event.tokens_per_step:.2f} tok/step"
    return " · spec off" if not event.on else ""


class ChainState:
    """What the panel shows of one chain of ``--samples N``: counts, phase, its last words, its box."""

    def __init__(self) -> None:
        self.thought_tokens = 0
        self.answer_tokens = 0
        self.phase = "thinking"
        self.forced: str | None = None
        self.tail = ""
        self.boxed: str | None = None

    def see(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            if event.phase == "thought":
                self.thought_tokens += event.tokens
            else:
                self.answer_tokens += event.tokens
                self.phase = "answering"
            self.tail = (self.tail + clean(event.text))[-200:]
        elif isinstance(event, Forced):
            self.forced = event.reason
            self.phase = "answering"
        elif isinstance(event, Finished):
            self.phase = event.result.stop_reason
            self.boxed = event.result.boxed
            self.thought_tokens = event.result.thought_tokens
            self.answer_tokens = event.result.answer_tokens


def chain_line(index: int, state: ChainState, *, tail: bool = True) -> str:
    """One compact line per chain: ``#2 answering 812+40 tok · forced (budget) · boxed 5 · …last words``."""
    parts = [f"#{index + 1} {state.phase}", f"{state.thought_tokens}+{state.answer_tokens} tok"]
    if state.forced:
        parts.append(f"forced ({state.forced})")
    if state.boxed is not None:
        parts.append(f"boxed {clean(state.boxed)}")
    elif tail and state.tail.strip():
        parts.append("…" + " ".join(state.tail.split())[-60:])
    return " · ".join(parts)


def vote_line(result: Result) -> str:
    """The vote of ``--samples N`` in one line: ``majority 5 (3 of 4 chains: 5 ×3, 7 ×1) · chain #2``."""
    vote = result.vote or {}
    counts = vote.get("counts") or {}
    n = len(result.chains)
    chain = vote.get("chain")
    which = f" · answer from chain #{chain + 1}" if isinstance(chain, int) else ""
    if not counts:
        return f"no chain of {n} gave a boxed answer{which} (the first to finish)"
    tally = ", ".join(f"{clean(v)} ×{c}" for v, c in counts.items())
    top = max(counts.values())
    return f"majority {clean(str(vote.get('answer')))} ({top} of {n} chains: {tally}){which}"


class Renderer:
    """Draws events.  Use as a context manager so a crash or Ctrl-C still restores the terminal."""

    def handle(self, event: Event) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop drawing (idempotent)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, events: Iterable[Event]) -> None:
        for event in events:
            self.handle(event)


class PlainRenderer(Renderer):
    """Plain text, for pipes and files: thought to ``err``, answer to ``out``, no control codes."""

    def __init__(
        self, out: IO[str] | None = None, err: IO[str] | None = None, *, hide_thinking: bool = False
    ):
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.hide_thinking = hide_thinking
        self._err_col0 = True  # is stderr's cursor at the start of a line
        self._answer_written = ""
        self.result: Result | None = None
        self.chains: dict[int, ChainState] = {}

    def _err(self, text: str) -> None:
        if text:
            self.err.write(text)
            self.err.flush()
            self._err_col0 = text.endswith("\n")

    def _err_line(self, line: str) -> None:
        if not self._err_col0:
            self._err("\n")
        self._err(line + "\n")

    def handle(self, event: Event) -> None:
        if isinstance(event, Started):
            if not self.hide_thinking:
                detail = f" · {event.detail}" if event.detail else ""
                self._err_line(
                    f"[{event.model} · {event.backend} · {event.quantization} · {media_line(event.images, event.clip)}"
                    f"{detail}]"
                )
            for note in event.clip.notes if event.clip is not None else ():
                self._err_line(f"note: {note}")
        elif isinstance(event, TextDelta):
            text = clean(event.text)
            if event.phase == "thought":
                if not self.hide_thinking:
                    self._err(text)
            else:
                if not self._answer_written and not self._err_col0:
                    self._err("\n")
                if text:
                    self.out.write(text)
                    self.out.flush()
                    self._answer_written += text
        elif isinstance(event, Forced):
            self._err_line(f"[{forced_note(event)}]")
        elif isinstance(event, ChainEvent):  # --samples N: one line per chain as it ends, no streams
            state = self.chains.setdefault(event.chain, ChainState())
            state.see(event.event)
            if isinstance(event.event, Finished) and not self.hide_thinking:
                self._err_line(f"[{chain_line(event.chain, state, tail=False)}]")
        elif isinstance(event, Finished):
            self.result = result = event.result
            if result.chains:
                self._err_line(f"[{vote_line(result)}]")
            answer = clean(result.answer)
            if answer and not self._answer_written:
                self.out.write(answer)  # a controller that does not stream its answer
                self._answer_written = answer
            if self._answer_written and not self._answer_written.endswith("\n"):
                self.out.write("\n")
            self.out.flush()
            if result.stop_reason == "interrupted":
                self._err_line("[interrupted: output is partial]")
            self._err_line(f"[{summary_line(result)}]")


class JsonRenderer(Renderer):
    """Prints one JSON object (:func:`qvq_local.openai_format.completion_dict`) when the question finishes."""

    def __init__(self, out: IO[str] | None = None, *, indent: int | None = None):
        self.out = out or sys.stdout
        self.indent = indent
        self.result: Result | None = None

    def handle(self, event: Event) -> None:
        if isinstance(event, Finished):
            self.result = event.result
            self.out.write(
                json.dumps(completion_dict(event.result), ensure_ascii=False, indent=self.indent) + "\n"
            )
            self.out.flush()


class _Tail:
    """The last lines of a growing text, wrapped once to a width, in a bounded buffer.

    ``add`` is amortised O(len(text)); ``view(n)`` is O(n).  Completed lines are wrapped when they
    complete; only the line still being written is wrapped at draw time, and it is flushed into the
    buffer once it grows past a few rows, so drawing never touches more than a few hundred characters.
    """

    def __init__(self, width: int, max_lines: int = 500, style: str = ""):
        self.width = max(10, width)
        self.style = style
        self.lines: deque[tuple[str, str]] = deque(maxlen=max_lines)
        self.current = ""
        self._wrapper = textwrap.TextWrapper(
            width=self.width,
            break_long_words=True,
            replace_whitespace=False,
            drop_whitespace=True,
            expand_tabs=True,
            tabsize=4,
        )

    def _wrap(self, line: str) -> list[str]:
        return self._wrapper.wrap(line) or [""]

    def _push(self, line: str) -> None:
        wrapped = self._wrap(line)
        if wrapped == [""] and self.lines and self.lines[-1][0] == "":
            return  # collapse runs of blank lines
        for piece in wrapped:
            self.lines.append((piece, self.style))

    def add(self, text: str) -> None:
        parts = text.split("\n")
        self.current += parts[0]
        for part in parts[1:]:
            self._push(self.current)
            self.current = part
        if len(self.current) > self.width * 4:
            wrapped = self._wrap(self.current)
            for piece in wrapped[:-1]:
                self.lines.append((piece, self.style))
            self.current = wrapped[-1]

    def mark(self, text: str, style: str) -> None:
        if self.current:
            self._push(self.current)
            self.current = ""
        for piece in self._wrap(text):
            self.lines.append((piece, style))

    def view(self, n: int) -> list[tuple[str, str]]:
        if n <= 0:
            return []
        current = [(piece, self.style) for piece in self._wrap(self.current)] if self.current else []
        need = max(0, n - len(current))
        start = max(0, len(self.lines) - need)
        head = [self.lines[i] for i in range(start, len(self.lines))]
        return (head + current)[-n:]

    def __bool__(self) -> bool:
        return bool(self.lines) or bool(self.current)


class LiveRenderer(Renderer):
    """The terminal panel.  ``console`` is a Rich Console on a terminal (stdout by default).

    ``model``/``backend``/``quantization`` fill the header before the ``Started`` event arrives (the
    prefill, with image encoding, can take a while on a big image).
    """

    def __init__(
        self,
        console=None,
        *,
        hide_thinking: bool = False,
        refresh_per_second: float = 8,
        model: str = "",
        backend: str = "",
        quantization: str = "",
        max_tail_lines: int = 30,
    ):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console()
        self.hide_thinking = hide_thinking
        self.max_tail_lines = max_tail_lines
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._decode_t0: float | None = None
        self._end: float | None = None
        self.model, self.backend, self.quantization = model, backend, quantization
        self.images: list[ImageInfo] = []
        self.clip: ClipInfo | None = None
        self.prompt_tokens = 0
        self.prefill_s = 0.0
        self.detail = ""  # how the images were bounded (Started.detail)
        self.think_budget: int | None = None
        self.answer_budget: int | None = None
        self.thought_tokens = 0
        self.answer_tokens = 0
        self.phase = "prefill"
        self.forced: list[Forced] = []
        self.speculating: Speculating | None = None  # the latest figures (--speculate)
        self.result: Result | None = None
        self.chains: dict[int, ChainState] = {}  # --samples N
        width = self.console.width - 4  # panel border and padding
        self.thought = _Tail(width, style="grey62")
        self.answer = _Tail(width, style="")
        self._closed = False
        self.live = Live(
            _Frame(self),
            console=self.console,
            refresh_per_second=refresh_per_second,
            auto_refresh=True,
            transient=False,
            vertical_overflow="crop",
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    # ---- events: only data changes here; the Live thread draws
    def handle(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, Started):
                self.model, self.backend, self.quantization = event.model, event.backend, event.quantization
                self.images = list(event.images)
                self.clip = event.clip
                self.prompt_tokens = event.prompt_tokens
                self.prefill_s = event.prefill_s
                self.detail = event.detail
                self.think_budget, self.answer_budget = event.think_budget, event.answer_budget
                self.phase = "thinking"
                self._decode_t0 = time.monotonic()
            elif isinstance(event, TextDelta):
                if event.phase == "thought":
                    self.thought_tokens += event.tokens
                    if not self.hide_thinking:
                        self.thought.add(clean(event.text))
                else:
                    self.phase = "answering"
                    self.answer_tokens += event.tokens
                    self.answer.add(clean(event.text))
            elif isinstance(event, Forced):
                self.forced.append(event)
                self.phase = "answering"
                style = "bold magenta" if event.reason == "loop" else "bold yellow"
                self.thought.mark(("⟳ " if event.reason == "loop" else "⏱ ") + forced_note(event), style)
            elif isinstance(event, ChainEvent):
                state = self.chains.setdefault(event.chain, ChainState())
                before = state.thought_tokens + state.answer_tokens
                state.see(event.event)
                if isinstance(event.event, TextDelta):
                    self.thought_tokens += state.thought_tokens + state.answer_tokens - before
                if self.phase == "prefill":
                    self.phase = "thinking"
            elif isinstance(event, Speculating):
                self.speculating = event
            elif isinstance(event, Finished):
                self.result = event.result
                self.phase = "interrupted" if event.result.stop_reason == "interrupted" else "done"
                self._end = time.monotonic()
        if isinstance(event, Finished):
            self._finish(event.result)

    def _finish(self, result: Result) -> None:
        from rich.markdown import Markdown
        from rich.panel import Panel
        from rich.text import Text

        self.close()
        answer = clean(result.answer).strip()
        if answer:
            self.console.print(
                Panel(
                    Markdown(highlight_boxed_markdown(answer)),
                    title="answer",
                    title_align="left",
                    border_style="green",
                )
            )
        elif result.stop_reason == "interrupted":
            self.console.print(Text("(interrupted before the answer)", style="yellow"))
        else:
            self.console.print(Text("(the model gave no answer)", style="yellow"))
        if result.boxed:
            self.console.print(
                Text.assemble(("boxed answer: ", "bold"), (f" {clean(result.boxed)} ", "bold black on green"))
            )
        if result.chains:
            for i, chain in enumerate(result.chains):
                state = self.chains.get(i) or ChainState()
                state.see(Finished(chain))
                self.console.print(Text(chain_line(i, state, tail=False), style="dim"))
            self.console.print(Text(vote_line(result), style="bold"))
        style = "yellow" if result.stop_reason == "interrupted" else "dim"
        self.console.print(Text(summary_line(result), style=style))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._end = self._end or time.monotonic()
        self.live.stop()

    # ---- drawing (called from Rich's refresh thread, under the lock)
    def _rows_for_tail(self, height: int) -> tuple[int, int]:
        reserved = 2 + 2 + 1  # header, thought panel border, status
        answer_rows = 0
        if self.answer:
            answer_rows = min(8, max(2, (height - reserved) // 3))
            reserved += 2
        thought_rows = max(3, min(self.max_tail_lines, height - reserved - answer_rows - 1))
        return thought_rows, answer_rows

    def _renderables(self, height: int) -> list:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        now = self._end or time.monotonic()
        header = Text.assemble(
            ("qvq ", "bold cyan"),
            (self.model or "model", "bold"),
            (f" · {self.backend}" if self.backend else "", "cyan"),
            (f" · {self.quantization}" if self.quantization else "", "cyan"),
        )
        if self.images or self.clip is not None:
            details = f"{media_line(self.images, self.clip)} · prompt {self.prompt_tokens} tokens"
            if self.prefill_s:
                details += f" · prefill {_fmt_seconds(self.prefill_s)}"
            if self.detail:
                details += f" · {self.detail}"
        else:
            details = "encoding image(s) and reading the prompt…"
        parts: list = [header, Text(details, style="dim")]
        parts += [
            Text(f"note: {note}", style="dim yellow") for note in (self.clip.notes if self.clip else ())
        ]

        thought_rows, answer_rows = self._rows_for_tail(height)
        if self.phase == "prefill":
            body: Any = Spinner("dots", text=Text("prefill", style="dim"))
        elif self.chains:
            body = Text("\n").join(
                Text(
                    chain_line(i, self.chains[i], tail=not self.hide_thinking), no_wrap=True, overflow="crop"
                )
                for i in sorted(self.chains)
            )
        elif self.hide_thinking:
            body = Text(f"(thinking hidden: {self.thought_tokens} tokens)", style="dim")
            for forced in self.forced:
                body.append(
                    "\n" + forced_note(forced),
                    style="bold magenta" if forced.reason == "loop" else "bold yellow",
                )
        else:
            lines = self.thought.view(thought_rows)
            body = Text("\n").join(
                Text(line, style=style, no_wrap=True, overflow="crop") for line, style in lines
            )
        title = f"thinking · {len(self.chains)} chains" if self.chains else "thinking"
        parts.append(Panel(body, title=title, title_align="left", border_style="grey42"))
        if answer_rows and self.result is None:
            lines = self.answer.view(answer_rows)
            body = Text("\n").join(
                Text(line, style=style, no_wrap=True, overflow="crop") for line, style in lines
            )
            parts.append(Panel(body, title="answer", title_align="left", border_style="green"))

        status = Table.grid(padding=(0, 1))
        elapsed = now - self._t0
        decoded = self.thought_tokens + self.answer_tokens
        rate = decoded / (now - self._decode_t0) if self._decode_t0 and now > self._decode_t0 else 0.0
        phase_style = {
            "thinking": "bold cyan",
            "answering": "bold green",
            "done": "bold green",
            "interrupted": "bold yellow",
        }.get(self.phase, "bold")
        status.add_column(no_wrap=True, min_width=11)
        cells: list = [Text(self.phase, style=phase_style)]
        if self.think_budget:
            status.add_column(width=20, no_wrap=True)
            cells.append(
                ProgressBar(
                    total=self.think_budget, completed=min(self.thought_tokens, self.think_budget), width=20
                )
            )
            counts = f"{self.thought_tokens}/{self.think_budget} thought"
        else:
            counts = f"{self.thought_tokens} thought"
        if self.answer_tokens:
            counts += f" · {self.answer_tokens} answer"
        if self.forced:
            counts += f" · forced ({self.forced[-1].reason})"
        status.add_column(no_wrap=True, overflow="ellipsis")
        cells.append(
            Text(
                f"{counts} · {rate:.1f} tok/s{speculation_status(self.speculating)} · {_fmt_seconds(elapsed)}",
                style="dim",
                no_wrap=True,
                overflow="ellipsis",
            )
        )
        status.add_row(*cells)
        parts.append(status)
        return [Group(*parts)]


class _Frame:
    """What ``Live`` draws: a snapshot of the renderer's data taken under its lock."""

    def __init__(self, renderer: LiveRenderer):
        self.renderer = renderer

    def __rich_console__(self, console, options):
        height = options.height or options.max_height or console.height
        with self.renderer._lock:
            renderables = self.renderer._renderables(height)
        yield from renderables
