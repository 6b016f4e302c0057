"""One prepared GPU run of qvq-local: every figure the lent H200 can give, in one 10-minute call.

Runs on the GPU machine with its own ``python3`` (3.12, torch, transformers...; nothing can be fetched
there), from the checkout's root, with ``.gpu/`` carried (``tools/gpu/prepare.py`` makes it here; the
exact call is in tools/gpu/README.md)::

    python3 tools/gpu/run.py                     # writes under $OUT
    python3 tools/gpu/run.py --list              # the steps, in order of value, with their time limits

and, on a machine without a GPU, the same script end to end on CPU builds and tiny shapes::

    .gpu-dry/image/bin/python3 tools/gpu/run.py --dry-run --out /tmp/gpu-dry-out

What it does: installs the carried wheels and builds into a scratch folder (the machine's Python is not
changed), copies the project's packages beside them, records nvidia-smi and the driver file as test
inputs, then runs the steps in order of value, each in its own process group with a time limit; a step
that fails or runs out of time is logged and the next one starts.  The synthetic models are made in the
background, on the upper half of the CPU cores, while the first steps run on the lower half; a step
whose model is not ready yet gives way to the next step that can run.  Every figure lands in ``$OUT``:
at most 8 files come back from there, so the logs are packed into one archive and the figures go into
``summary.json``, rewritten after each step so that a run cut short still returns what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomllib  # Python 3.11+: the GPU machine has 3.12

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".gpu"
DRY = ROOT / ".gpu-dry"
IMAGE = ROOT / "examples" / "bar_chart.png"
QUESTION = "Which bar is the tallest?"
#: ``--gpu-layers`` for the partial-offload runs: half of the 28 blocks of Qwen2-VL 2B and 7B.
PARTIAL = 14
#: Seconds kept at the end for stopping the builds and packing the logs.
RESERVE_S = 15
#: Disk the 7B model needs while it is made: bf16 checkpoint 16.6 GB, the quantiser's bf16 source
#: 15.2 GB, the Q4_K_M 4.7 GB and the projector 1.3 GB, with margin.
BIG_DISK_BYTES = 45 * 10**9


def now() -> float:
    return time.monotonic()


@dataclass
class Step:
    name: str
    cmd: list
    timeout: float
    needs: tuple[str, ...] = ()
    parse: Callable | None = None
    #: in the dry run (no GPU, CPU builds) this step cannot succeed; the reason is reported instead
    dry_fails: str | None = None


@dataclass
class Job:
    """One command of a background build, and what it leaves when it succeeds."""

    name: str
    cmd: list
    timeout: float
    makes: tuple[str, ...] = ()
    #: artifacts to wait for first (the GGUF conversions need llama.cpp's quantiser)
    after: tuple[str, ...] = ()
    env: dict | None = None
    #: the cores it runs on, when not the background half
    cpus: set[int] | None = None
    #: dry run: text whose presence in the log shows the job did what the dry run can check
    dry_check: str | None = None


@dataclass
class Artifact:
    path: Path
    settled: threading.Event = field(default_factory=threading.Event)
    ok: bool = False


class Run:
    """The state of one run: where things go, the time left, what each step gave."""

    def __init__(self, args):
        self.dry = args.dry_run
        self.out = Path(args.out or os.environ.get("OUT") or "gpu-out").resolve()
        self.work = Path(args.work).resolve()
        self.budget = args.budget or (3600.0 if self.dry else 540.0)
        self.t0 = now()
        self.logs = self.work / "logs"
        self.lock = threading.Lock()
        self.summary: dict = {
            "schema": "qvq-gpu-run/1",
            "mode": "dry-run (CPU builds, tiny shapes)" if self.dry else "gpu",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "budget_s": self.budget,
            "steps": [],
            "figures": {},
        }
        self.artifacts: dict[str, Artifact] = {}
        self.procs: set[subprocess.Popen] = set()
        self.threads: list[threading.Thread] = []
        self.steps: list[Step] = []
        self.cpus_fg, self.cpus_bg = split_cpus()
        self.env: dict = dict(os.environ)
        self.console = None
        self.llama_src: Path | None = None
        self.stopping = False

    # ------------------------------------------------------------ bookkeeping

    def elapsed(self) -> float:
        return now() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    def say(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        with self.lock:
            if self.console:
                self.console.write(line + "\n")
                self.console.flush()

    def save(self) -> None:
        with self.lock:
            self.summary["elapsed_s"] = round(self.elapsed(), 1)
            tmp = self.out / "summary.json.tmp"
            tmp.write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
            tmp.replace(self.out / "summary.json")

    def figure(self, key: str, value) -> None:
        with self.lock:
            self.summary["figures"][key] = value

    # ------------------------------------------------------------ running one command

    def exec(self, name: str, cmd: list, timeout: float, *, cpus=None, env=None) -> dict:
        """Run ``cmd`` with its output in logs/<name>.log; after ``timeout`` it is killed with its
        children (its own process group)."""
        log_path = self.logs / f"{name}.log"
        start = now()

        def pin() -> None:
            if cpus and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, cpus)

        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(str(c) for c in cmd) + "\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    [str(c) for c in cmd],
                    cwd=ROOT,
                    env={**self.env, **(env or {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=pin,
                )
            except OSError as exc:
                log.write(f"could not start: {exc}\n")
                return {"status": "error", "rc": None, "wall_s": 0.0, "log": log_path.name}
            with self.lock:
                self.procs.add(proc)
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
                status = "ok" if rc == 0 else "stopped" if self.stopping and rc < 0 else "failed"
            except subprocess.TimeoutExpired:
                kill_group(proc)
                rc, status = None, "timeout"
            with self.lock:
                self.procs.discard(proc)
            log.write(f"\n[{status}, rc {rc}, {now() - start:.1f} s]\n")
        return {"status": status, "rc": rc, "wall_s": round(now() - start, 1), "log": log_path.name}

    def run_step(self, step: Step) -> None:
        result: dict = {"name": step.name, "cmd": shlex.join(str(c) for c in step.cmd)}
        missing = [a for a in step.needs if not self.artifacts[a].ok]
        if missing:
            result.update(status="skipped", reason=f"{', '.join(missing)} not made (see its build's log)")
            self.record(result)
            return
        limit = min(step.timeout, self.left() - RESERVE_S)
        if limit < min(20.0, step.timeout):
            result.update(status="skipped", reason=f"{self.left():.0f} s left")
            self.record(result)
            return
        shown = result["cmd"] if len(result["cmd"]) < 240 else result["cmd"][:200] + " ..."
        self.say(f"{step.name}: {shown} (limit {limit:.0f} s)")
        result.update(self.exec(step.name, step.cmd, limit, cpus=self.cpus_fg), limit_s=round(limit))
        if step.parse and result["status"] == "ok":
            try:
                step.parse(self, step.name)
            except Exception as exc:  # noqa: BLE001 - a figure that does not parse must not stop the run
                result["parse_error"] = f"{type(exc).__name__}: {exc}"
        if self.dry and step.dry_fails and result["status"] != "ok":
            result["expected_in_dry_run"] = step.dry_fails
        self.record(result)

    def record(self, result: dict) -> None:
        if result.get("log") and result.get("status") != "ok":
            lines = (self.logs / result["log"]).read_text(errors="replace").splitlines()
            result["tail"] = [ln[:300] for ln in lines[-6:-1]]
        with self.lock:
            self.summary["steps"].append(result)
        extra = f" ({result['reason']})" if "reason" in result else ""
        if "expected_in_dry_run" in result:
            extra += f" [expected in the dry run: {result['expected_in_dry_run']}]"
        if "dry_check" in result:
            extra += f" [dry-run check: {result['dry_check']}]"
        wall = f" {result['wall_s']} s" if "wall_s" in result else ""
        self.say(f"{result['name']}: {result['status']}{wall}{extra}")
        self.save()

    # ------------------------------------------------------------ background model builds

    def build(self, label: str, jobs: list[Job], *, unless: str | None = None) -> None:
        """Run ``jobs`` one after another on the background cores; a failed job ends the chain (what
        follows needs its output).  Every artifact the chain would make is settled at its end, made or
        not, so no step waits for it longer."""

        def chain() -> None:
            try:
                if unless:
                    self.record({"name": label, "status": "skipped", "reason": unless, "background": True})
                    return
                for job in jobs:
                    res = {"name": job.name, "background": True}
                    for name in job.after:
                        art = self.artifacts[name]
                        art.settled.wait(timeout=max(0.0, self.left() - RESERVE_S))
                        if not art.ok:
                            self.record({**res, "status": "skipped", "reason": f"{name} not made"})
                            return
                    limit = min(job.timeout, self.left() - RESERVE_S)
                    if limit < 10:
                        self.record({**res, "status": "skipped", "reason": "out of time"})
                        return
                    cpus = job.cpus if job.cpus is not None else self.cpus_bg
                    res.update(
                        self.exec(job.name, job.cmd, limit, cpus=cpus, env=job.env), limit_s=round(limit)
                    )
                    if self.dry and job.dry_check:
                        seen = job.dry_check in (self.logs / res["log"]).read_text(errors="replace")
                        res["dry_check"] = f"{'found' if seen else 'NOT found'}: {job.dry_check!r}"
                    self.record(res)
                    if res["status"] != "ok":
                        return
                    for name in job.makes:
                        art = self.artifacts[name]
                        art.ok = art.path.exists()
                        art.settled.set()
            finally:
                for job in jobs:
                    for name in job.makes:
                        self.artifacts[name].settled.set()

        thread = threading.Thread(target=chain, name=label, daemon=True)
        thread.start()
        self.threads.append(thread)

    def schedule(self) -> None:
        """Run the steps: always the first in the list whose models are settled (made or failed)."""
        pending = list(self.steps)
        while pending:
            if self.left() < RESERVE_S + 10:
                for step in pending:
                    self.record({"name": step.name, "status": "skipped", "reason": "out of time"})
                return
            ready = next(
                (s for s in pending if all(self.artifacts[a].settled.is_set() for a in s.needs)), None
            )
            if ready is None:
                time.sleep(0.5)
                continue
            pending.remove(ready)
            self.run_step(ready)

    def stop(self) -> None:
        """End the builds still running (the run's time is up) and let their threads record it."""
        self.stopping = True
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            kill_group(proc)
        for thread in self.threads:
            thread.join(timeout=15)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and everything it started: its session (it was started in a new one), which also
    holds the children that put themselves in process groups of their own (ninja's compilers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for entry in Path("/proc").iterdir() if Path("/proc/self/stat").exists() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            session = int(stat[stat.rindex(")") + 2 :].split()[3])
            if session == proc.pid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """Steps on the lower half of the cores, model builds on the upper half (8 and 8 on the GPU
    machine), so that making a model does not slow a measurement; no split under 8 cores."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 8:
        return None, None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


# ---------------------------------------------------------------- setup: install what was carried


def project_packages(dest: Path) -> None:
    """The project's packages, laid out as pyproject.toml's package-dir maps them (``convert/`` is
    ``qvq_local.convert``), so ``PYTHONPATH=dest`` imports them as an install would."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package, folder in config["tool"]["setuptools"]["package-dir"].items():
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for path in (ROOT / folder).iterdir():
            if path.is_file() and (path.suffix == ".py" or path.name == "py.typed"):
                shutil.copy2(path, target / path.name)


def nvidia_roots() -> list[Path]:
    """The ``nvidia`` package folders of this Python (its nvidia-* wheels: cuBLAS, the CUDA runtime...)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def nvidia_lib_dirs() -> list[str]:
    """The ``lib`` folders of this Python's nvidia-* wheels."""
    return [str(lib) for root in nvidia_roots() for lib in sorted(root.glob("*/lib")) if lib.is_dir()]


#: The dry run's nvidia-smi: an H200 as KINDS.md saw one (143771 MiB), answering the two queries qvq
#: sends; every line says it is made up.
FAKE_NVIDIA_SMI = """#!/bin/sh
# dry run only (tools/gpu/run.py --dry-run): made-up readings, no GPU here
case "$*" in
  -L) echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-dry-run-not-a-real-gpu)";;
  --query-gpu=*) echo "NVIDIA H200, 143771, 143156";;
  *) echo "dry run: made-up nvidia-smi, no GPU here";;
esac
"""


def setup(run: Run) -> bool:
    shutil.rmtree(run.work, ignore_errors=True)
    for folder in (run.work, run.logs, run.out):
        folder.mkdir(parents=True, exist_ok=True)
    run.console = open(run.out / "run.log", "w")  # noqa: SIM115 - open for the whole run
    site, src, bin_dir = run.work / "site", run.work / "src", run.work / "bin"
    for folder in (site, src, bin_dir):
        folder.mkdir()
    start = now()
    wheels = sorted((CARRY / "wheels").glob("*.whl"))
    if run.dry:
        wheels += sorted((DRY / "wheels").glob("*.whl"))  # mlx-cpu in place of the CUDA build
    # llama-cpp-python: the CUDA build made here if one was carried; else its source, built on this
    # machine in the background (run.llama_src); the dry run without a carried build uses the CPU build
    llama = CARRY / "llama-cuda.tar.xz"
    if not llama.exists():
        run.llama_src = CARRY / "llama-src.tar.xz"
        llama = DRY / "llama-cpu.tar.xz" if run.dry else None
    archives = [a for a in (llama,) if a] + ([] if run.dry else [CARRY / "mlx-cuda13.tar.xz"])
    missing = [str(p.relative_to(ROOT)) for p in archives + [run.llama_src] if p and not p.exists()]
    if not wheels or missing or not (archives or run.llama_src):
        run.say(f"setup: missing {', '.join(missing) or '.gpu/wheels'}: run tools/gpu/prepare.py first")
        return False
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    pip += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
    res = subprocess.run(pip + [str(w) for w in wheels], capture_output=True, text=True)
    (run.logs / "setup-pip.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        run.say(f"setup: pip failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
        return False
    for archive in archives:  # after pip: mlx-cuda-13 adds lib/ and include/ to the mlx wheel's folder
        with tarfile.open(archive) as tar:
            tar.extractall(site, filter="tar")
    if run.llama_src:
        with tarfile.open(run.llama_src) as tar:
            tar.extractall(run.work / "llama-src", filter="tar")
    project_packages(src)
    roots = nvidia_roots()
    if roots and not (site / "nvidia").exists():
        # mlx-cuda-13's libmlx.so looks for cuBLAS, cuDNN, NCCL... at $ORIGIN/../../nvidia/*/lib, where a
        # normal install has them; LD_LIBRARY_PATH below is the second way
        (site / "nvidia").symlink_to(roots[0], target_is_directory=True)
    qvq = bin_dir / "qvq"
    qvq.write_text(f"#!{sys.executable}\nimport sys\nfrom qvq_local.cli import main\nsys.exit(main())\n")
    qvq.chmod(0o755)
    if run.dry:  # the GPU-aware paths (doctor's fit, gpu_fit.py, the recordings) run too, on made-up readings
        smi = bin_dir / "nvidia-smi"
        smi.write_text(FAKE_NVIDIA_SMI)
        smi.chmod(0o755)
    libs = nvidia_lib_dirs()
    if (
        run.dry
    ):  # pip's cuBLAS and CUDA runtime, and the stub driver: CUDA finds no device, llama.cpp uses the CPU
        libs = [str(DRY / "cuda" / "nvidia" / "cu13" / "lib"), str(DRY / "libcuda-stub")] + libs
    env = dict(os.environ)
    for var in ("QVQ_MODEL", "QVQ_BACKEND", "QVQ_GPU_LAYERS", "QVQ_CPU_BUFFERS", "CMAKE_ARGS"):
        env.pop(var, None)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(src), str(site)] + [p for p in [env.get("PYTHONPATH")] if p]),
        LD_LIBRARY_PATH=os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p]),
        QVQ_HOME=str(run.work / "home"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
        # python -m and -c put the working folder (the checkout) first on sys.path, and the checkout's
        # qvq_local has no convert/ (installs map it there): only PYTHONPATH's copy may be found
        PYTHONSAFEPATH="1",
    )
    run.env = env
    if not run.llama_src:
        # the build made here must load on this machine (its glibc, libstdc++, libgomp, the driver); if
        # it does not and the source was carried too, build it here instead
        probe = [
            sys.executable,
            "-c",
            "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())",
        ]
        res = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
        (run.logs / "setup-llama-probe.log").write_text(res.stdout + res.stderr)
        run.summary["llama_probe"] = (res.stdout + res.stderr).strip().splitlines()[-3:]
        if res.returncode != 0 and not run.dry and (CARRY / "llama-src.tar.xz").exists():
            run.say(
                "setup: the carried llama.cpp build does not load here; building it from the carried source"
            )
            for path in site.glob("llama_cpp*"):
                shutil.rmtree(path)
            run.llama_src = CARRY / "llama-src.tar.xz"
            with tarfile.open(run.llama_src) as tar:
                tar.extractall(run.work / "llama-src", filter="tar")
    disk = shutil.disk_usage(run.work)
    run.summary["setup"] = {
        "wall_s": round(now() - start, 1),
        "wheels": [w.name for w in wheels],
        "archives": [a.name for a in archives],
        "llama": "carried CUDA build"
        if (CARRY / "llama-cuda.tar.xz").exists()
        else (
            "built here from source"
            + (" (dry run: configure only; the CPU build stands in)" if run.dry else "")
        ),
        "ld_library_path": libs,
        "python": sys.version.split()[0],
        "cpus_steps": sorted(run.cpus_fg) if run.cpus_fg else "all",
        "cpus_builds": sorted(run.cpus_bg) if run.cpus_bg else "all",
        "work_disk_free_bytes": disk.free,
    }
    if (CARRY / "manifest.json").exists():
        run.summary["carried"] = json.loads((CARRY / "manifest.json").read_text())
    run.say(f"setup: {len(wheels)} wheels and {len(archives)} builds installed in {now() - start:.1f} s")
    run.save()
    return True


