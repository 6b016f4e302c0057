"""One measured job of the benchmark, run in a child process: ``python -m qvq_local.bench.worker SPEC OUT``.

Why a child process per job: the peak resident memory of a backend is only meaningful when nothing else
(the other backend, the raw library's own copy of the model, the converter's buffers) shares the
process, and MLX and llama.cpp each start their own thread pools.  The parent (``qvq_local.bench.harness``)
writes a JSON spec, runs this module, and reads the JSON result; a crash in a library (a segfault is
possible in native code) becomes a reported failure, not a lost benchmark.

Jobs (``spec["job"]``):

* ``synth``: write a synthetic checkpoint (``convert.synthetic.write_checkpoint``);
* ``convert-gguf`` / ``convert-mlx``: convert it (``convert_to_gguf`` / ``convert_to_mlx``);
* ``qvq``: this project's path: ``qvq_local.load(model).stream(image, question, think_budget=N)`` (images,
  prompt, Session, reasoning controller with a forced answer), per image size;
* ``raw``: the library alone on the same files: mlx-vlm's ``stream_generate`` or llama-cpp-python's
  ``create_chat_completion`` with its Qwen2-VL chat handler.

Every figure is the median over ``runs`` repetitions after one warm-up per image size; the individual
values are kept in ``samples`` and their min, max and quartiles in ``spread`` (``bench.stats``).

The ``qvq`` and ``raw`` jobs run either on their own (``job_qvq``/``job_raw``: every run of one path, then
the result) or served (``python -m qvq_local.bench.worker --serve SPEC REPLY_FD``): the model is loaded
once, then the parent sends one JSON command per line on stdin (``{"op": "run", "size": "224",
"warmup": false, ...}``, then ``{"op": "finish"}``) and reads one JSON reply per line from the pipe
``REPLY_FD``.  The harness serves both paths at once and alternates their runs (qvq, raw, qvq, raw, ...),
so a neighbour's load on a shared machine falls on both sides of a ratio.  Either way the result has
the same shape, built by :class:`Runs`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from qvq_local import atomic
from qvq_local.bench.memory import PeakRss, lifetime_peak_rss
from qvq_local.bench.stats import summarise

QUESTION = "What is the largest value in this chart? Think it through, then give the number."


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Runs:
    """The measured runs of one path, per image size: the warm-ups discarded, the peak RSS of each size's
    runs, and the summaries (``bench.stats.summarise``) every result carries under ``sizes``."""

    def __init__(self) -> None:
        self.samples: dict[str, list[dict]] = {}
        self.peaks: dict[str, int] = {}
        self.not_forced = 0
        self._size: str | None = None
        self._peak: PeakRss | None = None

    def _close_peak(self) -> None:
        if self._peak is not None:
            self._peak.__exit__(None, None, None)
            self.peaks[self._size] = max(self.peaks.get(self._size, 0), self._peak.bytes)
            self._peak = None

    def run(self, path, size: str, image_path: str, cmd: dict, *, warmup: bool) -> dict:
        """One run of ``path`` at ``size``; kept unless it is a warm-up.  Returns its figures."""
        if size != self._size or self._peak is None:
            self._close_peak()
            self._size, self._peak = size, PeakRss().__enter__()
        fig = path.run(size, image_path, cmd)
        forced = fig.pop("forced", True)
        fig.pop("stop_reason", None)
        if not warmup:
            self.not_forced += 0 if forced else 1
            self.samples.setdefault(size, []).append(fig)
        return fig

    def sizes(self) -> dict:
        self._close_peak()
        return {
            size: {**summarise(samples), "peak_rss_bytes": self.peaks.get(size, 0)}
            for size, samples in self.samples.items()
            if samples
        }


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
            _log(f"{spec['backend']} {path.name} {size}px run {i}/{n}{' (warm-up)' if i == 0 else ''}")
            runs.run(path, size, image_path, cmd, warmup=i == 0)
    return path.finish(runs)


def _sampling_kwargs() -> dict:
    """Greedy decoding with QVQ's repetition penalty: the same work on the qvq and raw paths."""
    return {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.05, "seed": 0}


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
            mmproj_quant=spec.get("mmproj_quant", "f16"),
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
            group_size=int(spec.get("group_size", 64)),
            progress=bool(spec.get("progress")),
        )
    )
    return {"path": str(path), **figures}


