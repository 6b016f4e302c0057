"""``qvq bench``: how fast does QVQ run on this machine, will it fit, and what does qvq-local cost?

The benchmark answers the question users ask before downloading 40 GB, with measurements taken in one
run on one machine:

1. the machine's memory bandwidth (``bench.bandwidth``), and from it the decode speed no implementation
   can beat (bytes read per token / bandwidth);
2. the model: ``--model REF`` (a converted model, or an HF folder that is converted first) or
   ``--shape tiny|2b|7b|72b`` (``--family`` for another family's shapes): a synthetic checkpoint of that
   shape, written and converted once into ``QVQ_HOME/bench/[<family>-]<shape>-<fmt>-<quant>`` and reused
   afterwards (time and peak memory of the
   conversion are kept beside it and reported);
3. per backend, in a child process each (``bench.worker``): qvq-local's own path
   (``qvq_local.load(...).stream``) and the raw library on the same files, prompt and image (mlx-vlm's
   ``stream_generate``, llama-cpp-python's ``create_chat_completion``), each figure the median of
   ``runs`` repetitions after a warm-up, per image size, with its spread (min, max, quartiles:
   ``bench.stats``).  The two paths run interleaved (qvq, raw, qvq, raw, ...: ``schedule`` and
   ``interleave`` on two served workers), so a neighbour's load on a shared machine falls on both
   sides of a qvq/raw ratio; the ratios are medians of the per-pair ratios;
4. the report (``bench.report``): Rich tables, a JSON file with every figure and the machine's
   description, and a PNG chart.

Nothing here is a timing threshold: the benchmark reports, it does not judge.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qvq_local import atomic
from qvq_local.errors import DiskFull, InputError, ModelError, QvqError
from qvq_local.families import DEFAULT_FAMILY

SCHEMA = "qvq-bench/1"
#: ``--backend all`` measures every backend in the registry
ALL = "all"
#: ``--quant`` -> (GGUF text quantisation, MLX bits).  The GGUF mmproj stays F16, MLX's vision tower
#: stays unquantised (mlx-vlm never quantises it), as ``qvq convert`` does.
QUANTS = {"q4": ("q4_k_m", 4), "q8": ("q8_0", 8)}
DEFAULT_IMAGE_SIZES = (224, 448)
#: Side of one merged image patch in pixels: the smallest image size worth measuring.
_FACTOR = DEFAULT_FAMILY.image_factor
#: With ``--backend all`` off Apple Silicon, MLX (mlx[cpu]) is skipped above this model size: its CPU
#: kernels made a 2b Q4 model take 30 s for a 27-token prompt and decode at 0.7 token/s (bf16 weights:
#: over 5 minutes for the same prompt) on the 2-core x86 machine this was written on.
MLX_CPU_LIMIT_BYTES = 200 * 10**6


def bench_home() -> Path:
    """Where synthesised and converted benchmark models are cached: ``QVQ_HOME/bench``."""
    from qvq_local.config import qvq_home

    return qvq_home() / "bench"


# ---------------------------------------------------------------- options


def parse_image_sizes(text: str | list[int] | tuple[int, ...]) -> list[int]:
    """``"224,448"`` -> ``[224, 448]``: square edge lengths in pixels, at least 28 (one merged patch)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [p for p in str(text).replace(" ", "").split(",") if p]
    sizes: list[int] = []
    for item in items:
        try:
            size = int(item)
        except (TypeError, ValueError):
            raise InputError(
                f"image size {item!r} is not a whole number of pixels (e.g. --image-sizes 224,448)"
            ) from None
        if size < _FACTOR or size > 4096:
            raise InputError(f"image size {size} is out of range: use {_FACTOR} to 4096 pixels")
        if size not in sizes:
            sizes.append(size)
    if not sizes:
        raise InputError("no image size given (e.g. --image-sizes 224,448)")
    return sorted(sizes)


def _check_options(runs: int, decode_tokens: int, answer_tokens: int, quant: str) -> None:
    if runs < 1:
        raise InputError(f"--runs must be at least 1, got {runs}")
    if decode_tokens < 2:
        raise InputError(f"--decode-tokens must be at least 2 (a rate needs two tokens), got {decode_tokens}")
    if answer_tokens < 1:
        raise InputError(f"the answer budget must be at least 1 token, got {answer_tokens}")
    if quant not in QUANTS:
        raise InputError(f"unknown quantisation {quant!r}: choose {', '.join(QUANTS)}")


