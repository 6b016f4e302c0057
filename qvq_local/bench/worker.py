"""One measured job of the benchmark, run in a child process: ``python -m qvq_local.bench.worker SPEC OUT``.

Why a child process per job: the peak resident memory of a backend is only meaningful when nothing else
(the other backend, the raw library's own copy of the model, the converter's buffers) shares the
process, and MLX and llama.cpp each start their own thread pools.  The parent (``qvq_local.bench.processes``)
writes a JSON spec, runs this module, and reads the JSON result; a crash in a library (a segfault is
possible in native code) becomes a reported failure, not a lost benchmark.

Jobs (``spec["job"]``):

* ``synth``: write a synthetic checkpoint (``convert.synthetic.write_checkpoint``);
* ``convert-gguf`` / ``convert-mlx``: convert it (``convert_to_gguf`` / ``convert_to_mlx``);
* ``qvq``: this project's path (``bench.qvq_path``): ``qvq_local.api.load(model).stream(image, question,
  think_budget=N)`` (images, prompt, Session, reasoning controller with a forced answer), per image size;
* ``raw``: the library alone on the same files (``bench.raw_paths``): mlx-vlm's ``stream_generate`` or
  llama-cpp-python's ``create_chat_completion`` with its Qwen2-VL chat handler;
* ``chains``: the ``--samples N`` decode rates (``bench.chains``);
* ``speculation``: the speculation section (``bench.speculation``: cost curve, replay, identical draft).

Every figure is the median over ``runs`` repetitions after one warm-up per image size; the individual
values are kept in ``samples`` and their min, max and quartiles in ``spread`` (``bench.stats``).

The ``qvq`` and ``raw`` jobs run either on their own (``job_qvq``/``job_raw``: every run of one path, then
the result) or served (``python -m qvq_local.bench.worker --serve SPEC REPLY_FD``): the model is loaded
once, then the parent sends one JSON command per line on stdin (``{"op": "run", "size": "224",
"warmup": false, ...}``, then ``{"op": "finish"}``) and reads one JSON reply per line from the pipe
``REPLY_FD``.  The harness serves both paths at once and alternates their runs (qvq, raw, qvq, raw, ...),
so a neighbour's load on a shared machine falls on both sides of a ratio.  Either way the result has
the same shape, built by :class:`qvq_local.bench.runs.Runs`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from qvq_local import atomic
from qvq_local.bench.memory import PeakRss
from qvq_local.bench.qvq_path import QvqPath
from qvq_local.bench.raw_paths import raw_path
from qvq_local.bench.runs import Runs, log
from qvq_local.bench.workload import QUESTION, load_model
from qvq_local.convert.quants import DEFAULT_GROUP_SIZE, DEFAULT_MMPROJ_QUANT


def run_sequentially(path, spec: dict) -> dict:
    """Every run of one path: per image size a warm-up, then ``runs`` measured runs; then its result."""
    runs = Runs()
    n = int(spec["runs"])
    for size, image_path in spec["images"].items():
        cmd = {
            "max_tokens": _max_tokens(spec, size),
            "prompt_tokens": (spec.get("prompt_tokens") or {}).get(size),
        }
        for i in range(n + 1):
            log(f"{spec['backend']} {path.name} {size}px run {i}/{n}{' (warm-up)' if i == 0 else ''}")
            runs.run(path, size, image_path, cmd, warmup=i == 0)
    return path.finish(runs)


# ---------------------------------------------------------------- conversion jobs


def _measured(work) -> tuple[object, dict]:
    """Run ``work()`` once; return its value and the figures every conversion job reports."""
    with PeakRss() as peak:
        t0 = time.perf_counter()
        value = work()
        seconds = time.perf_counter() - t0
    return value, {"ok": True, "seconds": seconds, "peak_rss_bytes": peak.bytes, "peak_method": peak.method}


def job_synth(spec: dict) -> dict:
    from qvq_local.convert.synthetic import write_checkpoint

    path, figures = _measured(
        lambda: write_checkpoint(
            Path(spec["out"]),
            shape=spec["shape"],
            dtype=spec.get("dtype", "bf16"),
            seed=int(spec.get("seed", 0)),
            progress=bool(spec.get("progress")),
            force=bool(spec.get("force", False)),
            tokenizer=spec.get("tokenizer"),
            family=spec.get("family"),
        )
    )
    return {"path": str(path), **figures}


def job_convert_gguf(spec: dict) -> dict:
    from qvq_local.convert.to_gguf import convert_to_gguf

    pair, figures = _measured(
        lambda: convert_to_gguf(
            Path(spec["src"]),
            Path(spec["out"]),
            quant=spec["quant"],
            mmproj_quant=spec.get("mmproj_quant", DEFAULT_MMPROJ_QUANT),
            progress=bool(spec.get("progress")),
        )
    )
    return {"model": str(pair.model), "mmproj": str(pair.mmproj), **figures}


def job_convert_mlx(spec: dict) -> dict:
    from qvq_local.convert.to_mlx import convert_to_mlx

    path, figures = _measured(
        lambda: convert_to_mlx(
            Path(spec["src"]),
            Path(spec["out"]),
            bits=spec.get("bits"),
            group_size=int(spec.get("group_size", DEFAULT_GROUP_SIZE)),
            progress=bool(spec.get("progress")),
        )
    )
    return {"path": str(path), **figures}


# ---------------------------------------------------------------- measured paths


def job_qvq(spec: dict) -> dict:
    """This project's path, per image size; the warm-up run of each size is discarded."""
    path = QvqPath(spec)
    try:
        return run_sequentially(path, spec)
    finally:
        path.close()