# ---------------------------------------------------------------- qvq: the project's API


def _qvq_one_run(model, image_path: str, decode_tokens: int, answer_tokens: int) -> dict:
    """One question through ``qvq_local`` (Model.stream: images, prompt, Session, reasoning controller).

    Thinking is cut at ``decode_tokens`` (plus the controller's grace window up to a sentence end), so the
    forced-answer step always happens; loop detection is off so a random model's repetitions do not end
    thinking early, and the language lock is off as the raw libraries have none (``_lang_lock_cost``
    measures it on its own).  Figures on the caller's clock (what a user of the API sees, controller, splitter and
    event overhead included; these are compared with the raw library):

    * ``first_token_s``: from calling ``stream`` (image loading and prompt building included, as the raw
      libraries' figure includes theirs) to the first thought token;
    * ``decode_tok_s``: thought tokens / seconds between the first thought token and the moment the
      forced text began (``Forced.at_token`` counts the tokens, so text the splitter holds back is no
      matter).

    The controller's own figures are kept beside them: ``first_token_s_api`` and ``decode_tok_s_step``
    (time inside ``Session.step`` only, answer tokens included).
    """
    from qvq_local.events import Finished, Forced, Started, TextDelta

    sk = _sampling_kwargs()
    t0 = time.perf_counter()
    started = None
    result = None
    t_first = t_think_end = None
    first_tokens = 0
    forced_at = None
    for event in model.stream(
        image_path,
        QUESTION,
        think_budget=decode_tokens,
        answer_budget=answer_tokens,
        temperature=sk["temperature"],
        top_k=sk["top_k"],
        top_p=sk["top_p"],
        repetition_penalty=sk["repetition_penalty"],
        seed=sk["seed"],
        loop_detection=False,
        lang_lock="off",  # like for like with the raw library; the lock's own cost is measured apart
    ):
        now = time.perf_counter()
        if isinstance(event, Started):
            started = event
        elif isinstance(event, TextDelta) and event.phase == "thought" and event.tokens and t_first is None:
            t_first, first_tokens = now, event.tokens
        elif isinstance(event, Forced) and forced_at is None:
            forced_at, t_think_end = event.at_token, now - event.seconds
        elif isinstance(event, Finished):
            result = event.result
    if result is None or started is None:
        raise RuntimeError("the event stream ended without Started/Finished")
    t = result.timings
    # thinking, on the caller's clock: from the first thought token to the moment the forced text began
    window_tokens = (forced_at - first_tokens) if forced_at is not None else 0
    wall_decode_s = (t_think_end - t_first) if (t_first is not None and t_think_end is not None) else 0.0
    fig = {
        "prompt_tokens": int(result.prompt_tokens),
        "image_tokens": int(sum(i.tokens for i in result.images)),
        "image_encode_s": float(t.image_encode_s),
        "prefill_s": float(t.prefill_s),
        "prefill_tok_s": float(t.prefill_tok_s),
        "first_token_s": (t_first - t0) if t_first is not None else float(t.first_token_s),
        "first_token_s_api": float(t.first_token_s),
        "decode_tokens": int(result.thought_tokens + result.answer_tokens),
        "thought_tokens": int(result.thought_tokens),
        "decode_s": float(t.decode_s),
        "decode_tok_s": window_tokens / wall_decode_s if wall_decode_s > 0 and window_tokens > 0 else 0.0,
        "decode_tok_s_step": float(t.decode_tok_s),
        "forced_step_s": float(t.forced_step_s),
        "forced_tokens": 0,
        "total_s": time.perf_counter() - t0,
    }
    if result.forced:
        fig["forced_tokens"] = _count_tokens(model.loaded, result.forced[0].text)
    fig["stop_reason"] = result.stop_reason
    fig["forced"] = bool(result.forced)
    fig["prefix_cache"] = dict(result.settings.get("prefix_cache") or {})
    return fig


