"""What the HTTP layer of `qvq serve` costs: time to first token and decode speed, in process vs served.

    python examples/serve_overhead.py MODEL [--runs 3] [--think-budget 64]

MODEL is anything `qvq ask -m` takes (a GGUF file, say).  Three measurements on the same loaded model and
image: the Python API (what `qvq ask` runs), one client of `qvq serve` streaming with the official `openai`
package, and four such clients at once.  Time to first token is measured by the client from sending the
request to the first reasoning chunk; decode speed is chunks (one per token) over the time from the first
chunk to the last.  Needs the serve extra and `openai`.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _chart(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (224, 168), "white")
    draw = ImageDraw.Draw(img)
    for i, h in enumerate([40, 90, 60, 120, 75]):
        draw.rectangle([20 + i * 40, 150 - h, 44 + i * 40, 150], fill=(40 + 40 * i, 90, 200 - 30 * i))
    img.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--think-budget", type=int, default=64)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()

    import openai
    from serve_util import ServerThread

    from qvq_local.api import load
    from qvq_local.serve.app import ServeOptions, create_app

    image = _chart(Path("/tmp/qvq-serve-overhead.png"))
    uri = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    question = "Which bar is the highest?"
    opts = {"think_budget": args.think_budget, "answer_budget": 32, "seed": 1, "loop_detection": False}
    model = load(args.model, backend=args.backend)

    from qvq_local.events import TextDelta

    def in_process() -> tuple[float, float]:
        """Timed as the client below times the server: first text delta, then text deltas per second."""
        t0 = time.perf_counter()
        first = last = None
        n = 0
        for event in model.stream(image, question, **opts):
            if isinstance(event, TextDelta) and event.text:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
        return first - t0, (n - 1) / (last - first) if last > first else 0.0

    with ServerThread(create_app(model, ServeOptions(queue=8))) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        body = {
            "model": model.name,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": uri}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            "stream": True,
            "extra_body": {"thinking_budget": args.think_budget, "answer_budget": 32, "seed": 1},
        }

        def one() -> tuple[float, float]:
            t0 = time.perf_counter()
            first = last = None
            n = 0
            for chunk in client.chat.completions.create(**body):
                if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].delta.model_extra):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
            return first - t0, (n - 1) / (last - first) if last > first else 0.0

        one()  # warm-up of both paths (first decode, caches), not counted
        in_process()
        local, served = [], []
        for _ in range(args.runs):  # interleaved, so a change in the machine's load hits both alike
            local.append(in_process())
            served.append(one())
        print(
            f"qvq ask (in process): first token {statistics.median(r[0] for r in local) * 1000:.0f} ms, "
            f"decode {statistics.median(r[1] for r in local):.1f} tok/s (median of {args.runs})"
        )
        print(
            f"qvq serve, 1 client:  first token {statistics.median(s[0] for s in served) * 1000:.0f} ms, "
            f"decode {statistics.median(s[1] for s in served):.1f} tok/s (median of {args.runs})"
        )
        results: list = [None] * 4

        def run(i: int) -> None:
            results[i] = one()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        ttfts = sorted(r[0] for r in results)
        print(
            f"qvq serve, 4 clients: first token {', '.join(f'{x * 1000:.0f}' for x in ttfts)} ms (queued one after "
            f"another), decode {statistics.median(r[1] for r in results):.1f} tok/s each, all done in {wall:.1f} s"
        )
    model.close()


if __name__ == "__main__":
    main()