# ---------------------------------------------------------------- recordings (test inputs)


def record_machine(run: Run) -> None:
    """``nvidia-smi -L``, the memory query qvq_local.hardware parses, and the driver file, as
    tests/data/gpu/ will hold them; ``nvidia-smi -q`` and the CPU go into the logs and the summary."""
    rec = run.out / "recordings"
    rec.mkdir(exist_ok=True)
    smi = shutil.which("nvidia-smi", path=run.env.get("PATH"))
    sys.path.insert(0, str(run.work / "src"))
    try:  # the query doctor sends, from the one place that defines it
        from qvq_local.hardware import NVIDIA_SMI_MEMORY_QUERY as query
    finally:
        sys.path.pop(0)
    for name, args in (("nvidia-smi-L.txt", ["-L"]), ("nvidia-smi-memory.csv", list(query))):
        text = ""
        if smi:
            res = subprocess.run([smi, *args], capture_output=True, text=True, timeout=30)
            text = res.stdout
        (rec / name).write_text(text)
    try:
        driver = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        driver = ""
    (rec / "driver-version.txt").write_text(driver)
    if smi:
        res = subprocess.run([smi, "-q"], capture_output=True, text=True, timeout=30)
        (run.logs / "nvidia-smi-q.log").write_text(res.stdout + res.stderr)
    with open("/proc/cpuinfo", errors="replace") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    machine = {
        "gpus": (rec / "nvidia-smi-L.txt").read_text().strip().splitlines(),
        "memory_mib": (rec / "nvidia-smi-memory.csv").read_text().strip().splitlines(),
        "driver": (driver.splitlines() or [""])[0],
        "cpu": cpu,
        "cpus": os.cpu_count(),
    }
    run.summary["machine"] = machine
    run.say(f"record: {machine['gpus'] or 'no NVIDIA GPU'} {machine['memory_mib']}")
    run.save()


