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
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qvq_local.errors import ModelError

Level = Literal["ok", "warning", "error"]

SUPPORTED_ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
GGUF_TEXT_ARCH = "qwen2vl"
GGUF_MMPROJ_ARCH = "clip"
GGUF_PROJECTOR = "qwen2vl_merger"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "qvq-manifest.json"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_GGUF_MAGIC = b"GGUF"
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


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
            from qvq_local import models

            resolved = models.resolve(text, download=False, progress=False)
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

    manifest = _read_manifest(path, findings)
    if manifest is not None and manifest.get("format") == "gguf" and manifest.get("model"):
        model_file = path / str(manifest["model"])
        if not model_file.is_file():
            findings.append(Finding("error", str(model_file), "missing: the manifest names this model file"))
            return findings
        _check_manifest_sizes(path, manifest, findings)
        _check_gguf_pair(model_file, findings, manifest=manifest)
        return findings
    ggufs = sorted(p for p in path.glob("*.gguf") if not _is_mmproj(p) and not _is_later_split(p))
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


def _is_mmproj(path: Path) -> bool:
    return path.name.lower().startswith("mmproj")


def _is_later_split(path: Path) -> bool:
    m = _SPLIT_RE.match(path.name)
    return bool(m and int(m.group("i")) > 1)


def _read_manifest(folder: Path, findings: list[Finding]) -> dict[str, Any] | None:
    mpath = folder / MANIFEST_NAME
    if not mpath.is_file():
        return None
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        findings.append(Finding("error", str(mpath), f"unreadable manifest ({_short(err)})"))
        return None
    if not isinstance(data, dict):
        findings.append(Finding("error", str(mpath), "manifest is not a JSON object"))
        return None
    return data


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
        for name, shape in info.items():
            if name.endswith(("merger.mlp.2.weight", "merger.mlp.2.bias", "embed_tokens.weight")):
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
    if any(a in SUPPORTED_ARCHITECTURES for a in archs) or (
        not archs and model_type in SUPPORTED_MODEL_TYPES
    ):
        findings.append(
            Finding("ok", str(path), f"architecture {archs[0] if archs else model_type} supported")
        )
    else:
        found = ", ".join(map(str, archs)) or f"model_type {model_type!r}"
        findings.append(
            Finding(
                "error",
                str(path),
                f"unsupported architecture {found}: qvq-local runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (QVQ / Qwen2-VL)",
            )
        )
        return
    text = {**config, **(config.get("text_config") or {})}
    hidden = text.get("hidden_size")
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        findings.append(Finding("error", str(path), "no vision_config: not a vision-language checkpoint"))
        return
    out = vision.get("hidden_size", hidden)
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
    for name, shape in widths.items():
        if name.endswith("merger.mlp.2.weight") and shape and shape[0] != hidden:
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
            name.endswith("embed_tokens.weight")
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
    """Parse one safetensors header and check it against the file size; ``None`` after a finding."""
    dtype_sizes = {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "I8": 1,
        "U8": 1,
        "U16": 2,
        "U32": 4,
        "U64": 8,
        "BOOL": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
    }
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                findings.append(Finding("error", str(path), f"truncated: {size} bytes, not even a header"))
                return None
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_SAFETENSORS_HEADER or n > size - 8:
                findings.append(
                    Finding(
                        "error",
                        str(path),
                        f"truncated or not safetensors: the header claims "
                        f"{n:,} bytes but the file holds {size:,}",
                    )
                )
                return None
            raw = fh.read(n)
    except OSError as err:
        findings.append(Finding("error", str(path), f"cannot read ({err.strerror or err})"))
        return None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        findings.append(Finding("error", str(path), "header is not valid JSON: corrupt or not safetensors"))
        return None
    if not isinstance(header, dict):
        findings.append(Finding("error", str(path), "header is not a JSON object"))
        return None
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    end_max = 0
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            findings.append(Finding("error", str(path), f"tensor {name!r}: malformed header entry"))
            return None
        item = dtype_sizes.get(dtype)
        if item is None:
            findings.append(Finding("error", str(path), f"tensor {name!r}: unknown dtype {dtype!r}"))
            return None
        want = item
        for d in shape:
            want *= d
        if end - begin != want or begin < 0:
            findings.append(
                Finding(
                    "error",
                    str(path),
                    f"tensor {name!r}: header says shape {list(shape)} "
                    f"{dtype} ({want:,} bytes) but its offsets span "
                    f"{end - begin:,} bytes",
                )
            )
            return None
        end_max = max(end_max, end)
        shapes[name] = shape
    if end_max > data_len:
        findings.append(
            Finding(
                "error",
                str(path),
                f"truncated: the header needs {end_max:,} bytes of data but the file holds {data_len:,}",
            )
        )
        return None
    if end_max < data_len:
        findings.append(Finding("warning", str(path), f"{data_len - end_max:,} bytes after the last tensor"))
    return shapes


