"""``qvq bench``: how fast does QVQ run on this machine, will it fit, and what does qvq-local cost?

The benchmark answers the question users ask before downloading 40 GB, with measurements taken in one
run on one machine.  This module puts the parts in order; each part is a module of its own:

1. the options, checked before any work (here), and the backends measured: the registry's local backends,
   all of them with ``--backend all``.  Nothing in the benchmark names a backend but the raw-library
   comparisons (``bench.raw_paths``).  The backends' load options given (``--cpu-buffers``,
   ``--gpu-layers``: the llama backend's) are shared out among the backends measured and checked by each
   one's options type (:func:`load_options`), then carried to the workers in their job's spec;
2. the machine (``bench.machine``) and its memory bandwidth (``bench.bandwidth``), and from it the decode
   speed no implementation can beat (bytes read per token / bandwidth);
3. the model (``bench.prepare``): ``--model REF`` (a converted model, or an HF folder that is converted
   first) or ``--shape tiny|2b|7b|72b`` (``--family`` for another family's shapes): a synthetic checkpoint
   of that shape, converted once to each backend's format into ``QVQ_HOME/bench`` and reused afterwards
   (time and peak memory of the conversion are kept beside it and reported);
4. per backend, in child processes (``bench.processes``, ``bench.worker``): qvq-local's own path
   (``bench.qvq_path``: ``qvq_local.api.load(...).stream``) and, where bench has one for the backend, the
   raw library on the same files, prompt and image (``bench.raw_paths``), each figure the median of
   ``runs`` repetitions after a warm-up, per image size, with its spread (min, max, quartiles:
   ``bench.stats``).  The two paths run interleaved (qvq, raw, qvq, raw, ...) on two served workers, so a
   neighbour's load on a shared machine falls on both sides of a qvq/raw ratio; the ratios are medians of
   the per-pair ratios.  Then the ``--samples`` chains (``bench.chains``), for the backends with the
   registry's ``chains`` capability;
5. the report (``bench.report``): Rich tables, a JSON file with every figure and the machine's
   description, and a PNG chart.

Nothing here is a timing threshold: the benchmark reports, it does not judge.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qvq_local.bench.bandwidth import weights_per_token
from qvq_local.bench.chains import chains_not_measured
from qvq_local.bench.machine import describe_machine
from qvq_local.bench.prepare import QUANTS, prepare_models, source_bytes
from qvq_local.bench.processes import ServedWorker, interleave, run_worker
from qvq_local.bench.raw_paths import has_raw_path
from qvq_local.bench.stats import qvq_raw_ratios
from qvq_local.bench.workload import make_clip, make_image
from qvq_local.errors import InputError, ModelError
from qvq_local.families import DEFAULT_FAMILY
from qvq_local.units import memory_size

SCHEMA = "qvq-bench/1"
#: ``--backend all`` measures every local backend in the registry
ALL = "all"
DEFAULT_IMAGE_SIZES = (224, 448)
#: Side of one merged image patch in pixels: the smallest image size worth measuring.
_FACTOR = DEFAULT_FAMILY.image_factor
#: With ``--backend all`` off Apple Silicon, a backend made for Apple Silicon (the registry's
#: ``apple_silicon_first``) is skipped above this model size: MLX's CPU kernels (mlx[cpu]) made a 2b Q4
#: model take 30 s for a 27-token prompt and decode at 0.7 token/s (bf16 weights: over 5 minutes for the
#: same prompt) on the 2-core x86 machine this was written on.
APPLE_ONLY_LIMIT_BYTES = 200 * 10**6


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


def load_options(
    backends: list[str], options: Mapping[str, Any] | None, labels: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Each measured backend's load options, for its workers' specs: those of ``options`` (name -> value;
    None: not given) its registry options type takes, checked and normalised by that type (so a bad value
    is refused before any work), as plain values.  An option none of ``backends`` takes is refused
    (:func:`qvq_local.backends.registry.share_options`)."""
    from qvq_local.backends import registry

    given = {k: v for k, v in (options or {}).items() if v is not None}
    shared = registry.share_options(backends, given, labels)
    out: dict[str, dict[str, Any]] = {}
    for name, own in shared.items():
        checked = registry.get(name).build_options(own, labels)
        out[name] = {option: getattr(checked, option) for option in own}
    return out


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