# ---------------------------------------------------------------- figures out of the logs

GPU_BANDWIDTH = r"""
import json, statistics, sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
n = 1 << 30  # 1 GiB per buffer, far beyond the 60 MB L2; random data, not zeros
a = torch.randn(n // 4, device="cuda")
b = torch.empty_like(a)
for _ in range(3):
    b.copy_(a)
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); b.copy_(a); e.record(); e.synchronize()
    times.append(s.elapsed_time(e) / 1e3)
gbs = sorted(2 * n / t / 1e9 for t in times)  # bytes read + bytes written, as STREAM counts a copy
print(json.dumps({"copy_gbs_median": statistics.median(gbs), "copy_gbs_min": gbs[0], "copy_gbs_max": gbs[-1],
                  "device": torch.cuda.get_device_name(0), "runs": len(gbs)}))
"""


def log_text(run: Run, name: str) -> str:
    """A step's output, without the command line the log starts with and the status line it ends with."""
    lines = (run.logs / f"{name}.log").read_text(errors="replace").splitlines()[1:]
    while lines and (not lines[-1].strip() or lines[-1].startswith("[ok, rc")):
        lines.pop()
    return "\n".join(lines)


def parse_bandwidth(run: Run, name: str) -> None:
    last = [ln for ln in log_text(run, name).splitlines() if ln.startswith("{")][-1]
    run.figure(name, json.loads(last))


