"""Completeness and integrity checks for a model on disk, for ``qvq doctor --model REF``.

People point this tool at 100 GB downloads that stopped half-way and at files converted by other tools.
Loading such a model fails deep inside a backend with a message about tensors; :func:`check_model`
instead reads only headers and metadata and lists, in plain words, what is wrong and where:

* a safetensors folder (Hugging Face or MLX): ``config.json`` readable, the architecture supported, every
  shard listed in ``model.safetensors.index.json`` present, every file's header consistent with its
  size (a truncated download is found here), pickle-only weights refused (they are never opened), the
  vision merger's width equal to the text width, the sizes recorded in ``qvq-manifest.json`` unchanged;
* a GGUF pair: both files readable GGUF, every tensor's data inside the file, the text model of
  architecture ``qwen2vl``, the projector a ``clip`` file with a ``qwen2vl_merger`` projector whose
  output width (``clip.vision.projection_dim`` and the rows of ``mm.2``) equals the text model's
  ``embedding_length``, split files all present.

Nothing here loads weights, unpickles, or touches the network (a hub id that is not downloaded is a
finding, not a download).  Heavy imports (gguf, numpy) happen inside the functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qvq_local.errors import ModelError
from qvq_local.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    describe_supported,
    family_for_config,
    family_for_gguf_arch,
    family_for_gguf_pair,
)
from qvq_local.formats.gguf import GgufHeader, GgufHeaderError, read_whole_gguf
from qvq_local.formats.manifest import MANIFEST_NAME, read_manifest
from qvq_local.formats.names import PICKLE_SUFFIXES, is_mmproj, split_part, split_part_name
from qvq_local.formats.safetensors import INDEX_NAME, SafetensorsFile

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    """One result of a check: ``level`` is ok, warning or error; ``path`` the file or folder it is about."""

    level: Level
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


def has_errors(findings: list[Finding]) -> bool:
    """True when any finding is an error (the model will not load or not work)."""
    return any(f.level == "error" for f in findings)


def check_model(ref: str | os.PathLike) -> list[Finding]:
    """Check a model folder, a GGUF file (with its mmproj) or a name/hub id already on disk.

    Never raises for a problem with the model: every problem is a ``Finding`` with level ``error``.
    The list always holds at least one finding; when it holds no error the model is complete.
    """
    text = str(ref).strip()
    path = Path(text).expanduser() if text else None
    if path is None or not path.exists():
        try:
            from qvq_local import hub

            resolved = hub.resolve(text, download=False, progress=False)
        except ModelError as err:
            return [Finding("error", text or "(empty)", _strip_path(str(err), text))]
        path = resolved.path
    findings: list[Finding] = []
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            _check_gguf_pair(path, findings)
        elif path.suffix.lower() in PICKLE_SUFFIXES:
            findings.append(
                Finding(
                    "error",
                    str(path),
                    "pickle checkpoint: never loaded (it can run code); use a safetensors or GGUF model",
                )
            )
        else:
            findings.append(
                Finding("error", str(path), "not a model: expected a .gguf file or a model folder")
            )
        return findings
    if not path.is_dir():
        return [Finding("error", str(path), "not a file or folder")]

    manifest = _manifest(path, findings)
    if manifest is not None and manifest.get("format") == "gguf" and manifest.get("model"):
        model_file = path / str(manifest["model"])
        if not model_file.is_file():
            findings.append(Finding("error", str(model_file), "missing: the manifest names this model file"))
            return findings
        _check_manifest_sizes(path, manifest, findings)
        _check_gguf_pair(model_file, findings, manifest=manifest)
        return findings
    ggufs = sorted(p for p in path.glob("*.gguf") if not is_mmproj(p) and not _is_later_split(p))
    if ggufs and not (path / "config.json").is_file():
        if len(ggufs) > 1:
            listed = ", ".join(p.name for p in ggufs)
            findings.append(
                Finding("warning", str(path), f"several GGUF models here ({listed}); checking each")
            )
        for model_file in ggufs:
            _check_gguf_pair(model_file, findings)
        return findings
    _check_safetensors_folder(path, findings)
    if manifest is not None:
        _check_manifest_sizes(path, manifest, findings)
    return findings


def check_gguf_file(path: str | os.PathLike) -> list[Finding]:
    """One GGUF file on its own: readable, a GGUF, every tensor's data inside the file.

    For a backend about to hand the file to llama.cpp, which reports a download that stopped half-way
    only as "failed to load model"; this names the file and says "truncated".  Reads headers only.
    """
    p = Path(path)
    findings: list[Finding] = []
    info = _read_gguf(p, findings)
    if info is not None:
        n = len(info["tensors"])
        findings.append(Finding("ok", str(p), f"GGUF with {n} tensors, all inside the file"))
    return findings


# ------------------------------------------------------------------------------------------ helpers
def _strip_path(message: str, ref: str) -> str:
    prefix = f"{ref}: "
    return message[len(prefix) :] if ref and message.startswith(prefix) else message


def _is_later_split(path: Path) -> bool:
    part = split_part(path)
    return bool(part and part.index > 1)


def _manifest(folder: Path, findings: list[Finding]) -> dict[str, Any] | None:
    """The manifest through the one reader (:func:`qvq_local.formats.manifest.read_manifest`); a bad one is
    a finding."""
    try:
        return read_manifest(folder)
    except ModelError as err:
        mpath = folder / MANIFEST_NAME
        findings.append(Finding("error", str(mpath), _strip_path(str(err), str(mpath))))
        return None


def _check_manifest_sizes(folder: Path, manifest: dict[str, Any], findings: list[Finding]) -> None:
    """Files recorded in the manifest must still be there with the size they had when written."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return
    bad = 0
    for rel, size in files.items():
        p = folder / str(rel)
        if not p.is_file():
            findings.append(Finding("error", str(p), "missing: listed in qvq-manifest.json"))
            bad += 1
        elif isinstance(size, int) and p.stat().st_size != size:
            findings.append(
                Finding(
                    "error",
                    str(p),
                    f"is {p.stat().st_size:,} bytes but qvq-manifest.json "
                    f"recorded {size:,} (changed or truncated)",
                )
            )
            bad += 1
    if not bad:
        findings.append(
            Finding(
                "ok",
                str(folder / MANIFEST_NAME),
                f"all {len(files)} recorded files present with their recorded sizes",
            )
        )


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:160]


