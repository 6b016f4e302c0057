"""`qvq batch`'s run (qvq_local/batch.py): reading the input, the resumable JSONL output, and a run of 50
mixed good and bad images on the tiny synthetic model with one model load."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from batch_data import BAD, jsonl_list, mixed_folder

from qvq_local import batch
from qvq_local.errors import InputError

# ------------------------------------------------------------------------------------------ input


def test_a_folder_gives_its_images_sorted_and_leaves_other_files_out(tmp_path):
    goods, bads = mixed_folder(tmp_path / "in", good=5)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    plan = batch.read_items(tmp_path / "in", "What is shown?")
    assert plan.kind == "folder" and plan.left_out == ["notes.txt"]
    assert [Path(i.images[0]).name for i in plan.items] == sorted(goods + bads)
    assert [i.index for i in plan.items] == list(range(len(goods + bads)))
    assert all(i.question == "What is shown?" for i in plan.items)
    with pytest.raises(InputError, match="no question"):
        batch.read_items(tmp_path / "in", None)


def test_the_key_is_the_item_not_its_place(tmp_path):
    rows = [
        {"image": "a.png", "question": "q1"},
        {"image": "b.png", "question": "q1"},
        {"image": "a.png", "question": "q2"},
        {"image": "a.png", "question": "q1"},  # the same pair again: its own item
    ]
    first = batch.read_items(jsonl_list(tmp_path / "one.jsonl", rows))
    keys = [i.key for i in first.items]
    assert len(set(keys)) == 4
    # a row inserted in front and the list reordered: each item keeps its key
    moved = [{"image": "new.png", "question": "q0"}, rows[2], rows[1], rows[0], rows[3]]
    second = batch.read_items(jsonl_list(tmp_path / "two.jsonl", moved))
    by_pair = {(i.images, i.question, i.key) for i in second.items}
    assert {(i.images, i.question, i.key) for i in first.items} <= by_pair
    # a folder is keyed by the names in it: the same folder moved elsewhere resumes
    mixed_folder(tmp_path / "f1", good=3)
    (tmp_path / "f1").rename(tmp_path / "f2")
    mixed_folder(tmp_path / "f1", good=3)
    a, b = batch.read_items(tmp_path / "f1", "q"), batch.read_items(tmp_path / "f2", "q")
    assert [i.key for i in a.items] == [i.key for i in b.items]
    assert a.items[0].images != b.items[0].images


def test_jsonl_rows_take_image_or_images_relative_to_the_list(tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    path = jsonl_list(
        sub / "jobs.jsonl",
        [
            {"image": "a.png", "question": "What?", "id": 7},
            {"images": ["a.png", "/abs/b.png"]},
        ],
    )
    path.write_text(path.read_text() + "\n\n")  # blank lines are fine
    plan = batch.read_items(path, "Default?")
    assert plan.kind == "jsonl"
    one, two = plan.items
    assert one.images == ("a.png",) and one.paths == (str(sub / "a.png"),) and one.id == "7"
    assert two.images == ("a.png", "/abs/b.png") and two.paths == (str(sub / "a.png"), "/abs/b.png")
    assert one.question == "What?" and two.question == "Default?" and two.id is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '{"image": "a.png", "question": "q"}\n{"image": "b.png", "question": \n',
            r"jobs.jsonl:2: not valid JSON",
        ),
        ('["a.png", "q"]\n', r"jobs.jsonl:1: each line must be a JSON object"),
        (
            '{"image": "a.png", "images": ["b.png"], "question": "q"}\n',
            r'jobs.jsonl:1: give either "image" or "images"',
        ),
        (
            '{"image": "a.png"}\n',
            r"jobs.jsonl:1: no question: give one in the row or a default with --question",
        ),
        ('{"images": [], "question": "q"}\n', r"jobs.jsonl:1: image\(s\) must be a path or a list of paths"),
        ("\n\n", r"jobs.jsonl: no rows in this list"),
    ],
)
def test_a_bad_list_is_one_line_naming_the_file_and_line(tmp_path, text, words):
    path = tmp_path / "jobs.jsonl"
    path.write_text(text)
    with pytest.raises(InputError, match=words) as raised:
        batch.read_items(path)
    assert "\n" not in str(raised.value)


def test_csv_rows_with_a_header_and_several_images_in_a_cell(tmp_path):
    path = tmp_path / "jobs.csv"
    path.write_text(
        '\ufeffImage,Question,id\na.png,"What is it, exactly?",x1\n\nb.png; c.png,,x2\n',
        encoding="utf-8",
    )
    plan = batch.read_items(path, "Default?")
    assert plan.kind == "csv"
    one, two = plan.items
    assert one.images == ("a.png",) and one.question == "What is it, exactly?" and one.id == "x1"
    assert two.images == ("b.png", "c.png") and two.question == "Default?"
    assert two.paths == (str(tmp_path / "b.png"), str(tmp_path / "c.png"))
    bad = tmp_path / "bad.csv"
    bad.write_text("file,question\na.png,q\n")
    with pytest.raises(InputError, match=r'bad.csv:1: the header must have an "image" or an "images" column'):
        batch.read_items(bad)
    without = tmp_path / "noq.csv"
    without.write_text("image\na.png\n")
    with pytest.raises(InputError, match=r"noq.csv:2: no question"):
        batch.read_items(without)


def test_a_glob_and_a_missing_source(tmp_path):
    mixed_folder(tmp_path, good=4)
    plan = batch.read_items(str(tmp_path / "img*.png"), "q")
    assert plan.kind == "glob" and [Path(i.images[0]).name for i in plan.items] == ["img00.png"]
    plan = batch.read_items(str(tmp_path / "*.*"), "q")
    assert len(plan.items) == 4 + len(BAD)
    with pytest.raises(InputError, match="no files match this pattern"):
        batch.read_items(str(tmp_path / "*.tiff"), "q")
    with pytest.raises(InputError, match="nowhere: no such folder, file or pattern"):
        batch.read_items(str(tmp_path / "nowhere"), "q")
    with pytest.raises(InputError, match="jobs.jsonl: no such file"):
        batch.read_items(str(tmp_path / "jobs.jsonl"), "q")


# ------------------------------------------------------------------------------------------ output


def test_rows_already_written_are_found_and_a_torn_last_line_is_dropped(tmp_path):
    plan = batch.read_items(
        jsonl_list(tmp_path / "in.jsonl", [{"image": f"{n}.png", "question": "q"} for n in range(3)])
    )
    out = tmp_path / "out.jsonl"
    first = batch.Output(out)
    first.append(batch.error_row(plan.items[0], "x.png: no such image file"))
    first.append(batch.error_row(plan.items[1], "y.png: no such image file"))
    first.close()
    with open(out, "a") as fh:  # a crash in the middle of writing the third row
        fh.write('{"key": "' + plan.items[2].key + '", "answer": "hal')
    notices: list[str] = []
    again = batch.Output(out, notice=notices.append)
    assert again.done(plan.items[0]) and again.done(plan.items[1]) and not again.done(plan.items[2])
    assert notices == [f"{out}: dropped an unfinished last line (the item in flight when a run stopped)"]
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["key"] for line in lines)  # valid JSONL again
    # --retry-errors: the error rows go, and their items are to do again
    retried = batch.Output(out, retry_errors=True, notice=notices.append)
    assert not retried.rows and out.read_text() == ""
    assert notices[-1] == f"{out}: 2 error row(s) taken out to be tried again"


def test_an_output_that_is_not_ours_is_refused_not_overwritten(tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text('{"key": "a"}\nhello\n{"key": "b"}\n')
    with pytest.raises(InputError, match=r"notes.jsonl: line 2 is not a row of qvq batch"):
        batch.Output(out)
    assert out.read_text() == '{"key": "a"}\nhello\n{"key": "b"}\n'
    with pytest.raises(InputError, match="the folder for the output does not exist"):
        batch.Output(tmp_path / "no" / "out.jsonl")
    with pytest.raises(InputError, match="the output must be a file"):
        batch.Output(tmp_path)


def test_the_csv_summary_is_one_row_per_item_and_never_a_formula(tmp_path):
    rows = [
        {
            "key": "b",
            "index": 1,
            "images": ["b.png"],
            "question": "q",
            "answer": '=HYPERLINK("x")',
            "boxed": "-3",
            "stop_reason": "answer",
            "error": None,
            "tokens": {"prompt": 9, "thought": 5, "answer": 2},
            "timings": {"total_s": 1.23456},
            "model": "m",
        },
        {
            "key": "a",
            "index": 0,
            "images": ["a.png", "c.png"],
            "question": "q, with a comma",
            "answer": None,
            "boxed": None,
            "stop_reason": "error",
            "error": "a.png: no such image file",
            "tokens": {},
            "timings": None,
        },
    ]
    path = batch.write_csv(tmp_path / "summary.csv", rows)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # UTF-8 with a BOM: spreadsheets read it so
    with open(path, encoding="utf-8-sig", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == list(batch.CSV_COLUMNS)
    assert table[1][:8] == [
        "0",
        "",
        "a.png;c.png",
        "q, with a comma",
        "",
        "",
        "error",
        "a.png: no such image file",
    ]
    assert table[2][4] == '\'=HYPERLINK("x")'  # text, not a formula
    assert table[2][5] == "-3" and table[2][8:] == ["9", "5", "2", "1.235", "m"]


# ------------------------------------------------------------------------------------------ a run


@pytest.fixture(scope="module")
def tiny_gguf(request):
    pytest.importorskip("llama_cpp")
    return request.getfixturevalue("tiny_gguf_q4").model


def _count_loads(monkeypatch) -> list:
    """Every model the registry's backends load from now on (the real loads, whoever asks for them)."""
    from qvq_local.backends import registry

    loads: list = []
    real = registry.BackendSpec.open_model

    def counting(self, target, options):
        loads.append(target)
        return real(self, target, options)

    monkeypatch.setattr(registry.BackendSpec, "open_model", counting)
    return loads


