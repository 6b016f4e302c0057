"""HF checkpoint -> MLX through mlx-vlm: parity with transformers, quantised output, namings, safety.

Parity is measured against transformers on CPU in float32 (the reference), never against our own code:
both run the same input_ids, pixel_values and image_grid_thw.  Pixel values come from transformers'
PIL/numpy Qwen2-VL image processor (torchvision is not needed).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from helpers import assert_error

from qvq_local.errors import InputError, ModelError

pytest.importorskip("mlx_vlm")

# Tolerance on next-token logits (|logit| ~ 1 for the tiny model).  Measured on CPU (mlx 0.32.4,
# mlx-vlm 0.7.10, torch 2.13, transformers 5.23): text-only 7.5e-7, with an image 1.0e-6.
LOGIT_ATOL = 1e-4
# 4-bit (group 64) against the unquantised conversion, same bound as the GGUF Q4_K_M test's against F32.
Q4_MIN_CORRELATION = 0.9


# ----------------------------------------------------------------------------- helpers
def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _prompts(checkpoint: Path, image_path: Path):
    """(text-only ids, image ids, pixel_values, image_grid_thw) built once for both frameworks."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = _config(checkpoint)
    pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    keep = (
        "min_pixels",
        "max_pixels",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
        "image_mean",
        "image_std",
    )
    processor = Qwen2VLImageProcessorPil(**{k: pre[k] for k in keep if k in pre})
    batch = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="np")
    pixel_values = np.asarray(batch["pixel_values"], dtype=np.float32)
    grid = np.asarray(batch["image_grid_thw"], dtype=np.int64)
    n_image_tokens = int(grid.prod()) // (pre.get("merge_size", 2) ** 2)

    text_ids = [cfg["bos_token_id"], 5, 17, 300, 42, 77, 12, 901, 3]
    image_ids = (
        [cfg["bos_token_id"], 5, 17, cfg["vision_start_token_id"]]
        + [cfg["image_token_id"]] * n_image_tokens
        + [cfg["vision_end_token_id"], 300, 42, 77, 12, 901, 3]
    )
    return text_ids, image_ids, pixel_values, grid


def _reference_logits(checkpoint: Path, text_ids, image_ids, pixel_values, grid):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    image_token = _config(checkpoint)["image_token_id"]
    with torch.no_grad():
        text = model(input_ids=torch.tensor([text_ids])).logits[0, -1].numpy()
        image = (
            model(
                input_ids=torch.tensor([image_ids]),
                pixel_values=torch.from_numpy(pixel_values),
                image_grid_thw=torch.from_numpy(grid),
                mm_token_type_ids=torch.tensor([[1 if t == image_token else 0 for t in image_ids]]),
            )
            .logits[0, -1]
            .numpy()
        )
    return text, image


def _mlx_logits(model, ids, pixel_values=None, grid=None):
    import mlx.core as mx
    import numpy as np

    kwargs = {}
    if pixel_values is not None:
        kwargs = {"pixel_values": mx.array(pixel_values), "image_grid_thw": mx.array(grid)}
    out = model(mx.array([ids]), **kwargs)
    return np.array(out.logits[0, -1].astype(mx.float32))


def _safetensors_names(path: Path) -> list[str]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return list(header)


def _to_transformers5_naming(src: Path, dest: Path) -> Path:
    """Copy a checkpoint with transformers 5's tensor names (headers rewritten, data copied)."""

    def rename(key: str) -> str:
        if key.startswith("model."):
            return "model.language_model." + key[len("model.") :]
        if key.startswith("visual."):
            return "model.visual." + key[len("visual.") :]
        return key

    dest.mkdir()
    for item in src.iterdir():
        if item.suffix == ".safetensors":
            with open(item, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
                data = fh.read()
            header = {(k if k == "__metadata__" else rename(k)): v for k, v in header.items()}
            blob = json.dumps(header).encode()
            blob += b" " * (-len(blob) % 8)
            (dest / item.name).write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        elif item.name == "model.safetensors.index.json":
            index = json.loads(item.read_text())
            index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
            (dest / item.name).write_text(json.dumps(index))
        else:
            shutil.copy(item, dest / item.name)
    return dest


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".staging-" in p.name)