# ------------------------------------------------------------------------------------------ safetensors
def _check_safetensors_folder(folder: Path, findings: list[Finding]) -> None:
    config_path = folder / "config.json"
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    safetensors = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not config_path.is_file():
        findings.append(
            Finding("error", str(folder), "no config.json (and no .gguf file): not a model folder")
        )
        if not safetensors and pickles:
            findings.append(
                Finding(
                    "error",
                    str(folder / pickles[0]),
                    "only pickle weights, which are never loaded (they can run code)",
                )
            )
        return
    config = _read_json(config_path, findings)
    if config is not None:
        _check_config(config, config_path, findings)

    if not safetensors and not (folder / INDEX_NAME).is_file():
        if pickles:
            findings.append(
                Finding(
                    "error",
                    str(folder / pickles[0]),
                    "only pickle weights, which are never loaded (they can run code); "
                    "use a safetensors checkpoint",
                )
            )
        else:
            findings.append(Finding("error", str(folder), "no *.safetensors weights"))
        return
    if pickles:
        findings.append(
            Finding(
                "warning",
                str(folder),
                f"pickle files present ({', '.join(pickles[:3])}); they are ignored, never loaded",
            )
        )

    to_check: list[Path] = []
    index = folder / INDEX_NAME
    expected_names: dict[str, set[str]] = {}
    if index.is_file():
        data = _read_json(index, findings)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            findings.append(Finding("error", str(index), "has no weight_map"))
        else:
            missing = []
            for tensor, shard in weight_map.items():
                if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith(".."):
                    findings.append(Finding("error", str(index), f"bad shard name {shard!r}"))
                    continue
                expected_names.setdefault(shard, set()).add(tensor)
            for shard in sorted(expected_names):
                if (folder / shard).is_file():
                    to_check.append(folder / shard)
                else:
                    missing.append(shard)
            for shard in missing:
                findings.append(
                    Finding(
                        "error",
                        str(folder / shard),
                        f"missing shard (listed in {INDEX_NAME}): the download or copy is incomplete",
                    )
                )
            if not missing:
                plural = "s" if len(expected_names) != 1 else ""
                findings.append(Finding("ok", str(index), f"all {len(expected_names)} shard{plural} present"))
    else:
        to_check = [folder / n for n in safetensors]

    good = 0
    widths: dict[str, tuple[int, ...]] = {}
    for shard in to_check:
        info = _safetensors_header(shard, findings)
        if info is None:
            continue
        good += 1
        for name in sorted(expected_names.get(shard.name, set()) - set(info)):
            findings.append(
                Finding("error", str(shard), f"{INDEX_NAME} says tensor {name!r} is here but it is not")
            )
            break
        family = (family_for_config(config) if config is not None else None) or DEFAULT_FAMILY
        for name, shape in info.items():
            if name.endswith(family.width_tensor_suffixes):
                widths[name] = shape
    if good and good == len(to_check):
        findings.append(
            Finding(
                "ok",
                str(folder),
                f"{good} safetensors file{'s' if good != 1 else ''}: headers match the file sizes",
            )
        )
    if config is not None:
        _check_widths_from_tensors(config, widths, folder, findings)


