"""owner/repo[:QUANT] through the real huggingface_hub client, over real HTTP, against tests/hubserver.py.

The GGUF and MLX files the server publishes are the project's own tiny conversions (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_error

from qvq_local import hub, hub_transfer
from qvq_local.errors import DiskFull, ModelError
from qvq_local.formats.manifest import build_manifest, write_manifest
from qvq_local.units import file_size

GGUF_REPO = "acme/Tiny-QVQ-GGUF"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "qvq-home"))


@pytest.fixture(scope="module")
def tiny_gguf_q8(tmp_path_factory, tiny_checkpoint):
    from qvq_local.convert.to_gguf import convert_to_gguf

    return convert_to_gguf(tiny_checkpoint, tmp_path_factory.mktemp("q8"), quant="q8_0", mmproj_quant="f16")


@pytest.fixture()
def gguf_repo(hub_server, tiny_gguf_q4, tiny_gguf_q8, tiny_gguf_f32):
    """Three quantisations and two projectors (F16 and F32), plus a README (a non-LFS file)."""
    hub_server.add(
        GGUF_REPO,
        {
            "Tiny-QVQ-Q4_K_M.gguf": tiny_gguf_q4.model,
            "Tiny-QVQ-Q8_0.gguf": tiny_gguf_q8.model,
            "Tiny-QVQ-F32.gguf": tiny_gguf_f32.model,
            "mmproj-Tiny-QVQ-f16.gguf": tiny_gguf_q4.mmproj,
            "mmproj-Tiny-QVQ-f32.gguf": tiny_gguf_f32.mmproj,
            "README.md": b"# Tiny QVQ GGUF\n",
        },
    )
    return hub_server


def _cdn_files(server) -> set[str]:
    return {r[2].rsplit("/", 1)[-1] for r in server.requests if r[0] == "cdn" and r[1] == "GET"}


def _blobs(tmp_path, repo_id=GGUF_REPO) -> set[str]:
    folder = tmp_path / "hf-cache" / ("models--" + repo_id.replace("/", "--")) / "blobs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


# ----------------------------------------------------------------------------- GGUF repos
def test_named_quant_downloads_only_it_and_one_projector_into_the_shared_cache(gguf_repo, tmp_path):
    got = hub.resolve(f"{GGUF_REPO}:q8_0", progress=False)
    assert (got.format, got.name, got.quantization) == ("gguf", f"{GGUF_REPO}:Q8_0", "Q8_0")
    assert got.path.name == "Tiny-QVQ-Q8_0.gguf" and got.mmproj.name == "mmproj-Tiny-QVQ-f16.gguf"
    cache = tmp_path / "hf-cache"
    assert cache in got.path.parents and got.path.is_symlink()  # huggingface_hub's own layout
    assert _cdn_files(gguf_repo) == {"Tiny-QVQ-Q8_0.gguf", "mmproj-Tiny-QVQ-f16.gguf"}
    repo = gguf_repo.repos[GGUF_REPO]
    assert _blobs(tmp_path) == {repo.lfs["Tiny-QVQ-Q8_0.gguf"], repo.lfs["mmproj-Tiny-QVQ-f16.gguf"]}
    assert got.path.read_bytes() == repo.files["Tiny-QVQ-Q8_0.gguf"]
    assert not (tmp_path / "qvq-home" / "hub").exists()  # nothing stored twice


def test_default_quant_is_q4_k_m_and_the_second_run_makes_no_network_call(gguf_repo, monkeypatch):
    got = hub.resolve(GGUF_REPO, progress=False)
    assert got.path.name == "Tiny-QVQ-Q4_K_M.gguf"
    assert _cdn_files(gguf_repo) == {"Tiny-QVQ-Q4_K_M.gguf", "mmproj-Tiny-QVQ-f16.gguf"}
    before = gguf_repo.count()
    again = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert again == got and gguf_repo.count() == before
    # with the server gone and offline mode on, still resolved from the cache
    gguf_repo.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(f"{GGUF_REPO}:Q4_K_M", download=False) == got
    with pytest.raises(ModelError) as raised:  # a quantisation that was never downloaded
        hub.resolve(f"{GGUF_REPO}:Q8_0")
    assert_error(raised, "not in the Hugging Face cache", "HF_HUB_OFFLINE")


def test_several_quants_without_the_default_are_listed_with_sizes(hub_server, tiny_gguf_q4, tiny_gguf_f32):
    hub_server.add(
        "acme/NoDefault",
        {
            "m-Q8_0.gguf": tiny_gguf_q4.model,
            "m-F32.gguf": tiny_gguf_f32.model,
            "mmproj-m-f16.gguf": tiny_gguf_q4.mmproj,
        },
    )
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/NoDefault", progress=False)
    size = file_size(tiny_gguf_f32.model.stat().st_size)
    assert_error(raised, "several GGUF models", r"F32 \(" + size, "Q8_0", "acme/NoDefault:F32")
    assert hub_server.count("cdn") == 0


def test_unknown_quant_lists_what_there_is(gguf_repo):
    with pytest.raises(ModelError) as raised:
        hub.resolve(f"{GGUF_REPO}:IQ2_XS", progress=False)
    assert_error(raised, "no IQ2_XS quantisation", "available: F32", "Q4_K_M", "Q8_0")
    assert gguf_repo.count("cdn") == 0


def test_mmproj_can_be_chosen(gguf_repo):
    path = hub.pull(f"{GGUF_REPO}:Q4_K_M", progress=False, mmproj="f32")
    assert _cdn_files(gguf_repo) == {"Tiny-QVQ-Q4_K_M.gguf", "mmproj-Tiny-QVQ-f32.gguf"}
    assert path.name == "Tiny-QVQ-Q4_K_M.gguf"
    with pytest.raises(ModelError) as raised:
        hub.pull(f"{GGUF_REPO}:Q4_K_M", progress=False, mmproj="q2_k")
    assert_error(raised, "no single projector matches", "mmproj-Tiny-QVQ-f16.gguf")


def test_gguf_repo_without_projector_is_refused(hub_server, tiny_gguf_q4):
    hub_server.add("acme/TextOnly", {"m-Q4_K_M.gguf": tiny_gguf_q4.model})
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/TextOnly", progress=False)
    assert_error(raised, "no vision projector")
    assert hub_server.count("cdn") == 0


def test_a_corrupted_byte_is_caught_by_sha256_and_the_file_deleted(gguf_repo, tmp_path):
    gguf_repo.corrupt.add("Tiny-QVQ-Q4_K_M.gguf")
    with pytest.raises(ModelError) as raised:
        hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert_error(raised, "Tiny-QVQ-Q4_K_M.gguf failed the sha256 check", "deleted")
    sha = gguf_repo.repos[GGUF_REPO].lfs["Tiny-QVQ-Q4_K_M.gguf"]
    assert sha not in _blobs(tmp_path)
    gguf_repo.corrupt.clear()  # the next run downloads it again, and it passes
    got = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert hub_transfer.sha256_file(got.path) == sha


def _ranges(server, name: str) -> list[str | None]:
    return [r[3] for r in server.requests if r[0] == "cdn" and r[1] == "GET" and r[2].endswith("/" + name)]


@pytest.fixture()
def small_chunks(monkeypatch):
    """huggingface_hub writes 10 MB chunks; 1 KB ones make a resume point inside these small files."""
    import types

    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    monkeypatch.setattr("huggingface_hub.file_download.time", types.SimpleNamespace(sleep=lambda s: None))


def test_a_dropped_connection_resumes_with_a_range_request(gguf_repo, small_chunks):
    name = "Tiny-QVQ-Q4_K_M.gguf"
    gguf_repo.drop_after[name] = [5000]
    got = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    first, second = _ranges(gguf_repo, name)
    assert first is None and second == "bytes=4096-"  # the 4 whole chunks received are kept
    assert got.path.read_bytes() == gguf_repo.repos[GGUF_REPO].files[name]


def test_a_download_cut_off_resumes_on_the_next_run(gguf_repo, small_chunks, tmp_path):
    """The connection keeps dropping until huggingface_hub gives up (as after Ctrl-C or a network
    outage): the error is one line, the partial file stays, and the next run asks only for the rest."""
    name = "Tiny-QVQ-Q4_K_M.gguf"
    gguf_repo.drop_after[name] = [3000] + [0] * 5
    with pytest.raises(ModelError) as raised:
        hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert_error(raised, "download failed")
    sha = gguf_repo.repos[GGUF_REPO].lfs[name]
    assert sha not in _blobs(tmp_path)  # nothing half-written where the complete file belongs
    got = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert _ranges(gguf_repo, name)[-1] == "bytes=2048-"
    assert hub_transfer.sha256_file(got.path) == sha


def test_an_interrupted_download_resumes_from_its_partial_file(gguf_repo, tmp_path):
    """Ctrl-C leaves ``blobs/<sha256>.qvq-partial``: the next run asks for the rest only."""
    repo = gguf_repo.repos[GGUF_REPO]
    sha = repo.lfs["Tiny-QVQ-Q4_K_M.gguf"]
    blobs = tmp_path / "hf-cache" / "models--acme--Tiny-QVQ-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.qvq-partial").write_bytes(repo.files["Tiny-QVQ-Q4_K_M.gguf"][:7000])
    got = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert _ranges(gguf_repo, "Tiny-QVQ-Q4_K_M.gguf") == ["bytes=7000-"]
    assert hub_transfer.sha256_file(got.path) == sha
    assert not (blobs / f"{sha}.qvq-partial").exists()


def test_split_gguf_downloads_every_part(hub_server, tiny_gguf_f32, tmp_path):
    from gguf_split import split_gguf

    parts = split_gguf(tiny_gguf_f32.model, tmp_path / "split", "Tiny-QVQ-F32", 2)
    hub_server.add(
        "acme/Split",
        {**{p.name: p for p in parts}, "mmproj-Tiny-QVQ-f32.gguf": tiny_gguf_f32.mmproj},
    )
    got = hub.resolve("acme/Split", progress=False)
    assert got.path.name == "Tiny-QVQ-F32-00001-of-00002.gguf" and got.quantization == "F32"
    assert (got.path.parent / "Tiny-QVQ-F32-00002-of-00002.gguf").is_file()
    assert _cdn_files(hub_server) == {p.name for p in parts} | {"mmproj-Tiny-QVQ-f32.gguf"}
    (row,) = [r for r in hub.list_models() if r["source"] == "hf-cache"]
    assert row["size"] == sum(p.stat().st_size for p in parts) + tiny_gguf_f32.mmproj.stat().st_size


# ----------------------------------------------------------------------------- safetensors repos
def test_mlx_repo_is_used_as_it_is(hub_server, tiny_mlx_q4):
    files = {p.name: p for p in tiny_mlx_q4.iterdir() if p.is_file()}
    hub_server.add("acme/Tiny-QVQ-MLX-4bit", files)
    got = hub.resolve("acme/Tiny-QVQ-MLX-4bit", progress=False)
    assert (got.format, got.quantization) == ("mlx", "4bit-g64")
    assert hub.resolve("acme/Tiny-QVQ-MLX-4bit:4BIT", progress=False) == got
    hub_server.add("acme/Other-MLX", files)
    before = hub_server.count("cdn")
    with pytest.raises(ModelError) as raised:  # refused on its config.json, before the weights
        hub.resolve("acme/Other-MLX:8bit", progress=False)
    assert_error(raised, "acme/Other-MLX is 4bit-g64, not 8bit")
    assert hub_server.count("cdn") == before
    assert "hf-cache" in got.path.parts
    for name in files:
        if name.endswith((".safetensors", ".json")):
            assert (got.path / name).read_bytes() == Path(files[name]).read_bytes()


def test_full_repo_downloads_safetensors_only_and_converts(hub_server, tiny_checkpoint):
    files = {p.name: p for p in tiny_checkpoint.iterdir() if p.is_file()}
    files["pytorch_model.bin"] = b"pickle!"
    files["modeling_evil.py"] = b"raise SystemExit"
    hub_server.add("acme/Tiny-QVQ", files)
    got = hub.resolve("acme/Tiny-QVQ", progress=False)
    assert got.format == "hf"
    names = {p.name for p in got.path.iterdir()}
    assert "config.json" in names and "pytorch_model.bin" not in names and "modeling_evil.py" not in names
    assert hub.resolve("acme/Tiny-QVQ:f32", progress=False) == got  # its one quantisation, named
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Tiny-QVQ:Q4_K_M", progress=False)
    assert_error(raised, "acme/Tiny-QVQ is F32, not Q4_K_M")


def test_pickle_only_repo_is_refused_before_any_download(hub_server):
    hub_server.add("acme/Pickled", {"config.json": b"{}", "pytorch_model.bin": b"pickle!"})
    with pytest.raises(ModelError) as raised:
        hub.pull("acme/Pickled", progress=False)
    assert_error(raised, "only pickle weights")
    assert not any(r[2].startswith("/acme/Pickled/resolve") for r in hub_server.requests)


# ----------------------------------------------------------------------------- errors
def test_gated_and_missing_repos_are_one_line_errors(hub_server, tiny_gguf_q4):
    hub_server.add("acme/Gated", {"m-Q4_K_M.gguf": tiny_gguf_q4.model}, gated=True)
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Gated", progress=False)
    assert_error(raised, "gated", "HF_TOKEN")
    assert "\n" not in str(raised.value)
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Nothing-Here:Q4_K_M", progress=False)
    assert_error(raised, "not found on the hub, or private")
    assert [r[2] for r in hub_server.requests] == [
        "/api/models/acme/Gated",
        "/api/models/acme/Nothing-Here",
    ]


def test_offline_with_nothing_cached(hub_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Anything:Q4_K_M")
    assert_error(raised, "not in the Hugging Face cache", "HF_HUB_OFFLINE")
    assert hub_server.count() == 0


def test_bad_quant_text_fails_before_the_network(hub_server):
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Repo:Q4 K", progress=False)
    assert_error(raised, "not a quantisation name")
    assert hub_server.count() == 0


def test_disk_check_refuses_a_download_that_cannot_fit(gguf_repo, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    with pytest.raises(DiskFull) as raised:
        hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert_error(raised, "the download needs", r"only 1\.0 KB is free")
    assert gguf_repo.count("cdn") == 0


# ----------------------------------------------------------------------------- listing and legacy
def test_models_lists_the_cache_and_old_qvq_home_downloads_still_resolve(gguf_repo, tmp_path):
    hub.resolve(f"{GGUF_REPO}:Q8_0", progress=False)
    hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    rows = [r for r in hub.list_models() if r["source"] == "hf-cache"]
    assert [(r["name"], r["format"], r["quantization"]) for r in rows] == [
        (f"{GGUF_REPO}:Q4_K_M", "gguf", "Q4_K_M"),
        (f"{GGUF_REPO}:Q8_0", "gguf", "Q8_0"),
    ]
    # a folder `qvq pull` wrote under QVQ_HOME/hub before the shared cache keeps working, with no network
    old = tmp_path / "qvq-home" / "hub" / "acme--Old"
    shutil.copytree(Path(rows[0]["path"]).parent, old, symlinks=False)
    for p in old.glob("*Q8_0*"):
        p.unlink()
    write_manifest(
        old,
        build_manifest(
            old,
            source="acme/Old",
            format="gguf",
            quantization="Q4_K_M",
            model_file="Tiny-QVQ-Q4_K_M.gguf",
            mmproj_file="mmproj-Tiny-QVQ-f16.gguf",
        ),
    )
    # other tools' models in the shared cache are not listed: a text-only GGUF repo, a BERT checkpoint
    text_only = tmp_path / "hf-cache" / "models--acme--Other"
    snap = text_only / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (text_only / "refs").mkdir()
    (text_only / "refs" / "main").write_text("0" * 40)
    (snap / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    (snap / "model.safetensors").write_bytes(b"\x02\0\0\0\0\0\0\0{}")
    assert [r["name"] for r in hub.list_models() if r["source"] == "hf-cache"] == [r["name"] for r in rows]
    before = gguf_repo.count()
    assert hub.resolve("acme/Old").path == old / "Tiny-QVQ-Q4_K_M.gguf"
    assert gguf_repo.count() == before
    assert json.loads(json.dumps(hub.list_models()))[0]["name"] == "acme/Old"


def test_an_unreachable_hub_is_a_one_line_error(hub_server):
    hub_server.close()
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Anything:Q4_K_M", progress=False)
    assert_error(raised, "download failed", "ConnectError")
    assert "\n" not in str(raised.value)


def test_progress_is_drawn_with_rich(gguf_repo, capsys):
    got = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=True)
    assert got.path.is_file()
    err = capsys.readouterr().err
    assert "Tiny-QVQ-Q4_K_M.gguf" in err and "MB" in err


# ----------------------------------------------------------------------------- short names and fit
@pytest.fixture()
def tiny_catalogue(monkeypatch, gguf_repo, tiny_mlx_q4):
    """The catalogue with one entry whose sources are the local hub's repos."""
    from qvq_local import catalogue

    gguf_repo.add("acme/Tiny-QVQ-MLX", {p.name: p for p in tiny_mlx_q4.iterdir() if p.is_file()})
    entry = catalogue.Entry(
        name="tiny",
        title="Tiny QVQ",
        shape="tiny",
        apple=catalogue.Source("acme/Tiny-QVQ-MLX", "mlx", 10**6, size_checked=True),
        other=catalogue.Source(f"{GGUF_REPO}:Q4_K_M", "gguf", 2 * 10**6, size_checked=True),
    )
    monkeypatch.setattr(catalogue, "CATALOGUE", {"tiny": entry})
    return gguf_repo