# ------------------------------------------------------------------------------------------ GGUF
def _check_gguf_pair(
    model_file: Path, findings: list[Finding], manifest: dict[str, Any] | None = None
) -> None:
    if _is_mmproj(model_file):
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
    if text is not None:
        arch = text["fields"].get("general.architecture")
        if arch == GGUF_MMPROJ_ARCH:
            findings.append(
                Finding(
                    "error", str(model_file), "this is a vision projector (arch clip), not the text model"
                )
            )
            return
        if arch != GGUF_TEXT_ARCH:
            findings.append(
                Finding(
                    "error",
                    str(model_file),
                    f"architecture {arch!r} is not supported: "
                    f"qvq-local runs {GGUF_TEXT_ARCH} (QVQ / Qwen2-VL)",
                )
            )
        else:
            width = text["fields"].get(f"{GGUF_TEXT_ARCH}.embedding_length")
            findings.append(
                Finding(
                    "ok",
                    str(model_file),
                    f"{GGUF_TEXT_ARCH} text model, {len(text['tensors'])} tensors, width {width}",
                )
            )
        _check_splits(model_file, text["fields"], findings)

    mmproj = _find_mmproj(model_file, manifest, findings)
    if mmproj is None:
        return
    proj = _read_gguf(mmproj, findings)
    if proj is None:
        return
    arch = proj["fields"].get("general.architecture")
    if arch != GGUF_MMPROJ_ARCH:
        findings.append(
            Finding(
                "error",
                str(mmproj),
                f"not a vision projector: architecture {arch!r} (expected {GGUF_MMPROJ_ARCH})",
            )
        )
        return
    projector = proj["fields"].get("clip.projector_type")
    if projector != GGUF_PROJECTOR:
        findings.append(
            Finding(
                "error",
                str(mmproj),
                f"projector type {projector!r} is not {GGUF_PROJECTOR} "
                "(a projector for another model family)",
            )
        )
        return
    dim = proj["fields"].get("clip.vision.projection_dim")
    rows = None
    tensors = proj["tensors"]
    if tensors.get("mm.2.bias"):
        rows = tensors["mm.2.bias"][0]
    elif "mm.2.weight" in tensors and len(tensors["mm.2.weight"]) >= 2:
        rows = tensors["mm.2.weight"][1]  # GGUF lists dimensions innermost first: [in, out]
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
                f"{GGUF_PROJECTOR} projector, output width {out_width} matches the text model",
            )
        )


def _find_mmproj(model_file: Path, manifest: dict[str, Any] | None, findings: list[Finding]) -> Path | None:
    if manifest and manifest.get("mmproj"):
        mmproj = model_file.parent / str(manifest["mmproj"])
        if not mmproj.is_file():
            findings.append(Finding("error", str(mmproj), "missing vision projector (named by the manifest)"))
            return None
        return mmproj
    candidates = sorted(p for p in model_file.parent.glob("*.gguf") if _is_mmproj(p))
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
    count = fields.get("split.count")
    m = _SPLIT_RE.match(model_file.name)
    if not count or int(count) <= 1 or not m:
        return
    missing = [f"{m.group('stem')}-{i:05d}-of-{int(count):05d}.gguf" for i in range(1, int(count) + 1)]
    missing = [n for n in missing if not (model_file.parent / n).is_file()]
    for name in missing:
        findings.append(Finding("error", str(model_file.parent / name), f"missing split file (1 of {count})"))


def _read_gguf(path: Path, findings: list[Finding]) -> dict[str, Any] | None:
    """Header fields and tensor shapes of a GGUF file, after checking every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as err:
        findings.append(Finding("error", str(path), f"cannot read ({err.strerror or err})"))
        return None
    if size == 0:
        findings.append(Finding("error", str(path), "empty file (0 bytes): not a GGUF model"))
        return None
    if magic != _GGUF_MAGIC:
        findings.append(
            Finding("error", str(path), "not a GGUF file (wrong magic bytes): corrupt or another format")
        )
        return None
    try:
        import warnings

        from gguf import GGUFReader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = GGUFReader(str(path))
    except ImportError as err:  # pragma: no cover - gguf is a core dependency
        findings.append(
            Finding("warning", str(path), f"cannot inspect GGUF: the gguf package is missing ({err})")
        )
        return None
    except Exception as err:  # noqa: BLE001 - untrusted bytes make the reader raise anything
        if "cannot reshape array" in str(err):  # a tensor's data view runs past the end of the file
            message = f"truncated: tensor data runs past the end of the file ({size:,} bytes)"
        else:
            message = f"corrupt or truncated GGUF ({_short(err)})"
        findings.append(Finding("error", str(path), message))
        return None
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
            continue  # big arrays, not needed here
        try:
            fields[key] = field.contents()
        except Exception:  # noqa: BLE001
            fields[key] = None
    tensors: dict[str, list[int]] = {}
    end_max = 0
    for t in reader.tensors:
        tensors[t.name] = [int(x) for x in t.shape]
        end_max = max(end_max, int(t.data_offset) + int(t.n_bytes))
    if end_max > size:
        findings.append(
            Finding(
                "error",
                str(path),
                f"truncated: tensor data needs {end_max:,} bytes but the file holds {size:,}",
            )
        )
        return None
    return {"fields": fields, "tensors": tensors}
