"""The benchmark's models: a synthetic checkpoint or the user's model, converted for each backend, cached.

For each backend chosen, the model must be in the format the registry says the backend loads after
``qvq convert`` (``BackendSpec.convert_to``).  ``--shape`` writes a synthetic checkpoint of that shape and
converts it; ``--model`` uses a converted model as it is when its format fits, and converts an HF folder.
Each synthesis and conversion runs once, in a worker child (its time and peak memory are measured), into
``QVQ_HOME/bench/[<family>-]<shape>-<fmt>-<quant>``; later runs reuse it and report the first run's cost.
The formats bench can convert to are :data:`BUILDS`; a backend in another format is reported as not run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qvq_local import atomic
from qvq_local.bench.processes import run_worker
from qvq_local.convert.quants import DEFAULT_GROUP_SIZE
from qvq_local.errors import DiskFull, ModelError, QvqError

#: ``--quant`` -> the quantisation each output format gets: GGUF's text-model type (the mmproj stays
#: F16) and MLX's bits (mlx-vlm never quantises the vision tower), as ``qvq convert`` does.
QUANTS = {"q4": {"gguf": "q4_k_m", "mlx": 4}, "q8": {"gguf": "q8_0", "mlx": 8}}


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=1))


def _cached_build(home: Path, name: str, spec: dict, label: str, log, check) -> dict:
    """Run a synth/convert job once; later calls reuse its output and report the original cost.

    ``check(result)`` says whether the recorded output is still complete on disk; a build made from
    another spec (another tokenizer, say) is rebuilt, not reused.
    """
    marker = home / f"{name}.build.json"
    old = _read_marker(marker)
    recipe = {k: v for k, v in spec.items() if k != "progress"}
    if old and old.get("ok") and old.get("recipe", recipe) == recipe and check(old):
        if log:
            log(f"{label}: reusing {home / name} (built in {old.get('seconds', 0):.1f} s)")
        return {**old, "reused": True}
    result = run_worker(spec, label=label, log=log)
    if not result.get("ok"):
        raise ModelError(f"{label} failed: {result.get('reason')}", path=home / name)
    result["reused"] = False
    _write_marker(marker, {**{k: v for k, v in result.items() if k != "reused"}, "recipe": recipe})
    return result


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def _build_gguf(source: Path, base: str, quant: str, home: Path, progress: bool, log) -> dict:
    gguf_quant = QUANTS[quant]["gguf"]
    name = f"{base}-gguf-{gguf_quant}"
    conv = _cached_build(
        home,
        name,
        {
            "job": "convert-gguf",
            "src": str(source),
            "out": str(home / name),
            "quant": gguf_quant,
            "mmproj_quant": "f16",
            "progress": progress,
        },
        f"converting to GGUF {gguf_quant}",
        log,
        check=lambda r: Path(r["model"]).is_file() and Path(r["mmproj"]).is_file(),
    )
    return {
        "model": conv["model"],
        "mmproj": conv["mmproj"],
        "conversion": conv,
        "quantization": gguf_quant.upper(),
    }


def _build_mlx(source: Path, base: str, quant: str, home: Path, progress: bool, log) -> dict:
    bits = QUANTS[quant]["mlx"]
    name = f"{base}-mlx-q{bits}"
    conv = _cached_build(
        home,
        name,
        {
            "job": "convert-mlx",
            "src": str(source),
            "out": str(home / name),
            "bits": bits,
            "group_size": DEFAULT_GROUP_SIZE,
            "progress": progress,
        },
        f"converting to MLX {bits}-bit",
        log,
        check=lambda r: (Path(r["path"]) / "config.json").is_file(),
    )
    return {"model": conv["path"], "mmproj": None, "conversion": conv, "quantization": f"{bits}-bit"}


#: The formats bench converts to (a backend's ``convert_to``), each run as the worker's ``convert-<format>``
#: job: ``build(source, base name, --quant, home, progress, log)`` -> the backend's entry in ``formats``.
BUILDS = {"gguf": _build_gguf, "mlx": _build_mlx}


def prepare_models(
    *,
    shape: str | None,
    model: str | None,
    backends: list[str],
    quant: str,
    home: Path,
    progress: bool,
    log,
    family: str | None = None,
) -> dict:
    """Make the model files each backend needs; return ``{"label", "source", "synthesis", "formats"}``.

    ``formats[backend]`` is ``{"model": path, "mmproj": path | None, "conversion": {...} | None}``, or
    ``{"error": reason}`` when this backend cannot get a model.
    """
    from qvq_local.backends import registry

    info: dict = {"synthesis": None, "formats": {}}
    source: Path | None = None
    if shape is not None:
        from qvq_local.convert import synthetic

        fam = synthetic.get_family(family)
        synthetic.get_shape(shape, fam)  # an unknown shape is an InputError naming the family's shapes
        # the default family keeps its cache names; another family's are prefixed with its alias
        prefix = "" if fam is synthetic.DEFAULT_FAMILY else f"{fam.aliases[0]}-"
        home.mkdir(parents=True, exist_ok=True)
        hf_name = f"{prefix}{shape}-hf-bf16"
        info["label"] = f"synthetic {prefix}{shape} ({quant})"
        info["source"] = f"shape:{prefix}{shape}"
        info["synthesis"] = _cached_build(
            home,
            hf_name,
            {
                "job": "synth",
                "out": str(home / hf_name),
                "shape": shape,
                "family": fam.name,
                "dtype": "bf16",
                "seed": 0,
                # the real Qwen vocabulary where dashscope is installed, else a trained one: a cache made
                # with the other must not be reused
                "tokenizer": synthetic.default_tokenizer(shape, fam),
                "progress": progress,
                "force": True,
            },
            f"synthesising the {prefix}{shape} checkpoint",
            log,
            check=lambda r: (Path(r["path"]) / "config.json").is_file(),
        )
        source, base = home / hf_name, f"{prefix}{shape}"
    else:
        from qvq_local import hub

        resolved = hub.resolve(model, download=True, progress=progress)
        info["label"] = f"{resolved.name} ({resolved.quantization})"
        info["source"] = str(model)
        if resolved.format == "hf":
            source, base = resolved.path, _safe_name(resolved.name)
            home.mkdir(parents=True, exist_ok=True)
        else:
            for backend in backends:
                wanted = registry.get(backend).convert_to
                if resolved.format == wanted:
                    info["formats"][backend] = {
                        "model": str(resolved.path),
                        "mmproj": str(resolved.mmproj) if resolved.mmproj else None,
                        "conversion": None,
                        "quantization": resolved.quantization,
                    }
                else:
                    info["formats"][backend] = {
                        "error": f"the model is {resolved.format.upper()}; the {backend} backend needs "
                        f"{wanted.upper()} (convert it, or pass the HF folder to convert both)"
                    }
            return info

    for backend in backends:
        fmt = registry.get(backend).convert_to
        build = BUILDS.get(fmt)
        if build is None:
            info["formats"][backend] = {
                "error": f"qvq bench cannot convert a model to {fmt.upper()}, the {backend} backend's format "
                f"(it converts to {', '.join(f.upper() for f in BUILDS)}); pass a converted model with --model"
            }
            continue
        try:
            info["formats"][backend] = build(source, base, quant, home, progress, log)
        except DiskFull:
            raise
        except QvqError as err:
            info["formats"][backend] = {"error": str(err)}
    return info


def source_bytes(shape: str | None, model: str | None, family: str | None = None) -> int:
    """Roughly the converted model's size, known before converting (decides the Apple-only skip)."""
    if shape is not None:
        from qvq_local.convert.synthetic import checkpoint_bytes

        return int(checkpoint_bytes(shape, "bf16", family) * 0.3)  # about what a 4-bit conversion keeps
    from qvq_local import hub

    path = hub.resolve(model, download=False, progress=False).path
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))
