"""qvq-local's own path in the benchmark: ``qvq_local.api.load(...).stream(...)``, one question per run.

Everything a user of the API pays is on the clock here (images, prompt, Session, the reasoning controller
with its forced answer, the stream splitter and the events), so these figures set against the raw
library's (:mod:`qvq_local.bench.raw_paths`) give what qvq-local costs.  Besides the paired runs, two
figures only this path has: the first token for a repeated image (the prefix cache, in memory and on
disk) and the language lock's cost per token.  Runs in a worker child (:mod:`qvq_local.bench.worker`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from qvq_local.bench.memory import PeakRss, lifetime_peak_rss
from qvq_local.bench.runs import Runs, log
from qvq_local.bench.stats import summarise
from qvq_local.bench.workload import QUESTION, count_tokens, greedy_sampling, load_model


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

    sk = greedy_sampling()
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
        fig["forced_tokens"] = _tokens_or_zero(model.loaded, result.forced[0].text)
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
                log(f"{model.backend} qvq prefix reuse run {i + 1}/{runs}")
                model.prefix_cache = prefix_cache.MemoryCache()
                model.disk_cache = prefix_cache.DiskCache(Path(folder), notice=log)
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
    text = build_prompt(loaded.chat_template, QUESTION, 0, None, family=model.family)
    n_text = count_tokens(loaded, text)  # control tokens spelt out: an upper bound
    n_ctx = (len(text.encode("utf-8")) if n_text is None else n_text) + 16 + 2 * rounds * (steps + 1)
    session = loaded.new_session(SamplingParams(**greedy_sampling()), n_ctx=max(n_ctx, 256))
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


def _video_row(model, clip_path: str, runs: int, answer_tokens: int) -> dict:
    """``qvq bench --video``: one question about a clip per run (no prefix reuse): frames sampled, video
    tokens, how it went in, decode-and-sample seconds, the vision encoder's, the prefill's and the first
    token's, on the caller's clock."""
    from qvq_local.events import Finished, TextDelta

    samples = []
    cache = model.prefix_cache
    model.prefix_cache = None
    try:
        for i in range(runs):
            log(f"{model.backend} qvq video run {i + 1}/{runs}")
            t0 = time.perf_counter()
            first = None
            result = None
            for event in model.stream(
                clip_path,
                QUESTION,
                think_budget=2,
                answer_budget=answer_tokens,
                loop_detection=False,
                lang_lock="off",
            ):
                if isinstance(event, TextDelta) and event.tokens and first is None:
                    first = time.perf_counter() - t0
                elif isinstance(event, Finished):
                    result = event.result
            if result is None or result.clip is None:
                raise RuntimeError("the clip's question ended without a Result naming its clip")
            samples.append(
                {
                    "frames": result.clip.frames,
                    "video_tokens": result.clip.tokens,
                    "decode_sample_s": result.clip.decode_s,
                    "encode_s": float(result.timings.image_encode_s),
                    "prefill_s": float(result.timings.prefill_s),
                    "first_token_s": first if first is not None else float(result.timings.first_token_s),
                    "prompt_tokens": int(result.prompt_tokens),
                }
            )
            mode = result.clip.mode
    finally:
        model.prefix_cache = cache
    return {**summarise(samples), "mode": mode, "clip": clip_path}


def _tokens_or_zero(loaded, text: str) -> int:
    """Tokens in ``text`` by the loaded model's own tokenizer (informative; 0 when its backend has none)."""
    return count_tokens(loaded, text) or 0


class QvqPath:
    """This project's path (``qvq_local.load(...).stream``), loaded once; one question per :meth:`run`."""

    name = "qvq"

    def __init__(self, spec: dict):
        self.spec = spec
        self.decode_tokens = int(spec["decode_tokens"])
        self.answer_tokens = int(spec.get("answer_tokens", 8))
        with PeakRss() as load_peak:
            t0 = time.perf_counter()
            self.model = load_model(spec)
            self.load_s = time.perf_counter() - t0
        self.load_peak_rss_bytes = load_peak.bytes
        # the repeated runs measure a fresh prefill each; prefix reuse is measured on its own (finish)
        self.model.prefix_cache = None

    def run(self, size: str, image_path: str, cmd: dict) -> dict:
        fig = _qvq_one_run(self.model, image_path, self.decode_tokens, self.answer_tokens)
        fig.pop("prefix_cache", None)
        return fig

    def finish(self, runs: Runs) -> dict:
        from qvq_local.backends import registry

        sizes = runs.sizes()
        # prefix reuse needs a backend that exports and restores the image prefix's KV state
        if registry.get(self.model.backend).has(registry.PREFIX_STATE):
            for size, fig in sizes.items():
                image_path = self.spec["images"][size]
                fig["prefix_reuse"] = _prefix_reuse(
                    self.model, image_path, int(self.spec["runs"]), self.answer_tokens
                )
        video = None
        if self.spec.get("video"):
            video = _video_row(self.model, self.spec["video"], int(self.spec["runs"]), self.answer_tokens)
        log(f"{self.spec['backend']} qvq language-lock cost")
        lang_lock = _lang_lock_cost(self.model)
        facts = self.model.run_facts()  # the backend's run_facts hook
        return {
            "ok": True,
            "path": "qvq_local.load(...).stream(...)",
            "backend": self.spec["backend"],
            "quantization": self.model.quantization,
            # set when qvq computes differently from the raw library (ratios include it)
            "compute": facts.get("compute"),
            "cpu_buffers": facts.get("cpu_buffers"),  # where the weights are held (llama.cpp's buffer types)
            "placement": facts.get("placement"),  # which layers run on a GPU
            "load_s": self.load_s,
            "load_peak_rss_bytes": self.load_peak_rss_bytes,
            "peak_rss_bytes": lifetime_peak_rss(),
            "answer_tokens": self.answer_tokens,
            "runs_not_forced": runs.not_forced,
            "sizes": sizes,
            "lang_lock": lang_lock,
            **({"video": video} if video is not None else {}),
        }

    def close(self) -> None:
        self.model.close()
