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


@pytest.mark.parametrize("backend", list(selftest.BACKEND_FORMAT))
def test_backend_decodes_a_quantised_model_in_a_child_process(backend):
    result = native_smoke(backend)
    if result.status == "skipped":
        pytest.skip(result.detail)
    print(f"\n{backend}: {result.status} in {result.seconds:.1f} s: {result.detail}")
    assert result.status == "pass", f"{backend} backend {result.status}: {result.detail}"
    assert " tokens at " in result.detail


def test_a_crash_is_reported_with_its_signal_flags_and_workaround(tmp_path):
    """The judging side of the check, with a stand-in interpreter that dies of SIGSEGV."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -SEGV $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    result = selftest.check("llama", tmp_path / "model.gguf", python=str(fake))
    assert result.status == "crash" and result.signal == "SIGSEGV"
    assert "crashed with SIGSEGV" in result.detail
    assert "QVQ_LLAMA_CPU_BUFFERS=none" in result.detail and "CPU " in result.detail


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