def _apple_only_skip(name: str) -> str:
    return (
        f"skipped: {name} on a CPU other than Apple Silicon has no fast quantised kernels (a 2b Q4 model "
        f"decodes under 1 token/s on a 2-core x86 CPU); pass --backend {name} to measure it anyway"
    )


def _apple() -> bool:
    from qvq_local import hardware

    return hardware.is_apple_silicon()


def _raw_n_ctx(sizes: list[int], decode_tokens: int, answer_tokens: int) -> int:
    image_tokens = max((round(s / _FACTOR) or 1) ** 2 for s in sizes)
    need = image_tokens + 512 + decode_tokens + answer_tokens + 128  # + grace window and forced text
    return ((need + 255) // 256) * 256


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
    options: Mapping[str, Any] | None = None,
    option_labels: Mapping[str, str] | None = None,
    video: bool = False,
    speculation: bool = False,
    spec_replay: str | os.PathLike | None = None,
) -> dict:
    """Run the whole benchmark and return the result dictionary (also written to ``json_path``).

    ``video``: also ask about a synthetic 10 s clip (``qvq bench --video``: one more row per backend).
    ``speculation``: also the speculation section (``qvq bench --speculation``,
    :mod:`qvq_local.bench.speculation`) on each backend that speculates; ``spec_replay``: the replies it
    replays (``--spec-replay FILE``; None: QVQ-72B-Preview's published replies from tests/data).

    Exactly one of ``model`` and ``shape`` (``shape`` defaults to ``"tiny"`` when neither is given);
    ``family`` picks the synthetic model's family (``qvq synth --family``; None: Qwen2-VL).  ``options``:
    the backends' load options by name (:func:`load_options`; ``option_labels``: how the caller spells
    them), loaded with in every worker.
    Raises InputError for bad options, ModelError for an unusable model, DiskFull when synthesising or
    converting would not fit; a backend or raw path that cannot run is reported in the result instead.
    """
    from rich.console import Console

    from qvq_local.bench.bandwidth import measure_bandwidth

    console = console or Console(stderr=True)
    backend, shape, sizes = _checked_options(
        model, shape, backend, image_sizes, runs, decode_tokens, answer_tokens, quant
    )
    if family is not None and model is not None:
        raise InputError("--family picks a synthetic model: pass it with --shape, not with --model")
    if model is None:
        from qvq_local.convert import synthetic

        synthetic.get_shape(shape, family)  # unknown family or shape: one line, before any work
    home_path = Path(home).expanduser() if home is not None else bench_home()
    replies = None
    if speculation:
        from qvq_local.bench.speculation import replies_file

        replies = replies_file(spec_replay)  # a missing or bad file: one line, before any work
    elif spec_replay is not None:
        raise InputError(
            "--spec-replay is the replies of the speculation section: pass it with --speculation"
        )
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        console.print(f"[dim]bench:[/] {msg}", highlight=False)

    backends = _choose_backends(backend, shape, model)
    loaded_with = load_options(backends, options, option_labels)
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
            "load_options": loaded_with,
            "video": video,
            "speculation": speculation,
            "spec_replay": replies,
        },
    }
    log("describing the machine")
    result["machine"] = describe_machine()
    installed = _installed_backends(backend, backends, shape, model, family)
    usable = [b for b in backends if installed[b][0]]

    log(f"measuring memory bandwidth ({memory_size(bandwidth_bytes)} array, {bandwidth_reps} reps)")
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
    clip = str(make_clip(home_path / "images" / "clip-10s.mp4")) if video else None
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
            options=loaded_with[name],
            video=clip,
            spec_replay=replies,
        )
        if json_path:  # a partial file after each backend: a long run that is stopped keeps what it measured
            from qvq_local.bench import report

            report.write_json({**result, "partial": True}, json_path)
    result["elapsed_s"] = time.perf_counter() - t_start
    from qvq_local.bench import report

    report.write_outputs(result, json_path, chart_path, log)
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
    """Which backends can run here (``(ok, reason)`` each).  With ``--backend all`` on a CPU other than Apple
    Silicon, a backend made for Apple Silicon is skipped for models over :data:`APPLE_ONLY_LIMIT_BYTES`."""
    from qvq_local.backends import registry

    installed = {b: _installed(b) for b in backends}
    apple_only = [b for b in backends if installed[b][0] and registry.get(b).apple_silicon_first]
    if (
        backend == ALL
        and apple_only
        and not _apple()
        and source_bytes(shape, model, family) > APPLE_ONLY_LIMIT_BYTES
    ):
        installed.update({b: (False, _apple_only_skip(b)) for b in apple_only})
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
    options: dict[str, Any] | None = None,
    video: str | None = None,
    spec_replay: str | None = None,
) -> dict:
    """One backend's entry: why it cannot run, or its qvq-local and raw-library runs and their ratios (a
    backend bench has no raw-library comparison for gets qvq-local's figures alone, and no ratio), and
    its ``--samples`` rates where it forks chains.  ``options``: its load options, for every worker;
    ``video``: a clip the qvq path also asks about (``--video``); ``spec_replay``: the replies of the
    speculation section, run where the backend speculates (``--speculation``; None: not run)."""
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
    model_format = registry.get(name).convert_to
    weights = weights_per_token(model_format, fmt["model"], fmt.get("mmproj"))
    per_token = weights["bytes_per_token"]
    bound = decode_bound(result["bandwidth"]["read_gbs_median"], per_token) if per_token else None
    entry.update(
        format=model_format,
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
            f"the model needs {memory_size(weights['model_bytes'])} but only "
            f"{memory_size(mem_available)} of memory is available: it does not fit"
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
        "options": dict(options or {}),
        "video": video,
    }
    if not raw or not has_raw_path(name):
        entry["order"] = "qvq only"
        entry["qvq"] = run_worker({"job": "qvq", **common}, label=f"{name}: qvq-local", log=log)
        why = "skipped (--no-raw)" if not raw else f"qvq bench has no raw-library comparison for {name}"
        entry["raw"] = {"ok": False, "reason": why}
    elif mem_available and 2 * weights["model_bytes"] > 0.9 * mem_available:
        # both paths hold the model while they alternate: where two copies do not fit, one after the other
        entry["order"] = SEQUENTIAL_ORDER
        entry["qvq"] = run_worker({"job": "qvq", **common}, label=f"{name}: qvq-local", log=log)
        entry["raw"] = _raw_run(entry["qvq"], common, sizes, decode_tokens, answer_tokens, log)
    else:
        entry["order"] = INTERLEAVED_ORDER
        entry["qvq"], entry["raw"] = _interleaved_run(common, sizes, decode_tokens, answer_tokens, log)
    entry["ratios"] = qvq_raw_ratios(entry["qvq"], entry["raw"])
    why_not = chains_not_measured(registry.get(name))
    if why_not is None:
        entry["chains"] = run_worker({"job": "chains", **common}, label=f"{name}: --samples 1/2/4/8", log=log)
    else:
        entry["chains"] = {"ok": False, "reason": why_not}
    if spec_replay is not None:
        if registry.get(name).has(registry.SPECULATION):
            entry["speculation"] = run_worker(
                {"job": "speculation", "spec_replay": spec_replay, **common},
                label=f"{name}: speculation (cost curve, replay, identical draft)",
                log=log,
            )
        else:
            entry["speculation"] = {"ok": False, "reason": f"the {name} backend does not speculate"}
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
    family: str | None = None,
    options: Mapping[str, Any] | None = None,
    option_labels: Mapping[str, str] | None = None,
    video: bool = False,
    speculation: bool = False,
    spec_replay: Path | None = None,
) -> dict:
    """The CLI entry: run, print the tables to stdout, say where the files went.  ``options``: the
    backends' load options as the command line gave them (``option_labels``: its flags)."""
    from rich.console import Console

    # tables with a spread under each figure need ~110 columns: a file or pipe gets 120, not Rich's 80
    out = Console() if sys.stdout.isatty() else Console(width=120)
    command = "qvq " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("qvq") else None
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
        options=options,
        option_labels=option_labels,
        video=video,
        speculation=speculation,
        spec_replay=spec_replay,
    )
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


__all__ = ["ALL", "SCHEMA", "bench_command", "bench_home", "load_options", "parse_image_sizes", "run_bench"]
