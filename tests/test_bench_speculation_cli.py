"""`qvq bench --speculation`: the speculation section as a row of the bench on each backend that
speculates, its table, and one line for a bad replay file before any work."""

from __future__ import annotations

import json

import pytest
from helpers import assert_error
from typer.testing import CliRunner

from qvq_local import bench
from qvq_local.cli import app
from qvq_local.errors import InputError

SMALL = dict(
    shape="tiny",
    image_sizes="56",
    runs=1,
    decode_tokens=8,
    answer_tokens=2,
    raw=False,
    bandwidth_bytes=16 * 2**20,
    bandwidth_reps=1,
    progress=False,
)


@pytest.mark.llama
def test_bench_speculation_row(tmp_path):
    pytest.importorskip("llama_cpp")
    replies = tmp_path / "replies.json"
    text = "Let me compute 12 times 7. 12 times 7 is 84. Let me double-check: 12 times 7 is 84. " * 6
    replies.write_text(json.dumps({"source": "a test", "replies": [{"name": "r1", "reply": text}]}))
    result = bench.run_bench(
        backend="llama",
        speculation=True,
        spec_replay=replies,
        json_path=tmp_path / "bench.json",
        home=tmp_path / "home",
        **SMALL,
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["settings"]["speculation"] is True and data["settings"]["spec_replay"] == str(replies)
    fig = data["backends"]["llama"]["speculation"]
    assert fig["ok"], fig
    curve = fig["cost_curve"]
    assert curve["sizes"] == list(range(1, fig["k"] + 2)) and curve["ratio"][0] == 1.0
    replay = fig["replay"]
    assert replay["source"] == "a test" and replay["replies"] == 1 and replay["tokens"] == 32  # 4 x decode
    assert replay["tokens_per_step"] >= 1.0 and 0.0 <= replay["acceptance"] <= 1.0
    same = fig["identical_draft"]
    assert same["tokens"] == 8 and same["draft"]["same_tokens"] and same["auto"]["same_tokens"]
    assert same["draft"]["tokens_per_step"] > 1.5  # a model drafting for itself is right nearly always
    assert result["backends"]["llama"]["speculation"] == fig


def test_a_bad_replay_file_is_one_line_before_any_work(tmp_path):
    with pytest.raises(InputError) as raised:
        bench.run_bench(backend="llama", speculation=True, spec_replay=tmp_path / "none.json", **SMALL)
    assert_error(raised, "replay file not found")
    with pytest.raises(InputError, match="pass it with --speculation"):
        bench.run_bench(backend="llama", spec_replay=tmp_path / "none.json", **SMALL)
    result = CliRunner().invoke(app, ["bench", "--speculation", "--spec-replay", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "replay file not found" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_shape_is_one_line_before_any_work(tmp_path, monkeypatch):
    """`qvq bench --shape 9b` said so only after measuring memory bandwidth (1 GiB, 5 times)."""
    import qvq_local.bench.bandwidth as bandwidth

    def measured(*args, **kwargs):
        raise AssertionError("bandwidth measured before the shape was checked")

    monkeypatch.setattr(bandwidth, "measure_bandwidth", measured)
    with pytest.raises(InputError) as raised:
        bench.run_bench(backend="llama", **{**SMALL, "shape": "9b"}, home=tmp_path / "home")
    assert_error(raised, "unknown Qwen2-VL shape '9b'")
