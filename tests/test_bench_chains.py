"""The bench's ``--samples N`` section (qvq_local.bench.chains) on the tiny GGUF, and its table (bench.report)."""

from __future__ import annotations

import pytest
from rich.console import Console

from qvq_local.bench.chains import measure_chains
from qvq_local.bench.report import render_chains_table


@pytest.mark.llama
def test_measure_chains_reports_every_n_with_spread_and_speedup(tiny_gguf_q4, sample_image):
    pytest.importorskip("llama_cpp")
    from PIL import Image

    import qvq_local
    from qvq_local.backends.base import Prompt
    from qvq_local.prompt import build_prompt

    with qvq_local.load(tiny_gguf_q4.model, backend="llama") as model:
        with Image.open(sample_image) as img:
            image = img.convert("RGB")
        prompt = Prompt(text=build_prompt(model.loaded.chat_template, "How tall?", 1), images=[image])
        out = measure_chains(model.loaded, prompt, tokens=6, runs=2, counts=(1, 2, 4))
    assert out["tokens_per_chain"] == 6 and list(out["by_n"]) == ["1", "2", "4"]
    for n, fig in out["by_n"].items():
        assert len(fig["samples"]) == 2
        assert fig["agg_tok_s_min"] <= fig["agg_tok_s"] <= fig["agg_tok_s_max"]
        assert fig["per_chain_tok_s"] == pytest.approx(fig["agg_tok_s"] / int(n), rel=0.5)
        assert fig["per_chain_tok_s"] > 0
    assert out["by_n"]["1"]["speedup"] == pytest.approx(1.0)
    assert out["by_n"]["4"]["speedup"] > 0
    print({n: round(f["agg_tok_s"], 1) for n, f in out["by_n"].items()})


def test_chains_table_shows_each_n_and_why_one_was_not_measured():
    fig = {
        "agg_tok_s": 30.0,
        "agg_tok_s_min": 28.0,
        "agg_tok_s_max": 33.0,
        "per_chain_tok_s": 7.5,
        "speedup": 3.2,
    }
    result = {
        "backends": {
            "llama": {"chains": {"ok": True, "by_n": {"4": fig}}},
            "mlx": {"chains": {"ok": False, "reason": "boom"}},
        }
    }
    console = Console(width=120, record=True)
    render_chains_table(result, console)
    text = console.export_text()
    assert "28.0-33.0" in text and "3.20x" in text and "7.5" in text
    assert "mlx: --samples not measured: boom" in text