@pytest.mark.llama
def test_one_load_errors_as_rows_repeats_reuse_the_prefix(tmp_path, tiny_gguf, monkeypatch):
    from qvq_local.api import load
    from qvq_local.settings import AskSettings

    goods, bads = mixed_folder(tmp_path / "images", good=3)
    rows = [{"image": f"images/{n}", "question": "What colour is the box?"} for n in goods + bads]
    rows.append({"image": "images/missing.png", "question": "What is shown?"})
    # two more questions about an image asked already: its encoded prefix is reused from memory
    rows += [{"image": f"images/{goods[0]}", "question": "How many boxes?"}] * 2
    plan = batch.read_items(jsonl_list(tmp_path / "jobs.jsonl", rows))
    assert len(plan.items) == 15
    loads = _count_loads(monkeypatch)
    output = batch.Output(tmp_path / "out.jsonl")
    settings = AskSettings.build({"think_budget": 8, "answer_budget": 8})
    lines: list[str] = []
    progress = batch.Progress(len(plan.items), 0, live=False)
    progress.line = lines.append  # the plain lines a pipe gets, one per item
    summary = batch.run(
        plan, output, lambda: load(str(tiny_gguf), backend="llama"), settings, progress=progress
    )

    assert len(loads) == 1 and summary.loads == 1
    assert (summary.answered, summary.errors, summary.skipped, summary.interrupted) == (5, 10, 0, False)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in written] == list(range(15))  # in input order, each item once
    assert {r["key"] for r in written} == {i.key for i in plan.items}
    for row in written:
        name = Path(row["images"][0]).name
        if name in BAD or name == "missing.png":
            words = BAD.get(name, "no such image file")
            assert row["error"].startswith(f"images/{name}: ") and words in row["error"], row["error"]
            assert row["answer"] is None and row["stop_reason"] == "error"
        else:
            assert row["error"] is None and row["stop_reason"] in ("answer", "budget", "loop", "max_tokens")
            assert isinstance(row["answer"], str) and isinstance(row["thought"], str)
            assert row["tokens"]["prompt"] > 0 and row["tokens"]["thought"] <= 8 + 32  # budget + grace window
            assert row["timings"]["total_s"] > 0 and row["model"] and row["backend"] == "llama"
            assert row["image_info"][0]["tokens"] > 0
            assert row["settings"]["detail"]["source"] == "machine"
    reuse = [r["settings"]["prefix_cache"]["source"] for r in written[-2:]]
    assert reuse == ["memory", "memory"]
    assert written[0]["settings"]["prefix_cache"]["source"] == "fresh" and written[3]["settings"] is None
    assert summary.prefix_reuse["memory"] == 2
    assert len(lines) == 15 and lines[0].startswith("[1/15] images/img00.png: '")
    assert lines[3] == "[4/15] error: " + written[3]["error"]  # the error names the image itself
    assert "[13/15] error: images/missing.png: no such image file" in lines

    # run again: nothing to do, and no model is loaded for it
    again = batch.run(plan, batch.Output(tmp_path / "out.jsonl"), lambda: load(str(tiny_gguf)), settings)
    assert (again.skipped, again.done, again.loads, len(loads)) == (15, 0, 0, 1)