def _max_tokens(spec: dict, size: str) -> int:
    """Tokens the raw run generates: as many as the qvq run made at this size (same work)."""
    return int((spec.get("max_tokens") or {}).get(size) or spec["decode_tokens"])


def job_raw(spec: dict) -> dict:
    """The raw library alone, per image size; the warm-up run of each size is discarded."""
    path = raw_path(spec)
    try:
        return run_sequentially(path, spec)
    finally:
        path.close()


def job_chains(spec: dict) -> dict:
    """``--samples N`` decode rates (:mod:`qvq_local.bench.chains`): load the model, build the prompt for
    the smallest image, measure every N.  A backend without the registry's ``chains`` capability is
    refused with the reason (the harness does not ask it)."""
    from qvq_local.backends import registry
    from qvq_local.backends.base import Prompt
    from qvq_local.bench.chains import CHAIN_COUNTS, chains_not_measured, measure_chains
    from qvq_local.errors import InputError
    from qvq_local.images import prepare_images
    from qvq_local.prompt import build_prompt

    why_not = chains_not_measured(registry.get(spec["backend"]))
    if why_not is not None:
        raise InputError(why_not)
    model = load_model(spec)
    try:
        loaded, family = model.loaded, model.family
        sizes = sorted(spec["images"], key=int)
        image = prepare_images([spec["images"][sizes[0]]], model.max_pixels, factor=family.image_factor)[
            0
        ].image
        text = build_prompt(loaded.chat_template, QUESTION, 1, family.system_prompt or None, family=family)
        prompt = Prompt(text=text, images=[image])
        figures = measure_chains(
            loaded,
            prompt,
            tokens=int(spec["decode_tokens"]),
            runs=int(spec["runs"]),
            counts=tuple(spec.get("counts") or CHAIN_COUNTS),
        )
    finally:
        model.close()
    return {"ok": True, "image_size": int(sizes[0]), **figures}


def job_speculation(spec: dict) -> dict:
    """``qvq bench --speculation`` (:func:`qvq_local.bench.speculation.job`)."""
    from qvq_local.bench import speculation

    return speculation.job(spec, load_model)


JOBS = {
    "chains": job_chains,
    "speculation": job_speculation,
    "synth": job_synth,
    "convert-gguf": job_convert_gguf,
    "convert-mlx": job_convert_mlx,
    "qvq": job_qvq,
    "raw": job_raw,
}


#: The paths a served worker can run (``--serve``), by job name.
PATHS = {"qvq": QvqPath, "raw": raw_path}


def _failure(exc: BaseException) -> dict:
    """Every failure is reported to the parent, with its reason (one line) and the traceback."""
    from qvq_local.errors import QvqError

    reason = str(exc) if isinstance(exc, QvqError) else f"{type(exc).__name__}: {exc}"
    return {
        "ok": False,
        "reason": " ".join(reason.split())[:500],
        "traceback": traceback.format_exc()[-4000:],
    }


def serve(spec: dict, commands, reply) -> int:
    """Load one path, then run it on request: one JSON command per line from ``commands``, one JSON reply
    per command through ``reply(dict)`` (see the module doc).  The first reply says the path is loaded."""
    try:
        path = PATHS[spec["job"]](spec)
    except Exception as exc:  # noqa: BLE001
        reply(_failure(exc))
        return 1
    runs = Runs()
    reply({"ok": True, "ready": True})
    code = 1
    try:
        for line in commands:
            cmd = json.loads(line)
            if cmd.get("op") == "finish":
                reply(path.finish(runs))
                code = 0
                break
            size, i, n = str(cmd["size"]), cmd.get("run", 0), spec["runs"]
            warmup = bool(cmd.get("warmup"))
            log(f"{spec['backend']} {path.name} {size}px run {i}/{n}{' (warm-up)' if warmup else ''}")
            fig = runs.run(path, size, spec["images"][size], cmd, warmup=warmup)
            reply({"ok": True, "fig": fig})
    except Exception as exc:  # noqa: BLE001
        reply(_failure(exc))
    finally:
        path.close()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    served = bool(argv) and argv[0] == "--serve"
    if served:
        argv = argv[1:]
    if len(argv) != 2:
        print(
            "usage: python -m qvq_local.bench.worker SPEC.json OUT.json\n"
            "       python -m qvq_local.bench.worker --serve SPEC.json REPLY_FD",
            file=sys.stderr,
        )
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    import faulthandler

    faulthandler.enable()  # a native crash in a measured library names the step it happened in
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if served:
        with os.fdopen(int(argv[1]), "w") as out:

            def reply(data: dict) -> None:
                out.write(json.dumps(data, default=str) + "\n")
                out.flush()

            return serve(spec, sys.stdin, reply)
    try:
        result = JOBS[spec["job"]](spec)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent, with its reason
        result = _failure(exc)
    atomic.write_text(argv[1], json.dumps(result, indent=1, default=str))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
