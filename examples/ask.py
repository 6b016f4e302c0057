"""The Python API in a few lines: load a model, stream the thought, get the answer.

    python examples/ask.py MODEL [IMAGE] [QUESTION]

MODEL is what `qvq ask --model` takes: a converted folder, a GGUF file, a name from `qvq models` or a hub
id.  For a quick try with random weights: `examples/demo.sh` makes `.demo/tiny-gguf` (or `.demo/tiny-mlx`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import qvq_local
from qvq_local.events import Finished, Forced, Started, TextDelta

HERE = Path(__file__).resolve().parent


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    image = sys.argv[2] if len(sys.argv) > 2 else str(HERE / "bar_chart.png")
    question = (
        sys.argv[3] if len(sys.argv) > 3 else "Which fruit sold the most, and how many more than the least?"
    )

    with qvq_local.load(sys.argv[1]) as model:
        # 1. streaming: every event as it happens
        phase = "thought"
        for event in model.stream(image, question, think_budget=64, answer_budget=32):
            if isinstance(event, Started):
                print(f"[{event.model} on {event.backend}, {event.prompt_tokens} prompt tokens]")
            elif isinstance(event, TextDelta):
                if event.phase != phase:
                    phase = event.phase
                    print("\n--- answer ---")
                print(event.text, end="", flush=True)
            elif isinstance(event, Forced):
                print(f"\n[{event.reason}: answer forced after {event.at_token} thought tokens]")
            elif isinstance(event, Finished):
                print(f"\n[stop reason: {event.result.stop_reason}]")

        # 2. or just the result
        result = model.ask(image, question, think_budget=64, answer_budget=32, seed=1)
        print("answer:", result.answer)
        print("boxed:", result.boxed)
        print(
            f"thought {result.thought_tokens} tokens, {result.timings.decode_tok_s:.1f} tok/s,"
            f" prefill {result.timings.prefill_s:.2f} s"
        )


if __name__ == "__main__":
    main()