def _read_json(path: Path, findings: list[Finding]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        findings.append(Finding("error", str(path), f"not readable JSON ({_short(err)})"))
        return None
    if not isinstance(data, dict):
        findings.append(Finding("error", str(path), "is not a JSON object"))
        return None
    return data


def _check_config(config: dict[str, Any], path: Path, findings: list[Finding]) -> None:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if not isinstance(archs, list):
        archs = [archs]
    if family_for_config(config) is not None:
        findings.append(
            Finding("ok", str(path), f"architecture {archs[0] if archs else model_type} supported")
        )
    else:
        found = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
        findings.append(
            Finding(
                "error",
                str(path),
                f"unsupported architecture {found}: qvq-local runs {describe_supported()}",
            )
        )
        return
    text = {**config, **(config.get("text_config") or {})}
    hidden = text.get("hidden_size")
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        findings.append(Finding("error", str(path), "no vision_config: not a vision-language checkpoint"))
        return
    out = (family_for_config(config) or DEFAULT_FAMILY).merger_width(config)
    if isinstance(hidden, int) and isinstance(out, int) and out != hidden:
        findings.append(
            Finding(
                "error",
                str(path),
                f"vision_config.hidden_size {out} (the merger's output) "
                f"does not match the text hidden_size {hidden}",
            )
        )


def _check_widths_from_tensors(
    config: dict[str, Any], widths: dict[str, tuple[int, ...]], folder: Path, findings: list[Finding]
) -> None:
    """The merger's output rows and the embedding's width must equal the configured text width."""
    text = {**config, **(config.get("text_config") or {})}
    hidden = text.get("hidden_size")
    if not isinstance(hidden, int):
        return
    family = family_for_config(config) or DEFAULT_FAMILY
    for name, shape in widths.items():
        if name.endswith(family.merger_out_suffix) and shape and shape[0] != hidden:
            findings.append(
                Finding(
                    "error",
                    str(folder),
                    f"tensor {name!r} projects images to width {shape[0]} "
                    f"but the text model is {hidden} wide",
                )
            )
        # MLX quantised embeddings pack their columns; only an unquantised one can be compared
        if (
            name.endswith(family.embedding_suffix)
            and len(shape) == 2
            and shape[1] != hidden
            and "quantization" not in config
        ):
            findings.append(
                Finding(
                    "error",
                    str(folder),
                    f"tensor {name!r} is {shape[1]} wide but config.json says hidden_size {hidden}",
                )
            )


def _safetensors_header(path: Path, findings: list[Finding]) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of one safetensors file, judged by the one safetensors reader (its findings mode);
    ``None`` after an error finding."""
    shard, problems = SafetensorsFile.inspect(path)
    for level, message in problems:
        findings.append(Finding(level, str(path), message))  # type: ignore[arg-type]
    if shard is None:
        return None
    shapes = {name: shard.shape(name) for name in shard}
    shard.close()
    return shapes


# ------------------------------------------------------------------------------------------ GGUF
def _check_gguf_pair(
    model_file: Path, findings: list[Finding], manifest: dict[str, Any] | None = None
) -> None:
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys

    clip = MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]  # "clip": the architecture every mmproj file declares
    if is_mmproj(model_file):
        findings.append(
            Finding(
                "error",
                str(model_file),
                "this is a vision projector (mmproj), not the model: pass the model .gguf",
            )
        )
        return
    text = _read_gguf(model_file, findings)
    width = None
    family = None
    if text is not None:
        arch = text["fields"].get(Keys.General.ARCHITECTURE)
        if arch == clip:
            findings.append(
                Finding(
                    "error", str(model_file), f"this is a vision projector (arch {clip}), not the text model"
                )
            )
            return
        family = family_for_gguf_arch(arch)
        if family is None:
            runs = ", ".join(f"{f.gguf_text_arch} ({f.models})" for f in FAMILIES.values())
            findings.append(
                Finding(
                    "error",
                    str(model_file),
                    f"architecture {arch!r} is not supported: qvq-local runs {runs}",
                )
            )
        else:
            width = text["fields"].get(Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
            findings.append(
                Finding(
                    "ok",
                    str(model_file),
                    f"{arch} text model, {len(text['tensors'])} tensors, width {width}",
                )
            )
        _check_splits(model_file, text["fields"], findings)

    mmproj = _find_mmproj(model_file, manifest, findings)
    if mmproj is None:
        return
    proj = _read_gguf(mmproj, findings)
    if proj is None:
        return
    arch = proj["fields"].get(Keys.General.ARCHITECTURE)
    if arch != clip:
        findings.append(
            Finding(
                "error",
                str(mmproj),
                f"not a vision projector: architecture {arch!r} (expected {clip})",
            )
        )
        return
    projector = proj["fields"].get(Keys.Clip.PROJECTOR_TYPE)
    text_arch = (family or DEFAULT_FAMILY).gguf_text_arch
    # families share a text architecture (Qwen2.5-VL's is qwen2vl too) or a projector (Qwen3-VL's is
    # Qwen3.5's too): the pair decides
    pair = family_for_gguf_pair(text_arch, projector)
    if pair is None:
        wanted = " or ".join(
            dict.fromkeys(f.gguf_projector for f in FAMILIES.values() if f.gguf_text_arch == text_arch)
        )
        findings.append(
            Finding(
                "error",
                str(mmproj),
                f"projector type {projector!r} is not {wanted} (a projector for another model family)",
            )
        )
        return
    expected = pair
    dim = proj["fields"].get(Keys.ClipVision.PROJECTION_DIM)
    rows = None
    tensors = proj["tensors"]
    out = expected.mmproj_out_tensor
    if tensors.get(f"{out}.bias"):
        rows = tensors[f"{out}.bias"][0]
    elif f"{out}.weight" in tensors and len(tensors[f"{out}.weight"]) >= 2:
        rows = tensors[f"{out}.weight"][1]  # GGUF lists dimensions innermost first: [in, out]
    out_width = rows if rows is not None else dim
    if width is not None and out_width is not None and int(out_width) != int(width):
        findings.append(
            Finding(
                "error",
                str(mmproj),
                f"projects images to width {out_width} but the text model "
                f"{model_file.name} is {width} wide: the two files are "
                "from different models",
            )
        )
    elif dim is not None and rows is not None and int(dim) != int(rows):
        findings.append(
            Finding(
                "error",
                str(mmproj),
                f"clip.vision.projection_dim {dim} does not match the {rows} rows of mm.2",
            )
        )
    elif width is not None:
        findings.append(
            Finding(
                "ok",
                str(mmproj),
                f"{projector} projector, output width {out_width} matches the text model",
            )
        )


def _find_mmproj(model_file: Path, manifest: dict[str, Any] | None, findings: list[Finding]) -> Path | None:
    if manifest and manifest.get("mmproj"):
        mmproj = model_file.parent / str(manifest["mmproj"])
        if not mmproj.is_file():
            findings.append(Finding("error", str(mmproj), "missing vision projector (named by the manifest)"))
            return None
        return mmproj
    candidates = sorted(p for p in model_file.parent.glob("*.gguf") if is_mmproj(p))
    if len(candidates) > 1:
        named = [p for p in candidates if model_file.stem.lower() in p.name.lower()]
        if len(named) == 1:
            candidates = named
    if not candidates:
        findings.append(
            Finding(
                "error",
                str(model_file),
                "no vision projector (mmproj*.gguf) beside the model: "
                "images cannot be read; qvq convert --to gguf writes "
                "both files",
            )
        )
        return None
    if len(candidates) > 1:
        listed = ", ".join(p.name for p in candidates)
        findings.append(
            Finding(
                "error",
                str(model_file.parent),
                f"several vision projectors ({listed}): keep the one that belongs to the model",
            )
        )
        return None
    return candidates[0]


def _check_splits(model_file: Path, fields: dict[str, Any], findings: list[Finding]) -> None:
    from gguf import Keys

    count = fields.get(Keys.Split.LLM_KV_SPLIT_COUNT)
    part = split_part(model_file)
    if not count or int(count) <= 1 or not part:
        return
    missing = [split_part_name(part.stem, i, int(count)) for i in range(1, int(count) + 1)]
    missing = [n for n in missing if not (model_file.parent / n).is_file()]
    for name in missing:
        findings.append(Finding("error", str(model_file.parent / name), f"missing split file (1 of {count})"))


def _read_gguf(path: Path, findings: list[Finding]) -> dict[str, Any] | None:
    """Header fields and tensor shapes of a GGUF file, after checking every tensor lies inside the file."""
    header = inspect_gguf(path, findings)
    if header is None:
        return None
    return {"fields": header.fields, "tensors": {name: list(t.shape) for name, t in header.tensors.items()}}


def inspect_gguf(path: str | os.PathLike, findings: list[Finding]) -> GgufHeader | None:
    """The header of a GGUF file whose tensor data all lies inside the file; else ``None`` and an error.

    Reads the header once (:func:`qvq_local.formats.gguf.read_whole_gguf`, the check the llama backend
    runs before loading, raising instead of reporting); the result also serves the caller's own checks
    (architecture, projector).
    """
    p = Path(path)
    try:
        return read_whole_gguf(p)
    except GgufHeaderError as err:
        findings.append(Finding("error", str(p), str(err)))
        return None
