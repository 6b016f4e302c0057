"""The vision projector (mmproj) per quantisation: image embeddings against transformers, encode time.

llama.cpp's mtmd runs the GGUF mmproj; transformers runs the checkpoint's own vision tower and merger in
float32 on CPU (the reference).  ``tests/test_convert_gguf.py`` checks the parity of the converter's
mmproj types with these functions, and ``examples/mmproj_quant.py`` prints F16 against Q8_0 (error and
encode time) for a shape.  Nothing here is imported by the runtime; torch and transformers are needed
only by :func:`transformers_image_embeddings` (the ``dev`` extra).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: Image embeddings of an mmproj may differ from transformers' by at most this much (absolute, on
#: embeddings of magnitude ~1): the f32 mmproj measured ~5e-4 on the tiny shape.
PARITY_ATOL = 5e-3


@contextmanager
def mtmd_encoder(
    model_gguf: str | os.PathLike, mmproj_gguf: str | os.PathLike, *, threads: int = 2
) -> Iterator[Callable]:
    """Yield ``encode(image) -> (embeddings [tokens, width], seconds)``: the merger's output for one PIL
    image, computed by llama.cpp's mtmd from the mmproj; ``seconds`` is the encode call alone (not the
    preprocessing).  The text model is opened only for its width (through ``high_level_llama``, so an AMX
    CPU does not crash)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import mtmd_cpp

    from qvq_local.backends.llama_buffers import high_level_llama
    from qvq_local.bench.raw_paths import _silence_llama_logs

    with high_level_llama(model_gguf):
        llm = llama_cpp.Llama(model_path=str(model_gguf), n_ctx=256, n_threads=threads, verbose=False)
    _silence_llama_logs()  # mtmd prints every chunk at its default level
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu, params.print_timings, params.n_threads = False, False, threads
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_gguf).encode(), llm.model, params)
    if not ctx:
        llm.close()
        raise RuntimeError(f"{mmproj_gguf}: mtmd_init_from_file failed")

    def encode(image):
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = mtmd_cpp.mtmd_bitmap_init(
            rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))
        )
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            marker = mtmd_cpp.mtmd_default_marker()
            text = mtmd_cpp.mtmd_input_text(
                text=marker, text_len=len(marker), add_special=False, parse_special=True
            )
            bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd_cpp.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == 1:  # MTMD_INPUT_CHUNK_TYPE_IMAGE
                    n = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)
                    t0 = time.perf_counter()
                    if mtmd_cpp.mtmd_encode_chunk(ctx, chunk) != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    seconds = time.perf_counter() - t0
                    out = mtmd_cpp.mtmd_get_output_embd(ctx)
                    emb = np.ctypeslib.as_array(out, shape=(n * llm.n_embd(),)).reshape(n, -1).copy()
                    return emb, seconds
            raise RuntimeError("the image produced no image chunk")
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            mtmd_cpp.mtmd_bitmap_free(bitmap)

    try:
        yield encode
    finally:
        mtmd_cpp.mtmd_free(ctx)
        llm.close()


def mtmd_image_embeddings(model_gguf, mmproj_gguf, image, *, threads: int = 2):
    """The merger's output for one image through llama.cpp's mtmd (see :func:`mtmd_encoder`)."""
    with mtmd_encoder(model_gguf, mmproj_gguf, threads=threads) as encode:
        return encode(image)[0]


def transformers_image_embeddings(ckpt_dir: str | os.PathLike, image):
    """The reference: transformers' vision tower + merger on the checkpoint, float32 on CPU."""
    import torch
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(ckpt_dir)
    inputs = processor(images=[image.convert("RGB")], return_tensors="pt")
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(ckpt_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
    feats = getattr(feats, "pooler_output", feats)
    return (torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats).float().numpy()


def compare(got, ref) -> dict:
    """Error figures of ``got`` against the reference: max and mean absolute error, the reference's scale
    (max magnitude) and the max error relative to it."""
    import numpy as np

    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "scale": scale,
        "max_rel": float(diff.max()) / scale if scale else float("inf"),
        "within_tolerance": bool(diff.max() < PARITY_ATOL),
    }


__all__ = [
    "PARITY_ATOL",
    "compare",
    "mtmd_encoder",
    "mtmd_image_embeddings",
    "transformers_image_embeddings",
]
