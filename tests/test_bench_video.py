"""`qvq bench --video`: a row per backend for a synthetic clip (frames, video tokens, decode-and-sample,
encode, first token), natively on MLX and as frames on llama.cpp."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from qvq_local import bench

pytest.importorskip("av")


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.llama
def test_bench_video_row(tmp_path):
    pytest.importorskip("mlx_vlm")
    pytest.importorskip("llama_cpp")
    result = bench.run_bench(
        shape="tiny",
        backend="all",
        image_sizes="56",
        runs=1,
        decode_tokens=4,
        answer_tokens=2,
        raw=False,
        video=True,
        json_path=tmp_path / "bench.json",
        bandwidth_bytes=16 * 2**20,
        bandwidth_reps=1,
        home=tmp_path / "home",
        progress=False,
    )
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["settings"]["video"] is True
    for name, mode in (("mlx", "video"), ("llama", "frames")):
        row = data["backends"][name]["qvq"]["video"]
        assert row["mode"] == mode and row["clip"].endswith("clip-10s.mp4")
        assert row["frames"] >= 2 and row["video_tokens"] > 0 and row["prompt_tokens"] > row["video_tokens"]
        for key in ("decode_sample_s", "encode_s", "prefill_s", "first_token_s"):
            assert row[key] > 0, (name, key)
    buf = io.StringIO()
    from qvq_local.bench.report import render_tables

    render_tables(result, Console(file=buf, width=160))
    table = buf.getvalue()
    assert "A clip (qvq bench --video" in table and "frames" in table and "video" in table
