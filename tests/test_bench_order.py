"""The benchmark's run order (qvq and raw interleaved) and its spreads, from recorded inputs.

Nothing here is timed: the figures are values recorded from runs on a shared machine (the issue's: one
neighbour's load swung qvq's decode from 11.8 to 5.3 tok/s between runs), so every expected value is
worked out by hand.
"""

from __future__ import annotations

import json

import pytest

from qvq_local.bench import harness, processes, stats, worker
from qvq_local.bench import report as bench_report

# ------------------------------------------------------------------------------------------ spread


def test_spread_of_three_recorded_runs():
    # sorted 5.3, 11.8, 12.0; inclusive quartiles at positions 0.5 and 1.5
    got = stats.spread([11.8, 5.3, 12.0])
    assert got == pytest.approx({"min": 5.3, "max": 12.0, "q1": 8.55, "q3": 11.9, "n": 3})


def test_spread_of_one_run_is_that_run():
    assert stats.spread([7.5]) == {"min": 7.5, "max": 7.5, "q1": 7.5, "q3": 7.5, "n": 1}


def test_spread_of_five_runs_iqr():
    # 1..5: q1 = 2, q3 = 4 (inclusive method: positions 1 and 3)
    got = stats.spread([5, 1, 4, 2, 3])
    assert (got["q1"], got["q3"], got["min"], got["max"]) == (2.0, 4.0, 1.0, 5.0)


def test_summarise_keeps_runs_in_order_and_integer_medians():
    runs = [
        {"decode_tok_s": 11.8, "decode_tokens": 70, "forced": True, "stop_reason": "budget"},
        {"decode_tok_s": 5.3, "decode_tokens": 71},
        {"decode_tok_s": 12.0, "decode_tokens": 73},
    ]
    got = stats.summarise(runs)
    assert got["decode_tok_s"] == 11.8
    assert got["decode_tokens"] == 71 and isinstance(got["decode_tokens"], int)
    assert got["samples"] == {"decode_tok_s": [11.8, 5.3, 12.0], "decode_tokens": [70, 71, 73]}
    assert got["spread"]["decode_tok_s"]["min"] == 5.3 and got["spread"]["decode_tok_s"]["max"] == 12.0
    assert "forced" not in got and "stop_reason" not in got  # booleans and text are not figures


def test_summarise_a_field_only_some_runs_have():
    got = stats.summarise([{"a": 1.0}, {"a": 3.0, "b": 2.0}])
    assert got["a"] == 2.0 and got["b"] == 2.0 and got["spread"]["b"]["n"] == 1


def test_paired_ratios_follow_the_pairs_not_the_medians():
    """The issue's swing: qvq's second run fell to 5.3 tok/s, and so did raw's, which ran right after it.
    Per pair the ratios are ~1; the ratio of the medians of non-paired runs would not be."""
    qvq = [{"decode_tok_s": 11.8, "first_token_s": 2.0}, {"decode_tok_s": 5.3}, {"decode_tok_s": 12.0}]
    raw = [{"decode_tok_s": 12.0, "first_token_s": 1.6}, {"decode_tok_s": 5.0}, {"decode_tok_s": 12.0}]
    got = stats.paired_ratios(qvq, raw, ["decode_tok_s", "first_token_s"])
    assert got["samples"]["decode_tok_s"] == pytest.approx([11.8 / 12.0, 5.3 / 5.0, 1.0])
    assert got["decode_tok_s"] == pytest.approx(1.0)
    assert got["spread"]["decode_tok_s"]["min"] == pytest.approx(11.8 / 12.0)
    assert got["spread"]["decode_tok_s"]["max"] == pytest.approx(5.3 / 5.0)
    assert got["first_token_s"] == pytest.approx(1.25) and got["spread"]["first_token_s"]["n"] == 1


def test_paired_ratios_skip_a_zero_denominator():
    got = stats.paired_ratios([{"x": 1.0}, {"x": 2.0}], [{"x": 0.0}, {"x": 4.0}], ["x"])
    assert got["samples"]["x"] == [0.5]


def test_runs_of_rebuilds_the_per_run_figures():
    summary = stats.summarise([{"a": 1.0, "b": 2}, {"a": 3.0, "b": 4}])
    assert stats.runs_of(summary) == [{"a": 1.0, "b": 2}, {"a": 3.0, "b": 4}]


