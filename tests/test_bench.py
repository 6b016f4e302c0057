"""The benchmark: its pieces (bandwidth, bytes per token, peak memory, options, report) and one smoke run.

The smoke run is the whole ``qvq bench --shape tiny --backend all`` path with one repetition: it
synthesises and converts a tiny model into a temporary QVQ_HOME, runs qvq-local and the raw libraries on
both backends, and must produce a JSON file in which every figure is present and positive, and a PNG
chart.  No timing thresholds: the figures are only checked to exist and be measured (> 0).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from helpers import assert_error

from qvq_local.bench import bandwidth as bench_bandwidth
from qvq_local.bench import harness as bench
from qvq_local.bench import memory as bench_memory
from qvq_local.bench import prepare, workload
from qvq_local.bench import report as bench_report
from qvq_local.errors import InputError

# ------------------------------------------------------------------------------------------ pieces


def test_bandwidth_is_measured_and_positive():
    # 64 MiB: above this machine's 32 MiB L3; the real bench uses 1 GiB
    out = bench_bandwidth.measure_bandwidth(64 * 2**20, reps=2)
    for key in (
        "read_gbs_median",
        "read_gbs_best",
        "read_gbs_single_thread_median",
        "copy_gbs_median",
        "copy_gbs_best",
    ):
        assert out[key] > 0, key
    assert out["read_gbs_best"] >= out["read_gbs_median"]
    assert out["size_bytes"] == 64 * 2**20


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A header-valid safetensors file with zero-filled data."""
    sizes = {"F32": 4, "BF16": 2, "U32": 4}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)
    return path


def test_bytes_per_token_untied(tmp_path):
    # 10-row embedding of width 4 (f32: 16 bytes a row), one layer weight, a separate lm_head, vision tower
    _safetensors(
        tmp_path / "model.safetensors",
        {
            "language_model.model.embed_tokens.weight": ("F32", [10, 4]),
            "language_model.model.layers.0.mlp.down_proj.weight": ("F32", [4, 4]),
            "language_model.lm_head.weight": ("F32", [10, 4]),
            "vision_tower.blocks.0.attn.qkv.weight": ("F32", [12, 4]),
        },
    )
    out = bench_bandwidth.mlx_bytes_per_token(tmp_path)
    assert out["vision_bytes"] == 12 * 4 * 4
    assert out["embedding_bytes"] == 160
    assert not out["tied_lm_head"]
    # layer (64) + lm_head (160) + one embedding row (16); the embedding table itself is not read
    assert out["bytes_per_token"] == 64 + 160 + 16


def test_bytes_per_token_tied_reads_the_whole_embedding(tmp_path):
    _safetensors(
        tmp_path / "model.safetensors",
        {
            "language_model.model.embed_tokens.weight": ("F32", [10, 4]),
            "language_model.model.layers.0.mlp.down_proj.weight": ("F32", [4, 4]),
        },
    )
    out = bench_bandwidth.mlx_bytes_per_token(tmp_path)
    assert out["tied_lm_head"]
    assert out["bytes_per_token"] == 160 + 64 + 16  # the embedding is the output head, plus the looked-up row


def test_decode_bound():
    assert bench_bandwidth.decode_bound(10.0, 10**9) == pytest.approx(10.0)
    assert bench_bandwidth.decode_bound(0.0, 10**9) == 0.0


def test_peak_rss_sees_an_allocation():
    with bench_memory.PeakRss() as peak:
        block = bytearray(64 * 2**20)
        block[::4096] = b"\1" * len(block[::4096])  # touch every page
    del block
    assert peak.method in ("VmHWM", "sampled")
    assert peak.bytes >= 64 * 2**20
    assert bench_memory.lifetime_peak_rss() >= peak.bytes


@pytest.mark.parametrize(
    "text,expected", [("224,448", [224, 448]), ("448, 224,224", [224, 448]), ("56", [56])]
)
def test_parse_image_sizes(text, expected):
    assert bench.parse_image_sizes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "10", "224,x", "99999"])
def test_parse_image_sizes_refuses(text):
    with pytest.raises(InputError):
        bench.parse_image_sizes(text)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"runs": 0}, "--runs"),
        ({"decode_tokens": 1}, "--decode-tokens"),
        ({"backend": "cuda"}, "backend"),
        ({"quant": "q3"}, "quantisation"),
        ({"model": "x", "shape": "tiny"}, "either"),
        ({"shape": "13b"}, "shape"),
    ],
)
def test_run_bench_refuses_bad_options_before_work(tmp_path, kwargs, words):
    with pytest.raises(InputError) as raised:
        bench.run_bench(home=tmp_path, backend=kwargs.pop("backend", "llama"), **kwargs)
    assert_error(raised, words)
    assert not (tmp_path / "images").exists()  # refused before anything was made