def _prefix_reuse(model, image_path: str, runs: int, answer_tokens: int) -> dict:
    """First token for a repeated image (issue 16), per run: a first ask with empty caches, the same image
    again from the in-memory cache, then again from the disk cache alone (a new CLI process's case), with
    the disk write (after the first answer), read time and the state's size.  Ratios: repeated first
    token / first ask's first token (goal: at most 0.2).  Few thought tokens: only the first token matters.
    """
    import tempfile

    from qvq_local import prefix_cache

    samples = []
    memory, disk = model.prefix_cache, model.disk_cache
    try:
        with tempfile.TemporaryDirectory(prefix="qvq-bench-cache-") as folder:
            for i in range(runs):
                _log(f"{model.backend} qvq prefix reuse run {i + 1}/{runs}")
                model.prefix_cache = prefix_cache.MemoryCache()
                model.disk_cache = prefix_cache.DiskCache(Path(folder), notice=_log)
                model.disk_cache.clear()
                first = _qvq_one_run(model, image_path, 2, answer_tokens)
                again = _qvq_one_run(model, image_path, 2, answer_tokens)
                model.prefix_cache = None
                from_disk = _qvq_one_run(model, image_path, 2, answer_tokens)
                sources = [r["prefix_cache"].get("source") for r in (first, again, from_disk)]
                if sources != ["fresh", "memory", "disk"]:
                    raise RuntimeError(f"prefix cache sources were {sources}, expected fresh, memory, disk")
                samples.append(
                    {
                        "first_token_s": first["first_token_s"],
                        "memory_first_token_s": again["first_token_s"],
                        "disk_first_token_s": from_disk["first_token_s"],
                        "memory_ratio": again["first_token_s"] / first["first_token_s"],
                        "disk_ratio": from_disk["first_token_s"] / first["first_token_s"],
                        "write_s": first["prefix_cache"]["write_s"],
                        "read_s": from_disk["prefix_cache"]["read_s"],
                        "bytes": first["prefix_cache"]["bytes"],
                    }
                )
    finally:
        model.prefix_cache, model.disk_cache = memory, disk
    return summarise(samples)


def _lang_lock_cost(model, steps: int = 48, rounds: int = 4) -> dict:
    """What the language lock costs per token: one text-only session stepped in alternating blocks
    without and with the mask of :data:`QUESTION` (an English question: CJK and other scripts masked),
    medians of each block's ms/token.  Also the one-off cost of the script table."""
    from qvq_local import lang
    from qvq_local.backends.base import Prompt, SamplingParams
    from qvq_local.prompt import build_prompt

    mask, info = model.language_mask(lang.decide(QUESTION, "on"))
    loaded = model.loaded
    text = build_prompt(loaded.chat_template, QUESTION, 0, None)
    n_ctx = _count_tokens(loaded, text) + 16 + 2 * rounds * (steps + 1)
    session = loaded.new_session(SamplingParams(**_sampling_kwargs()), n_ctx=max(n_ctx, 256))
    blocks: dict[bool, list[float]] = {False: [], True: []}
    try:
        session.prefill(Prompt(text=text, images=[]))
        for r in range(rounds):
            # ABBA order: the context grows as the session goes on, which must not favour either side
            for masked in (False, True) if r % 2 == 0 else (True, False):
                session.step(mask if masked else None)  # the switch itself is not a per-token cost
                t0 = time.perf_counter()
                for _ in range(steps):
                    session.step(mask if masked else None)
                blocks[masked].append((time.perf_counter() - t0) / steps * 1000)
    finally:
        session.close()
    off, on = statistics.median(blocks[False]), statistics.median(blocks[True])
    return {
        "masked_tokens": info.get("masked_tokens", 0),
        "table_s": model.lang_index_s,
        "step_ms_off": off,
        "step_ms_on": on,
        "overhead_ms": on - off,
    }


def _count_tokens(loaded, text: str) -> int:
    """Tokens in ``text`` by the loaded model's own tokenizer (informative; 0 when it cannot tell)."""
    try:
        tokenize = getattr(loaded, "tokenize", None)
        if callable(tokenize):
            return len(tokenize(text))
        return len(loaded.tokenizer.encode(text, add_special_tokens=False))
    except Exception:  # noqa: BLE001
        return 0