# ---------------------------------------------------------------- child processes


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


# ---------------------------------------------------------------- models: synthesise, convert, resolve


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=1))


def _cached_build(home: Path, name: str, spec: dict, label: str, log, check) -> dict:
    """Run a synth/convert job once; later calls reuse its output and report the original cost.

    ``check(result)`` says whether the recorded output is still complete on disk; a build made from
    another spec (another tokenizer, say) is rebuilt, not reused.
    """
    marker = home / f"{name}.build.json"
    old = _read_marker(marker)
    recipe = {k: v for k, v in spec.items() if k != "progress"}
    if old and old.get("ok") and old.get("recipe", recipe) == recipe and check(old):
        if log:
            log(f"{label}: reusing {home / name} (built in {old.get('seconds', 0):.1f} s)")
        return {**old, "reused": True}
    result = run_worker(spec, label=label, log=log)
    if not result.get("ok"):
        raise ModelError(f"{label} failed: {result.get('reason')}", path=home / name)
    result["reused"] = False
    _write_marker(marker, {**{k: v for k, v in result.items() if k != "reused"}, "recipe": recipe})
    return result


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def prepare_models(
    *,
    shape: str | None,
    model: str | None,
    backends: list[str],
    quant: str,
    home: Path,
    progress: bool,
    log,
    family: str | None = None,
) -> dict:
    """Make the model files each backend needs; return ``{"label", "source", "synthesis", "formats"}``.

    ``formats[backend]`` is ``{"model": path, "mmproj": path | None, "conversion": {...} | None}``, or
    ``{"error": reason}`` when this backend cannot get a model.
    """
    from qvq_local.backends import registry

    gguf_quant, mlx_bits = QUANTS[quant]
    info: dict = {"synthesis": None, "formats": {}}
    source: Path | None = None
    if shape is not None:
        from qvq_local.convert import synthetic

        fam = synthetic.get_family(family)
        synthetic.get_shape(shape, fam)  # an unknown shape is an InputError naming the family's shapes
        # the default family keeps its cache names; another family's are prefixed with its alias
        prefix = "" if fam is synthetic.DEFAULT_FAMILY else f"{fam.aliases[0]}-"
        home.mkdir(parents=True, exist_ok=True)
        hf_name = f"{prefix}{shape}-hf-bf16"
        info["label"] = f"synthetic {prefix}{shape} ({quant})"
        info["source"] = f"shape:{prefix}{shape}"
        info["synthesis"] = _cached_build(
            home,
            hf_name,
            {
                "job": "synth",
                "out": str(home / hf_name),
                "shape": shape,
                "family": fam.name,
                "dtype": "bf16",
                "seed": 0,
                # the real Qwen vocabulary where dashscope is installed, else a trained one: a cache made
                # with the other must not be reused
                "tokenizer": synthetic.default_tokenizer(shape, fam),
                "progress": progress,
                "force": True,
            },
            f"synthesising the {prefix}{shape} checkpoint",
            log,
            check=lambda r: (Path(r["path"]) / "config.json").is_file(),
        )
        source, base = home / hf_name, f"{prefix}{shape}"
    else:
        from qvq_local import hub

        resolved = hub.resolve(model, download=True, progress=progress)
        info["label"] = f"{resolved.name} ({resolved.quantization})"
        info["source"] = str(model)
        if resolved.format == "hf":
            source, base = resolved.path, _safe_name(resolved.name)
            home.mkdir(parents=True, exist_ok=True)
        else:
            for backend in backends:
                wanted = registry.get(backend).convert_to
                if resolved.format == wanted:
                    info["formats"][backend] = {
                        "model": str(resolved.path),
                        "mmproj": str(resolved.mmproj) if resolved.mmproj else None,
                        "conversion": None,
                        "quantization": resolved.quantization,
                    }
                else:
                    info["formats"][backend] = {
                        "error": f"the model is {resolved.format.upper()}; the {backend} backend needs "
                        f"{wanted.upper()} (convert it, or pass the HF folder to convert both)"
                    }
            return info

    for backend in backends:
        try:
            if registry.get(backend).convert_to == "gguf":
                name = f"{base}-gguf-{gguf_quant}"
                conv = _cached_build(
                    home,
                    name,
                    {
                        "job": "convert-gguf",
                        "src": str(source),
                        "out": str(home / name),
                        "quant": gguf_quant,
                        "mmproj_quant": "f16",
                        "progress": progress,
                    },
                    f"converting to GGUF {gguf_quant}",
                    log,
                    check=lambda r: Path(r["model"]).is_file() and Path(r["mmproj"]).is_file(),
                )
                info["formats"][backend] = {
                    "model": conv["model"],
                    "mmproj": conv["mmproj"],
                    "conversion": conv,
                    "quantization": gguf_quant.upper(),
                }
            else:
                name = f"{base}-mlx-q{mlx_bits}"
                conv = _cached_build(
                    home,
                    name,
                    {
                        "job": "convert-mlx",
                        "src": str(source),
                        "out": str(home / name),
                        "bits": mlx_bits,
                        "group_size": 64,
                        "progress": progress,
                    },
                    f"converting to MLX {mlx_bits}-bit",
                    log,
                    check=lambda r: (Path(r["path"]) / "config.json").is_file(),
                )
                info["formats"][backend] = {
                    "model": conv["path"],
                    "mmproj": None,
                    "conversion": conv,
                    "quantization": f"{mlx_bits}-bit",
                }
        except DiskFull:
            raise
        except QvqError as err:
            info["formats"][backend] = {"error": str(err)}
    return info