@pytest.mark.parametrize(
    ("apple", "fmt", "repo"), [(True, "mlx", "acme/Tiny-QVQ-MLX"), (False, "gguf", GGUF_REPO)]
)
def test_short_names_resolve_to_this_platforms_source(tiny_catalogue, monkeypatch, apple, fmt, repo):
    monkeypatch.setattr("qvq_local.hardware.is_apple_silicon", lambda: apple)
    got = hub.resolve("tiny", progress=False)
    assert got.format == fmt and got.name.split(":")[0] == repo
    assert hub.pull("TINY", progress=False) == got.path  # case-insensitive; cached: no second fetch


def test_the_qvq_short_name_names_real_sources_per_platform():
    from qvq_local import catalogue

    entry = catalogue.lookup("qvq")
    assert entry.title == "QVQ-72B-Preview"
    assert (entry.apple.format, hub.parse_ref(entry.apple.ref)) == (
        "mlx",
        hub.HubRef("mlx-community/QVQ-72B-Preview-4bit"),
    )
    assert (entry.other.format, hub.parse_ref(entry.other.ref)) == (
        "gguf",
        hub.HubRef("lmstudio-community/QVQ-72B-Preview-GGUF", "Q4_K_M"),
    )


@pytest.mark.parametrize(
    ("apple", "memory", "verdict"), [(True, 64, "fits"), (False, 64, "fits"), (False, 32, "does not fit")]
)
def test_models_available_shows_sizes_and_the_fit(monkeypatch, apple, memory, verdict):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    monkeypatch.setattr("qvq_local.hardware.is_apple_silicon", lambda: apple)
    monkeypatch.setattr("qvq_local.hardware.memory_bytes", lambda: (memory * 1024**3, memory * 1024**3))
    result = CliRunner().invoke(app, ["models", "--available", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    row = rows["qvq"]
    assert row["verdict"] == verdict
    assert row["source"].startswith("mlx-community/" if apple else "lmstudio-community/")
    assert row["size"] == (41 * 10**9 if apple else int(48.8 * 10**9))
    # QVQ-72B's KV cache (80 layers x 8 KV heads x 128 x f16) comes on top of the weights
    assert row["needed_bytes"] > row["size"] * 1.1
    table = CliRunner().invoke(app, ["models", "--available"])
    assert "qvq" in table.stdout and verdict in table.stdout


def test_the_qwen3_vl_short_names_use_their_family_for_the_fit(monkeypatch):
    """Qwen3-VL's entries: Qwen's own GGUF repos at Q4_K_M elsewhere, MLX 4-bit on Apple Silicon, and the
    memory estimate from Qwen3-VL's dimensions (a Qwen2-VL shape table has no 4b or 8b)."""
    from qvq_local import catalogue, doctor
    from qvq_local.families import FAMILIES

    monkeypatch.setattr("qvq_local.hardware.memory_bytes", lambda: (16 * 1024**3, 16 * 1024**3))
    rows = {r["name"]: r for r in doctor.available_rows(apple_silicon=False)}
    for name, size in (("qwen3-vl-4b", "4B"), ("qwen3-vl-8b", "8B")):
        entry = catalogue.lookup(name)
        assert entry.family == "Qwen3-VL" and entry.shape in FAMILIES["Qwen3-VL"].synth_shapes
        assert hub.parse_ref(entry.other.ref) == hub.HubRef(f"Qwen/Qwen3-VL-{size}-Thinking-GGUF", "Q4_K_M")
        assert entry.apple.format == "mlx" and not entry.other.size_checked  # estimates, said so
        assert rows[name]["verdict"] == "fits"
    # the 8B model has more layers of KV cache and more weights than the 4B
    kv4 = rows["qwen3-vl-4b"]["needed_bytes"] - rows["qwen3-vl-4b"]["size"]
    kv8 = rows["qwen3-vl-8b"]["needed_bytes"] - rows["qwen3-vl-8b"]["size"]
    assert kv8 > kv4 > 0


def test_a_model_too_big_for_this_machine_is_said_before_the_download(gguf_repo, monkeypatch, capsys):
    monkeypatch.setattr("qvq_local.hardware.memory_bytes", lambda: (10**6, 10**6))
    hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    err = capsys.readouterr().err
    assert f"warning: {GGUF_REPO}:Q4_K_M needs at least" in err and "this machine has 976.6 KiB" in err


# ----------------------------------------------------------------------------- the CLI, end to end
def test_pull_and_models_through_the_cli(gguf_repo):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["pull", f"{GGUF_REPO}:q8_0", "-q", "--mmproj", "f32"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("Tiny-QVQ-Q8_0.gguf")
    assert _cdn_files(gguf_repo) == {"Tiny-QVQ-Q8_0.gguf", "mmproj-Tiny-QVQ-f32.gguf"}
    listed = json.loads(runner.invoke(app, ["models", "--json"]).stdout)
    assert [(r["name"], r["source"]) for r in listed] == [(f"{GGUF_REPO}:Q8_0", "hf-cache")]
    result = runner.invoke(app, ["pull", "acme/Missing", "-q"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert_error(line, "error: acme/Missing: not found on the hub, or private")


@pytest.mark.llama
@pytest.mark.slow
def test_ask_with_a_hub_quant_downloads_verifies_answers_then_runs_offline(
    gguf_repo, sample_image, tiny_checkpoint, monkeypatch
):
    """The issue's "done when": ``qvq ask img q -m owner/repo:Q4_K_M`` on a clean cache downloads only that
    quantisation and its projector, verifies them and answers; the second run makes no network call."""
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from qvq_local.cli import app

    args = ["ask", str(sample_image), "Which bar is highest?", "-m", f"{GGUF_REPO}:Q4_K_M"]
    args += ["--think-budget", "8", "--answer-budget", "4", "--json", "--seed", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)
    assert first["qvq"]["backend"] == "llama" and first["usage"]["completion_tokens"] > 0
    assert _cdn_files(gguf_repo) == {"Tiny-QVQ-Q4_K_M.gguf", "mmproj-Tiny-QVQ-f16.gguf"}
    # no generation_config.json came down: the sampling defaults are read from the GGUF's
    # general.sampling.* keys, which differ from every fallback in the synthetic checkpoint
    shipped = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    settings = first["qvq"]["settings"]
    assert settings["top_k"] == shipped["top_k"]
    for key in ("temperature", "top_p", "repetition_penalty"):
        assert settings[key] == pytest.approx(shipped[key], rel=1e-6)
    gguf_repo.close()  # no hub any more, and offline mode on: everything comes from the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = gguf_repo.count()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    second = json.loads(result.stdout)
    assert second["choices"][0]["message"] == first["choices"][0]["message"]  # same files, same seed
    assert gguf_repo.count() == before


def test_a_gguf_that_the_hub_serves_broken_is_refused_by_its_header(hub_server, tiny_gguf_q4, tmp_path):
    """The sha256 matches (the repo's file itself is cut short), so the GGUF header check catches it."""
    hub_server.add(
        "acme/Broken",
        {
            "m-Q4_K_M.gguf": tiny_gguf_q4.model.read_bytes()[:200_000],
            "mmproj-m-f16.gguf": tiny_gguf_q4.mmproj,
        },
    )
    with pytest.raises(ModelError) as raised:
        hub.resolve("acme/Broken", progress=False)
    assert_error(raised, "m-Q4_K_M.gguf from the hub is not a valid GGUF file", "truncated", "deleted")
    sha = hub_server.repos["acme/Broken"].lfs["m-Q4_K_M.gguf"]
    assert sha not in _blobs(tmp_path, "acme/Broken")
    assert hub.from_cache(hub.HubRef("acme/Broken")) is None


@pytest.mark.llama
def test_a_downloaded_split_gguf_loads_through_llama_cpps_own_split_loading(
    hub_server, tiny_gguf_f32, tmp_path
):
    """llama.cpp is handed the first part only and finds the second beside it in the cache's snapshot."""
    pytest.importorskip("llama_cpp")
    from gguf_split import split_gguf

    from qvq_local.backends import llamacpp
    from qvq_local.backends.base import SamplingParams

    parts = split_gguf(tiny_gguf_f32.model, tmp_path / "split", "Tiny-QVQ-F32", 2)
    hub_server.add(
        "acme/Split", {**{p.name: p for p in parts}, "mmproj-Tiny-QVQ-f32.gguf": tiny_gguf_f32.mmproj}
    )
    got = hub.resolve("acme/Split", progress=False)
    model = llamacpp.load(got.path, got.mmproj)
    try:
        session = model.new_session(SamplingParams(), n_ctx=64)
        session.close()
        assert model.n_vocab > 0
    finally:
        model.close()
    second = got.path.parent / "Tiny-QVQ-F32-00002-of-00002.gguf"
    second.unlink()  # without its second part the model does not load: the split really is used
    with pytest.raises(ModelError) as raised:
        llamacpp.load(got.path, got.mmproj)
    assert_error(raised, "llama.cpp could not load this GGUF")


def test_ctrl_c_mid_file_keeps_the_partial_and_the_next_run_resumes(
    gguf_repo, small_chunks, monkeypatch, tmp_path
):
    """KeyboardInterrupt arrives while huggingface_hub writes a chunk: it propagates (no error swallowed
    it), the bytes written stay in qvq's partial file, nothing enters the cache, the next run resumes."""
    import huggingface_hub.file_download as fd

    real_http_get = fd.http_get
    name = "Tiny-QVQ-Q4_K_M.gguf"

    class Interrupting:
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, data):
            if self.n >= 3 * 1024:
                raise KeyboardInterrupt
            self.n += len(data)
            return self.fh.write(data)

        def __getattr__(self, attr):
            return getattr(self.fh, attr)

    monkeypatch.setattr(fd, "http_get", lambda url, fh, **kw: real_http_get(url, Interrupting(fh), **kw))
    with pytest.raises(KeyboardInterrupt):
        hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    sha = gguf_repo.repos[GGUF_REPO].lfs[name]
    blobs = tmp_path / "hf-cache" / "models--acme--Tiny-QVQ-GGUF" / "blobs"
    assert (blobs / f"{sha}.qvq-partial").stat().st_size == 3 * 1024 and sha not in _blobs(tmp_path)
    monkeypatch.setattr(fd, "http_get", real_http_get)
    got = hub.resolve(f"{GGUF_REPO}:Q4_K_M", progress=False)
    assert _ranges(gguf_repo, name)[-1] == "bytes=3072-"
    assert hub_transfer.sha256_file(got.path) == sha