def json_output(run: Run, name: str) -> dict:
    """The JSON document a ``--json`` command printed."""
    text = log_text(run, name)
    return json.loads(text[text.find("{") : text.rfind("}") + 1])


def parse_doctor(run: Run, name: str) -> None:
    data = json_output(run, name)
    machine = data.get("machine", {})
    keep = ("cuda", "llama_gpu_offload", "llama_gpu_backends", "gpu_warning", "nvidia", "default_backend")
    fig = {k: machine.get(k) for k in keep if k in machine}
    fig.update({k: v for k, v in data.items() if k not in ("machine", "backends")})
    run.figure(name, fig)


def parse_ask(run: Run, name: str) -> None:
    data = json_output(run, name)
    extra = data.get("qvq") or {}
    fig = {"usage": data.get("usage")}
    fig.update({k: extra[k] for k in ("timings", "stop_reason", "quantization", "backend") if k in extra})
    run.figure(name, fig)


def without_samples(obj):
    """``obj`` without its per-run ``samples`` lists (the medians and spreads stay; the bench JSON in
    the logs archive has every run)."""
    if isinstance(obj, dict):
        return {k: without_samples(v) for k, v in obj.items() if k != "samples"}
    if isinstance(obj, list):
        return [without_samples(v) for v in obj]
    return obj


