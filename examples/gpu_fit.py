"""How much GPU memory does a GGUF really take at each ``--gpu-layers``, against ``qvq doctor``'s estimate?

    python examples/gpu_fit.py MODEL [--gpu-layers all,20,1] [--image examples/bar_chart.png]

MODEL is anything ``qvq ask -m`` takes (a GGUF file or folder, a name from ``qvq models``).  For each
value the model is loaded, asked one short question about the image (so the context and the compute
buffers exist), and the GPU memory in use is read from ``nvidia-smi`` against what was in use before the
first load (so CUDA's context counts in every row, as the estimate's reserve does).  ``estimate/real`` above 1 means doctor's advice errs on the safe side.  Needs an NVIDIA GPU and a
llama-cpp-python built with CUDA (``CMAKE_ARGS="-DGGML_CUDA=on" pip install ...``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import qvq_local
from qvq_local import fit, hardware, hub
from qvq_local.backends.llama_buffers import requested_gpu_layers
from qvq_local.errors import QvqError


def in_use() -> int:
    return sum(g["total_bytes"] - g["free_bytes"] for g in hardware.nvidia_memory())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--gpu-layers", default="all,20,1", help="Comma-separated --gpu-layers values.")
    ap.add_argument("--image", default=str(Path(__file__).with_name("bar_chart.png")))
    args = ap.parse_args()
    if not hardware.nvidia_memory():
        sys.exit("error: nvidia-smi reports no NVIDIA GPU here")
    try:
        values = [(v, requested_gpu_layers(v)) for v in args.gpu_layers.split(",") if v.strip()]
        resolved = hub.resolve(args.model, download=False)
    except QvqError as exc:
        sys.exit(f"error: {exc}")
    if resolved.format != "gguf":
        sys.exit(
            f"error: {args.model}: a GGUF model is needed (llama.cpp offloads layers), not {resolved.format}"
        )
    shape = fit.gguf_shape(resolved.path)
    ctx = fit.default_context(shape["context_length"])
    sizes = fit.offload_sizes(resolved, shape, ctx)
    print(f"{resolved.name}: {len(sizes[0])} blocks + the output layer, context {ctx} tokens")
    print(f"{'--gpu-layers':>12}  {'placement':<36} {'real GB':>8} {'estimate GB':>12} {'estimate/real':>14}")
    # one reading before the first load: CUDA's context and cuBLAS stay after a model is closed, and the
    # estimate's reserve is for them, so every row is measured against a GPU without them
    before = in_use()
    for value, layers in values:
        model = qvq_local.load(resolved.path, backend="llama", gpu_layers=layers)
        try:
            model.prefix_cache = None
            model.ask(args.image, "What does the image show?", think_budget=16)
            real = in_use() - before
            placement = model.loaded.placement()
        finally:
            model.close()
        estimate = fit.gpu_need_bytes(*sizes, layers)
        ratio = f"{estimate / real:.2f}" if real > 0 else "-"
        print(f"{value:>12}  {placement:<36} {real / 1e9:>8.2f} {estimate / 1e9:>12.2f} {ratio:>14}")
        time.sleep(1)  # let the driver return the memory before the next reading


if __name__ == "__main__":
    main()