# ----------------------------------------------------------------------------- parity
@pytest.mark.parity
@pytest.mark.mlx
@pytest.mark.slow
def test_unquantised_mlx_matches_transformers_text_and_image(tiny_checkpoint, tiny_mlx_f32, sample_image):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import numpy as np
    from mlx_vlm import load

    text_ids, image_ids, pixel_values, grid = _prompts(tiny_checkpoint, sample_image)
    ref_text, ref_image = _reference_logits(tiny_checkpoint, text_ids, image_ids, pixel_values, grid)

    model, _ = load(str(tiny_mlx_f32))
    got_text = _mlx_logits(model, text_ids)
    got_image = _mlx_logits(model, image_ids, pixel_values, grid)

    err_text = float(np.abs(got_text - ref_text).max())
    err_image = float(np.abs(got_image - ref_image).max())
    # the image changes the logits by far more than the tolerance, so the vision path is really tested
    assert float(np.abs(ref_image - ref_text).max()) > 100 * LOGIT_ATOL
    assert err_text < LOGIT_ATOL, f"text-only max abs error {err_text:.3g}"
    assert err_image < LOGIT_ATOL, f"image max abs error {err_image:.3g}"
    assert int(got_text.argmax()) == int(ref_text.argmax())
    assert int(got_image.argmax()) == int(ref_image.argmax())


# ----------------------------------------------------------------------------- quantised output
@pytest.mark.mlx
@pytest.mark.slow
def test_4bit_conversion_loads_and_generates(tiny_mlx_q4, tiny_mlx_f32, tiny_checkpoint, sample_image):
    import mlx.core as mx
    from mlx_vlm import load

    cfg = _config(tiny_mlx_q4)
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64
    names = _safetensors_names(next(tiny_mlx_q4.glob("*.safetensors")))
    quantised = {n[: -len(".scales")] for n in names if n.endswith(".scales")}
    assert any("language_model.model.layers.0.mlp.gate_proj" in n for n in quantised)
    assert not any("vision_tower" in n for n in quantised)  # mlx-vlm never quantises the vision tower
    f32_bytes = sum(p.stat().st_size for p in tiny_checkpoint.glob("*.safetensors"))
    q4_bytes = sum(p.stat().st_size for p in tiny_mlx_q4.glob("*.safetensors"))
    assert q4_bytes < 0.8 * f32_bytes

    import numpy as np
    from mlx_vlm.generate.ar import generate_step

    model, _ = load(str(tiny_mlx_q4))
    text_ids, image_ids, pixel_values, grid = _prompts(tiny_checkpoint, sample_image)
    for ids, pv, g in ((text_ids, None, None), (image_ids, pixel_values, grid)):
        kwargs = {} if pv is None else {"image_grid_thw": mx.array(g)}
        steps = generate_step(
            mx.array([ids]),
            model,
            None if pv is None else mx.array(pv),
            None,
            max_tokens=6,
            temperature=0.0,
            **kwargs,
        )
        tokens = [int(token) for token, _ in steps]
        assert len(tokens) == 6 and all(0 <= t < cfg["vocab_size"] for t in tokens)
        # the first generated token is the argmax of the quantised model's own next-token logits
        assert tokens[0] == int(np.argmax(_mlx_logits(model, ids, pv, g)))

    # the quantised model is still the same model: its logits track the unquantised conversion's
    reference, _ = load(str(tiny_mlx_f32))
    for label, ids, pv, g in (("text", text_ids, None, None), ("image", image_ids, pixel_values, grid)):
        a, b = _mlx_logits(model, ids, pv, g), _mlx_logits(reference, ids, pv, g)
        corr = float(np.corrcoef(a, b)[0, 1])
        top5 = len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5]))
        print(
            f"\n4-bit vs f32 MLX {label} logits: correlation {corr:.4f}, max abs diff {np.abs(a - b).max():.3g},"
            f" top-5 overlap {top5}/5"
        )
        assert corr > Q4_MIN_CORRELATION, (label, corr)


@pytest.mark.mlx
@pytest.mark.slow
def test_8bit_conversion_writes_8bit_config(tiny_checkpoint, tmp_path):
    from qvq_local.convert.to_mlx import convert_to_mlx

    out = convert_to_mlx(tiny_checkpoint, tmp_path / "q8", bits=8, group_size=32)
    assert _config(out)["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"} or (
        _config(out)["quantization"]["bits"] == 8 and _config(out)["quantization"]["group_size"] == 32
    )


# ----------------------------------------------------------------------------- namings
@pytest.mark.mlx
@pytest.mark.slow
def test_transformers5_naming_converts_to_the_same_weights(tiny_checkpoint, tiny_mlx_f32, tmp_path):
    import mlx.core as mx
    from qvq_local.convert.to_mlx import convert_to_mlx

    renamed = _to_transformers5_naming(tiny_checkpoint, tmp_path / "t5")
    assert any(
        n.startswith("model.language_model.")
        for p in renamed.glob("*.safetensors")
        for n in _safetensors_names(p)
    )
    out = convert_to_mlx(renamed, tmp_path / "t5-mlx", bits=None)
    assert _leftovers(tmp_path) == []  # the staging copy is gone

    def weights(folder: Path) -> dict:
        merged = {}
        for p in sorted(folder.glob("*.safetensors")):
            merged.update(mx.load(str(p)))
        return merged

    ours, reference = weights(out), weights(tiny_mlx_f32)
    assert set(ours) == set(reference)
    for name, value in reference.items():
        assert mx.array_equal(ours[name], value), name