@pytest.mark.parametrize(
    ("fig", "spec", "text"),
    [
        ({"x": 11.8, "spread": {"x": {"min": 5.3, "max": 12.0, "n": 3}}}, ".2f", "11.80 (5.30-12.00)"),
        ({"x": 11.8, "spread": {"x": {"min": 11.8, "max": 11.8, "n": 1}}}, ".2f", "11.80"),
        ({"x": 64, "spread": {"x": {"min": 64.0, "max": 64.0, "n": 3}}}, "d", "64"),
        ({"x": 256, "spread": {"x": {"min": 255.0, "max": 257.0, "n": 2}}}, "d", "256 (255-257)"),
        ({"x": 0.9}, ".0%", "90%"),
        ({}, ".2f", "-"),
    ],
)
def test_median_and_spread_text(fig, spec, text):
    assert stats.median_and_spread(fig, "x", spec) == text


# ------------------------------------------------------------------------------------------ order


def test_schedule_alternates_after_the_warmups():
    assert processes.schedule(["224", "448"], 2) == [
        ("224", 0, "qvq"),
        ("224", 0, "raw"),
        ("224", 1, "qvq"),
        ("224", 1, "raw"),
        ("224", 2, "qvq"),
        ("224", 2, "raw"),
        ("448", 0, "qvq"),
        ("448", 0, "raw"),
        ("448", 1, "qvq"),
        ("448", 1, "raw"),
        ("448", 2, "qvq"),
        ("448", 2, "raw"),
    ]


class _Recorded:
    """A served worker that replays recorded figures and writes every command into a shared log."""

    def __init__(self, name: str, log: list, figs: list[dict], fail_at: int | None = None):
        self.name, self.log, self.figs, self.fail_at = name, log, list(figs), fail_at
        self.finished = self.closed = False

    def request(self, cmd: dict) -> dict:
        self.log.append((self.name, cmd))
        if self.fail_at is not None and len([c for n, c in self.log if n == self.name]) > self.fail_at:
            return {"ok": False, "reason": f"{self.name} crashed"}
        return {"ok": True, "fig": self.figs.pop(0)}

    def finish(self) -> dict:
        self.finished = True
        return {"ok": True, "name": self.name}

    def close(self) -> None:
        self.closed = True


def _qvq_figs(n):
    return [{"decode_tokens": 60 + i, "prompt_tokens": 300 + i} for i in range(n)]


def test_interleave_alternates_and_gives_raw_the_qvq_run_s_token_counts():
    log: list = []
    qvq = _Recorded("qvq", log, _qvq_figs(6))
    raw = _Recorded("raw", log, [{}] * 6)
    out = processes.interleave({"qvq": qvq, "raw": raw}, ["224", "448"], 2)
    assert [(n, c["size"], c["run"], c["warmup"]) for n, c in log] == [
        (n, s, i, i == 0) for s in ("224", "448") for i in range(3) for n in ("qvq", "raw")
    ]
    raw_cmds = [c for n, c in log if n == "raw"]
    assert [c["max_tokens"] for c in raw_cmds] == [60, 61, 62, 63, 64, 65]
    assert [c["prompt_tokens"] for c in raw_cmds] == [300, 301, 302, 303, 304, 305]
    assert all("max_tokens" not in c for n, c in log if n == "qvq")
    assert out == {"qvq": {"ok": True, "name": "qvq"}, "raw": {"ok": True, "name": "raw"}}


def test_interleave_goes_on_without_a_failed_raw_path():
    log: list = []
    qvq = _Recorded("qvq", log, _qvq_figs(4))
    raw = _Recorded("raw", log, [{}] * 4, fail_at=1)  # the warm-up works, run 1 fails
    out = processes.interleave({"qvq": qvq, "raw": raw}, ["224"], 3)
    assert [n for n, _ in log] == ["qvq", "raw", "qvq", "raw", "qvq", "qvq"]
    assert out["raw"] == {"ok": False, "reason": "raw crashed"} and raw.closed and not raw.finished
    assert out["qvq"]["ok"] and qvq.finished


def test_interleave_stops_when_qvq_fails():
    log: list = []
    qvq = _Recorded("qvq", log, _qvq_figs(4), fail_at=1)
    raw = _Recorded("raw", log, [{}] * 4)
    out = processes.interleave({"qvq": qvq, "raw": raw}, ["224", "448"], 2)
    assert [n for n, _ in log] == ["qvq", "raw", "qvq"]
    assert out["qvq"]["reason"] == "qvq crashed"
    assert not out["raw"]["ok"] and raw.closed and not raw.finished


# ------------------------------------------------------------------------------------------ the served worker


