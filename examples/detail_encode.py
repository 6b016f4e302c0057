"""Image encode time per detail level (``--detail``), through qvq-local's own llama.cpp path.

    python examples/detail_encode.py [--shape tiny|2b] [--levels low,medium,high] [--rounds 2] [--work DIR]

Synthesises a checkpoint of the shape (random weights in QVQ's layout; ``2b`` is Qwen2-VL-2B's vision tower,
the same 32-layer, 1280-wide ViT as QVQ-72B's, under a one-layer text stack, since only the vision half is
timed), converts it to GGUF (Q4_K_M text, F16 mmproj, as ``qvq convert`` does), loads it once with
:func:`qvq_local.api.load` and asks one question per level and round about a square chart bounded to that
level, with a one-token budget and the prefix cache off, so every ask encodes its image.  Prints, per level,
the image tokens, the median (min-max) of ``Started.image_encode_s`` (what ``qvq ask`` reports as the
encode) and the median CPU time of the ask up to its prefill, all threads (the core-seconds an image costs,
which a busy shared machine inflates far less than the wall time).  The levels alternate between rounds (low..high, then high..low), after one warm-up encode.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "2b", "7b", "72b"))
    ap.add_argument("--levels", default="low,medium,high", help="comma-separated: low,medium,high,max")
    ap.add_argument("--rounds", type=int, default=2, help="timed encodes per level")
    ap.add_argument("--work", default=None, help="folder for the checkpoint and GGUF files (default: temp)")
    args = ap.parse_args()

    from qvq_local.convert.synthetic import vision_tower_shape, write_checkpoint
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local import detail
    from qvq_local.api import load
    from qvq_local.bench.workload import make_image

    levels = [detail.check_level(x) for x in args.levels.split(",") if x.strip()]
    with ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        shape = vision_tower_shape(args.shape)
        ckpt = work / f"{shape.name}-bf16"
        if not (ckpt / "config.json").is_file():
            print(f"synthesising {shape.name} in {ckpt}")
            write_checkpoint(ckpt, shape=shape, dtype="bf16", seed=0, tokenizer="trained", force=True)
        out = work / f"{shape.name}-gguf"
        if not any(out.glob("mmproj-*.gguf")):
            print(f"converting to GGUF in {out}")
            convert_to_gguf(ckpt, out, quant="q4_k_m", mmproj_quant="f16")
        model = stack.enter_context(load(out, backend="llama"))
        model.prefix_cache = model.disk_cache = None
        family = model.loaded.family
        images = {lv: make_image(detail.square_side(lv, family), work / f"square-{lv}.png") for lv in levels}

        def encode(level: str) -> tuple[float, float, int]:
            from qvq_local.events import Started

            kw = {"max_pixels": detail.max_pixels(level, family), "think_budget": 1, "answer_budget": 1}
            cpu0 = time.process_time()
            for event in model.stream([images[level]], "What is shown?", **kw):
                if isinstance(event, Started):
                    seconds, tokens = event.image_encode_s, event.images[0].tokens
                    cpu = time.process_time() - cpu0  # every thread's CPU time up to the end of prefill
            return seconds, cpu, tokens

        threads = model.loaded.n_threads
        encode(levels[0])  # warm-up
        times: dict[str, list[float]] = {lv: [] for lv in levels}
        cpus: dict[str, list[float]] = {lv: [] for lv in levels}
        tokens: dict[str, int] = {}
        for r in range(args.rounds):
            for lv in levels if r % 2 == 0 else levels[::-1]:
                seconds, cpu, tokens[lv] = encode(lv)
                times[lv].append(seconds)
                cpus[lv].append(cpu)
                print(
                    f"  round {r + 1}: {lv:6} {tokens[lv]:5} tokens  {seconds:8.2f} s  {cpu:8.2f} CPU s",
                    flush=True,
                )

    print(f"\nshape {shape.name}, llama.cpp, {threads} threads, {args.rounds} encodes per level")
    print(
        f"{'level':8} {'side px':>8} {'tokens':>7} {'encode s, median (min-max)':>28} {'CPU s (all threads)':>20}"
    )
    for lv in levels:
        ts, cs = times[lv], cpus[lv]
        spread = f"{statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f})"
        print(
            f"{lv:8} {detail.square_side(lv, family):8} {tokens[lv]:7} {spread:>28} {statistics.median(cs):20.2f}"
        )
    print(
        "(CPU s: the process's CPU time to the end of prefill, every thread; on a shared machine the wall"
        " time grows with the load, the CPU time much less)"
    )


if __name__ == "__main__":
    main()