# ---------------------------------------------------------------- images and the machine


def make_image(size: int, path: Path) -> Path:
    """A deterministic ``size`` x ``size`` bar-and-line chart PNG (the same bytes every run)."""
    from PIL import Image, ImageDraw

    if path.is_file():
        return path
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    s = size / 224.0
    base = int(200 * s)
    for i, h in enumerate([40, 90, 60, 120, 75]):
        x = int((20 + i * 40) * s)
        draw.rectangle([x, base - int(h * s), x + int(24 * s), base], fill=(40 + 40 * i, 90, 200 - 30 * i))
    draw.line([(int(10 * s), base), (int(214 * s), base)], fill="black", width=max(1, int(2 * s)))
    points = [(int(x * s), int(y * s)) for x, y in [(20, 150), (60, 110), (100, 130), (140, 80), (180, 120)]]
    draw.line(points, fill="red", width=max(1, int(3 * s)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        img.save(tmp)
    return path


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """``hardware.describe()`` plus the CPU's name and a one-line summary for the table and chart."""
    try:
        from qvq_local import hardware

        facts = dict(hardware.describe(probe_gpu=True))
    except Exception as exc:  # noqa: BLE001 - the bench still reports what it can find itself
        facts = {
            "os": platform.system(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "describe_error": f"{type(exc).__name__}: {exc}",
        }
        try:
            import psutil

            facts["memory_total_bytes"] = int(psutil.virtual_memory().total)
            facts["memory_available_bytes"] = int(psutil.virtual_memory().available)
        except Exception as exc:  # noqa: BLE001 - psutil is optional (the bench extra)
            facts["memory_error"] = f"{type(exc).__name__}: {exc}"
    facts["cpu"] = _cpu_name()
    mem = facts.get("memory_total_bytes")
    mem_text = f", {mem / 2**30:.0f} GiB RAM" if mem else ""
    facts["summary"] = (
        f"{facts['cpu']}, {facts.get('cpu_count')} cores{mem_text}, "
        f"{facts.get('os', platform.system())} {facts.get('machine', platform.machine())}"
    )
    return facts


# ---------------------------------------------------------------- the benchmark


def _choose_backends(backend: str, shape: str | None, model: str | None) -> list[str]:
    from qvq_local import hardware
    from qvq_local.backends import registry

    if backend == ALL:
        return list(registry.names())
    if backend in registry.names():
        return [backend]

    formats = None
    if model is not None:
        from qvq_local import hub

        formats = {hub.resolve(model, download=False, progress=False).format}
    return [hardware.choose_backend("auto", formats)]


def _installed(backend: str) -> tuple[bool, str | None]:
    from qvq_local import hardware
    from qvq_local.backends import registry

    if hardware.backend_installed(backend):
        return True, None
    return False, f"not installed ({registry.get(backend).install_hint})"


MLX_CPU_SKIP = (
    "skipped: mlx on a CPU other than Apple Silicon has no fast quantised kernels (a 2b Q4 model decodes "
    "under 1 token/s on a 2-core x86 CPU); pass --backend mlx to measure it anyway"
)


def _source_bytes(shape: str | None, model: str | None, family: str | None = None) -> int:
    """Roughly the converted model's size, known before converting (decides the MLX-on-CPU skip)."""
    if shape is not None:
        from qvq_local.convert.synthetic import checkpoint_bytes

        return int(checkpoint_bytes(shape, "bf16", family) * 0.3)  # about what a 4-bit conversion keeps
    from qvq_local import hub

    path = hub.resolve(model, download=False, progress=False).path
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _apple() -> bool:
    from qvq_local import hardware

    return hardware.is_apple_silicon()


def _weights_per_token(backend: str, fmt: dict) -> dict:
    from qvq_local.backends import registry
    from qvq_local.bench.bandwidth import gguf_bytes_per_token, mlx_bytes_per_token

    if registry.get(backend).convert_to == "gguf":
        out = gguf_bytes_per_token(fmt["model"])
        mmproj = Path(fmt["mmproj"]).stat().st_size if fmt.get("mmproj") else 0
        out["model_bytes"] = out["file_bytes"] + mmproj
        out["vision_bytes"] = mmproj
    else:
        out = mlx_bytes_per_token(fmt["model"])
        out["model_bytes"] = sum(p.stat().st_size for p in Path(fmt["model"]).rglob("*") if p.is_file())
    return out


def _raw_n_ctx(sizes: list[int], decode_tokens: int, answer_tokens: int) -> int:
    image_tokens = max((round(s / _FACTOR) or 1) ** 2 for s in sizes)
    need = image_tokens + 512 + decode_tokens + answer_tokens + 128  # + grace window and forced text
    return ((need + 255) // 256) * 256


#: The figures compared between qvq-local and the raw library, run by run.
RATIO_KEYS = ("decode_tok_s", "first_token_s")


def _ratios(qvq: dict, raw: dict) -> dict:
    """qvq/raw per image size and at the smallest size (the headline figures).

    Each figure is the median of the per-run ratios (qvq run i / raw run i; interleaved, they ran next to
    each other), with their spread under ``spread`` and the per-run values under ``samples``.
    """
    from qvq_local.bench.stats import paired_ratios, runs_of

    if not qvq.get("ok"):
        return {"reason": "qvq path failed"}
    if not raw.get("ok"):
        return {"reason": f"raw path not run: {raw.get('reason', '?')}"}
    per_size = {}
    for size, q in qvq["sizes"].items():
        r = raw["sizes"].get(size)
        if not r:
            continue
        summary = paired_ratios(runs_of(q), runs_of(r), RATIO_KEYS)
        per_size[size] = {k: summary.get(k) for k in RATIO_KEYS}
        per_size[size]["spread"] = summary.get("spread", {})
        per_size[size]["samples"] = summary.get("samples", {})
    if not per_size:
        return {"reason": "no image size measured on both paths"}
    first = per_size[min(per_size, key=int)]
    return {
        **first,
        "at_image_size": int(min(per_size, key=int)),
        "per_size": per_size,
        "meaning": "decode_tok_s: qvq/raw, higher is better (>= 1.0: no overhead); "
        "first_token_s: qvq/raw seconds, lower is better (<= 1.0: no overhead); "
        "medians of the per-run ratios, spread = their min/max/quartiles",
    }


def run_bench(
    *,
    model: str | None = None,
    shape: str | None = None,
    backend: str = "auto",
    image_sizes: list[int] | tuple[int, ...] | str = DEFAULT_IMAGE_SIZES,
    runs: int = 3,
    decode_tokens: int = 64,
    answer_tokens: int = 8,
    quant: str = "q4",
    raw: bool = True,
    json_path: str | os.PathLike | None = None,
    chart_path: str | os.PathLike | None = None,
    bandwidth_bytes: int = 1 << 30,
    bandwidth_reps: int = 5,
    home: str | os.PathLike | None = None,
    progress: bool = True,
    console=None,
    command: str | None = None,
    family: str | None = None,
) -> dict:
    """Run the whole benchmark and return the result dictionary (also written to ``json_path``).

    Exactly one of ``model`` and ``shape`` (``shape`` defaults to ``"tiny"`` when neither is given);
    ``family`` picks the synthetic model's family (``qvq synth --family``; None: Qwen2-VL).
    Raises InputError for bad options, ModelError for an unusable model, DiskFull when synthesising or
    converting would not fit; a backend or raw path that cannot run is reported in the result instead.
    """
    from rich.console import Console

    from qvq_local.bench.bandwidth import measure_bandwidth

    console = console or Console(stderr=True)
    backend, shape, sizes = _checked_options(
        model, shape, backend, image_sizes, runs, decode_tokens, answer_tokens, quant
    )
    if family is not None:
        from qvq_local.convert import synthetic

        if model is not None:
            raise InputError("--family picks a synthetic model: pass it with --shape, not with --model")
        synthetic.get_shape(shape, family)  # unknown family or shape: one line, before any work
    home_path = Path(home).expanduser() if home is not None else bench_home()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        console.print(f"[dim]bench:[/] {msg}", highlight=False)

    backends = _choose_backends(backend, shape, model)
    result: dict = {
        "schema": SCHEMA,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "model": model,
            "shape": shape,
            "family": family,
            "backend": backend,
            "backends": backends,
            "image_sizes": sizes,
            "runs": runs,
            "warmup_runs": 1,
            "decode_tokens": decode_tokens,
            "answer_tokens": answer_tokens,
            "quant": quant,
            "raw": raw,
            "sampling": "greedy (top_k 1, temperature 0), repetition penalty 1.05, seed 0",
            "loop_detection": False,
            "home": str(home_path),
        },
    }
    log("describing the machine")
    result["machine"] = describe_machine()
    installed = _installed_backends(backend, backends, shape, model, family)
    usable = [b for b in backends if installed[b][0]]

    log(f"measuring memory bandwidth ({bandwidth_bytes / 2**30:.2f} GiB array, {bandwidth_reps} reps)")
    result["bandwidth"] = measure_bandwidth(bandwidth_bytes, bandwidth_reps)
    bw = result["bandwidth"]
    log(f"read {bw['read_gbs_median']:.1f} GB/s, copy {bw['copy_gbs_median']:.1f} GB/s")

    prepared: dict = {"label": model or shape, "formats": {}}
    if usable:
        prepared = prepare_models(
            shape=shape,
            model=model,
            backends=usable,
            quant=quant,
            home=home_path,
            progress=progress,
            log=log,
            family=family,
        )
    result["model"] = {
        "label": prepared.get("label"),
        "source": prepared.get("source"),
        "synthesis": prepared.get("synthesis"),
    }

    images = {str(s): str(make_image(s, home_path / "images" / f"chart-{s}.png")) for s in sizes}
    result["backends"] = {}
    for name in backends:
        result["backends"][name] = _measure_backend(
            name,
            installed[name],
            prepared["formats"].get(name, {}),
            result,
            images=images,
            sizes=sizes,
            runs=runs,
            decode_tokens=decode_tokens,
            answer_tokens=answer_tokens,
            raw=raw,
            log=log,
        )
        if json_path:  # a partial file after each backend: a long run that is stopped keeps what it measured
            from qvq_local.bench import report as bench_report

            bench_report.write_json({**result, "partial": True}, json_path)
    result["elapsed_s"] = time.perf_counter() - t_start
    _write_outputs(result, json_path, chart_path, log)
    return result


def _checked_options(
    model, shape, backend, image_sizes, runs, decode_tokens, answer_tokens, quant
) -> tuple[str, str | None, list[int]]:
    """Every option checked before any work: (canonical backend, shape, image sizes)."""
    from qvq_local.backends import registry

    if model is not None and shape is not None:
        raise InputError("pass either --model or --shape, not both")
    if model is None and shape is None:
        shape = "tiny"
    backend = registry.canonical(backend, extra=(ALL,))
    if backend in registry.BACKENDS and registry.get(backend).has(registry.REMOTE):
        raise InputError(
            f"qvq bench measures the backends that run here, not {backend}: choose {registry.choices(ALL)}"
        )
    _check_options(runs, decode_tokens, answer_tokens, quant)
    return backend, shape, parse_image_sizes(image_sizes)


def _installed_backends(
    backend: str, backends: list[str], shape, model, family: str | None = None
) -> dict[str, tuple[bool, str | None]]:
    """Which backends can run here (``(ok, reason)`` each); MLX on a non-Apple CPU is skipped for big models."""
    installed = {b: _installed(b) for b in backends}
    mlx_asked = backend == ALL and "mlx" in backends and installed["mlx"][0]
    if mlx_asked and not _apple() and _source_bytes(shape, model, family) > MLX_CPU_LIMIT_BYTES:
        installed["mlx"] = (False, MLX_CPU_SKIP)
    return installed


def _measure_backend(
    name: str,
    installed: tuple[bool, str | None],
    fmt: dict,
    result: dict,
    *,
    images: dict,
    sizes: list[int],
    runs: int,
    decode_tokens: int,
    answer_tokens: int,
    raw: bool,
    log,
) -> dict:
    """One backend's entry: why it cannot run, or its qvq-local and raw-library runs and their ratios."""
    from qvq_local.backends import registry
    from qvq_local.bench.bandwidth import decode_bound

    entry: dict = {"available": False}
    ok, why = installed
    if not ok:
        entry["reason"] = why
        return entry
    if "error" in fmt:
        entry["reason"] = fmt["error"]
        return entry
    weights = _weights_per_token(name, fmt)
    bound = decode_bound(result["bandwidth"]["read_gbs_median"], weights["bytes_per_token"])
    entry.update(
        format=registry.get(name).convert_to,
        model_path=fmt["model"],
        mmproj_path=fmt["mmproj"],
        quantization=fmt.get("quantization"),
        conversion=fmt.get("conversion"),
        bound_tok_s=bound,
        **weights,
    )
    mem_available = result["machine"].get("memory_available_bytes") or 0
    if mem_available and weights["model_bytes"] > 0.95 * mem_available:
        entry["reason"] = (
            f"the model needs {weights['model_bytes'] / 1e9:.1f} GB but only "
            f"{mem_available / 1e9:.1f} GB of memory is available: it does not fit"
        )
        return entry
    entry["available"] = True
    common = {
        "backend": name,
        "model": fmt["model"],
        "mmproj": fmt["mmproj"],
        "images": images,
        "runs": runs,
        "decode_tokens": decode_tokens,
        "answer_tokens": answer_tokens,
    }
    if not raw:
        entry["order"] = "qvq only"
        entry["qvq"] = run_worker({"job": "qvq", **common}, label=f"{name}: qvq-local", log=log)
        entry["raw"] = {"ok": False, "reason": "skipped (--no-raw)"}
    elif mem_available and 2 * weights["model_bytes"] > 0.9 * mem_available:
        # both paths hold the model while they alternate: where two copies do not fit, one after the other
        entry["order"] = SEQUENTIAL_ORDER
        entry["qvq"] = run_worker({"job": "qvq", **common}, label=f"{name}: qvq-local", log=log)
        entry["raw"] = _raw_run(entry["qvq"], common, sizes, decode_tokens, answer_tokens, log)
    else:
        entry["order"] = INTERLEAVED_ORDER
        entry["qvq"], entry["raw"] = _interleaved_run(common, sizes, decode_tokens, answer_tokens, log)
    entry["ratios"] = _ratios(entry["qvq"], entry["raw"])
    entry["chains"] = run_worker({"job": "chains", **common}, label=f"{name}: --samples 1/2/4/8", log=log)
    if entry["qvq"].get("ok"):
        smallest = entry["qvq"]["sizes"][str(sizes[0])]
        entry["decode_tok_s"] = smallest["decode_tok_s"]
        entry["bound_fraction"] = entry["decode_tok_s"] / bound if bound else None
        spread = (smallest.get("spread") or {}).get("decode_tok_s")
        if spread:
            entry["spread"] = {"decode_tok_s": spread}
            if bound:
                entry["spread"]["bound_fraction"] = {
                    k: (v / bound if k != "n" else v) for k, v in spread.items()
                }
    return entry


INTERLEAVED_ORDER = "interleaved (qvq, raw, qvq, raw, ...; both models loaded)"
SEQUENTIAL_ORDER = "sequential (qvq's runs, then raw's: two copies of the model do not fit in memory)"


def _interleaved_run(common: dict, sizes: list[int], decode_tokens: int, answer_tokens: int, log):
    """qvq's and the raw library's runs alternated between two served workers: ``(qvq, raw)`` results."""
    backend = common["backend"]
    qvq = ServedWorker({"job": "qvq", **common}, label=f"{backend}: qvq-local", log=log)
    if not qvq.ready.get("ok"):
        qvq.close()
        return qvq.ready, {"ok": False, "reason": "not run: the qvq path failed"}
    raw_spec = {"job": "raw", "n_ctx": _raw_n_ctx(sizes, decode_tokens, answer_tokens), **common}
    raw = ServedWorker(raw_spec, label=f"{backend}: raw library", log=log)
    workers = {"qvq": qvq}
    if raw.ready.get("ok"):
        workers["raw"] = raw
    else:
        raw.close()
    if log:
        log(f"{backend}: {'qvq and raw runs interleaved' if 'raw' in workers else 'qvq runs'}")
    results = interleave(workers, [str(s) for s in sizes], common["runs"])
    return results["qvq"], results.get("raw", raw.ready)


def _raw_run(qvq: dict, common: dict, sizes: list[int], decode_tokens: int, answer_tokens: int, log) -> dict:
    """The raw library on the same work: as many tokens as the qvq run generated (thought, grace, answer)."""
    qvq_sizes = qvq.get("sizes") or {}
    return run_worker(
        {
            "job": "raw",
            "n_ctx": _raw_n_ctx(sizes, decode_tokens, answer_tokens),
            "max_tokens": {k: v.get("decode_tokens") for k, v in qvq_sizes.items()},
            "prompt_tokens": {k: v.get("prompt_tokens") for k, v in qvq_sizes.items()},
            **common,
        },
        label=f"{common['backend']}: raw library",
        log=log,
    )


def _write_outputs(result: dict, json_path, chart_path, log) -> None:
    """The JSON file and the chart, each path recorded in the result."""
    from qvq_local.bench import report as bench_report

    if json_path:
        result["json"] = str(bench_report.write_json(result, json_path))
    if chart_path:
        try:
            result["chart"] = str(bench_report.write_chart(result, chart_path))
        except ImportError as exc:
            result["chart_error"] = f"matplotlib is not installed ({exc}); pip install 'qvq-local[bench]'"
            log(result["chart_error"])
        if json_path:  # record the chart's path in the file too
            bench_report.write_json(result, json_path)


def bench_command(
    *,
    model: str | None,
    shape: str | None,
    backend: str,
    image_sizes: str,
    runs: int,
    decode_tokens: int,
    quant: str,
    raw: bool,
    json_path: Path | None,
    chart_path: Path | None,
    bandwidth_mib: int,
    cpu_buffers: str | None = None,
    family: str | None = None,
    gpu_layers: str | int | None = None,
) -> dict:
    """The CLI entry: run, print the tables to stdout, say where the files went."""
    from rich.console import Console

    from qvq_local.backends import llama_buffers

    # the workers are child processes: they read both from the environment (checked before it is touched)
    mode = llama_buffers.requested_mode(cpu_buffers) if cpu_buffers is not None else None
    layers = llama_buffers.requested_gpu_layers(gpu_layers)
    saved = {name: os.environ.get(name) for name in (llama_buffers.ENV_VAR, llama_buffers.GPU_LAYERS_ENV)}
    if mode is not None:
        os.environ[llama_buffers.ENV_VAR] = mode
    if layers is not None:
        os.environ[llama_buffers.GPU_LAYERS_ENV] = str(layers)
    # tables with a spread under each figure need ~110 columns: a file or pipe gets 120, not Rich's 80
    out = Console() if sys.stdout.isatty() else Console(width=120)
    command = "qvq " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("qvq") else None
    try:
        result = run_bench(
            model=model,
            shape=shape,
            backend=backend,
            image_sizes=image_sizes,
            runs=runs,
            decode_tokens=decode_tokens,
            quant=quant,
            raw=raw,
            json_path=json_path,
            chart_path=chart_path,
            bandwidth_bytes=int(bandwidth_mib) * 2**20,
            command=command,
            family=family,
        )
    finally:  # an API or test caller keeps its own environment
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    from qvq_local.bench.report import render_tables

    render_tables(result, out)
    for key, what in (("json", "JSON"), ("chart", "chart")):
        if result.get(key):
            out.print(f"{what}: {result[key]}")
    out.print(f"bench took {result['elapsed_s']:.0f} s")
    if not any(b.get("available") for b in result["backends"].values()):
        reasons = "; ".join(f"{n}: {b.get('reason')}" for n, b in result["backends"].items())
        raise ModelError(f"no backend could be benchmarked ({reasons})")
    return result


__all__ = [
    "ServedWorker",
    "bench_command",
    "bench_home",
    "describe_machine",
    "interleave",
    "make_image",
    "parse_image_sizes",
    "prepare_models",
    "run_bench",
    "run_worker",
    "schedule",
]
