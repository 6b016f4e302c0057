"""``qvq doctor --selftest``: a tiny synthetic model through each installed backend, in a child process.

Why a child process: the native libraries can crash the whole interpreter (llama.cpp's AMX buffer type
segfaulted on Intel Xeons, upstream issue #20824).  In a child, a crash becomes a report -- the backend,
the signal, the CPU features and the workaround -- instead of a dead terminal, and the other backends
still get their turn.  The test suite runs the same check first (``tests/conftest.py``), so a native crash
fails one named test instead of killing pytest before it reports anything.

The model is the ``tiny`` synthetic checkpoint, quantised as users run it (GGUF Q4_K_M, MLX 4-bit), since
quantised kernels are where CPU-specific code runs.  Built once and cached under
``$QVQ_HOME/selftest/<qvq version>``; a run takes a few seconds after that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qvq_local.backends import registry

CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class CheckResult:
    backend: str
    status: str  # pass | fail | crash | skipped
    detail: str
    seconds: float = 0.0
    signal: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _home() -> Path:
    from importlib.metadata import PackageNotFoundError, version

    from qvq_local.config import qvq_home

    try:
        ver = version("qvq-local")
    except PackageNotFoundError:
        ver = "dev"
    return qvq_home() / "selftest" / ver


def prepare(backend: str, root: Path | None = None) -> Path:
    """The self-test model for ``backend`` (built on first use): the tiny checkpoint converted by ``qvq
    convert``'s own pipeline to the backend's format, with that format's defaults (the quantisation users
    run), into a folder that only exists once the conversion is complete."""
    from qvq_local.convert.pipeline import convert
    from qvq_local.convert.synthetic import write_checkpoint

    root = Path(root) if root is not None else _home()
    checkpoint = root / "tiny"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(checkpoint, shape="tiny", dtype="bf16", seed=0, force=True)
    out = root / registry.get(backend).convert_to
    if not out.is_dir():  # the pipeline renames its finished output into place last
        convert(checkpoint, to=registry.get(backend).convert_to, out=out, progress=False)
    return out


def crash_advice(backend: str) -> str:
    """What to do about a native crash of ``backend``: the facts a bug report needs and the workaround
    (the backend's ``crash_advice`` hook; without one, the other local backends to switch to)."""
    from qvq_local.cpu import detect

    cpu = detect()
    flags = " ".join(cpu.shown()) or "none of AVX2/AVX-512/AMX/NEON reported"
    line = f"CPU {cpu.model or cpu.arch}: {flags}"
    spec = registry.get(backend)
    hook = spec.hook(registry.CRASH_ADVICE)
    if hook is not None:
        return f"{line}; {hook()}"
    others = [registry.get(name) for name in registry.names() if name != spec.name]
    switch = " or ".join(
        f"--backend {s.name}" + (f" ({s.convert_to.upper()})" if s.convert_to else "") for s in others
    )
    advice = "run with QVQ_DEBUG=1 for details"
    if others:
        advice = f"workaround: use {switch} on this machine; {advice}"
    return f"{line}; {advice}"


def signal_name(returncode: int) -> str | None:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def check(
    backend: str, model: Path, timeout: float = CHILD_TIMEOUT_S, *, python: str | None = None
) -> CheckResult:
    """Run the self-test of ``backend`` on ``model`` in a child process and judge how it ended.

    ``python`` replaces the interpreter (the tests use a stand-in that dies of a signal)."""
    cmd = [python or sys.executable, "-X", "faulthandler", "-m", "qvq_local.selftest", backend, str(model)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return CheckResult(backend, "fail", f"no answer within {timeout:.0f} s", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    sig = signal_name(proc.returncode)
    if sig is not None:
        return CheckResult(
            backend, "crash", f"crashed with {sig}; {crash_advice(backend)}", seconds, signal=sig
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    try:
        got = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
        tokens, tok_s, stop, detail = got["tokens"], got["decode_tok_s"], got["stop_reason"], got["detail"]
    except (ValueError, KeyError, TypeError):
        got = None
    if got is not None:
        return CheckResult(
            backend,
            "pass",
            f"{tokens} tokens at {tok_s:.0f} tok/s, stop {stop}, {detail}",
            seconds,
        )
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return CheckResult(backend, "fail", f"exit code {proc.returncode}: {tail}", seconds)


def run(backends: list[str] | None = None, on_progress=None) -> list[CheckResult]:
    """Self-test every installed backend (or those named); backends not installed are ``skipped``."""
    from qvq_local.hardware import backend_installed

    results = []
    for backend in backends or list(registry.names()):
        if not backend_installed(backend):
            results.append(
                CheckResult(backend, "skipped", f"not installed ({registry.get(backend).install_hint})")
            )
            continue
        if on_progress:
            on_progress(backend)
        try:
            model = prepare(backend)
        except Exception as exc:  # noqa: BLE001 - a failed build is this backend's result, not a crash
            results.append(CheckResult(backend, "fail", f"could not build the test model: {exc}"))
            continue
        results.append(check(backend, model))
    return results


def _child(backend: str, model: str) -> int:
    """In the child: load, ask one question about a generated image, print one JSON line."""
    from PIL import Image  # the parent started this child with -X faulthandler

    import qvq_local

    image = Path(model).parent / "selftest.png"
    if not image.is_file():
        img = Image.new("RGB", (112, 84), "white")
        img.paste((200, 40, 40), (10, 10, 60, 70))
        img.save(image)
    with qvq_local.load(model, backend=backend, download=False) as loaded:
        result = loaded.ask(str(image), "What is in the picture?", think_budget=12, answer_budget=6)
        detail = loaded.run_facts().get("summary") or loaded.spec.title  # the backend's run_facts hook
    tokens = result.thought_tokens + result.answer_tokens
    print(
        json.dumps(
            {
                "tokens": tokens,
                "decode_tok_s": result.timings.decode_tok_s or 0.0,
                "stop_reason": result.stop_reason,
                "detail": detail,
            }
        )
    )
    return 0 if tokens > 0 else 1


if __name__ == "__main__":  # python -m qvq_local.selftest BACKEND MODEL
    sys.exit(_child(sys.argv[1], sys.argv[2]))
