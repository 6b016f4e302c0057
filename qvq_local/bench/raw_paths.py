"""The raw libraries alone on the same files, prompt, image and sampling: the benchmark's yardstick.

mlx-vlm's ``stream_generate`` and llama-cpp-python's ``create_chat_completion`` with its Qwen2-VL chat
handler, each timed token by token the way qvq-local's path is (:mod:`qvq_local.bench.qvq_path`), so
qvq/raw ratios measure what qvq-local adds.  A comparison exists only for the backends listed in
:data:`RAW_PATHS`; any other backend in the registry is benchmarked on qvq-local's path alone.  Each
library is imported only when its path is loaded, in a worker child (:mod:`qvq_local.bench.worker`).
"""

from __future__ import annotations

import time
from pathlib import Path

from qvq_local.bench.memory import PeakRss, lifetime_peak_rss
from qvq_local.bench.runs import Runs
from qvq_local.bench.workload import QUESTION, greedy_sampling


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


class RawMlxPath:
    """mlx-vlm's own ``stream_generate`` on the same folder, prompt text and image.

    ``stream_generate`` yields once per generated token, so the moment of each yield is the moment that
    token became available to a caller.
    """

    name = "raw"

    def __init__(self, spec: dict):
        import mlx_vlm
        from mlx_vlm import load as vlm_load

        from qvq_local.families import DEFAULT_FAMILY
        from qvq_local.prompt import build_prompt, load_chat_template

        self.spec = spec
        self.library = f"mlx-vlm {getattr(mlx_vlm, '__version__', '?')} stream_generate"
        with PeakRss() as load_peak:
            t0 = time.perf_counter()
            self.model, self.processor = vlm_load(spec["model"])
            self.load_s = time.perf_counter() - t0
        self.load_peak_rss_bytes = load_peak.bytes
        self.text = build_prompt(
            load_chat_template(spec["model"]), QUESTION, 1, system=DEFAULT_FAMILY.system_prompt
        )

    def run(self, size: str, image_path: str, cmd: dict) -> dict:
        from mlx_vlm import stream_generate

        sk = greedy_sampling()
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
        options = spec.get("options") or {}  # the llama backend's load options, as qvq's path gets them
        layers = llama_buffers.requested_gpu_layers(options.get("gpu_layers"))
        n_gpu_layers = (-1 if gpu else 0) if layers is None else layers
        _silence_llama_logs()
        with PeakRss() as load_peak:
            t0 = time.perf_counter()
            handler_name, handler = _llama_handler(spec["mmproj"])
            # The same CPU buffer plan as qvq's session (AMX off on AMX CPUs): like for like, and no crash.
            with llama_buffers.high_level_llama(spec["model"], options.get("cpu_buffers")):
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

        from qvq_local.families import DEFAULT_FAMILY

        sk = greedy_sampling()
        stamps: list[float] = []

        def clock(_ids, scores):
            stamps.append(time.perf_counter())
            return scores

        messages = [
            {"role": "system", "content": DEFAULT_FAMILY.system_prompt},
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


#: The raw-library comparison bench has for a backend, by the backend's name.  A backend not listed is
#: measured on qvq-local's path alone (its figures, no qvq/raw ratio).
RAW_PATHS = {"mlx": RawMlxPath, "llama": RawLlamaPath}


def has_raw_path(backend: str) -> bool:
    """Whether bench can compare ``backend`` with its library used directly."""
    return backend in RAW_PATHS


def raw_path(spec: dict):
    """The raw library's path for ``spec["backend"]``, loaded."""
    cls = RAW_PATHS.get(spec["backend"])
    if cls is None:
        raise RuntimeError(f"qvq bench has no raw-library comparison for the {spec['backend']} backend")
    return cls(spec)