class QvqPath:
    """This project's path (``qvq_local.load(...).stream``), loaded once; one question per :meth:`run`."""

    name = "qvq"

    def __init__(self, spec: dict):
        import qvq_local

        self.spec = spec
        self.decode_tokens = int(spec["decode_tokens"])
        self.answer_tokens = int(spec.get("answer_tokens", 8))
        with PeakRss() as load_peak:
            t0 = time.perf_counter()
            self.model = qvq_local.load(spec["model"], backend=spec["backend"])
            self.load_s = time.perf_counter() - t0
        self.load_peak_rss_bytes = load_peak.bytes
        # the repeated runs measure a fresh prefill each; prefix reuse is measured on its own (finish)
        self.model.prefix_cache = None

    def run(self, size: str, image_path: str, cmd: dict) -> dict:
        fig = _qvq_one_run(self.model, image_path, self.decode_tokens, self.answer_tokens)
        fig.pop("prefix_cache", None)
        return fig

    def finish(self, runs: Runs) -> dict:
        sizes = runs.sizes()
        for size, fig in sizes.items():
            image_path = self.spec["images"][size]
            fig["prefix_reuse"] = _prefix_reuse(
                self.model, image_path, int(self.spec["runs"]), self.answer_tokens
            )
        _log(f"{self.spec['backend']} qvq language-lock cost")
        lang_lock = _lang_lock_cost(self.model)
        buffers = getattr(self.model.loaded, "cpu_buffers", None)
        return {
            "ok": True,
            "path": "qvq_local.load(...).stream(...)",
            "backend": self.spec["backend"],
            "quantization": self.model.quantization,
            # set when qvq computes differently from the raw library (ratios include it)
            "compute": getattr(self.model.loaded, "compute_note", None),
            "cpu_buffers": buffers.describe() if buffers is not None else None,  # llama.cpp weight buffers
            "placement": getattr(self.model.loaded, "placement", lambda: None)(),  # llama: GPU / CPU layers
            "load_s": self.load_s,
            "load_peak_rss_bytes": self.load_peak_rss_bytes,
            "peak_rss_bytes": lifetime_peak_rss(),
            "answer_tokens": self.answer_tokens,
            "runs_not_forced": runs.not_forced,
            "sizes": sizes,
            "lang_lock": lang_lock,
        }

    def close(self) -> None:
        self.model.close()


def job_qvq(spec: dict) -> dict:
    """This project's path, per image size; the warm-up run of each size is discarded."""
    path = QvqPath(spec)
    try:
        return run_sequentially(path, spec)
    finally:
        path.close()


# ---------------------------------------------------------------- raw: the libraries alone


def _raw_figures(t0: float, stamps: list[float], t_end: float, prompt_tokens: int) -> dict:
    """Figures of one raw run from the moments each token became available (``stamps``).

    ``first_token_s``: call to first token.  ``decode_tok_s``: (tokens - 1) / (last token - first token),
    the same window the qvq path uses.  ``prefill_tok_s``: prompt tokens (image tokens included) / time
    to first token, i.e. image encoding included, as on the qvq path.
    """
    n = len(stamps)
    first = stamps[0] if stamps else t_end
    span = (stamps[-1] - first) if n > 1 else 0.0
    ttft = first - t0
    return {
        "prompt_tokens": int(prompt_tokens),
        "first_token_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft if prompt_tokens and ttft > 0 else 0.0,
        "decode_tokens": n,
        "decode_s": span,
        "decode_tok_s": (n - 1) / span if span > 0 else 0.0,
        "total_s": t_end - t0,
    }


def _max_tokens(spec: dict, size: str) -> int:
    """Tokens the raw run generates: as many as the qvq run made at this size (same work)."""
    return int((spec.get("max_tokens") or {}).get(size) or spec["decode_tokens"])


