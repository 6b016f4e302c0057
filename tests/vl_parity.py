"""Shared by the newer families' tests: the chart image, transformers' next-token logits for a prompt, the
prompt's logits through a qvq-local backend, and a checkpoint made by transformers' own classes.

The reference is transformers on CPU in f32 (``Qwen2VLImageProcessorPil`` for the pixels, the checkpoint's
own tokenizer.json for the ids), independent of the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

QUESTION = "Which bar is the tallest, and by how much?"

#: The files a checkpoint made by transformers' save_pretrained lacks: copied from the synthetic one.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "preprocessor_config.json",
)


def chart_image():
    """320x224: sides multiples of 32 above the 65536-pixel minimum, so transformers and both backends use
    it unresized (20x14 patches, 70 image tokens)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 224), "white")
    draw = ImageDraw.Draw(img)
    for i, h in enumerate([40, 90, 60, 120, 75, 150]):
        x = 20 + i * 48
        draw.rectangle([x, 200 - h, x + 30, 200], fill=(40 + 35 * i, 90, 200 - 30 * i))
    draw.line([(20, 100), (90, 60), (160, 80), (230, 30), (300, 70)], fill="red", width=3)
    return img


def hf_model(ckpt: Path, class_name: str):
    import torch
    import transformers

    return getattr(transformers, class_name).from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_logits(model, ckpt: Path, text: str, images: list, image_pad: str):
    """transformers' last-position logits for the rendered prompt ``text`` with ``images`` (the pad token
    expanded to each image's token count), and the prompt's ids."""
    import torch
    from tokenizers import Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    kwargs = {}
    if images:
        pix = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=images, return_tensors="pt")
        n = [int(t * h * w) // 4 for t, h, w in pix["image_grid_thw"].tolist()]
        pieces = text.split(image_pad)
        text = pieces[0] + "".join(image_pad * k + rest for k, rest in zip(n, pieces[1:]))
        kwargs = {"pixel_values": pix["pixel_values"], "image_grid_thw": pix["image_grid_thw"]}
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if images:
        pad = tokenizer.token_to_id(image_pad)
        kwargs["mm_token_type_ids"] = torch.tensor([[1 if t == pad else 0 for t in ids]])
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs
        )
    return out.logits[0, -1].float().numpy(), ids


def session_logits(new_session, prompt):
    """``(logits after prefilling prompt, prefill stats)`` through a session ``new_session()`` opens."""
    import numpy as np

    session = new_session()
    try:
        stats = session.prefill(prompt)
        return np.array(session.last_logits()), stats
    finally:
        session.close()


def save_with_transformers(source: Path, out: Path, class_name: str, seed: int = 1) -> Path:
    """A checkpoint made by transformers' own classes: the model built from ``source``'s config.json with
    transformers' random init, saved with ``save_pretrained`` (safetensors), and the tokenizer, template
    and processor files (which save_pretrained of a model does not write) copied from ``source``."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).to(torch.float32)
    model.save_pretrained(out)  # safetensors: transformers 5 writes no other format
    for name in _SIDE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out
