"""The wiring behind ``qvq batch``: ``qvq ask``'s options and model loading, :mod:`qvq_local.batch`'s run.

The question's settings and the model's load come from :mod:`qvq_local.ask_cmd` (the same options, the
same ``qvq config`` defaults, the same messages), so a batch answers each item as ``qvq ask`` would answer
it.  Order, for a good experience: the input list and the output file are read and checked before the
model loads (a typo in a list should not cost a minute of loading), and nothing is loaded when every item
is answered already.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qvq_local.ask_cmd import (
    EXIT_INTERRUPTED,
    AskRequest,
    SigintFlag,
    build_settings,
    load_model,
    load_request,
)
from qvq_local.errors import InputError

#: Exit code when the run stopped because items kept failing for a reason not their own (a server down).
EXIT_STOPPED = 1


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_batch(
    request: AskRequest,
    source: str,
    question: str | None,
    output: Path,
    *,
    csv_path: Path | None = None,
    retry_errors: bool = False,
) -> int:
    """Run ``qvq batch``; return the exit code (0, 130 after Ctrl-C, 1 when failures stopped it)."""
    from qvq_local import batch
    from qvq_local.settings import check_text

    if question is not None:
        if not question.strip():
            raise InputError("--question is empty")
        check_text(question, "--question")
    if csv_path is not None:
        folder = csv_path.parent if str(csv_path.parent) else Path(".")
        if not folder.is_dir():
            raise InputError("the folder for --csv does not exist", path=folder)
        if csv_path.is_dir():
            raise InputError("--csv needs a file name, this is a folder", path=csv_path)
    plan = batch.read_items(source, question)
    for item in plan.items:
        check_text(item.question, f"{item.where}: the question" if item.where else "the question")
    if plan.left_out:
        _say(
            f"{source}: left out {len(plan.left_out)} file(s) that are not images by name: {', '.join(plan.left_out[:5])}"
        )
    settings = build_settings(request)
    how = load_request(request)
    out = batch.Output(output, retry_errors=retry_errors, notice=_say)
    todo = sum(not out.done(item) for item in plan.items)
    progress = batch.Progress(todo, len(plan.items) - todo)

    def load() -> Any:
        model = load_model(request, how)
        if request.cache:  # the run's repeats from memory, and what earlier runs and asks left on disk
            from qvq_local import prefix_cache

            model.disk_cache = prefix_cache.disk_cache(_say)
        else:
            model.prefix_cache = model.disk_cache = None
        model.cache_notice = _say
        progress.line(
            f"{model.name} · {model.backend} · {model.quantization} · {model.image_bound(settings).label()}"
        )
        return model

    with SigintFlag() as sigint:
        summary = batch.run(
            plan, out, load, settings, progress=progress, stop_requested=lambda: sigint.set, notice=_say
        )

    from rich.console import Console

    Console().print(batch.summary_table(summary, out))
    if csv_path is not None:
        batch.write_csv(csv_path, out.rows.values())
        _say(f"summary of {len(out.rows)} row(s) written to {csv_path}")
    if summary.interrupted:
        _say(f"interrupted: {summary.done} item(s) written this run; run the same command again to resume")
        return EXIT_INTERRUPTED
    if summary.stopped:
        _say(f"error: {summary.stopped}")
        return EXIT_STOPPED
    return 0


__all__ = ["EXIT_STOPPED", "run_batch"]
