"""The prefix cache policy (qvq_local.prefix_cache): key, in-memory LRU, disk files, and its use by
``Model.ask`` and ``qvq ask`` / ``qvq cache``.  The backends' restore itself: tests/test_prefix_state.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_error
from typer.testing import CliRunner

from qvq_local import prefix_cache as pc
from qvq_local.backends.base import PrefixState, Prompt
from qvq_local.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QVQ_MODEL", raising=False)
    monkeypatch.delenv("QVQ_BACKEND", raising=False)
    monkeypatch.delenv("QVQ_CACHE_MAX_MB", raising=False)


def _state(n_bytes: int = 4096, seed: int = 0) -> PrefixState:
    rng = np.random.default_rng(seed)
    return PrefixState(
        backend="llama",
        n_cells=7,
        n_pos=5,
        ids=[1, 2, 3],
        tensors={
            "seq_state": rng.integers(0, 255, n_bytes, dtype=np.uint8),
            "0.keys": rng.standard_normal((1, 2, 7, 4)).astype(np.float32),
        },
        meta={"image_tokens": [4]},
    )


# ---------------------------------------------------------------- key


def test_key_changes_with_everything_the_prefix_depends_on(tmp_path):
    from PIL import Image

    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    img = Image.new("RGB", (28, 28), (10, 20, 30))
    base = dict(
        model=pc.model_identity(model),
        backend="llama",
        prefix="<sys><img>",
        template="T",
        images=[img],
        max_pixels=1000,
    )
    key = pc.prefix_key(**base)
    assert key == pc.prefix_key(**base)  # deterministic
    other_img = img.copy()
    other_img.putpixel((0, 0), (11, 20, 30))
    for change in (
        {"backend": "mlx"},
        {"prefix": "<other sys><img>"},
        {"template": "T2"},
        {"images": [other_img]},
        {"max_pixels": 2000},
    ):
        assert pc.prefix_key(**{**base, **change}) != key, change
    model.write_bytes(b"x" * 11)  # the model file changed (size, mtime)
    assert pc.prefix_key(**{**base, "model": pc.model_identity(model)}) != key


def test_prefix_text_ends_after_the_last_image_block():
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    text = f"sys\nuser\n{block}{block}What?<|im_end|>"
    assert pc.prefix_text(text, block) == f"sys\nuser\n{block}{block}"
    assert pc.prefix_text("no image", block) == ""


# ---------------------------------------------------------------- memory


def test_memory_cache_is_lru_and_capped_in_bytes():
    one = _state(1000, 1)
    cache = pc.MemoryCache(max_bytes=int(one.nbytes * 2.5))
    cache.put("a", one)
    cache.put("b", _state(1000, 2))
    assert cache.get("a") is one  # a is now the most recently used
    cache.put("c", _state(1000, 3))  # over the cap: b goes, not a
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes <= cache.max_bytes
    assert not cache.put("huge", _state(10 * one.nbytes))  # larger than the whole cap: not kept
    assert "huge" not in cache and len(cache) == 2


# ---------------------------------------------------------------- disk


def test_disk_round_trip_is_exact(tmp_path):
    cache = pc.DiskCache(tmp_path / "c")
    state = _state()
    assert cache.put("k1", state) > state.nbytes
    back = cache.get("k1")
    assert (back.backend, back.n_cells, back.n_pos, back.ids, back.meta) == (
        "llama",
        7,
        5,
        [1, 2, 3],
        state.meta,
    )
    for name, arr in state.tensors.items():
        assert back.tensors[name].dtype == arr.dtype and np.array_equal(back.tensors[name], arr)
    # a valid safetensors file: the header parses as safetensors says (8-byte length, JSON, data)
    raw = cache.path("k1").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert header["0.keys"]["dtype"] == "F32" and header["0.keys"]["shape"] == [1, 2, 7, 4]
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda raw: raw[: len(raw) - 10], ("truncated",)),
        (lambda raw: raw[:5], ("truncated",)),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]), ("corrupt", "checksum")),
        (lambda raw: raw[:9] + b"!" + raw[10:], ("corrupt header",)),
        # valid JSON, wrong value: the checksum covers the header's values too
        (lambda raw: raw.replace(b'\\"n_pos\\": 5', b'\\"n_pos\\": 6'), ("corrupt", "checksum")),
    ],
)
def test_untrusted_files_are_ignored_with_one_notice(tmp_path, damage, words):
    notices: list[str] = []
    cache = pc.DiskCache(tmp_path / "c", notice=notices.append)
    cache.put("k1", _state())
    path = cache.path("k1")
    path.write_bytes(damage(path.read_bytes()))
    assert cache.get("k1") is None
    assert len(notices) == 1 and "\n" not in notices[0]
    assert_error(notices[0], "ignoring", *words, "rebuilding", path=path)
    assert not path.exists()  # removed, so the next ask rebuilds it


def test_a_file_under_another_key_is_refused(tmp_path):
    notices: list[str] = []
    cache = pc.DiskCache(tmp_path / "c", notice=notices.append)
    cache.put("k1", _state())
    cache.path("k1").rename(cache.path("k2"))
    assert cache.get("k2") is None
    assert_error(notices[0], "key does not match")


def test_disk_cap_evicts_the_least_recently_used(tmp_path):
    import os

    state = _state(50_000)
    cache = pc.DiskCache(tmp_path / "c", max_bytes=int(state.nbytes * 2.5))
    for i, key in enumerate(("a", "b")):
        cache.put(key, state)
        os.utime(cache.path(key), (1000 + i, 1000 + i))
    assert cache.get("a") is not None  # touched: now the newest
    cache.put("c", state)
    assert cache.path("a").exists() and cache.path("c").exists() and not cache.path("b").exists()
    assert sum(e[1] for e in cache.entries()) <= cache.max_bytes
    assert cache.clear()[0] == 2 and cache.entries() == []


# ---------------------------------------------------------------- the policy, on a stand-in session


#: A prompt with one image (the policy only counts them).
PROMPT = Prompt("prompt", images=["image"])


class _Session:
    """Records how it was prefilled; refuses any prefix state whose ids differ from ``accepts``."""

    def __init__(self, accepts: list[int]):
        self.accepts = accepts
        self.calls: list[str] = []
        self.prefix_state = None

    def prefill(self, prompt, *, prefix=None, keep_prefix=False):
        from qvq_local.errors import InputError

        if prefix is not None:
            if prefix.ids != self.accepts:
                raise InputError("the saved prefix state does not match this prompt (other text or images)")
            self.calls.append("restored" + (" and kept" if keep_prefix else ""))
            if keep_prefix:  # a state at an earlier image: the later images encoded, the new prefix kept
                self.prefix_state = _state(100, 9)
                self.prefix_state.ids = list(self.accepts) + [4]
            return "stats"
        self.calls.append("fresh")
        if keep_prefix:
            self.prefix_state = _state(100, 9)
            self.prefix_state.ids = list(self.accepts)
        return "stats"


def test_policy_memory_then_disk_then_fresh(tmp_path):
    notices: list[str] = []
    memory, disk = pc.MemoryCache(), pc.DiskCache(tmp_path / "c", notice=notices.append)
    s1 = _Session([1, 2, 3])
    stats, out = pc.prefill(s1, PROMPT, "k", memory, disk, notices.append)
    assert (stats, out.source, s1.calls) == ("stats", "fresh", ["fresh"]) and "k" in memory
    assert not disk.entries()  # the disk write waits for store() (after the answer)
    assert pc.store(out, disk).write_s > 0 and len(disk.entries()) == 1
    s2 = _Session([1, 2, 3])
    assert pc.prefill(s2, PROMPT, "k", memory, disk)[1].source == "memory"
    s3 = _Session([1, 2, 3])
    out3 = pc.prefill(s3, PROMPT, "k", None, disk)[1]
    assert out3.source == "disk" and out3.read_s > 0 and s3.calls == ["restored"]
    # no key (no image, caching off): a plain prefill, nothing kept
    s4 = _Session([1, 2, 3])
    assert pc.prefill(s4, PROMPT, None, memory, disk)[1].source == "off" and s4.calls == ["fresh"]
    assert notices == []


def test_policy_a_refused_state_is_dropped_with_a_notice_and_rebuilt():
    notices: list[str] = []
    memory = pc.MemoryCache()
    stale = _state(100, 1)
    stale.ids = [9, 9]
    memory.put("k", stale)
    session = _Session([1, 2, 3])
    _, out = pc.prefill(session, PROMPT, "k", memory, None, notices.append)
    assert out.source == "fresh" and session.calls == ["fresh"]
    assert memory.get("k").ids == [1, 2, 3]  # replaced by the rebuilt state
    assert len(notices) == 1
    assert_error(notices[0], "memory entry not used", "does not match", "rebuilding")


def test_policy_a_state_at_an_earlier_image_is_restored_and_the_whole_prefix_kept(tmp_path):
    """A conversation's new turn brings an image: the state at the earlier turn's image is restored (the
    backend encodes only the new image), and the state at the new last image is kept for the next turn."""
    memory, disk = pc.MemoryCache(), pc.DiskCache(tmp_path / "c")
    earlier = _state(100, 1)
    earlier.ids = [1, 2, 3]
    memory.put("turn1", earlier)
    session = _Session([1, 2, 3])
    prompt = Prompt("prompt", images=["image 1", "image 2"])
    _, out = pc.prefill(session, prompt, "turn2", memory, disk, earlier=[(1, "turn1")])
    assert out.source == "memory" and out.images_reused == 1 and session.calls == ["restored and kept"]
    assert memory.get("turn2") is session.prefix_state  # the next turn restores it whole
    assert (
        pc.store(out, disk).write_s > 0 and len(disk.entries()) == 1
    )  # and it goes to disk after the answer
    again = _Session([1, 2, 3, 4])
    _, out = pc.prefill(again, prompt, "turn2", memory, disk, earlier=[(1, "turn1")])
    assert out.images_reused == 2 and again.calls == ["restored"]


# ---------------------------------------------------------------- Model.ask and the CLI (tiny GGUF)


@pytest.fixture(scope="module")
def gguf_model(request):
    pytest.importorskip("llama_cpp")
    return request.getfixturevalue("tiny_gguf_q4").model


ASK = {"think_budget": 12, "answer_budget": 6, "seed": 0}


@pytest.mark.llama
def test_model_ask_reuses_the_prefix_and_answers_the_same(gguf_model, sample_image, tmp_path):
    import qvq_local

    with qvq_local.load(gguf_model) as model:
        first = model.ask(sample_image, "Which bar is highest?", **ASK)
        second = model.ask(sample_image, "What colour is it?", **ASK)
        assert first.settings["prefix_cache"]["source"] == "fresh"
        assert second.settings["prefix_cache"]["source"] == "memory"
        assert second.timings.image_encode_s == 0.0 and first.timings.image_encode_s > 0.0
        # the same question with no cache at all gives the same tokens
        model.prefix_cache = None
        plain = model.ask(sample_image, "What colour is it?", **ASK)
        assert plain.settings["prefix_cache"]["source"] == "off"
        assert (plain.thought, plain.answer) == (second.thought, second.answer)

        # on disk: written after the first answer, read by the next ask, rebuilt when damaged
        notices: list[str] = []
        model.disk_cache = pc.DiskCache(tmp_path / "cache", notice=notices.append)
        fresh = model.ask(sample_image, "Which bar is highest?", **ASK)
        assert fresh.settings["prefix_cache"]["source"] == "fresh"
        assert fresh.settings["prefix_cache"]["write_s"] > 0 and fresh.settings["prefix_cache"]["bytes"] > 0
        (path,) = [e[0] for e in model.disk_cache.entries()]
        reused = model.ask(sample_image, "What colour is it?", **ASK)
        assert reused.settings["prefix_cache"]["source"] == "disk"
        assert (reused.thought, reused.answer) == (plain.thought, plain.answer)
        path.write_bytes(path.read_bytes()[:-100])
        rebuilt = model.ask(sample_image, "What colour is it?", **ASK)
        assert rebuilt.settings["prefix_cache"]["source"] == "fresh"
        assert len(notices) == 1 and "truncated" in notices[0]
        assert (rebuilt.thought, rebuilt.answer) == (plain.thought, plain.answer)
        assert pc.read_state(path, path.name.removesuffix(pc.SUFFIX)).n_cells > 0  # written again


@pytest.mark.llama
def test_cli_caches_on_disk_and_no_cache_turns_it_off(gguf_model, sample_image):
    args = ["ask", str(sample_image), "--model", str(gguf_model), "--json", "--think-budget", "8"]
    args += ["--answer-budget", "4"]

    def source(result):
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["qvq"]["settings"]["prefix_cache"]["source"]

    assert source(runner.invoke(app, [*args, "--no-cache", "Q one?"])) == "off"
    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert info["entries"] == 0
    assert source(runner.invoke(app, [*args, "Q one?"])) == "fresh"
    assert source(runner.invoke(app, [*args, "Q two?"])) == "disk"
    info = json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)
    assert info["entries"] == 1 and info["bytes"] > 0
    result = runner.invoke(app, ["cache", "clear"])
    assert result.exit_code == 0 and "removed 1 file" in result.stdout
    assert json.loads(runner.invoke(app, ["cache", "info", "--json"]).stdout)["entries"] == 0
