"""`qvq batch` as a user runs it: 50 mixed good and bad images on the tiny synthetic model, a process
killed mid-run (and one stopped with Ctrl-C) then run again, every item once in the JSONL and the CSV,
one model load per run, and one-line errors for bad input before any model loads."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from batch_data import BAD, good_image, jsonl_list, mixed_folder
from typer.testing import CliRunner

from qvq_local import batch
from qvq_local.cli import app

ROOT = Path(__file__).resolve().parent.parent
#: What each run prints once, when its model has loaded (batch_cmd's loader): the loads are counted by it.
LOADED = " · llama · Q4_K_M · detail "


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))


def _fifty(folder: Path) -> tuple[Path, list[batch.Item]]:
    """A JSONL list of 50 items: 38 good images, the 9 kinds of bad one, a missing file, and two more
    questions about an image asked already."""
    goods, bads = mixed_folder(folder / "images", good=38)
    rows = [{"image": f"images/{n}", "question": "What colour is the box?"} for n in goods + bads]
    rows.append({"image": "images/missing.png", "question": "What is shown?"})
    rows += [{"image": f"images/{goods[0]}", "question": "How many boxes?"}] * 2
    path = jsonl_list(folder / "jobs.jsonl", rows)
    plan = batch.read_items(path)
    assert len(plan.items) == 50
    return path, plan.items


def _command(jobs: Path, out: Path, model: Path, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "qvq_local.cli", "batch", str(jobs), "-o", str(out), "-m", str(model),
        "--think-budget", "8", "--answer-budget", "8", *more,
    ]  # fmt: skip


def _start(args: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_rows(out: Path, n: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {n} rows: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no {n} rows within {timeout} s")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def _check_complete(rows: list[dict], items: list[batch.Item]) -> None:
    """Every item exactly once, an error row for each bad image, an answer for each good one."""
    assert len(rows) == 50
    assert sorted(r["index"] for r in rows) == list(range(50))
    assert {r["key"] for r in rows} == {i.key for i in items}  # no duplicate, none missing
    for row in rows:
        name = Path(row["images"][0]).name
        if name in BAD or name == "missing.png":
            assert row["error"] and BAD.get(name, "no such image file") in row["error"], row
            assert row["answer"] is None and row["stop_reason"] == "error"
        else:
            assert row["error"] is None and isinstance(row["answer"], str) and row["tokens"]["prompt"] > 0
            assert row["settings"]["detail"]["level"] == "low"  # --detail low below
            assert row["image_info"][0]["tokens"] > 0 and row["timings"]["total_s"] > 0


@pytest.mark.llama
@pytest.mark.slow
def test_a_killed_run_resumes_with_every_item_once_and_one_load_per_run(tmp_path, tiny_gguf_q4):
    pytest.importorskip("llama_cpp")
    jobs, items = _fifty(tmp_path)
    out, table = tmp_path / "answers.jsonl", tmp_path / "answers.csv"
    args = _command(jobs, out, tiny_gguf_q4.model, "--detail", "low", "--csv", str(table))

    first = _start(args, tmp_path)
    _wait_for_rows(out, 15, first)
    first.kill()  # a crash: SIGKILL, no cleanup at all
    first.communicate()
    assert first.returncode == -signal.SIGKILL
    lines = out.read_bytes().split(b"\n")
    kept = [json.loads(line) for line in lines[:-1]]  # every ended line is a whole row
    assert 15 <= len(kept) < 50 and not table.exists()

    second = _start(args, tmp_path)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 0, stderr
    assert f"{len(kept)} item(s) already in the output: skipped" in stderr
    assert stderr.count(LOADED) == 1  # one model load for the run
    assert "done: " in stdout and f"of {50 - len(kept)} item(s) this run" in stdout
    rows = _rows(out)
    _check_complete(rows, items)
    assert [r["key"] for r in rows[: len(kept)]] == [r["key"] for r in kept]  # nothing rewritten

    with open(table, encoding="utf-8-sig", newline="") as fh:
        sheet = list(csv.DictReader(fh))
    assert [int(r["index"]) for r in sheet] == list(range(50))
    by_index = {r["index"]: r for r in rows}
    for line in sheet:
        row = by_index[int(line["index"])]
        assert line["images"] == row["images"][0] and line["question"] == row["question"]
        assert line["error"] == (row["error"] or "") and line["stop_reason"] == row["stop_reason"]
        assert (
            line["answer"] == (row["answer"] or "").strip() or line["answer"] == "'" + row["answer"].strip()
        )
        assert int(line["prompt_tokens"]) == row["tokens"]["prompt"]

    third = _start(args, tmp_path)  # everything is there: nothing to do, nothing loaded
    stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 0 and LOADED not in stderr and "50 item(s) already in the output" in stderr


@pytest.mark.llama
@pytest.mark.slow
def test_ctrl_c_exits_130_and_leaves_a_valid_file(tmp_path, tiny_gguf_q4):
    pytest.importorskip("llama_cpp")
    jobs, items = _fifty(tmp_path)
    out = tmp_path / "answers.jsonl"
    args = _command(jobs, out, tiny_gguf_q4.model, "--detail", "low")
    run = _start(args, tmp_path)
    _wait_for_rows(out, 5, run)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "interrupted: " in stderr and "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    assert out.read_bytes().endswith(b"\n")  # whole rows only
    kept = _rows(out)
    assert 5 <= len(kept) < 50 and "interrupted" in stdout
    again = _start(args, tmp_path)
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    _check_complete(_rows(out), items)


# ------------------------------------------------------------------------------------------ bad input


def _one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.strip().splitlines() == [f"error: {text}"]
    assert "Traceback" not in result.output


def test_bad_input_is_one_line_before_any_model_loads(tmp_path):
    runner = CliRunner()
    nowhere = tmp_path / "nowhere"
    _one_line_error(
        runner.invoke(app, ["batch", str(nowhere), "-q", "q", "-o", str(tmp_path / "o.jsonl"), "-m", "none"]),
        2,
        f"{nowhere}: no such folder, file or pattern",
    )
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"image": "a.png", "question": "q"}\n{"image": \n')
    _one_line_error(
        runner.invoke(app, ["batch", str(jobs), "-o", str(tmp_path / "o.jsonl"), "-m", "none"]),
        2,
        f"{jobs}:2: not valid JSON (Expecting value)",
    )
    jobs.write_text('{"image": "a.png", "question": "q"}\n')
    _one_line_error(
        runner.invoke(app, ["batch", str(jobs), "-o", str(tmp_path / "no" / "o.jsonl"), "-m", "none"]),
        2,
        f"{tmp_path / 'no'}: the folder for the output does not exist",
    )
    _one_line_error(
        runner.invoke(app, ["batch", str(jobs), "-o", "o.jsonl", "--csv", str(tmp_path / "no" / "s.csv")]),
        2,
        f"{tmp_path / 'no'}: the folder for --csv does not exist",
    )
    _one_line_error(
        runner.invoke(app, ["batch", str(jobs), "-o", str(tmp_path / "o.jsonl"), "--detail", "huge"]),
        2,
        "--detail must be low | medium | high | max | auto, got 'huge'",
    )
    mixed_folder(tmp_path / "images", good=1)
    _one_line_error(
        runner.invoke(app, ["batch", str(tmp_path / "images"), "-o", str(tmp_path / "o.jsonl")]),
        2,
        "no question: give one in the row or a default with --question",
    )


# ------------------------------------------------------------------------ qvq ask's options apply


def _goods(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True)
    return [good_image(folder / f"img{i}.png", i).name for i in range(n)]


@pytest.mark.llama
@pytest.mark.slow
def test_samples_and_budgets_apply_to_each_item(tmp_path, tiny_gguf_q4):
    pytest.importorskip("llama_cpp")
    goods = _goods(tmp_path / "images", 2)
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(tmp_path / "images"), "-q", "What colour is the box?", "-o", str(out)]
    args += ["-m", str(tiny_gguf_q4.model), "--samples", "2", "--think-budget", "8", "--answer-budget", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [Path(r["images"][0]).name for r in rows] == goods
    for row in rows:
        assert row["error"] is None and row["settings"]["samples"] == 2
        assert row["settings"]["think_budget"] == 8 and row["settings"]["answer_budget"] == 4
        assert len(row["chains"]) == 2 and row["vote"]
        for chain in row["chains"]:
            assert chain["tokens"]["thought"] <= 8 + 32 and chain["tokens"]["answer"] <= 4  # + grace window


@pytest.mark.llama
@pytest.mark.slow
def test_backend_openai_asks_the_server_and_a_bad_image_is_an_error_row(tmp_path, tiny_gguf_f32):
    pytest.importorskip("fastapi")
    pytest.importorskip("llama_cpp")
    from serve_util import ServerThread

    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app

    _goods(tmp_path / "images", 2)
    (tmp_path / "images" / "text.png").write_text("not a picture\n")
    model = load(tiny_gguf_f32.model, backend="llama")
    app_ = create_app(model, ServeOptions(api_key="k1"))
    out = tmp_path / "answers.jsonl"
    try:
        with ServerThread(app_) as server:
            args = ["batch", str(tmp_path / "images"), "-q", "What colour is the box?", "-o", str(out)]
            args += ["--backend", "openai", "--base-url", server.base_url, "--api-key", "k1"]
            args += ["-m", model.name, "--think-budget", "16", "--answer-budget", "8", "--seed", "1"]
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, result.output
            rows = _rows(out)
            assert len(rows) == 3
            bad = [r for r in rows if r["images"][0].endswith("text.png")]
            assert len(bad) == 1 and "text file" in bad[0]["error"]
            for row in rows:
                if row["error"]:
                    continue
                assert row["backend"] == "openai" and row["settings"]["think_budget"] == 16
                local = model.ask(row["images"][0], row["question"], think_budget=16, answer_budget=8, seed=1)
                assert (row["thought"], row["answer"]) == (local.thought, local.answer)
    finally:
        app_.state.worker.shutdown()
        model.close()


# ------------------------------------------------------------------------ what the user watches


def test_progress_bar_shows_the_eta_and_the_summary_table_the_counts(tmp_path):
    import io

    from rich.console import Console

    plan = batch.read_items(jsonl_list(tmp_path / "jobs.jsonl", [{"image": "a.png", "question": "q"}] * 2))
    stream = io.StringIO()
    progress = batch.Progress(2, 3, stream=stream, live=True)
    progress.starting(plan.items[0])
    good = {
        "images": ["a.png"], "answer": "red", "boxed": None, "stop_reason": "answered",
        "timings": {"total_s": 1.5}, "error": None, "tokens": {"prompt": 40, "thought": 7, "answer": 2},
        "settings": {"prefix_cache": {"source": "fresh"}},
    }  # fmt: skip
    progress.finished(good)
    progress.starting(plan.items[1])
    progress.finished({"images": ["a.png"], "error": "a.png: not an image", "stop_reason": "error"})
    progress.close()
    shown = stream.getvalue()
    assert "3 item(s) already in the output: skipped" in shown
    assert "batch" in shown and "2/2" in shown and "ETA" in shown
    assert "a.png: not an image" in shown and "a.png: a.png" not in shown

    summary = batch.Summary(total=5, skipped=3, seconds=4.0, load_s=1.0, loads=1)
    summary.see(good)
    summary.see({"error": "a.png: not an image"})
    console = Console(file=io.StringIO(), width=120)
    console.print(batch.summary_table(summary, batch.Output(tmp_path / "out.jsonl")))
    table = console.file.getvalue()
    assert "done: 2 of 2 item(s) this run" in table
    for line, words in [("answers", "1"), ("errors", "1"), ("skipped", "3")]:
        assert any(line in row and words in row for row in table.splitlines()), table
    assert "40 prompt · 7 thought · 2 answer" in table and "2.0 s per item" in table
    assert "1 fresh" in table
