"""One small smoke check per backend, in a child process, before anything decodes in-process.

See tests/conftest.py: when a backend crashes here, this test fails with the signal, the CPU features and
the workaround, and the in-process tests of that backend are skipped instead of killing pytest.
"""

from __future__ import annotations

import os
import signal
import stat

import pytest
from conftest import native_smoke

from qvq_local import selftest
from qvq_local.backends import registry


@pytest.mark.parametrize("backend", list(registry.names()))
def test_backend_decodes_a_quantised_model_in_a_child_process(backend, request):
    result = native_smoke(backend, request)
    if result.status == "skipped":
        pytest.skip(result.detail)
    print(f"\n{backend}: {result.status} in {result.seconds:.1f} s: {result.detail}")
    assert result.status == "pass", f"{backend} backend {result.status}: {result.detail}"
    assert " tokens at " in result.detail
    # how it ran, in its backend's words (the run_facts hook's summary), else the backend's title
    tail = {"llama": ", CPU buffers: ", "mlx": ", MLX"}.get(backend)
    assert tail is None or tail in result.detail


def test_a_crash_is_reported_with_its_signal_flags_and_workaround(tmp_path):
    """The judging side of the check, with a stand-in interpreter that dies of SIGSEGV."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -SEGV $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = selftest.check("llama", tmp_path / "model.gguf", python=str(fake))
    assert result.status == "crash" and result.signal == "SIGSEGV"
    assert "crashed with SIGSEGV" in result.detail
    assert "QVQ_LLAMA_CPU_BUFFERS=none" in result.detail and "CPU " in result.detail


def test_crash_advice_is_the_backends_own_else_another_backend_to_switch_to():
    llama = selftest.crash_advice("llama")  # its registry crash_advice hook
    assert (
        llama.startswith("CPU ") and "workaround: QVQ_LLAMA_CPU_BUFFERS=none (or --cpu-buffers none)" in llama
    )
    mlx = selftest.crash_advice("mlx")  # no hook: the other local backends, in the format each loads
    assert mlx.startswith("CPU ")
    assert mlx.endswith(
        "; workaround: use --backend llama (GGUF) on this machine; run with QVQ_DEBUG=1 for details"
    )


def test_a_failure_is_not_a_crash(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModelError: broken' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = selftest.check("mlx", tmp_path / "m", python=str(fake))
    assert result.status == "fail" and result.signal is None
    assert result.detail == "exit code 3: ModelError: broken"


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_signal_names():
    assert selftest.signal_name(-signal.SIGSEGV) == "SIGSEGV"
    assert selftest.signal_name(-signal.SIGILL) == "SIGILL"
    assert selftest.signal_name(0) is None


def _doctor_with(monkeypatch, results, *args):
    from typer.testing import CliRunner

    from qvq_local.cli import app

    monkeypatch.setattr(selftest, "run", lambda backends=None, on_progress=None: results)
    return CliRunner().invoke(app, ["doctor", "--selftest", *args], terminal_width=300)


def test_doctor_selftest_reports_each_backend_and_exits_4_on_a_crash(monkeypatch):
    crash = selftest.CheckResult("llama", "crash", "crashed with SIGSEGV; CPU x: amx_int8", 1.5, "SIGSEGV")
    ok = selftest.CheckResult("mlx", "pass", "50 tokens at 97 tok/s, stop max_tokens, MLX", 3.0)
    result = _doctor_with(monkeypatch, [crash, ok])
    assert result.exit_code == 4
    assert "self-test llama  crash (1.5 s): crashed with SIGSEGV" in result.stdout
    assert "self-test mlx    pass (3.0 s)" in result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: self-test of the llama backend: crashed with SIGSEGV; CPU x: amx_int8"
    ]
    as_json = _doctor_with(monkeypatch, [crash, ok], "--json")
    import json

    assert as_json.exit_code == 4
    assert [r["status"] for r in json.loads(as_json.stdout)["selftest"]] == ["crash", "pass"]


def test_doctor_selftest_passes_with_exit_0(monkeypatch):
    ok = selftest.CheckResult("llama", "pass", "50 tokens", 1.0)
    skipped = selftest.CheckResult("mlx", "skipped", "not installed (pip install 'qvq-local[mlx]')")
    result = _doctor_with(monkeypatch, [ok, skipped])
    assert result.exit_code == 0, result.output
    assert "self-test mlx    skipped" in result.stdout


def test_the_cli_prints_a_fault_traceback_on_a_native_crash(tmp_path):
    """qvq (ask, bench, every command) runs with faulthandler on: a segfault names the Python stack."""
    import subprocess
    import sys

    script = (
        "import ctypes, sys\n"
        "from qvq_local import cli\n"
        "def crash():\n"
        "    ctypes.string_at(0)\n"  # a NULL read: SIGSEGV inside a C call, as in a native library
        "cli.app = crash\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "line 4 in crash" in proc.stderr


def test_bench_names_a_crashed_worker_with_its_signal_and_the_workaround(monkeypatch):
    from qvq_local.bench import processes as bench

    class Died:
        returncode = -signal.SIGSEGV

    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: Died())
    result = bench.run_worker({"job": "qvq", "backend": "llama"}, label="llama: qvq-local")
    assert result["ok"] is False
    assert result["reason"].startswith(
        "the llama: qvq-local process ended with SIGSEGV (a native crash: CPU "
    )
    assert "QVQ_LLAMA_CPU_BUFFERS=none" in result["reason"]


def test_a_garbled_reply_is_a_failure_not_a_traceback(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '{not json'\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = selftest.check("llama", tmp_path / "m.gguf", python=str(fake))
    assert result.status == "fail" and result.signal is None
