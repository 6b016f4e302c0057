"""The benchmark's child processes: one job run to its end, or paths served and their runs interleaved.

Every measurement runs in a child (``python -m qvq_local.bench.worker``, see that module for why):
:func:`run_worker` runs one job and reads its JSON result; :class:`ServedWorker` keeps a path (qvq-local's
or a raw library's) loaded and runs it on request, and :func:`interleave` alternates two served paths in
the order :func:`schedule` gives (qvq, raw, qvq, raw, ...), so a neighbour's load on a shared machine falls
on both sides of a qvq/raw ratio.  A child that dies without reporting (a native crash, the OOM killer)
comes back as a failure naming its exit status or signal, never as a silent zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _worker_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _ended(returncode: int | None, spec: dict, label: str) -> str:
    """Why a worker ended without reporting: its exit status or signal, with a hint."""
    from qvq_local.selftest import crash_advice, signal_name

    code = -1 if returncode is None else returncode
    how = signal_name(code) or f"exit code {code}"
    hint = " (killed: out of memory?)" if code in (-9, 137) else ""
    if code < 0 and code != -9:
        backend = spec.get("backend")
        hint = f" (a native crash: {crash_advice(backend)})" if backend else " (a native crash)"
    return f"the {label} process ended with {how}{hint} before reporting"


def run_worker(spec: dict, *, label: str, log=None) -> dict:
    """Run one ``bench.worker`` job in a child process and return its JSON result.

    A child that dies without writing a result (a native crash, the OOM killer) comes back as
    ``{"ok": False, "reason": ...}`` naming the exit status, never as a silent zero.
    """
    with tempfile.TemporaryDirectory(prefix="qvq-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = _worker_env()
        if log:
            log(f"{label} ...")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "qvq_local.bench.worker", str(spec_path), str(out_path)],
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        if out_path.is_file():
            result = json.loads(out_path.read_text())
        else:
            result = {"ok": False, "reason": _ended(proc.returncode, spec, label)}
    result["wall_s"] = wall
    if log:
        done = f"done in {wall:.1f} s" if result.get("ok") else f"FAILED: {result.get('reason')}"
        log(f"{label}: {done}")
    return result


class ServedWorker:
    """A ``bench.worker --serve`` child: one path (qvq or raw) loaded once, run on request.

    ``ready`` is the child's first reply (``{"ok": False, "reason"}`` when loading failed or the child
    died); :meth:`request` sends one command and returns its reply; :meth:`finish` returns the path's
    result, in the shape ``run_worker`` returns, with ``wall_s``.  A child that dies is reported as a
    failed reply naming its exit status, never as a silent zero.
    """

    def __init__(self, spec: dict, *, label: str, log=None):
        self.spec, self.label, self.log = spec, label, log
        self._tmp = tempfile.TemporaryDirectory(prefix="qvq-bench-")
        spec_path = Path(self._tmp.name) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        if log:
            log(f"{label}: loading")
        self.t0 = time.perf_counter()
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qvq_local.bench.worker", "--serve", str(spec_path), str(write_fd)],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=_worker_env(),
                text=True,
            )
        finally:
            os.close(write_fd)
        self._replies = os.fdopen(read_fd)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self._replies.readline()
        if line:
            return json.loads(line)
        return {"ok": False, "reason": _ended(self.proc.wait(), self.spec, self.label)}

    def request(self, cmd: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"ok": False, "reason": _ended(self.proc.wait(), self.spec, self.label)}
        return self._reply()

    def finish(self) -> dict:
        result = self.request({"op": "finish"})
        self.close()
        result["wall_s"] = time.perf_counter() - self.t0
        if self.log:
            done = (
                f"done in {result['wall_s']:.1f} s" if result.get("ok") else f"FAILED: {result.get('reason')}"
            )
            self.log(f"{self.label}: {done}")
        return result

    def close(self) -> None:
        """End the child (politely: stdin closed; killed if it does not exit)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._replies.close()
        self._tmp.cleanup()


def schedule(
    sizes: list[str], runs: int, paths: tuple[str, ...] = ("qvq", "raw")
) -> list[tuple[str, int, str]]:
    """The order of an interleaved measurement: ``(size, run, path)``, run 0 being each path's warm-up.

    Per image size: qvq's warm-up, raw's warm-up, then qvq 1, raw 1, qvq 2, raw 2, ...  qvq goes first in
    each pair because the raw run repeats the number of tokens the qvq run made.
    """
    return [(size, i, path) for size in sizes for i in range(runs + 1) for path in paths]


def interleave(workers: dict, sizes: list[str], runs: int) -> dict:
    """Run ``schedule(...)`` on served workers (``{"qvq": w, "raw": w}``); return each path's result.

    Each raw run gets the token counts of the qvq run just before it (``max_tokens``, ``prompt_tokens``),
    so the pair does the same work.  A raw path that fails is reported and the qvq runs go on; when the
    qvq path fails, nothing else runs (there is nothing to compare with).
    """
    failed: dict[str, dict] = {}
    last_qvq: dict = {}
    for size, i, name in schedule(sizes, runs, tuple(workers)):
        if name in failed or "qvq" in failed:
            continue
        cmd: dict = {"op": "run", "size": size, "run": i, "warmup": i == 0}
        if name == "raw":
            cmd["max_tokens"] = last_qvq.get("decode_tokens")
            cmd["prompt_tokens"] = last_qvq.get("prompt_tokens")
        reply = workers[name].request(cmd)
        if not reply.get("ok"):
            failed[name] = reply
        elif name == "qvq":
            last_qvq = reply.get("fig") or {}
    results = {}
    for name, worker in workers.items():
        if name in failed:
            worker.close()
            results[name] = failed[name]
        elif "qvq" in failed:
            worker.close()
            results[name] = {"ok": False, "reason": "not run: the qvq path failed"}
        else:
            results[name] = worker.finish()
    return results
