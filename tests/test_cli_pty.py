"""`qvq ask` in a real pseudo-terminal: the live panel draws, and Ctrl-C (SIGINT) keeps the partial output.

The child runs ``python -m qvq_local.cli`` with its stdout, stderr and stdin on the pty, as in a terminal.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.llama,
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal"),
]


@pytest.fixture(scope="module")
def gguf_model(request):
    pytest.importorskip("llama_cpp")
    return str(request.getfixturevalue("tiny_gguf_q4").model)


class PtyProcess:
    """A child process on a pseudo-terminal of ``cols`` x ``rows``; collects everything it writes."""

    def __init__(self, argv: list[str], env: dict[str, str], cols: int = 100, rows: int = 30):
        pid, fd = pty.fork()
        if pid == 0:  # child
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.output = b""
        self.status: int | None = None

    def read_until(self, predicate, timeout: float) -> bool:
        """Read output until ``predicate(output)`` holds, the child closes the pty, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.output):
                return True
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed its side
                    return predicate(self.output)
                if not chunk:
                    return predicate(self.output)
                self.output += chunk
        return predicate(self.output)

    def wait(self, timeout: float) -> int:
        self.read_until(lambda _: False, timeout=0)  # drain what is there
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_until(lambda _: False, timeout=0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.read_until(lambda _: False, timeout=0.5)
                os.close(self.fd)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError(f"qvq did not exit in {timeout}s; output:\n{self.text[-3000:]}")

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QVQ_", "COLUMNS", "LINES"))}
    env.update(
        QVQ_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", TERM="xterm-256color", PYTHONUNBUFFERED="1"
    )
    env.pop("NO_COLOR", None)
    return env


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "qvq_local.cli", "ask", *args]


def test_live_panel_draws_on_a_terminal(gguf_model, sample_image, tmp_path):
    proc = PtyProcess(
        _argv(
            str(sample_image),
            "Which bar is highest?",
            "-m",
            gguf_model,
            "--think-budget",
            "48",
            "--answer-budget",
            "16",
        ),
        _env(tmp_path),
    )
    code = proc.wait(timeout=180)
    text = proc.text
    assert code == 0, text[-3000:]
    assert "\x1b[" in text  # it drew with terminal control codes
    assert "thinking" in text and "answer" in text  # the panel titles
    assert "tiny-f32-Q4_K_M.gguf" in text and "llama" in text  # the header
    assert "thinking budget reached at" in text and "answer forced" in text  # the mark
    assert "/48 thought" in text  # the status line against the budget
    assert "stop: " in text and "tok/s" in text  # the summary


def test_sigint_during_generation_exits_130_and_keeps_the_partial_thought(gguf_model, sample_image, tmp_path):
    save = tmp_path / "partial.md"
    proc = PtyProcess(
        _argv(
            str(sample_image),
            "Which bar is highest?",
            "-m",
            gguf_model,
            "--think-budget",
            "20000",
            "--no-loop-stop",
            "--save",
            str(save),
        ),
        _env(tmp_path),
    )

    # wait until the thought is streaming: the status line shows a non-zero count against the budget
    def thinking(out: bytes) -> bool:
        counts = re.findall(rb"(\d+)/20000 thought", out)
        return bool(counts) and int(counts[-1]) >= 5

    running = proc.read_until(thinking, timeout=180)
    assert running, proc.text[-3000:]
    os.kill(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=60)
    text = proc.text
    assert code == 130, text[-3000:]
    assert "interrupted" in text  # the panel says so
    assert "Traceback" not in text
    saved = save.read_text(encoding="utf-8")
    assert "**Interrupted**" in saved and "stop reason: interrupted" in saved
    thought = saved.split("## Thought (", 1)[1]
    count = int(thought.split(" tokens)", 1)[0])
    assert 0 < count < 20000  # stopped part-way, and what was produced is kept
    body = thought.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert body.strip()