class RawMlxPath:
    """mlx-vlm's own ``stream_generate`` on the same folder, prompt text and image.

    ``stream_generate`` yields once per generated token, so the moment of each yield is the moment that
    token became available to a caller.
    """

    name = "raw"

    def __init__(self, spec: dict):
        import mlx_vlm
        from mlx_vlm import load as vlm_load

        from qvq_local.prompt import QVQ_SYSTEM_PROMPT, build_prompt, load_chat_template

        self.spec = spec
        self.library = f"mlx-vlm {getattr(mlx_vlm, '__version__', '?')} stream_generate"
        with PeakRss() as load_peak:
            t0 = time.perf_counter()
            self.model, self.processor = vlm_load(spec["model"])
            self.load_s = time.perf_counter() - t0
        self.load_peak_rss_bytes = load_peak.bytes
        self.text = build_prompt(load_chat_template(spec["model"]), QUESTION, 1, system=QVQ_SYSTEM_PROMPT)

    def run(self, size: str, image_path: str, cmd: dict) -> dict:
        from mlx_vlm import stream_generate

        sk = _sampling_kwargs()
        stamps: list[float] = []
        last = None
        t0 = time.perf_counter()
        for res in stream_generate(
            self.model,
            self.processor,
            self.text,
            image=[image_path],
            max_tokens=int(cmd.get("max_tokens") or self.spec["decode_tokens"]),
            temperature=sk["temperature"],
            repetition_penalty=sk["repetition_penalty"],
        ):
            if res.token is not None and len(stamps) < res.generation_tokens:
                stamps.append(time.perf_counter())
            last = res
        t_end = time.perf_counter()
        fig = _raw_figures(t0, stamps, t_end, int(last.prompt_tokens) if last is not None else 0)
        if last is not None:
            fig["library_prompt_tok_s"] = float(last.prompt_tps)
            fig["library_generation_tok_s"] = float(last.generation_tps)
            fig["library_peak_memory_gb"] = float(last.peak_memory)
        return fig

    def finish(self, runs: Runs) -> dict:
        return {
            "library": self.library,
            "load_s": self.load_s,
            "load_peak_rss_bytes": self.load_peak_rss_bytes,
            "sizes": runs.sizes(),
            **_raw_result(self.spec),
        }

    def close(self) -> None:
        import mlx.core as mx

        self.model = self.processor = None
        mx.clear_cache()


def _llama_handler(mmproj: str):
    """The chat handler llama-cpp-python 0.3.x offers for Qwen2-VL family models (mtmd underneath)."""
    from llama_cpp import llama_chat_format as fmt

    for name in ("Qwen25VLChatHandler", "MTMDChatHandler"):
        cls = getattr(fmt, name, None)
        if cls is not None:
            return name, cls(clip_model_path=mmproj, verbose=False)
    raise RuntimeError(
        "llama-cpp-python has no Qwen2-VL chat handler (neither Qwen25VLChatHandler nor MTMDChatHandler)"
    )


def _data_uri(path: str) -> str:
    import base64

    data = Path(path).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_QUIET_LOG = None


def _silence_llama_logs() -> None:
    """Drop llama.cpp/mtmd log lines (mtmd prints every prompt chunk at its default level)."""
    global _QUIET_LOG
    import llama_cpp
    from llama_cpp import mtmd_cpp

    if _QUIET_LOG is None:
        _QUIET_LOG = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_QUIET_LOG, None)
    for name in ("mtmd_log_set", "mtmd_helper_log_set"):
        fn = getattr(mtmd_cpp, name, None)
        if fn is not None:
            fn(_QUIET_LOG, None)