class _FakePath:
    """Stands in for QvqPath in ``worker.serve``: figures from a list, in order."""

    name = "qvq"
    values = [9.0, 11.8, 5.3, 12.0]

    def __init__(self, spec):
        self.i = 0
        self.seen: list[dict] = []
        _FakePath.last = self

    def run(self, size, image_path, cmd):
        self.seen.append(cmd)
        v = self.values[self.i]
        self.i += 1
        return {"decode_tok_s": v, "forced": self.i != 3, "stop_reason": "budget"}

    def finish(self, runs):
        return {"ok": True, "sizes": runs.sizes(), "runs_not_forced": runs.not_forced}

    def close(self):
        pass


def test_served_worker_keeps_measured_runs_only(monkeypatch):
    monkeypatch.setitem(worker.PATHS, "qvq", _FakePath)
    replies: list[dict] = []
    spec = {"job": "qvq", "backend": "llama", "runs": 3, "images": {"56": "chart.png"}}
    commands = [json.dumps({"op": "run", "size": "56", "run": i, "warmup": i == 0}) for i in range(4)]
    code = worker.serve(spec, [*commands, json.dumps({"op": "finish"})], replies.append)
    assert code == 0
    assert replies[0] == {"ok": True, "ready": True}
    assert [r["fig"]["decode_tok_s"] for r in replies[1:5]] == [9.0, 11.8, 5.3, 12.0]
    final = replies[-1]
    size = final["sizes"]["56"]
    assert size["samples"]["decode_tok_s"] == [11.8, 5.3, 12.0]  # the 9.0 warm-up is not a sample
    assert size["decode_tok_s"] == 11.8 and size["spread"]["decode_tok_s"]["min"] == 5.3
    assert size["peak_rss_bytes"] > 0
    assert final["runs_not_forced"] == 1  # the run that stopped before the forced answer


def test_served_worker_reports_a_failed_load(monkeypatch):
    def broken(spec):
        raise FileNotFoundError("model.gguf: no such file")

    monkeypatch.setitem(worker.PATHS, "qvq", broken)
    replies: list[dict] = []
    assert worker.serve({"job": "qvq"}, [], replies.append) == 1
    assert replies[0]["ok"] is False and "no such file" in replies[0]["reason"]


# ------------------------------------------------------------------------------------------ report


def _recorded_result() -> dict:
    def size(values, encode):
        runs = [{"decode_tok_s": v, "image_encode_s": e, "image_tokens": 64} for v, e in zip(values, encode)]
        return stats.summarise(runs)

    qvq = {"ok": True, "sizes": {"224": size([11.8, 5.3, 12.0], [1.0, 1.5, 1.1])}}
    raw = {"ok": True, "sizes": {"224": size([12.0, 5.0, 12.0], [0.9, 1.4, 1.0])}}
    ratios = stats.qvq_raw_ratios(qvq, raw)
    return {
        "settings": {"runs": 3, "decode_tokens": 64, "image_sizes": [224]},
        "model": {"label": "synthetic tiny (q4)"},
        "machine": {"summary": "test machine"},
        "bandwidth": {"read_gbs_median": 10.0},
        "backends": {
            "llama": {
                "available": True,
                "order": harness.INTERLEAVED_ORDER,
                "qvq": qvq,
                "raw": raw,
                "ratios": ratios,
                "decode_tok_s": 11.8,
                "bound_tok_s": 20.0,
                "bound_fraction": 11.8 / 20.0,
                "spread": {"decode_tok_s": {"min": 5.3, "max": 12.0, "n": 3}},
            }
        },
    }


def test_ratios_are_medians_of_paired_runs_with_their_spread():
    ratios = _recorded_result()["backends"]["llama"]["ratios"]
    assert ratios["decode_tok_s"] == pytest.approx(1.0)  # pairs: 0.983, 1.06, 1.0
    assert ratios["spread"]["decode_tok_s"]["min"] == pytest.approx(11.8 / 12.0)
    assert ratios["spread"]["decode_tok_s"]["max"] == pytest.approx(5.3 / 5.0)
    assert ratios["at_image_size"] == 224 and "224" in ratios["per_size"]


