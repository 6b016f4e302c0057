"""``qvq batch``: one question (or one per row) over many images, one model load, one JSONL row per item.

Why a command and not a shell loop: a loop reloads the model for every image (minutes for a 40 GB model),
and pays each repeated image's encode again.  Here the model is loaded once, the prefix cache keeps each
image's encoded prefix (in memory for the run, and on disk as ``qvq ask`` keeps it), and every answer is
written the moment it is known.

Input (:func:`read_items`): a folder (its image files, by suffix, sorted), a glob (``'scans/*.png'``), or a
list of rows: JSONL (one object a line: ``image`` or ``images``, ``question``, optional ``id``) or CSV (a
header with ``image`` or ``images`` -- several separated by ``;`` -- ``question``, optional ``id``).  Image
paths in a list are relative to the list's folder.  A row without a question takes ``--question``.

Output (:class:`Output`): one JSON object a line, appended, flushed and fsynced per item, so a crash, a
reboot or Ctrl-C loses at most the item in flight, and the file is valid JSONL at every moment but the
write of one line (a torn last line is dropped, and said so, when the file is opened again).  Each row
holds the item (``key``, ``index``, ``id``, ``images``, ``question``), the answer (``thought``,
``answer``, ``boxed``, ``stop_reason``, ``tokens``, ``timings``, ``image_info``, ``settings`` with the
prefix cache's reuse and the detail level), the model, and ``error`` (one line, or null).

Resume: a rerun with the same output skips every item whose ``key`` is in the file already.  The key is a
sha256 of the item's images (as written in the input), its question and the how-many-th such pair it is,
so inserting, removing or reordering input rows does not shift answers onto other items, and a list that
asks the same question of the same image twice gets two answers.  ``retry_errors`` takes the error rows
out (the file is rewritten atomically without them) and does those items again.

One bad item never ends the run: an image that is missing, corrupt, not an image or too large, or a
prompt that does not fit the context, is that item's error row.  Other failures (a server that went away)
end the run once :data:`MAX_CONSECUTIVE_FAILURES` items in a row hit one; what was written stays.

This module is the run (plan, resume, loop, rows, summary); how the model is loaded and the question's
settings are built is the caller's (``qvq batch`` uses ``qvq ask``'s wiring), handed in as a loader and an
:class:`~qvq_local.settings.AskSettings`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from qvq_local import atomic
from qvq_local.errors import ContextOverflow, InputError, QvqError

#: File suffixes a folder's images are recognised by (other files in it are left out, and counted).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
#: Suffixes read as a list of rows.
LIST_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
#: Items in a row that fail with an error not about the item itself (a server down, a backend failure)
#: before the run stops (each is still an error row).
MAX_CONSECUTIVE_FAILURES = 3
#: The separator of several images in one CSV cell.
CSV_IMAGE_SEPARATOR = ";"

EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------ the items


@dataclass(frozen=True)
class Item:
    """One question about one or more images.  ``images``: as the input names them (a list's paths as
    written in it, a folder's files under the folder as given); ``paths``: where they are; ``where``: the
    input line for messages (``jobs.jsonl:12``)."""

    index: int
    images: tuple[str, ...]
    question: str
    key: str
    paths: tuple[str, ...]
    id: str | None = None
    where: str = ""


@dataclass
class Plan:
    """What a run is asked to do: the items, and what the input left out (files that are not images)."""

    items: list[Item]
    source: str
    kind: str  # folder | glob | jsonl | csv | image
    left_out: list[str] = field(default_factory=list)


def item_key(images: Iterable[str], question: str, occurrence: int) -> str:
    """The key a row is found by on resume: the images as written, the question, and which repeat of that
    pair it is (0 for the first)."""
    payload = json.dumps([list(images), question, occurrence], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _check_question(question: str | None, where: str) -> str:
    if question is None or not str(question).strip():
        raise InputError("no question: give one in the row or a default with --question", path=where or None)
    if not isinstance(question, str):
        raise InputError(f"the question must be text, got {type(question).__name__}", path=where)
    return question


def read_items(source: str | os.PathLike, question: str | None = None) -> Plan:
    """The items of a run: ``source`` is a folder, a glob, a JSONL or CSV list, or one image file.

    ``question``: the question for folder and glob input, and for list rows without their own.  Raises
    InputError (one line naming the file and line) for an input that cannot be read; a listed image
    that is missing or bad is not checked here (it becomes that item's error row).
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        left_out = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise InputError("no image files in this folder (by suffix: .png, .jpg, ...)", path=path)
        q = _check_question(question, "")
        # keyed by the names in the folder: the same folder under another spelling or place resumes
        rows = [((p.name,), (str(p),), (str(p),), q, None, str(p)) for p in images]
        return Plan(_number(rows), str(path), "folder", left_out)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        kind = LIST_SUFFIXES[path.suffix.lower()]
        rows = _read_jsonl(path, question) if kind == "jsonl" else _read_csv(path, question)
        if not rows:
            raise InputError("no rows in this list", path=path)
        return Plan(_number(rows), str(path), kind)
    if path.is_file():  # one image: a batch of one
        q = _check_question(question, "")
        return Plan(_number([((text,), (text,), (str(path),), q, None, text)]), text, "image")
    if _is_glob(text):
        matches = sorted(m for m in glob.glob(os.path.expanduser(text), recursive=True) if Path(m).is_file())
        if not matches:
            raise InputError("no files match this pattern", path=text)
        q = _check_question(question, "")
        return Plan(_number([((m,), (m,), (m,), q, None, m) for m in matches]), text, "glob")
    if path.suffix.lower() in LIST_SUFFIXES or path.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError("no such file", path=path)
    raise InputError("no such folder, file or pattern", path=path)


def _number(rows: list[tuple]) -> list[Item]:
    """Items with their index and key (the repeat count of each images+question pair in the key).

    Each row: (the images as the key names them, as shown, their paths, question, id, input line)."""
    seen: Counter = Counter()
    items = []
    for index, (keyed, images, paths, question, ident, where) in enumerate(rows):
        pair = (tuple(keyed), question)
        items.append(
            Item(
                index=index,
                images=tuple(images),
                question=question,
                key=item_key(keyed, question, seen[pair]),
                paths=tuple(paths),
                id=ident,
                where=where,
            )
        )
        seen[pair] += 1
    return items


def _row_images(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError("image(s) must be a path or a list of paths", path=where)
    return [v.strip() for v in value]


def _resolve(base: Path, image: str) -> str:
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else base / p)


def _read_jsonl(path: Path, question: str | None) -> list[tuple]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"cannot read the list ({getattr(err, 'strerror', None) or err})", path=path
        ) from None
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON ({err.msg})", path=where) from None
        if not isinstance(obj, dict):
            raise InputError(
                'each line must be a JSON object such as {"image": "a.png", "question": "..."}', path=where
            )
        if ("image" in obj) == ("images" in obj):
            raise InputError('give either "image" or "images"', path=where)
        images = _row_images(obj.get("image", obj.get("images")), where)
        q = _check_question(obj.get("question", question), where)
        ident = obj.get("id")
        ident = None if ident is None else str(ident)
        rows.append((images, images, [_resolve(path.parent, i) for i in images], q, ident, where))
    return rows


def _read_csv(path: Path, question: str | None) -> list[tuple]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(
            f"cannot read the list ({getattr(err, 'strerror', None) or err})", path=path
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if ("image" in header) == ("images" in header):
            raise InputError('the header must have an "image" or an "images" column', path=f"{path}:1")
        column = "image" if "image" in header else "images"
        rows = []
        for record in reader:
            where = f"{path}:{reader.line_num}"
            cell = (record.get(column) or "").strip()
            if not cell and not any((v or "").strip() for k, v in record.items() if k):
                continue  # a blank line
            images = [p.strip() for p in cell.split(CSV_IMAGE_SEPARATOR) if p.strip()]
            if not images:
                raise InputError(f'no image in the "{column}" column', path=where)
            q = (record.get("question") or "").strip() or question
            q = _check_question(q, where)
            ident = (record.get("id") or "").strip() or None
            rows.append((images, images, [_resolve(path.parent, i) for i in images], q, ident, where))
    except csv.Error as err:
        raise InputError(f"not valid CSV ({err})", path=path) from None
    return rows


# ------------------------------------------------------------------------------------------ the output


class Output:
    """The JSONL output: rows already there (by key), and appending one row at a time, durably.

    Opening it reads what an earlier run wrote: a torn last line (the item in flight when the process
    died) is dropped; any other line that is not a row of ``qvq batch`` is an InputError (nothing is
    overwritten that this command did not write).  ``retry_errors`` drops the error rows too.  When a
    line is dropped, the file is rewritten atomically without it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        retry_errors: bool = False,
        notice: Callable[[str], None] = lambda line: None,
    ):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        self._fh: IO[str] | None = None
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError("the folder for the output does not exist", path=folder)
        if self.path.is_dir():
            raise InputError("the output must be a file, this is a folder", path=self.path)
        if self.path.exists():
            self._read(retry_errors, notice)

    def _read(self, retry_errors: bool, notice: Callable[[str], None]) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise InputError(f"cannot read the output ({err.strerror or err})", path=self.path) from None
        lines = data.split(b"\n")
        torn = lines.pop() if lines else b""  # text after the last newline: a line the writer never ended
        keep: list[bytes] = []
        dropped_errors = 0
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                raise InputError(
                    f"line {number} is not a row of qvq batch; give another output file",
                    path=self.path,
                )
            if retry_errors and row.get("error"):
                dropped_errors += 1
                continue
            if row["key"] in self.rows:
                continue  # written twice (two runs at once): the first one counts
            self.rows[row["key"]] = row
            keep.append(raw)
        if torn.strip():
            notice(f"{self.path}: dropped an unfinished last line (the item in flight when a run stopped)")
        if dropped_errors:
            notice(f"{self.path}: {dropped_errors} error row(s) taken out to be tried again")
        if torn.strip() or dropped_errors:
            atomic.write_text(self.path, "".join(line.decode("utf-8") + "\n" for line in keep))

    def done(self, item: Item) -> bool:
        return item.key in self.rows

    def append(self, row: dict) -> None:
        """Write one row and make it durable (flush and fsync) before returning."""
        if self._fh is None:
            created = not self.path.exists()
            self._fh = open(self.path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
            if created:
                _fsync_folder(self.path.parent)
        line = json.dumps(row, ensure_ascii=False) + "\n"
        self._fh.write(line)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows[row["key"]] = row

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _fsync_folder(folder: Path) -> None:
    """Make a new file's name durable too (its folder's entry), where the platform allows."""
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ rows


def _base_row(item: Item) -> dict:
    row: dict[str, Any] = {"key": item.key, "index": item.index}
    if item.id is not None:
        row["id"] = item.id
    row.update(images=list(item.images), question=item.question)
    return row


def answer_row(item: Item, result: Any) -> dict:
    """The row of an answered item (``result``: the question's :class:`qvq_local.events.Result`)."""
    row = _base_row(item)
    row.update(
        thought=result.thought,
        answer=result.answer,
        boxed=result.boxed,
        stop_reason=result.stop_reason,
        tokens={
            "prompt": result.prompt_tokens,
            "thought": result.thought_tokens,
            "answer": result.answer_tokens,
        },
        timings=asdict(result.timings),
        image_info=[asdict(info) for info in result.images],
        settings=result.settings,
        model=result.model,
        backend=result.backend,
        quantization=result.quantization,
    )
    if result.chains:  # --samples N: every chain, and the vote that chose the answer above
        row["vote"] = result.vote
        row["chains"] = [
            {
                "thought": c.thought,
                "answer": c.answer,
                "boxed": c.boxed,
                "stop_reason": c.stop_reason,
                "tokens": {"thought": c.thought_tokens, "answer": c.answer_tokens},
            }
            for c in result.chains
        ]
    row["error"] = None
    row["finished_at"] = _now()
    return row


def error_row(item: Item, error: str) -> dict:
    """The row of an item that could not be answered: the error's one line, no answer."""
    row = _base_row(item)
    row.update(
        thought=None,
        answer=None,
        boxed=None,
        stop_reason="error",
        tokens={"prompt": 0, "thought": 0, "answer": 0},
        timings=None,
        image_info=[],
        settings=None,
        error=error,
        finished_at=_now(),
    )
    return row


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Summary:
    """What a run did (this run's items; ``skipped``: found in the output already)."""

    total: int = 0
    skipped: int = 0
    answered: int = 0
    errors: int = 0
    interrupted: bool = False
    stopped: str | None = None  # why the run stopped early (consecutive failures)
    prompt_tokens: int = 0
    thought_tokens: int = 0
    answer_tokens: int = 0
    seconds: float = 0.0
    load_s: float = 0.0
    loads: int = 0
    prefix_reuse: Counter = field(default_factory=Counter)

    @property
    def done(self) -> int:
        return self.answered + self.errors

    def see(self, row: dict) -> None:
        if row.get("error"):
            self.errors += 1
            return
        self.answered += 1
        tokens = row.get("tokens") or {}
        self.prompt_tokens += int(tokens.get("prompt") or 0)
        self.thought_tokens += int(tokens.get("thought") or 0)
        self.answer_tokens += int(tokens.get("answer") or 0)
        source = ((row.get("settings") or {}).get("prefix_cache") or {}).get("source")
        if source:
            self.prefix_reuse[source] += 1


class Progress:
    """Progress on stderr: a Rich bar with the ETA on a terminal, else one plain line per item.

    The bar starts with the first item (after the model loaded, whose own spinner comes first)."""

    def __init__(self, total: int, skipped: int, stream: IO[str] | None = None, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.total = total
        self.count = 0
        self.live = self.stream.isatty() if live is None else live
        self._bar: Any = None
        self._task: Any = None
        if skipped:
            self.line(f"{skipped} item(s) already in the output: skipped")

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]batch[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("·"),
            TimeElapsedColumn(),
            TextColumn("· ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.description}", style="dim"),
            console=Console(file=self.stream),
        )
        self._task = self._bar.add_task("", total=self.total)
        self._bar.start()

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def starting(self, item: Item) -> None:
        if self.live and self._bar is None and self.total:
            self._start()
        if self._bar is not None:
            self._bar.update(self._task, description=_short(", ".join(item.images), 40))

    def finished(self, row: dict) -> None:
        self.count += 1
        name = ", ".join(row["images"])
        if row.get("error"):
            text = f"error: {row['error']}"
            if any(row["error"].startswith(image + ":") for image in row["images"]):
                name = ""  # an image's error names the image already
        else:
            shown = row.get("boxed") or " ".join((row.get("answer") or "").split())
            seconds = (row.get("timings") or {}).get("total_s") or 0.0
            text = f"{_short(shown, 60)!r} ({row['stop_reason']}, {seconds:.1f} s)"
        shown = f"{name}: {text}" if name else text
        if self._bar is not None:
            if row.get("error"):
                self._bar.console.print(shown, style="yellow", markup=False, highlight=False)
            self._bar.advance(self._task)
        else:
            self.line(f"[{self.count}/{self.total}] {shown}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run(
    plan: Plan,
    output: Output,
    load: Callable[[], Any],
    settings: Any,
    *,
    progress: Progress | None = None,
    stop_requested: Callable[[], bool] | None = None,
    notice: Callable[[str], None] = lambda line: None,
) -> Summary:
    """Answer every item of ``plan`` not in ``output`` yet, with one model from ``load()``.

    ``settings``: the question's :class:`~qvq_local.settings.AskSettings`, the same for every item.  Each
    item is read (its images checked) at its turn; an InputError there or a prompt that does not fit is
    its error row.  Ctrl-C (``KeyboardInterrupt``, or ``stop_requested()`` turning true) stops after
    closing the model: the item in flight is not written, ``Summary.interrupted`` is set.  The model is
    loaded only when there is something to do, and closed at the end.
    """
    from qvq_local.driver import drive
    from qvq_local.images import read_images

    todo = [item for item in plan.items if not output.done(item)]
    summary = Summary(total=len(plan.items), skipped=len(plan.items) - len(todo))
    t0 = time.perf_counter()
    if not todo:
        return summary
    bar = progress or Progress(len(todo), summary.skipped, live=False)
    model = None
    failures = 0
    try:
        model = load()
        summary.loads += 1
        summary.load_s = float(getattr(model, "load_s", 0.0) or 0.0)
        _check_model(output, model, notice)
        for item in todo:
            if stop_requested is not None and stop_requested():
                raise KeyboardInterrupt
            bar.starting(item)
            try:
                sources = read_images(list(item.paths))
                result = drive(
                    model.stream_settings(sources, item.question, settings), stop_requested=stop_requested
                )
                row = answer_row(item, result)
                failures = 0
            except (InputError, ContextOverflow) as err:  # the item's own problem: its row, and go on
                row = error_row(item, _relabel(str(err), item))
                failures = 0
            except QvqError as err:
                row = error_row(item, str(err))
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    summary.stopped = (
                        f"{failures} items in a row failed ({err}); the run stopped, rerun it to resume"
                    )
            output.append(row)
            summary.see(row)
            bar.finished(row)
            if summary.stopped:
                break
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        if model is not None:
            model.close()
        output.close()
        summary.seconds = time.perf_counter() - t0
    return summary


def _relabel(message: str, item: Item) -> str:
    """An image error names the file as the run found it; show it as the input wrote it."""
    for written, path in zip(item.images, item.paths):
        if written != path and message.startswith(path + ":"):
            return written + message[len(path) :]
    return message


def _check_model(output: Output, model: Any, notice: Callable[[str], None]) -> None:
    """One line when the output holds answers of another model (a resumed run with other settings)."""
    others = sorted(
        {r.get("model") for r in output.rows.values() if r.get("model") and r.get("model") != model.name}
    )
    if others:
        notice(
            f"{output.path} holds answers from {', '.join(others)}; this run answers with {model.name}"
            " (rows say which model answered)"
        )


# ------------------------------------------------------------------------------------------ summaries


#: The CSV summary's columns, in order.
CSV_COLUMNS = (
    "index",
    "id",
    "images",
    "question",
    "answer",
    "boxed",
    "stop_reason",
    "error",
    "prompt_tokens",
    "thought_tokens",
    "answer_tokens",
    "total_s",
    "model",
)


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: model output starting with ``=``, ``+``, ``-`` or ``@`` is
    not a formula (a leading ``'``), unless it is a plain number."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def csv_rows(rows: Iterable[dict]) -> list[list[Any]]:
    """One list per row, :data:`CSV_COLUMNS` in order, by input index."""
    out = []
    for row in sorted(rows, key=lambda r: (r.get("index", 0), r.get("key", ""))):
        tokens = row.get("tokens") or {}
        timings = row.get("timings") or {}
        values = [
            row.get("index"),
            row.get("id") or "",
            CSV_IMAGE_SEPARATOR.join(row.get("images") or []),
            row.get("question") or "",
            (row.get("answer") or "").strip(),
            row.get("boxed") or "",
            row.get("stop_reason") or "",
            row.get("error") or "",
            tokens.get("prompt", 0),
            tokens.get("thought", 0),
            tokens.get("answer", 0),
            round(float(timings.get("total_s") or 0.0), 3),
            row.get("model") or "",
        ]
        out.append([_cell(v) for v in values])
    return out


def write_csv(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """The CSV summary of ``rows`` (every row of the output, earlier runs' too), written atomically, in
    UTF-8 with a byte-order mark so spreadsheets read it as UTF-8."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError("the folder for --csv does not exist", path=folder)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(rows))
    return atomic.write_text(path, buf.getvalue(), encoding="utf-8-sig")


def summary_table(summary: Summary, output: Output) -> Any:
    """A Rich table of the run: answers, errors, skipped, tokens, time, prefix reuse."""
    from rich.table import Table

    table = Table(title=None, show_edge=False, header_style="bold", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    state = "interrupted" if summary.interrupted else "stopped" if summary.stopped else "done"
    table.add_row("run", f"{state}: {summary.done} of {summary.total - summary.skipped} item(s) this run")
    table.add_row("answers", str(summary.answered))
    table.add_row("errors", str(summary.errors))
    if summary.skipped:
        table.add_row("skipped", f"{summary.skipped} (answered in an earlier run)")
    table.add_row(
        "tokens",
        f"{summary.prompt_tokens:,} prompt · {summary.thought_tokens:,} thought · {summary.answer_tokens:,} answer",
    )
    per = f", {summary.seconds / summary.done:.1f} s per item" if summary.done else ""
    load = f" (model load {summary.load_s:.1f} s, {summary.loads}x)" if summary.loads else ""
    table.add_row("time", f"{summary.seconds:.1f} s{per}{load}")
    if summary.prefix_reuse:
        parts = ", ".join(f"{n} {source}" for source, n in sorted(summary.prefix_reuse.items()))
        table.add_row("image prefix", parts)
    table.add_row("output", f"{output.path} ({len(output.rows)} row(s))")
    return table


__all__ = [
    "CSV_COLUMNS",
    "IMAGE_SUFFIXES",
    "Item",
    "Output",
    "Plan",
    "Progress",
    "Summary",
    "answer_row",
    "csv_rows",
    "error_row",
    "item_key",
    "read_items",
    "run",
    "summary_table",
    "write_csv",
]