class RawLlamaPath:
    """llama-cpp-python's own chat completion with its Qwen2-VL handler, the same image as a data: URI.

    Context settings match the qvq backend's (threads = all cores, flash attention, batch 512, GPU layers
    as llama.cpp supports), so the comparison is of the code paths, not of the settings.

    Timing: streamed chunks are no clock for tokens here (llama-cpp-python holds text back while it could
    be an incomplete UTF-8 character or the start of a stop string, so chunks arrive in bursts).  A
    logits processor is called once per generated token, right after llama.cpp produced its logits, so
    its call times are the moments tokens become available; it returns the scores unchanged.
    """

    name = "raw"

    def __init__(self, spec: dict):
        import llama_cpp
        from llama_cpp import Llama

        from qvq_local.backends import llama_buffers
        from qvq_local.cpu import usable_cores

        self.spec = spec
        threads = usable_cores()
        self.n_ctx = int(spec.get("n_ctx") or 4096)
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        layers = llama_buffers.requested_gpu_layers()  # --gpu-layers, as qvq's path gets it
        n_gpu_layers = (-1 if gpu else 0) if layers is None else layers
        _silence_llama_logs()
        with PeakRss() as load_peak:
            t0 = time.perf_counter()
            handler_name, handler = _llama_handler(spec["mmproj"])
            # The same CPU buffer plan as qvq's session (AMX off on AMX CPUs): like for like, and no crash.
            with llama_buffers.high_level_llama(spec["model"]):
                self.llm = Llama(
                    model_path=spec["model"],
                    chat_handler=handler,
                    n_ctx=self.n_ctx,
                    n_batch=512,
                    n_ubatch=512,
                    n_threads=threads,
                    n_threads_batch=threads,
                    flash_attn=True,
                    n_gpu_layers=n_gpu_layers,
                    verbose=False,
                )
            self.load_s = time.perf_counter() - t0
        self.load_peak_rss_bytes = load_peak.bytes
        self.library = f"llama-cpp-python {llama_cpp.__version__} create_chat_completion ({handler_name})"
        _silence_llama_logs()  # Llama() installs its own logger

    def run(self, size: str, image_path: str, cmd: dict) -> dict:
        from llama_cpp import LogitsProcessorList

        from qvq_local.prompt import QVQ_SYSTEM_PROMPT

        sk = _sampling_kwargs()
        stamps: list[float] = []

        def clock(_ids, scores):
            stamps.append(time.perf_counter())
            return scores

        messages = [
            {"role": "system", "content": QVQ_SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_uri(image_path)}},
                    {"type": "text", "text": QUESTION},
                ],
            },
        ]
        t0 = time.perf_counter()
        out = self.llm.create_chat_completion(
            messages=messages,
            max_tokens=int(cmd.get("max_tokens") or self.spec["decode_tokens"]),
            logits_processor=LogitsProcessorList([clock]),
            temperature=sk["temperature"],
            top_k=sk["top_k"],
            top_p=sk["top_p"],
            min_p=0.0,
            repeat_penalty=sk["repetition_penalty"],
            seed=sk["seed"],
        )
        t_end = time.perf_counter()
        usage = out.get("usage") or {}
        # llama-cpp-python counts an image by its M-RoPE positions, not its tokens, so its prompt_tokens
        # undercount; the qvq run's count of the same prompt and image is exact
        library_prompt = int(usage.get("prompt_tokens") or 0)
        prompt_tokens = int(cmd.get("prompt_tokens") or library_prompt)
        fig = _raw_figures(t0, list(stamps), t_end, prompt_tokens)
        fig["library_prompt_tokens"] = library_prompt
        fig["library_completion_tokens"] = int(usage.get("completion_tokens") or 0)
        return fig

    def finish(self, runs: Runs) -> dict:
        return {
            "library": self.library,
            "load_s": self.load_s,
            "load_peak_rss_bytes": self.load_peak_rss_bytes,
            "n_ctx": self.n_ctx,
            "sizes": runs.sizes(),
            **_raw_result(self.spec),
        }

    def close(self) -> None:
        self.llm.close()


def _raw_result(spec: dict) -> dict:
    return {"ok": True, "backend": spec["backend"], "peak_rss_bytes": lifetime_peak_rss()}


def raw_path(spec: dict):
    """The raw library's path for ``spec["backend"]``, loaded."""
    return RawMlxPath(spec) if spec["backend"] == "mlx" else RawLlamaPath(spec)


def job_raw(spec: dict) -> dict:
    """The raw library alone, per image size; the warm-up run of each size is discarded."""
    path = raw_path(spec)
    try:
        return run_sequentially(path, spec)
    finally:
        path.close()


def job_chains(spec: dict) -> dict:
    """``--samples N`` decode rates (:mod:`qvq_local.bench.chains`)."""
    from qvq_local.bench.chains import job_chains as run

    return run(spec)


JOBS = {
    "chains": job_chains,
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
            _log(f"{spec['backend']} {path.name} {size}px run {i}/{n}{' (warm-up)' if warmup else ''}")
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
