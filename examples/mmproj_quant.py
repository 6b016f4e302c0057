"""F16 against Q8_0 for the vision projector: image-embedding error against transformers, encode time.

    python examples/mmproj_quant.py [--shape tiny|2b] [--image-size 448] [--rounds 4] [--quants f32,f16,q8_0]

Synthesises a checkpoint of the shape (random weights in QVQ's layout; ``2b`` is Qwen2-VL-2B's vision
tower, the same 32-layer, 1280-wide ViT as QVQ-72B's, with its merger into 1536, under a one-layer text
stack, since only the vision half matters here), converts one mmproj per quantisation with
``qvq convert``'s converter, then for each: the image embeddings llama.cpp's mtmd computes, against
transformers' vision tower + merger in float32 on CPU (max and mean absolute error; the parity tests'
tolerance is ``qvq_local.bench.mmproj.PARITY_ATOL``), and the time of mtmd's encode call.  The encodes
alternate between the quantisations (ABBA rounds after one warm-up each), so a machine whose load
drifts slows all of them alike; each time is the median with its min-max.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=("tiny", "2b", "7b", "72b"))
    ap.add_argument(
        "--image-size", type=int, default=448, help="square image edge in pixels (multiple of 28)"
    )
    ap.add_argument("--quants", default="f32,f16,q8_0")
    ap.add_argument("--rounds", type=int, default=4, help="timed encodes per quantisation")
    ap.add_argument("--dtype", default="bf16", help="checkpoint dtype (QVQ ships bf16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--work", default=None, help="folder for the checkpoint and the GGUF files (default: temp)"
    )
    args = ap.parse_args()

    from PIL import Image
    from qvq_local.convert.synthetic import vision_tower_shape, write_checkpoint
    from qvq_local.convert.to_gguf import convert_to_gguf

    from qvq_local.bench.mmproj import PARITY_ATOL, compare, mtmd_encoder, transformers_image_embeddings
    from qvq_local.bench.workload import make_image

    quants = [q.strip().lower() for q in args.quants.split(",") if q.strip()]
    with ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        shape = vision_tower_shape(args.shape)
        ckpt = work / f"{shape.name}-{args.dtype}"
        if not (ckpt / "config.json").is_file():
            print(f"synthesising {shape.name} ({args.dtype}) in {ckpt}")
            write_checkpoint(ckpt, shape=shape, dtype=args.dtype, seed=0, tokenizer="trained", force=True)
        image_path = make_image(args.image_size, work / f"chart-{args.image_size}.png")
        image = Image.open(image_path)
        pairs = {}
        for q in quants:
            out = work / f"gguf-{q}"
            existing = sorted(out.glob("mmproj-*.gguf")) if out.is_dir() else []
            models = (
                sorted(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-")) if existing else []
            )
            if existing and models:
                pairs[q] = (models[0], existing[0])
            else:
                pair = convert_to_gguf(ckpt, out, quant="f32", mmproj_quant=q)
                pairs[q] = (pair.model, pair.mmproj)
        print("reference: transformers, float32, CPU")
        ref = transformers_image_embeddings(ckpt, image)
        encoders = {
            q: stack.enter_context(mtmd_encoder(m, p, threads=args.threads)) for q, (m, p) in pairs.items()
        }
        errors, times = {}, {q: [] for q in quants}
        for q in quants:  # the warm-up encode gives the embeddings compared
            emb, _ = encoders[q](image)
            errors[q] = compare(emb, ref)
        for r in range(args.rounds):
            for q in quants if r % 2 == 0 else quants[::-1]:
                times[q].append(encoders[q](image)[1])
        sizes = {q: pair[1].stat().st_size / 1e6 for q, pair in pairs.items()}  # before a temp folder goes

    print(
        f"\nshape {shape.name} ({args.dtype} source), image {args.image_size}x{args.image_size} "
        f"({ref.shape[0]} tokens x {ref.shape[1]}), {args.threads} threads, {args.rounds} encodes each"
    )
    print(
        f"{'mmproj':8} {'size MB':>9} {'max abs err':>12} {'mean abs':>10} {'max rel':>9} {'encode s':>22}  parity"
    )
    for q in quants:
        e, ts = errors[q], times[q]
        size = sizes[q]
        spread = f"{statistics.median(ts):.3f} ({min(ts):.3f}-{max(ts):.3f})" if ts else "-"
        verdict = f"{'within' if e['within_tolerance'] else 'OUTSIDE'} {PARITY_ATOL:g}"
        print(
            f"{q:8} {size:9.1f} {e['max_abs']:12.3g} {e['mean_abs']:10.3g} {e['max_rel']:9.2%} {spread:>22}  {verdict}"
        )
    print(f"(reference scale: max |embedding| = {errors[quants[0]]['scale']:.3g})")


if __name__ == "__main__":
    main()
