"""Interrupted work leaves nothing that looks complete: SIGINT/SIGTERM during synth, convert and ask, and a
full disk during convert.

Each case runs the real CLI in a subprocess, waits until it is demonstrably mid-write (its hidden partial
folder exists and holds data), sends the signal, then checks: the exit code says "interrupted" (130, or
143 for SIGTERM), no traceback, the final output does not exist, no hidden partial/staged folder is left,
and a rerun into the same path succeeds.  ``qvq ask`` interrupted keeps its partial thought in ``--save``
and ``--json`` output.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "qvq_local.cli"]
INTERRUPTED = {signal.SIGINT: (130,), signal.SIGTERM: (130, 143)}


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVQ_")}
    env.update(
        HOME=str(home),
        QVQ_HOME=str(home / "qvq"),
        HF_HUB_OFFLINE="1",
        MLX_DISABLE_COMPILE="1",
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="200",
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    return env


class Child:
    """A CLI subprocess whose stdout/stderr are collected by threads (so we can poll while it runs)."""

    def __init__(self, args: list[str], cwd: Path, home: Path, preexec_fn=None):
        self.args = args
        self.proc = subprocess.Popen(
            [*CLI, *args],
            cwd=cwd,
            env=cli_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - sets resource limits only, before threads start
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        while True:
            chunk = stream.read(1)
            if not chunk:
                return
            sink.append(chunk)

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"finished before {what}: rc={self.proc.returncode}\n{self.stderr[-3000:]}")
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"timed out waiting for {what}\n{self.stderr[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"did not stop within {timeout} s after the signal\n{self.stderr[-3000:]}")
        for t in self._threads:
            t.join(timeout=10)
        return rc

    def describe(self) -> str:
        return (
            f"args={self.args}\nrc={self.proc.returncode}\nstdout={self.stdout[-2000:]}\n"
            f"stderr={self.stderr[-3000:]}"
        )


def partials(folder: Path, name: str) -> list[Path]:
    """Hidden partial/staging/staged siblings of ``name`` (nested too: ``..name.partial-x.staging-y``)."""
    if not folder.is_dir():
        return []
    return [
        p for p in folder.iterdir() if p.name.startswith(".") and p.name.lstrip(".").startswith(f"{name}.")
    ]


def partial_bytes(folder: Path, name: str) -> int:
    total = 0
    for p in partials(folder, name):
        for f in p.rglob("*") if p.is_dir() else [p]:
            try:
                total += f.stat().st_size if f.is_file() else 0
            except OSError:
                pass
    return total


def assert_interrupted_cleanly(child: Child, rc: int, sig: int, parent: Path, name: str) -> None:
    shown = child.describe()
    assert rc in INTERRUPTED[sig], shown
    assert "Traceback" not in child.stdout + child.stderr, shown
    assert not (parent / name).exists(), f"a complete-looking output exists\n{shown}"
    assert partials(parent, name) == [], f"partial files left: {partials(parent, name)}\n{shown}"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def mid_source(tmp_path_factory) -> Path:
    """A ~140M-parameter bf16 Qwen2-VL-layout checkpoint (~290 MB): converting it takes seconds, not
    milliseconds, so a signal lands mid-write."""
    from qvq_local.convert.synthetic import write_checkpoint

    from qvq_local.families.qwen2vl import SynthShape

    shape = SynthShape(
        name="mid",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=16384,
        tie_word_embeddings=False,
        mrope_section=(16, 24, 24),
        max_position_embeddings=4096,
        vision_depth=4,
        vision_embed_dim=512,
        vision_num_heads=8,
        tokenizer_base=1264,
        max_shard_bytes=64 * 1024**2,
    )
    return write_checkpoint(tmp_path_factory.mktemp("mid") / "mid-src", shape=shape, dtype="bf16", seed=0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, home) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    env = cli_env(home)
    subprocess.run(
        [*CLI, "synth", str(root / "src"), "--shape", "tiny", "--dtype", "f32"],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *CLI,
            "convert",
            str(root / "src"),
            "--to",
            "gguf",
            "--quant",
            "f32",
            "--mmproj-quant",
            "f32",
            "-o",
            str(root / "gguf"),
            "-q",
        ],
        cwd=root,
        env=env,
        check=True,
        capture_output=True,
    )
    return root / "gguf"


SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


# ------------------------------------------------------------------------------------------ synth
@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_during_synth(sig, home, tmp_path):
    child = Child(["synth", "big", "--shape", "2b"], tmp_path, home)
    child.wait_until(lambda: partial_bytes(tmp_path, "big") > 20 * 1024**2, 120, "synth to write 20 MB")
    child.proc.send_signal(sig)
    rc = child.finish()
    assert_interrupted_cleanly(child, rc, sig, tmp_path, "big")
    # a rerun into the same path succeeds
    rerun = subprocess.run(
        [*CLI, "synth", "big", "--shape", "tiny"],
        check=False,
        cwd=tmp_path,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "big" / "model.safetensors.index.json").is_file()
    assert partials(tmp_path, "big") == []


# ------------------------------------------------------------------------------------------ convert
def _convert_args(src: Path, fmt: str, out: str) -> list[str]:
    if fmt == "gguf":
        return ["convert", str(src), "--to", "gguf", "--quant", "q8_0", "-o", out, "-q"]
    return ["convert", str(src), "--to", "mlx", "--bits", "4", "-o", out, "-q"]


@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_during_convert(sig, fmt, mid_source, home, tmp_path):
    child = Child(_convert_args(mid_source, fmt, "out"), tmp_path, home)
    child.wait_until(lambda: partial_bytes(tmp_path, "out") > 1024**2, 180, "convert to start writing")
    child.proc.send_signal(sig)
    rc = child.finish()
    assert_interrupted_cleanly(child, rc, sig, tmp_path, "out")
    assert sorted(p.name for p in mid_source.parent.iterdir()) == ["mid-src"], "the source folder was touched"
    rerun = subprocess.run(
        [*CLI, *_convert_args(mid_source, fmt, "out")],
        check=False,
        cwd=tmp_path,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "out" / "qvq-manifest.json").is_file()
    assert partials(tmp_path, "out") == []


# ------------------------------------------------------------------------------------------ full disk
def _small_file_limit(limit: int):
    def apply() -> None:  # runs in the child: writes past `limit` bytes fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("fmt", ["gguf", "mlx"])
def test_full_disk_during_convert(fmt, mid_source, home, tmp_path):
    args = _convert_args(mid_source, fmt, "out")
    child = Child(args, tmp_path, home, preexec_fn=_small_file_limit(8 * 1024**2))
    rc = child.finish(timeout=600)
    shown = child.describe()
    assert rc != 0, shown
    assert "Traceback" not in child.stdout + child.stderr, shown
    lines = [ln for ln in child.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, shown
    assert any(w in lines[0].lower() for w in ("space", "disk", "too large", "full")), shown
    assert not (tmp_path / "out").exists(), shown
    assert partials(tmp_path, "out") == [], shown


def test_full_disk_during_synth(home, tmp_path):
    child = Child(
        ["synth", "full", "--shape", "tiny"], tmp_path, home, preexec_fn=_small_file_limit(2 * 1024**2)
    )
    rc = child.finish(timeout=300)
    shown = child.describe()
    assert rc != 0, shown
    assert "Traceback" not in child.stdout + child.stderr, shown
    lines = [ln for ln in child.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, shown
    assert not (tmp_path / "full").exists() and partials(tmp_path, "full") == [], shown


# ------------------------------------------------------------------------------------------ ask
def _image(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(path)
    return path


def test_sigint_during_ask_keeps_partial_thought_plain(tiny_gguf, home, tmp_path):
    """Piped output streams the thought to stderr: interrupt once some has appeared."""
    save = tmp_path / "run.md"
    args = [
        "ask",
        str(_image(tmp_path / "red.png")),
        "What colour is it?",
        "--model",
        str(tiny_gguf),
        "--no-loop-stop",
        "--save",
        str(save),
    ]
    child = Child(args, tmp_path, home)

    def thought_lines() -> list[str]:  # stderr: a "[model · backend ...]" header, then the thought
        return [ln for ln in child.stderr.splitlines()[1:] if ln.strip() and not ln.startswith("[")]

    child.wait_until(lambda: sum(len(ln) for ln in thought_lines()) > 40, 180, "the thought to stream")
    child.proc.send_signal(signal.SIGINT)
    rc = child.finish()
    shown = child.describe()
    assert rc == 130, shown
    assert "Traceback" not in child.stdout + child.stderr, shown
    assert save.is_file(), shown
    text = save.read_text()
    streamed = thought_lines()[0][:20]
    assert streamed in text, (streamed, text[:1500])
    assert "interrupted" in text.lower(), text[:1500]


def test_sigint_during_ask_keeps_partial_thought_json(tiny_gguf, home, tmp_path):
    """--json prints nothing until the end; interrupt after a few seconds of decoding (tiny model, no
    budget, loop stop off: it would run for minutes), then the JSON object holds the partial thought."""
    save = tmp_path / "run.md"
    args = [
        "ask",
        str(_image(tmp_path / "red.png")),
        "What colour is it?",
        "--model",
        str(tiny_gguf),
        "--no-loop-stop",
        "--json",
        "--save",
        str(save),
    ]
    child = Child(args, tmp_path, home)
    time.sleep(6)
    assert child.proc.poll() is None, child.describe()
    child.proc.send_signal(signal.SIGINT)
    rc = child.finish()
    shown = child.describe()
    assert rc == 130, shown
    assert "Traceback" not in child.stdout + child.stderr, shown
    data = json.loads(child.stdout)
    message = data["choices"][0]["message"]
    assert message.get("reasoning_content"), shown
    assert data["qvq"]["stop_reason"] == "interrupted", shown
    assert save.is_file() and message["reasoning_content"].split()[0] in save.read_text()


# ------------------------------------------------------------------------------------------ two at once
def test_a_second_convert_into_the_same_output_fails_at_once(mid_source, home, tmp_path):
    """Issue 22, defect 7: two `qvq convert` runs with the same -o both exited 0 and the last silently
    replaced the other's output.  The first holds an OS lock on its output; the second fails at once, in
    one line naming the folder and the first run's pid (and not suggesting --force, which would not help
    while the first runs); a run killed with SIGKILL leaves no lock behind."""
    args = _convert_args(mid_source, "gguf", "out")
    first = Child(args, tmp_path, home)
    first.wait_until(lambda: partial_bytes(tmp_path, "out") > 1024**2, 180, "convert to start writing")
    t0 = time.monotonic()
    for extra in ([], ["--force"]):
        second = subprocess.run(
            [*CLI, *args, *extra],
            cwd=tmp_path,
            env=cli_env(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
        assert lines[0].startswith("error: out: ") and f"pid {first.proc.pid}" in lines[0], lines[0]
        assert "--force" not in lines[0] and "Traceback" not in second.stderr
    assert time.monotonic() - t0 < 60 and first.proc.poll() is None  # refused while the first still ran
    assert first.finish(timeout=600) == 0, first.describe()
    assert (tmp_path / "out" / "qvq-manifest.json").is_file()
    assert partials(tmp_path, "out") == []  # no partial folder, no lock file left
    after = subprocess.run(
        [*CLI, *args], cwd=tmp_path, env=cli_env(home), capture_output=True, text=True, timeout=120
    )
    assert after.returncode == 2 and "--force" in after.stderr  # the first has ended: now --force helps

    killed = Child([*args, "--force"], tmp_path, home)
    killed.wait_until(lambda: partial_bytes(tmp_path, "out") > 1024**2, 180, "convert to start writing")
    killed.proc.kill()
    killed.finish()
    rerun = subprocess.run(
        [*CLI, *args, "--force"], cwd=tmp_path, env=cli_env(home), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr  # the dead run's lock went with it
    assert (tmp_path / "out" / "qvq-manifest.json").is_file()