BENCH_KEYS = (
    "prompt_tokens",
    "image_tokens",
    "image_encode_s",
    "prefill_s",
    "prefill_tok_s",
    "first_token_s",
    "decode_tok_s",
    "total_s",
    "prefix_reuse",
    "peak_rss_bytes",
)


def parse_bench(run: Run, name: str) -> None:
    """A bench JSON's headline figures (the whole file is in the logs archive), with the decode bound
    recomputed from the GPU's own copy bandwidth: the bench's bound is the host memory's."""
    data = json.loads((run.logs / f"{name}.json").read_text())
    bw = (run.summary["figures"].get("gpu-bandwidth") or {}).get("copy_gbs_median")
    fig: dict = {}
    for backend, entry in (data.get("backends") or {}).items():
        if not entry.get("available"):
            fig[backend] = {"available": False, "reason": entry.get("reason")}
            continue
        qvq = entry.get("qvq") or {}
        row = {
            k: entry.get(k)
            for k in (
                "decode_tok_s",
                "bound_tok_s",
                "bound_fraction",
                "bytes_per_token",
                "model_bytes",
                "spread",
                "ratios",
            )
        }
        row.update(placement=qvq.get("placement"), compute=qvq.get("compute"), load_s=qvq.get("load_s"))
        row["sizes"] = {
            size: {k: per.get(k) for k in BENCH_KEYS if k in per}
            for size, per in (qvq.get("sizes") or {}).items()
            if isinstance(per, dict)
        }
        chains = entry.get("chains") or {}
        row["chains"] = {
            n: {k: v for k, v in c.items() if k != "samples"} for n, c in (chains.get("by_n") or {}).items()
        }
        if not chains.get("ok", True):
            row["chains_error"] = chains.get("error") or chains.get("reason")
        if bw and entry.get("bytes_per_token"):
            row["gpu_bound_tok_s"] = bw * 1e9 / entry["bytes_per_token"]
            if entry.get("decode_tok_s"):
                row["gpu_bound_fraction"] = entry["decode_tok_s"] / row["gpu_bound_tok_s"]
        fig[backend] = without_samples(row)
    run.figure(name, fig)