def test_make_image_is_deterministic(tmp_path):
    from PIL import Image

    a = workload.make_image(112, tmp_path / "a.png")
    b = workload.make_image(112, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    assert Image.open(a).size == (112, 112)


def test_cli_bench_bad_option_is_one_error_line():
    from typer.testing import CliRunner

    from qvq_local.cli import app

    res = CliRunner().invoke(app, ["bench", "--runs", "0", "--backend", "llama"])
    assert res.exit_code == 2
    assert "--runs must be at least 1" in res.output
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------------ smoke run

POSITIVE_PER_SIZE_QVQ = (
    "prompt_tokens",
    "image_tokens",
    "image_encode_s",
    "prefill_s",
    "prefill_tok_s",
    "first_token_s",
    "decode_tokens",
    "decode_tok_s",
    "decode_tok_s_step",
    "forced_step_s",
    "forced_tokens",
    "total_s",
    "peak_rss_bytes",
)
POSITIVE_PER_SIZE_RAW = (
    "prompt_tokens",
    "first_token_s",
    "prefill_tok_s",
    "decode_tokens",
    "decode_tok_s",
    "total_s",
    "peak_rss_bytes",
)
POSITIVE_PER_BACKEND = (
    "model_bytes",
    "bytes_per_token",
    "text_weights_bytes",
    "vision_bytes",
    "bound_tok_s",
    "decode_tok_s",
    "bound_fraction",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("mlx_vlm")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("bench")
    result = bench.run_bench(
        shape="tiny",
        backend="all",
        image_sizes="56",
        runs=1,
        decode_tokens=4,
        answer_tokens=2,
        json_path=root / "out" / "bench.json",
        chart_path=root / "out" / "bench.png",
        bandwidth_bytes=64 * 2**20,
        bandwidth_reps=2,
        home=root / "home",
        progress=False,
    )
    return root, result


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.llama
def test_smoke_json_holds_every_figure_positive(smoke):
    root, _ = smoke
    data = json.loads((root / "out" / "bench.json").read_text())
    assert data["schema"] == bench.SCHEMA
    assert data["machine"]["cpu_count"] > 0 and data["machine"]["summary"]
    for key in ("read_gbs_median", "copy_gbs_median"):
        assert data["bandwidth"][key] > 0
    synth = data["model"]["synthesis"]
    assert synth["seconds"] > 0 and synth["peak_rss_bytes"] > 0
    assert set(data["backends"]) == {"llama", "mlx"}
    for name, b in data["backends"].items():
        assert b["available"], (name, b.get("reason"))
        for key in POSITIVE_PER_BACKEND:
            assert b[key] > 0, (name, key)
        assert b["conversion"]["seconds"] > 0 and b["conversion"]["peak_rss_bytes"] > 0
        assert b["qvq"]["ok"], b["qvq"].get("reason")
        assert b["raw"]["ok"], b["raw"].get("reason")
        assert b["qvq"]["load_s"] > 0 and b["qvq"]["peak_rss_bytes"] > 0 and b["raw"]["peak_rss_bytes"] > 0
        assert b["qvq"]["runs_not_forced"] == 0  # the forced-answer step happened in every measured run
        assert "compute" in b["qvq"]  # None, or how qvq computes differently from the raw library
        q, r = b["qvq"]["sizes"]["56"], b["raw"]["sizes"]["56"]
        for key in POSITIVE_PER_SIZE_QVQ:
            assert q[key] > 0, (name, "qvq", key)
            assert len(q["samples"].get(key, [1])) == 1  # runs=1: one measured sample per figure
        for key in POSITIVE_PER_SIZE_RAW:
            assert r[key] > 0, (name, "raw", key)
        # (image tokens differ by backend at 56 px: the HF processor keeps 56x56 -> 4 tokens, llama.cpp's
        # clip preprocessing enlarges small images to 84x84 -> 9 tokens; so only > 0 is checked above)
        assert r["decode_tokens"] == q["decode_tokens"]  # the raw run did the same number of tokens
        # issue 16: the repeated image's first token from the in-memory and the disk prefix cache
        reuse = q["prefix_reuse"]
        for key in (
            "first_token_s",
            "memory_first_token_s",
            "disk_first_token_s",
            "memory_ratio",
            "disk_ratio",
        ):
            assert reuse[key] > 0, (name, "prefix_reuse", key)
        assert reuse["write_s"] > 0 and reuse["read_s"] > 0 and reuse["bytes"] > 0
        assert b["ratios"]["decode_tok_s"] > 0 and b["ratios"]["first_token_s"] > 0
        assert b["chains"]["ok"], b["chains"].get("reason")  # --samples N: one row per N, all positive
        assert sorted(b["chains"]["by_n"], key=int) == ["1", "2", "4", "8"]
        assert all(f["agg_tok_s"] > 0 and f["per_chain_tok_s"] > 0 for f in b["chains"]["by_n"].values())
    assert data["chart"] == str(root / "out" / "bench.png")


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.llama
def test_smoke_chart_is_a_png(smoke):
    root, _ = smoke
    head = (root / "out" / "bench.png").read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.llama
def test_smoke_second_run_reuses_the_converted_models(smoke):
    root, result = smoke
    again = prepare.prepare_models(
        shape="tiny",
        model=None,
        backends=["llama", "mlx"],
        quant="q4",
        home=root / "home",
        progress=False,
        log=None,
    )
    assert again["synthesis"]["reused"]
    for name in ("llama", "mlx"):
        fmt = again["formats"][name]
        assert fmt["conversion"]["reused"]
        assert fmt["model"] == result["backends"][name]["model_path"]


@pytest.mark.slow
@pytest.mark.mlx
@pytest.mark.llama
def test_smoke_tables_render(smoke):
    from rich.console import Console

    _, result = smoke
    console = Console(width=100, record=True)
    bench_report.render_tables(result, console)
    text = console.export_text()
    for word in ("llama qvq", "llama raw", "mlx qvq", "mlx raw", "qvq/raw decode", "bound t/s", "per chain"):
        assert word in text
    assert "Repeated image: prefix reuse" in text


def test_prefix_table_shows_medians_ratios_and_spread():
    from rich.console import Console

    from qvq_local.bench.stats import summarise

    runs = [  # three runs as the worker reports them; the table shows their summary
        {"first_token_s": 1.5, "memory_first_token_s": 0.45, "memory_ratio": 0.3, "disk_ratio": 0.2},
        {"first_token_s": 2.0, "memory_first_token_s": 0.3, "memory_ratio": 0.15, "disk_ratio": 0.2},
        {"first_token_s": 2.5, "memory_first_token_s": 0.25, "memory_ratio": 0.1, "disk_ratio": 0.2},
    ]
    for run in runs:
        run.update(disk_first_token_s=0.4, write_s=0.012, read_s=0.003, bytes=3 * 2**20)
    reuse = summarise(runs)
    result = {
        "backends": {
            "llama": {"available": True, "qvq": {"ok": True, "sizes": {"448": {"prefix_reuse": reuse}}}}
        }
    }
    console = Console(width=160, record=True)
    bench_report._prefix_table(console, result["backends"])
    text = console.export_text()
    assert "Repeated image" in text and "448px" in text
    assert "2.00 (1.50-2.50)" in text and "x0.15 (0.10-0.30)" in text and "x0.20" in text
    assert "0.012/0.003" in text and "3.1 MB" in text  # 3 MiB on disk, in decimal units


def test_the_runtime_never_imports_the_bench_harness():
    """The bench lives in its own subpackage: the API, ask, doctor and the CLI module load without it."""
    import subprocess
    import sys

    code = (
        "import sys, qvq_local, qvq_local.api, qvq_local.ask_cmd, qvq_local.doctor, qvq_local.selftest\n"
        "from qvq_local import cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('qvq_local.bench')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_cached_build_is_reused_only_for_the_same_recipe(tmp_path, monkeypatch):
    calls = []

    def fake_worker(spec, *, label, log=None):
        calls.append(spec["tokenizer"])
        out = tmp_path / "m"
        out.mkdir(exist_ok=True)
        return {"ok": True, "path": str(out), "seconds": 1.0}

    monkeypatch.setattr(prepare, "run_worker", fake_worker)
    spec = {"job": "synth", "shape": "2b", "tokenizer": "qwen", "progress": True}

    def build(**changes):
        return prepare._cached_build(tmp_path, "m", {**spec, **changes}, "synth", None, check=lambda r: True)

    assert build()["reused"] is False
    assert build(progress=False)["reused"] is True  # how progress is shown is not part of the recipe
    assert build(tokenizer="trained")["reused"] is False  # another vocabulary: rebuilt
    assert calls == ["qwen", "trained"]