def test_tables_show_the_spread_beside_the_median():
    from rich.console import Console

    console = Console(width=120, record=True)  # what `qvq bench` prints into a file or pipe
    bench_report.render_tables(_recorded_result(), console)
    lines = console.export_text().splitlines()
    text = "\n".join(lines)
    assert "…" not in text  # no figure cut

    def row(label: str) -> tuple[str, str]:
        """A table row (median line) and the line under it (spread line)."""
        i = next(i for i, line in enumerate(lines) if line.lstrip().startswith(label))
        return lines[i], lines[i + 1]

    qvq, qvq_spread = row("llama qvq 224px")
    assert "11.80" in qvq and "(5.30-12.00)" in qvq_spread  # decode
    assert "1.100" in qvq and "(1.000-1.500)" in qvq_spread  # encode
    assert " 64 " in qvq and "(64-64)" not in qvq_spread  # the same in every run: no range
    raw, raw_spread = row("llama raw 224px")
    assert "12.00" in raw and "(5.00-12.00)" in raw_spread
    limits, limits_spread = row("llama  ")
    assert "1.000" in limits and "(0.983-1.060)" in limits_spread  # qvq/raw decode: median of the pairs
    assert "(5.30-12.00)" in limits_spread  # decode against the bound
    assert "interleaved (qvq, raw" in text


def test_chart_draws_the_spread(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    bars = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, yerr=None, **kw):
        bars.append((list(y), yerr))
        return real(self, x, y, *args, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    path = bench_report.write_chart(_recorded_result(), tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ys, (below, above) = bars[0]  # llama qvq decode: median 11.8, down to 5.3, up to 12.0
    assert ys == [11.8] and below == [pytest.approx(6.5)] and above == [pytest.approx(0.2)]


def test_served_worker_child_reports_a_failure_through_the_pipe():
    """The real child process: an unknown job comes back as the first reply, and the child exits."""
    served = processes.ServedWorker({"job": "no-such-job", "backend": "llama"}, label="llama: test")
    try:
        assert served.ready["ok"] is False and "no-such-job" in served.ready["reason"]
    finally:
        served.close()
    assert served.proc.returncode == 1


@pytest.mark.parametrize(
    ("available_gb", "order"),
    [(16.0, harness.INTERLEAVED_ORDER), (7.0, harness.SEQUENTIAL_ORDER)],
)
def test_two_copies_that_do_not_fit_run_one_path_after_the_other(monkeypatch, available_gb, order):
    """Interleaving holds the model twice (one worker per path); a 4 GB model with 7 GB free runs the old
    way, qvq's runs then raw's, and the result says which order it used."""
    calls = []
    fig = {"decode_tok_s": 10.0, "first_token_s": 1.0, "decode_tokens": 9, "prompt_tokens": 50}
    sizes = {"224": stats.summarise([fig])}

    def fake_worker(spec, *, label, log=None):
        calls.append(("sequential", spec["job"]))
        return {"ok": True, "sizes": sizes}

    def fake_interleaved(common, sizes_, decode_tokens, answer_tokens, log):
        calls.append(("interleaved", common["backend"]))
        return {"ok": True, "sizes": sizes}, {"ok": True, "sizes": sizes}

    monkeypatch.setattr(harness, "run_worker", fake_worker)
    monkeypatch.setattr(harness, "_interleaved_run", fake_interleaved)
    monkeypatch.setattr(
        harness,
        "weights_per_token",
        lambda fmt, model, mmproj: {"bytes_per_token": 10**9, "model_bytes": 4 * 10**9},
    )
    result = {
        "bandwidth": {"read_gbs_median": 20.0},
        "machine": {"memory_available_bytes": int(available_gb * 10**9)},
    }
    entry = harness._measure_backend(
        "llama",
        (True, None),
        {"model": "m.gguf", "mmproj": "mm.gguf"},
        result,
        images={"224": "chart.png"},
        sizes=[224],
        runs=1,
        decode_tokens=8,
        answer_tokens=2,
        raw=True,
        log=None,
    )
    assert entry["order"] == order
    # the --samples chains are measured on their own, after the paired runs, in either order
    assert calls[-1] == ("sequential", "chains")
    if order == harness.INTERLEAVED_ORDER:
        assert calls[:-1] == [("interleaved", "llama")]
    else:
        assert calls[:-1] == [("sequential", "qvq"), ("sequential", "raw")]
    assert entry["ratios"]["decode_tok_s"] == 1.0


def test_tables_say_where_the_layers_ran():
    """A GPU run says so beside the bound, which is the CPU memory's; a CPU run adds no line."""
    from rich.console import Console

    def printed(placement):
        result = _recorded_result()
        result["backends"]["llama"]["qvq"]["placement"] = placement
        console = Console(width=120, record=True)
        bench_report.render_tables(result, console)
        return console.export_text()

    assert "llama: text layers: GPU 14 of 28 layers, CPU the rest; the bound is the CPU memory's" in printed(
        "GPU 14 of 28 layers, CPU the rest"
    )
    assert "text layers:" not in printed("CPU")