def parse_text(run: Run, name: str) -> None:
    """Steps that print a table (gpu_fit, pytest, selftest): their last lines as printed."""
    run.figure(name, [ln for ln in log_text(run, name).splitlines() if ln.strip()][-30:])


# ---------------------------------------------------------------- the plan


def llama_build_job(run: Run) -> Job:
    """Build llama-cpp-python with CUDA from the carried source, on every core but the first two (the
    steps that need no llama.cpp go on meanwhile), into the scratch site-packages."""
    from cuda_build import driver_library, llama_cmake_args, toolkit_root

    toolkit = toolkit_root() or Path("/usr/local/cuda")
    roots = nvidia_roots()
    cu13 = DRY / "cuda" / "nvidia" / "cu13" if run.dry else (roots[0] / "cu13" if roots else Path("/missing"))
    stub = DRY / "libcuda-stub" / "libcuda.so" if run.dry else None
    libcuda = driver_library(toolkit, stub) or Path("/missing/libcuda.so")
    cpus = set(sorted(os.sched_getaffinity(0))[2:]) if hasattr(os, "sched_getaffinity") else None
    jobs = len(cpus) if cpus else os.cpu_count() or 2
    args = llama_cmake_args(toolkit, cu13, libcuda, native=True)  # built where it runs
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--no-cache-dir", "--target", run.work / "site", run.work / "llama-src" / "llama-cpp-python"]
    env = {"CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs)}
    # the dry run only checks that it configures (compiling takes an hour on 2 cores); CPU build stands in
    return Job(
        "build-llama-cuda",
        cmd,
        240 if run.dry else 420,
        () if run.dry else ("llama",),
        env=env,
        cpus=cpus,
        dry_check="Build files have been written",
    )


def plan(run: Run, *, start_builds: bool = True) -> None:
    """The background builds, and every step in the order of what its figures are worth."""
    py, qvq = sys.executable, "qvq"
    models = run.work / "models"
    # model roles: "small" is Qwen2-VL 2B, "big" 7B; the dry run makes tiny ones in the same roles
    shapes = {"tiny": "tiny", "small": "tiny" if run.dry else "2b", "big": "tiny" if run.dry else "7b"}
    run.summary["models"] = shapes
    slow = 4 if run.dry else 1  # a 2-core CPU with nothing offloaded
    no_gpu = "no GPU here"

    def folder(role: str, fmt: str) -> Path:
        return models / f"{role}-{fmt}"

    run.artifacts["llama"] = Artifact(run.work / "site" / "llama_cpp" / "lib")
    for role in shapes:
        run.artifacts[f"{role}-gguf"] = Artifact(folder(role, "gguf") / "qvq-manifest.json")
        run.artifacts[f"{role}-mlx"] = Artifact(folder(role, "mlx") / "config.json")

    def synth(role: str, limit: float) -> Job:
        cmd = [qvq, "synth", folder(role, "hf"), "--shape", shapes[role], "--force"]
        return Job(f"synth-{role}", cmd, limit)

    def convert(role: str, fmt: str, limit: float) -> Job:
        quant = ["--quant", "q4_k_m"] if fmt == "gguf" else ["--bits", "4"]
        cmd = [qvq, "convert", folder(role, "hf"), "--to", fmt, *quant, "-q", "--out", folder(role, fmt)]
        after = ("llama",) if fmt == "gguf" else ()  # llama.cpp's quantiser
        return Job(f"convert-{role}-{fmt}", [*cmd, "--force"], limit, (f"{role}-{fmt}",), after=after)

    if start_builds:
        llama = run.artifacts["llama"]
        if run.llama_src:
            run.build("build-llama", [llama_build_job(run)])
        if not run.llama_src or run.dry:  # installed at setup
            llama.ok = llama.path.exists()
            llama.settled.set()
        free = shutil.disk_usage(run.work).free
        short = None if run.dry or free > BIG_DISK_BYTES else f"{free / 1e9:.0f} GB free, the 7B needs ~45"
        small = [synth("small", 240), convert("small", "mlx", 240), convert("small", "gguf", 300)]
        run.build("build-small", small)
        run.build("build-tiny", [synth("tiny", 60), convert("tiny", "mlx", 120)])
        run.build("build-big", [synth("big", 420), convert("big", "gguf", 420)], unless=short)

    def bench(name: str, role: str, backend: str, *extra: str) -> list:
        model = folder(role, "gguf" if backend == "llama" else "mlx")
        return [qvq, "bench", "-m", model, "--backend", backend, "--json", run.logs / f"{name}.json", *extra]

    def ask(role: str, *extra: str) -> list:
        return [qvq, "ask", IMAGE, QUESTION, "-m", folder(role, "gguf"), "--json", "--seed", "0", *extra]

    def fit(role: str) -> list:
        return [py, "examples/gpu_fit.py", folder(role, "gguf"), "--gpu-layers", f"all,{PARTIAL},1"]

    def doctor_model(role: str) -> list:
        return [qvq, "doctor", "--model", folder(role, "gguf"), "--json"]

    def pytest(name: str, marker: str, files: list[str], per_test: int) -> list:
        cmd = [py, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", "-rs"]
        return [*cmd, f"--timeout={per_test}", "--junitxml", run.logs / f"{name}.xml", *files]

    gpu_tests = ["tests/test_gpu_real.py"]
    llama_on_gpu = [
        "tests/test_backend_llama.py",
        "tests/test_chains_llama.py",
        "tests/test_prefix_cache.py",
        "tests/test_family_qwen3vl.py",
        "tests/test_family_qwen2_5vl.py",
        "tests/test_gpu_layers.py",
    ]
    mlx_on_gpu = [
        "tests/test_convert_mlx.py",
        "tests/test_backend_mlx.py",
        "tests/test_chains_mlx.py",
        "tests/test_family_qwen2_5vl.py",
        "tests/test_family_qwen3vl.py",
    ]
    full = ["--think-budget", "256", "--answer-budget", "64", "--no-cache"]
    partial = [*full, "--gpu-layers", str(PARTIAL)]
    cpu = ["--think-budget", "128", "--answer-budget", "32", "--no-cache", "--gpu-layers", "0"]
    L, S, T, B = ("llama",), ("llama", "small-gguf"), ("tiny-mlx",), ("llama", "big-gguf")
    run.steps = [
        Step("gpu-bandwidth", [py, "-c", GPU_BANDWIDTH], 60, (), parse_bandwidth, dry_fails=no_gpu),
        Step("bench-tiny-mlx", bench("bench-tiny-mlx", "tiny", "mlx"), 150 * slow, T, parse_bench),
        Step("doctor", [qvq, "doctor", "--json"], 60, L, parse_doctor),
        Step("selftest", [qvq, "doctor", "--selftest"], 240 * slow, L, parse_text),
        Step("pytest-gpu", pytest("pytest-gpu", "gpu", gpu_tests, 120), 150 * slow, L, parse_text),
        Step("doctor-model-small", doctor_model("small"), 60, S, parse_doctor),
        Step("ask-small-full", ask("small", *full), 120 * slow, S, parse_ask),
        Step("gpu-fit-small", fit("small"), 150 * slow, S, parse_text),
        Step("bench-small-full", bench("bench-small-full", "small", "llama"), 240 * slow, S, parse_bench),
        Step("ask-small-partial", ask("small", *partial), 120 * slow, S, parse_ask),
        Step(
            "bench-small-partial",
            bench("bench-small-partial", "small", "llama", "--gpu-layers", str(PARTIAL)),
            240 * slow,
            S,
            parse_bench,
        ),
        Step(
            "bench-small-mlx",
            bench("bench-small-mlx", "small", "mlx"),
            240 * slow,
            ("small-mlx",),
            parse_bench,
        ),
        Step("doctor-model-big", doctor_model("big"), 60, B, parse_doctor),
        Step("gpu-fit-big", fit("big"), 150 * slow, B, parse_text),
        Step("bench-big-full", bench("bench-big-full", "big", "llama"), 240 * slow, B, parse_bench),
        Step("ask-small-cpu", ask("small", *cpu), 120 * slow, S, parse_ask),
        Step(
            "pytest-llama-on-gpu",
            pytest("pytest-llama-on-gpu", "llama", llama_on_gpu, 90),
            240 * slow,
            L,
            parse_text,
        ),
        Step(
            "pytest-mlx-on-gpu",
            pytest("pytest-mlx-on-gpu", "mlx", mlx_on_gpu, 90),
            240 * slow,
            (),
            parse_text,
        ),
        Step(
            "bench-big-partial",
            bench("bench-big-partial", "big", "llama", "--gpu-layers", str(PARTIAL)),
            240 * slow,
            B,
            parse_bench,
        ),
        Step(
            "bench-small-cpu",
            bench(
                "bench-small-cpu",
                "small",
                "llama",
                "--runs",
                "1",
                "--image-sizes",
                "224",
                "--no-raw",
                "--gpu-layers",
                "0",
            ),
            240 * slow,
            S,
            parse_bench,
        ),
    ]


# ---------------------------------------------------------------- main


def finish(run: Run) -> None:
    """Stop the builds, pack the logs, write the report and print the table the reply's tail shows."""
    run.stop()
    steps = [s for s in run.summary["steps"] if not s.get("background")]
    statuses = [s["status"] for s in steps]
    run.summary["counts"] = {k: statuses.count(k) for k in sorted(set(statuses))}
    unexpected = [
        s["name"] for s in steps if s["status"] not in ("ok", "skipped") and "expected_in_dry_run" not in s
    ]
    run.summary["unexpected_failures"] = unexpected
    run.save()
    with tarfile.open(run.out / "logs.tar.xz", "w:xz") as tar:
        tar.add(run.logs, arcname="logs")
    lines = [f"{'step':<24} {'status':<8} {'wall s':>7}  note"]
    for s in run.summary["steps"]:
        note = s.get("reason") or s.get("dry_check") or ""
        if "expected_in_dry_run" in s:
            note = "expected in the dry run: " + s["expected_in_dry_run"]
        name = ("  " if s.get("background") else "") + s["name"]
        lines.append(f"{name:<24} {s['status']:<8} {s.get('wall_s', ''):>7}  {note}")
    report = "\n".join(lines)
    figures = json.dumps(run.summary["figures"], indent=1, default=str)
    (run.out / "report.txt").write_text(
        f"{report}\n\nunexpected failures: {unexpected or 'none'}\n\n{figures}\n"
    )
    print(report)
    print(f"unexpected failures: {unexpected or 'none'}; {run.elapsed():.0f} s in all")
    print(f"figures: {run.out}/summary.json and report.txt; logs: logs.tar.xz; test inputs: recordings/")
    if run.console:
        run.console.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="Where the figures go (default: $OUT).")
    ap.add_argument(
        "--work", default="/tmp/qvq-gpu", help="Scratch folder, emptied first (default /tmp/qvq-gpu)."
    )
    ap.add_argument("--budget", type=float, help="Seconds for the whole run (default 540; dry run 3600).")
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU builds and tiny shapes, on a machine without a GPU."
    )
    ap.add_argument("--list", action="store_true", help="Print the steps and exit.")
    args = ap.parse_args()
    run = Run(args)
    if args.list:
        plan(run, start_builds=False)
        for step in run.steps:
            wait = f"  (after {', '.join(step.needs)})" if step.needs else ""
            print(f"{step.name:<22} {step.timeout:>5.0f} s{wait}")
        return
    if not setup(run):
        run.save()
        sys.exit(2)
    try:
        record_machine(run)
        plan(run)
        run.schedule()
    finally:
        finish(run)


if __name__ == "__main__":
    main()