# ----------------------------------------------------------------------------- safety
def test_bad_sources_fail_before_any_output(tiny_checkpoint, tmp_path):
    from qvq_local.convert.to_mlx import convert_to_mlx

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    cfg = _config(broken)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as raised:
        convert_to_mlx(broken, tmp_path / "out")
    assert_error(raised, "architecture|model_type|Llama")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []

    missing = tmp_path / "missing"
    shutil.copytree(tiny_checkpoint, missing)
    next(missing.glob("model-*.safetensors")).unlink()
    with pytest.raises(ModelError):
        convert_to_mlx(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    with pytest.raises(InputError) as raised:
        convert_to_mlx(tiny_checkpoint, tmp_path / "out", bits=3)
    assert_error(raised, "bits")
    with pytest.raises(InputError) as raised:
        convert_to_mlx(tiny_checkpoint, tmp_path / "out", group_size=48)
    assert_error(raised, "group")


@pytest.mark.mlx
@pytest.mark.parametrize("naming", ["original", "transformers5"])
def test_interrupted_conversion_leaves_nothing_complete(tiny_checkpoint, tmp_path, monkeypatch, naming):
    """Ctrl-C while mlx-vlm writes weights: no output folder, no partial or staging folder left."""
    import importlib

    from qvq_local.convert.to_mlx import convert_to_mlx

    mlx_convert_module = importlib.import_module("mlx_vlm.convert")  # the package re-exports a function
    if naming == "original":
        src = tiny_checkpoint
    else:
        src = _to_transformers5_naming(tiny_checkpoint, tmp_path / "t5")
    work = tmp_path / "work"
    work.mkdir()
    real_save = mlx_convert_module.save_weights

    def save_then_interrupt(path, model, **kwargs):
        real_save(path, model, **kwargs)  # the weights are on disk (in the partial folder) ...
        assert any(Path(path).glob("*.safetensors"))
        raise KeyboardInterrupt  # ... when the user presses Ctrl-C

    monkeypatch.setattr(mlx_convert_module, "save_weights", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_to_mlx(src, work / "out", bits=4)
    assert list(work.iterdir()) == []


@pytest.mark.mlx
def test_existing_output_is_kept_unless_overwrite(tiny_checkpoint, tmp_path):
    from qvq_local.convert.to_mlx import convert_to_mlx

    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(InputError) as raised:
        convert_to_mlx(tiny_checkpoint, out)
    assert_error(raised, "exists")
    assert (out / "precious.txt").exists()
    convert_to_mlx(tiny_checkpoint, out, bits=4, overwrite=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").exists()
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_progress_display_names_stages(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("mlx_vlm")
    from qvq_local.convert.to_mlx import convert_to_mlx

    convert_to_mlx(tiny_checkpoint, tmp_path / "out", bits=4, progress=True)
    captured = capsys.readouterr()
    assert "[INFO]" not in captured.out  # mlx-vlm's own prints are captured, not shown
    assert "MLX" in captured.err  # the Rich display went to stderr


def test_not_enough_disk_fails_before_writing(tiny_checkpoint, tmp_path, monkeypatch):
    import collections

    from qvq_local.convert import to_mlx

    from qvq_local.errors import DiskFull

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(to_mlx.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskFull) as raised:
        to_mlx.convert_to_mlx(tiny_checkpoint, tmp_path / "out", bits=4)
    assert_error(raised, "GB")
    assert list(tmp_path.iterdir()) == []
    shards = sorted(tiny_checkpoint.glob("*.safetensors"))
    source_bytes = sum(p.stat().st_size for p in shards)
    assert to_mlx.estimate_output_bytes(tiny_checkpoint, shards, None, 64) == source_bytes


@pytest.mark.mlx
def test_size_estimate_is_close_to_the_real_4bit_output(tiny_checkpoint, tiny_mlx_q4):
    from qvq_local.convert import to_mlx

    shards = sorted(tiny_checkpoint.glob("*.safetensors"))
    estimate = to_mlx.estimate_output_bytes(tiny_checkpoint, shards, 4, 64)
    real = sum(p.stat().st_size for p in tiny_mlx_q4.glob("*.safetensors"))
    assert 0.8 * real < estimate < 1.25 * real, (estimate, real)
