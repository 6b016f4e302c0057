"""The benchmark is generic over the registry's backends: a backend bench has never heard of is converted
to its own format, measured on qvq-local's path alone (no raw-library comparison, so no ratio), and one
whose format bench cannot write is reported as not run, all without bench naming it.

The backend here is the registry's llama entry under another name (``elsewhere``), or with a format no
converter writes; the worker children are replaced by recorded results, so nothing is loaded or timed.
"""

from __future__ import annotations

import dataclasses

import pytest
from rich.console import Console

from qvq_local.backends import registry
from qvq_local.bench import harness, prepare, report, stats
from qvq_local.bench.raw_paths import has_raw_path

NEW = "elsewhere"


@pytest.fixture
def new_backend(monkeypatch):
    """Registers ``elsewhere`` (llama's entry renamed, converted to ``fmt``) for ``registry.get``."""
    real_get = registry.get

    def register(fmt: str, **changes):
        spec = dataclasses.replace(real_get("llama"), name=NEW, aliases=(), convert_to=fmt, **changes)
        monkeypatch.setattr(registry, "get", lambda name: spec if name == NEW else real_get(name))
        return spec

    return register


def test_bench_compares_only_the_backends_it_has_a_raw_library_for():
    assert has_raw_path("llama") and has_raw_path("mlx")
    assert not has_raw_path(NEW)


def test_a_new_backend_is_converted_to_its_own_format_and_shares_a_conversion(
    tmp_path, monkeypatch, new_backend
):
    new_backend("gguf")
    jobs = []

    def fake_worker(spec, *, label, log=None):
        jobs.append(spec["job"])
        out = tmp_path / "built"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")
        for name in ("m.gguf", "mm.gguf"):
            (out / name).write_bytes(b"GGUF")
        return {
            "ok": True,
            "seconds": 1.0,
            "path": str(out),
            "model": str(out / "m.gguf"),
            "mmproj": str(out / "mm.gguf"),
        }

    monkeypatch.setattr(prepare, "run_worker", fake_worker)
    info = prepare.prepare_models(
        shape="tiny", model=None, backends=["llama", NEW], quant="q4", home=tmp_path, progress=False, log=None
    )
    # one synthesis and one GGUF conversion, which the new backend reuses from llama's build
    assert jobs == ["synth", "convert-gguf"]
    assert info["formats"][NEW]["model"] == info["formats"]["llama"]["model"]
    assert info["formats"][NEW]["quantization"] == "Q4_K_M"
    assert info["formats"][NEW]["conversion"]["reused"] is True


def test_a_format_bench_cannot_write_is_reported_not_run(tmp_path, monkeypatch, new_backend):
    new_backend("onnx")
    monkeypatch.setattr(
        prepare,
        "run_worker",
        lambda spec, *, label, log=None: {"ok": True, "seconds": 1.0, "path": str(tmp_path)},
    )
    (tmp_path / "config.json").write_text("{}")
    info = prepare.prepare_models(
        shape="tiny", model=None, backends=[NEW], quant="q4", home=tmp_path, progress=False, log=None
    )
    error = info["formats"][NEW]["error"]
    assert "cannot convert a model to ONNX" in error and NEW in error and "--model" in error
    entry = harness._measure_backend(
        NEW,
        (True, None),
        info["formats"][NEW],
        {"bandwidth": {"read_gbs_median": 10.0}, "machine": {}},
        images={"56": "chart.png"},
        sizes=[56],
        runs=1,
        decode_tokens=4,
        answer_tokens=2,
        raw=True,
        log=None,
    )
    assert entry == {"available": False, "reason": error}


def test_a_backend_without_a_raw_library_gets_qvq_figures_and_no_ratio(tmp_path, monkeypatch, new_backend):
    new_backend("onnx")  # a format whose weights bench cannot read: its size, and no bandwidth bound
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\0" * 5000)
    jobs = []
    fig = {"decode_tok_s": 10.0, "first_token_s": 1.0, "decode_tokens": 9, "prompt_tokens": 50}

    def fake_worker(spec, *, label, log=None):
        jobs.append((spec["job"], spec["backend"]))
        if spec["job"] == "chains":
            return {"ok": False, "reason": "no chains here"}
        return {"ok": True, "sizes": {"56": stats.summarise([fig])}}

    monkeypatch.setattr(harness, "run_worker", fake_worker)
    monkeypatch.setattr(
        harness, "_interleaved_run", lambda *a, **k: pytest.fail("nothing to interleave with")
    )
    entry = harness._measure_backend(
        NEW,
        (True, None),
        {"model": str(model), "mmproj": None},
        {"bandwidth": {"read_gbs_median": 10.0}, "machine": {"memory_available_bytes": 10**10}},
        images={"56": "chart.png"},
        sizes=[56],
        runs=1,
        decode_tokens=4,
        answer_tokens=2,
        raw=True,
        log=None,
    )
    assert jobs == [("qvq", NEW), ("chains", NEW)]  # no raw job was started
    assert entry["available"] and entry["order"] == "qvq only"
    assert entry["raw"] == {"ok": False, "reason": f"qvq bench has no raw-library comparison for {NEW}"}
    assert "decode_tok_s" not in entry["ratios"] and "no raw-library comparison" in entry["ratios"]["reason"]
    assert entry["decode_tok_s"] == 10.0
    assert entry["model_bytes"] == 5000 and entry["bound_tok_s"] is None and entry["bound_fraction"] is None

    console = Console(width=120, record=True)
    report.render_tables({"backends": {NEW: entry}}, console)
    text = console.export_text()
    assert f"{NEW} qvq 56px" in text and "10.00" in text
    assert f"{NEW}: raw library not run: qvq bench has no raw-library comparison for {NEW}" in text
    assert "5.0 KB" in text  # its size on disk


def test_a_backend_that_does_not_fork_chains_gets_no_samples_job(tmp_path, monkeypatch, new_backend):
    """The ``--samples`` rates are measured only for a backend with the registry's ``chains`` capability;
    another is reported as not measured, with why, and no chains worker starts."""
    caps = registry.get("llama").capabilities - {registry.CHAINS}
    new_backend("onnx", capabilities=caps)  # a format whose weights bench does not read: nothing to parse
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\0" * 5000)
    jobs = []

    def fake_worker(spec, *, label, log=None):
        jobs.append(spec["job"])
        return {"ok": True, "sizes": {"56": stats.summarise([{"decode_tok_s": 10.0}])}}

    monkeypatch.setattr(harness, "run_worker", fake_worker)
    entry = harness._measure_backend(
        NEW,
        (True, None),
        {"model": str(model), "mmproj": None},
        {"bandwidth": {"read_gbs_median": 10.0}, "machine": {}},
        images={"56": "chart.png"},
        sizes=[56],
        runs=1,
        decode_tokens=4,
        answer_tokens=2,
        raw=False,
        log=None,
    )
    assert jobs == ["qvq"]
    assert entry["chains"] == {
        "ok": False,
        "reason": f"the {NEW} backend runs one chain at a time (it has no chains capability)",
    }
    console = Console(width=160, record=True)
    report.render_chains_table({"backends": {NEW: entry}}, console)
    assert (
        f"{NEW}: --samples not measured: the {NEW} backend runs one chain at a time" in console.export_text()
    )
