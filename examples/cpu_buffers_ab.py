"""Which llama.cpp CPU buffer mode is fastest on this machine?  An interleaved A/B on one GGUF.

    python examples/cpu_buffers_ab.py MODEL.gguf MMPROJ.gguf [--modes none,no-amx] [--rounds 6]

Each mode loads the model once; rounds alternate the order (ABBA) so drift in the machine's load hits
both alike.  Each run prefills a text prompt and decodes 32 greedy tokens; medians are printed.  ``all``
(llama.cpp's own choice) crashes on Intel AMX CPUs with the bundled llama.cpp (issue #20824): leave it
out there.  See qvq_local/backends/llama_buffers.py for what each mode does.
"""

from __future__ import annotations

import argparse
import statistics
import time

from qvq_local.backends import llamacpp
from qvq_local.backends.base import Prompt, SamplingParams
from qvq_local.backends.llama_buffers import LlamaOptions
from qvq_local.prompt import build_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("mmproj")
    ap.add_argument("--modes", default="none,no-amx")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-repeats", type=int, default=1, help="Repeat the prompt to lengthen prefill.")
    args = ap.parse_args()
    modes = args.modes.split(",")
    models = {
        m: llamacpp.load(args.model, args.mmproj, LlamaOptions(cpu_buffers=m), n_threads=args.threads)
        for m in modes
    }
    for mode, model in models.items():
        print(f"{mode}: {model.cpu_buffers.describe()}")
    text = "Describe the chart in detail, step by step. " * args.prompt_repeats
    # the model's own chat template (the same turn qvq ask builds), without QVQ's system prompt
    prompt = Prompt(text=build_prompt(models[modes[0]].chat_template, text, 0, None), images=[])
    decode: dict[str, list[float]] = {m: [] for m in modes}
    prefill: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            model = models[mode]
            session = model.new_session(
                SamplingParams(temperature=0.0), n_ctx=model.context_needed(prompt, new_tokens=40)
            )
            try:
                t0 = time.perf_counter()
                session.prefill(prompt)
                t1 = time.perf_counter()
                for _ in range(32):
                    session.step()
                t2 = time.perf_counter()
            finally:
                session.close()
            prefill[mode].append(t1 - t0)
            decode[mode].append(32 / (t2 - t1))
    for mode in modes:
        runs = ", ".join(f"{x:.2f}" for x in decode[mode])
        print(
            f"{mode:7s} decode {statistics.median(decode[mode]):6.2f} tok/s (runs {runs}); "
            f"prefill {statistics.median(prefill[mode]) * 1000:.0f} ms"
        )
    for model in models.values():
        model.close()


if __name__ == "__main__":
    main()
