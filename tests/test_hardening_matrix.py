"""The hardening matrix: bad images, broken models and bad run options, each driven through the real CLI.

One row per case.  Every row runs ``qvq`` in a subprocess (HOME and QVQ_HOME in a temporary folder) and
asserts the same contract: a non-zero exit code, exactly one ``error: ...`` line on stderr that names the
file (or the option) and the problem, no traceback anywhere, and no output left that looks complete (no
``--save`` transcript, no converted folder, no hidden partial folder).

The models are built once per module through the CLI itself (``qvq synth`` + ``qvq convert``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import assert_error

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "qvq_local.cli"]


# ------------------------------------------------------------------------------------------ running
def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVQ_")}
    env.update(
        HOME=str(home),
        QVQ_HOME=str(home / "qvq"),
        HF_HUB_OFFLINE="1",
        MLX_DISABLE_COMPILE="1",
        TOKENIZERS_PARALLELISM="false",
        COLUMNS="200",
        NO_COLOR="1",
    )
    return env


def run_cli(args: list[str], cwd: Path, home: Path, timeout: float = 300, preexec_fn=None):
    return subprocess.run(
        [*CLI, *args],
        check=False,
        cwd=cwd,
        env=cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_clear_error(proc, needles: tuple[str, ...], *, path=None, args=None) -> str:
    """Non-zero exit, no traceback, one ``error:`` line that names ``path`` (when given) and holds every
    needle (case-insensitive) outside any path: a word in a file name does not count."""
    shown = f"args={args}\nrc={proc.returncode}\nstdout={proc.stdout[-2000:]}\nstderr={proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode != 0, shown
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, shown
    line = lines[0]
    assert_error(line, *(re.escape(n) for n in needles), path=path)
    return line


def leftovers(folder: Path, name: str) -> list[str]:
    """Anything in ``folder`` that is the output ``name`` or a hidden partial/staged copy of it."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name == name or (p.name.startswith(".") and p.name.lstrip(".").startswith(f"{name}."))
    )


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def built(tmp_path_factory, home) -> dict[str, Path]:
    """tiny source (f32), its GGUF pair and a GGUF whose context is only 256 tokens, made by the CLI."""
    root = tmp_path_factory.mktemp("built")
    src = root / "tiny-src"
    proc = run_cli(["synth", str(src), "--shape", "tiny", "--dtype", "f32"], root, home)
    assert proc.returncode == 0, proc.stderr
    gguf = root / "tiny-gguf"
    proc = run_cli(
        [
            "convert",
            str(src),
            "--to",
            "gguf",
            "--quant",
            "f32",
            "--mmproj-quant",
            "f32",
            "-o",
            str(gguf),
            "-q",
        ],
        root,
        home,
    )
    assert proc.returncode == 0, proc.stderr
    small = root / "small-ctx-src"
    shutil.copytree(src, small)
    config = json.loads((small / "config.json").read_text())
    config["max_position_embeddings"] = 256
    (small / "config.json").write_text(json.dumps(config))
    small_gguf = root / "small-ctx-gguf"
    proc = run_cli(
        [
            "convert",
            str(small),
            "--to",
            "gguf",
            "--quant",
            "f32",
            "--mmproj-quant",
            "f32",
            "-o",
            str(small_gguf),
            "-q",
        ],
        root,
        home,
    )
    assert proc.returncode == 0, proc.stderr
    return {"src": src, "gguf": gguf, "small_gguf": small_gguf, "root": root}


@pytest.fixture(scope="module")
def built_mlx(built, home) -> Path:
    out = built["root"] / "tiny-mlx"
    proc = run_cli(
        ["convert", str(built["src"]), "--to", "mlx", "--bits", "none", "-o", str(out), "-q"],
        built["root"],
        home,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _gguf_model_file(folder: Path) -> Path:
    return next(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))


def _mmproj_file(folder: Path) -> Path:
    return next(p for p in folder.glob("mmproj*.gguf"))


# ------------------------------------------------------------------------------------------ images
def _png(path: Path, size=(64, 48), mode="RGB") -> Path:
    from PIL import Image

    Image.new(mode, size, "red" if mode == "RGB" else 128).save(path)
    return path


def _jpeg(path: Path, size=(256, 256)) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def make_png_bomb(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A real decompression bomb: a valid greyscale PNG of width x height zero pixels, a few hundred KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    parts = []
    for _ in range(height // 100):
        parts.append(comp.compress(row * 100))
    parts.append(comp.flush())
    data = b"\x89PNG\r\n\x1a\n"
    data += _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data += _png_chunk(b"IDAT", b"".join(parts))
    data += _png_chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _limit_memory():  # runs in the child: decoding a 400-megapixel bomb would need far more than this
    resource.setrlimit(resource.RLIMIT_AS, (3 * 1024**3, 3 * 1024**3))


@dataclass
class ImageCase:
    id: str
    make: object  # (folder) -> path to pass
    needles: tuple[str, ...]
    limit_memory: bool = False


IMAGE_CASES = [
    ImageCase("missing", lambda d: d / "nope.png", ("no such",)),
    ImageCase("empty", lambda d: _write(d / "empty.png", b""), ("empty file",)),
    ImageCase("truncated-png", lambda d: _truncate(_jpeg_as_png(d / "cut.png"), 0.5), ("truncated",)),
    ImageCase("truncated-jpeg", lambda d: _truncate(_jpeg(d / "cut.jpg"), 0.4), ("truncated",)),
    ImageCase(
        "text-as-png",
        lambda d: _write(d / "notes.png", b"hello, these are notes\n" * 20),
        ("not an image", "looks like a text file"),
    ),
    ImageCase(
        "pdf-as-png",
        lambda d: _write(d / "doc.png", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n<<>>\nendobj\n"),
        ("pdf",),
    ),
    ImageCase("directory", lambda d: _mkdir(d / "pics.png"), ("folder",)),
    ImageCase(
        "decompression-bomb",
        lambda d: make_png_bomb(d / "bomb.png"),
        ("too large",),
        limit_memory=True,
    ),
]


def _jpeg_as_png(path: Path) -> Path:
    """A noisy PNG (so that cutting it in half really removes pixel data)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c.id for c in IMAGE_CASES])
def test_bad_image_is_refused_with_one_line(case: ImageCase, built, home, tmp_path):
    image = case.make(tmp_path)
    save = tmp_path / "run.md"
    args = [
        "ask",
        str(image),
        "What is shown?",
        "--model",
        str(built["gguf"]),
        "--save",
        str(save),
        "--think-budget",
        "4",
        "--answer-budget",
        "4",
    ]
    proc = run_cli(args, tmp_path, home, timeout=120, preexec_fn=_limit_memory if case.limit_memory else None)
    assert_one_clear_error(proc, case.needles, path=image, args=args)
    assert proc.returncode == 2  # InputError
    assert not save.exists(), "no transcript may be written for a run that never started"


# ------------------------------------------------------------------------------------------ models
def _copy_src(built, dest: Path) -> Path:
    shutil.copytree(built["src"], dest)
    return dest


def _no_config(built, d: Path) -> Path:
    src = _copy_src(built, d / "noconfig")
    (src / "config.json").unlink()
    return src


def _unsupported_arch(built, d: Path) -> Path:
    src = _copy_src(built, d / "llama-src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    return src


def _missing_shard(built, d: Path) -> Path:
    src = _copy_src(built, d / "shardless")
    (src / "model-00002-of-00004.safetensors").unlink()
    return src


def _truncated_safetensors(built, d: Path) -> Path:
    src = _copy_src(built, d / "cut-src")
    shard = src / "model-00003-of-00004.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    return src


def _lying_header(built, d: Path) -> Path:
    """Shard 1's header claims a bigger shape for its first tensor than its offsets span."""
    src = _copy_src(built, d / "liar-src")
    shard = src / "model-00001-of-00004.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return src


class _Marker:
    """Unpickling this creates the marker file (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_only(built, d: Path) -> Path:
    src = d / "pickle-src"
    src.mkdir()
    shutil.copy(built["src"] / "config.json", src / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(built["src"] / name, src / name)
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Marker(str(d / "PWNED"))}))
    return src


def _gguf_without_mmproj(built, d: Path) -> Path:
    folder = d / "lonely"
    folder.mkdir()
    model = shutil.copy(_gguf_model_file(built["gguf"]), folder)
    return Path(model)


def _gguf_other_arch(built, d: Path) -> Path:
    """A valid GGUF of architecture llama, with a genuine qwen2vl projector beside it."""
    import numpy as np
    from gguf import GGUFWriter

    folder = d / "llama-gguf"
    folder.mkdir()
    path = folder / "tinyllama-F32.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_name("tinyllama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([b"a", b"b", b"c", b"d"])
    w.add_token_types([1, 1, 1, 1])
    w.add_token_merges([b"a b"])
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shutil.copy(_mmproj_file(built["gguf"]), folder / "mmproj-tinyllama-F32.gguf")
    return path


def _corrupt_gguf(built, d: Path) -> Path:
    """The pair, with the text model's tensor data cut short (a download that stopped half-way)."""
    folder = d / "corrupt-gguf"
    folder.mkdir()
    model = Path(shutil.copy(_gguf_model_file(built["gguf"]), folder))
    shutil.copy(_mmproj_file(built["gguf"]), folder)
    os.truncate(model, model.stat().st_size // 2)
    return model


def _garbage_gguf(built, d: Path) -> Path:
    """The pair, with the text model's bytes after the magic overwritten by noise."""
    folder = d / "garbage-gguf"
    folder.mkdir()
    model = Path(shutil.copy(_gguf_model_file(built["gguf"]), folder))
    shutil.copy(_mmproj_file(built["gguf"]), folder)
    data = bytearray(model.read_bytes())
    data[8:4096] = os.urandom(4096 - 8)
    model.write_bytes(bytes(data))
    return model


@dataclass
class ModelCase:
    id: str
    make: object  # (built, tmp) -> source path
    needles: tuple[str, ...]  # what the message says outside any path (the file is checked by path)
    name_of: object = None  # (path) -> text the error line must name; default: the path's name
    convert: bool = True  # also run `qvq convert` on it
    ask: bool = True  # also run `qvq ask --model` on it
    ask_needles: tuple[str, ...] | None = None
    convert_needles: tuple[str, ...] | None = None
    extra_ask: list[str] = field(default_factory=list)


MODEL_CASES = [
    ModelCase("no-config", _no_config, ("config.json",)),
    ModelCase(
        "unsupported-architecture",
        _unsupported_arch,
        ("LlamaForCausalLM",),
        ask_needles=("unsupported",),
        convert_needles=("unsupported architecture",),
    ),
    ModelCase("missing-shard", _missing_shard, ("model-00002-of-00004.safetensors",)),
    ModelCase(
        "truncated-safetensors", _truncated_safetensors, ("model-00003-of-00004.safetensors", "truncated")
    ),
    ModelCase("header-lies-about-sizes", _lying_header, ("model-00001-of-00004.safetensors", "bytes")),
    ModelCase("pickle-only", _pickle_only, ("pickle",)),
    ModelCase("gguf-without-mmproj", _gguf_without_mmproj, ("mmproj",), convert=False),
    ModelCase("gguf-other-architecture", _gguf_other_arch, ("llama",), convert=False),
    ModelCase("gguf-truncated", _corrupt_gguf, ("truncated",), convert=False),
    ModelCase("gguf-garbage", _garbage_gguf, ("gguf",), convert=False),
]


def _model_rows():
    for case in MODEL_CASES:
        if case.convert:
            yield pytest.param(case, "convert", id=f"{case.id}-convert")
        if case.ask:
            yield pytest.param(case, "ask", id=f"{case.id}-ask")


@pytest.mark.parametrize(("case", "command"), list(_model_rows()))
def test_bad_model_is_refused_with_one_line(case: ModelCase, command: str, built, home, tmp_path):
    src = case.make(built, tmp_path)
    if command == "convert":
        out = tmp_path / "out"
        args = ["convert", str(src), "--to", "gguf", "--quant", "f32", "-o", str(out), "-q"]
        needles = case.convert_needles or case.needles
        proc = run_cli(args, tmp_path, home, timeout=300)
        line = assert_one_clear_error(proc, needles, path=src, args=args)
        assert leftovers(tmp_path, "out") == [], line
    else:
        image = _png(tmp_path / "img.png")
        save = tmp_path / "run.md"
        args = [
            "ask",
            str(image),
            "What is shown?",
            "--model",
            str(src),
            "--save",
            str(save),
            "--think-budget",
            "4",
            "--answer-budget",
            "4",
            *case.extra_ask,
        ]
        needles = case.ask_needles or case.needles
        proc = run_cli(args, tmp_path, home, timeout=300)
        assert_one_clear_error(proc, needles, path=src, args=args)
        assert not save.exists()
    assert not (tmp_path / "PWNED").exists(), "a pickle was unpickled"


def test_mlx_folder_with_llama_backend(built_mlx, home, tmp_path):
    image = _png(tmp_path / "img.png")
    args = ["ask", str(image), "What?", "--model", str(built_mlx), "--backend", "llama"]
    proc = run_cli(args, tmp_path, home)
    assert_one_clear_error(proc, ("llama", "mlx"), args=args)


def test_gguf_with_mlx_backend(built, home, tmp_path):
    image = _png(tmp_path / "img.png")
    args = ["ask", str(image), "What?", "--model", str(built["gguf"]), "--backend", "mlx"]
    proc = run_cli(args, tmp_path, home)
    assert_one_clear_error(proc, ("mlx", "gguf"), args=args)


# ------------------------------------------------------------------------------------------ runs
def _big_image(d: Path) -> Path:
    return _png(d / "big.png", size=(448, 448))


RUN_CASES = [
    # (id, extra args builder, needles); the model is the 256-token-context GGUF where a model is needed
    ("context-overflow-image", lambda d: [str(_big_image(d)), "Describe it."], ("256", "--max-pixels")),
    (
        "context-overflow-two-images",
        lambda d: [str(_png(d / "a.png", (300, 300))), str(_png(d / "b.png", (300, 300))), "What changed?"],
        ("256", "--max-pixels"),
    ),
    (
        "context-overflow-think-budget",
        lambda d: [str(_png(d / "s.png", (56, 56))), "Q?", "--think-budget", "4000"],
        ("256", "--think-budget"),
    ),
    (
        "zero-think-budget",
        lambda d: [str(_png(d / "s.png")), "Q?", "--think-budget", "0"],
        ("--think-budget",),
    ),
    (
        "negative-think-budget",
        lambda d: [str(_png(d / "s.png")), "Q?", "--think-budget=-5"],
        ("--think-budget",),
    ),
    (
        "zero-answer-budget",
        lambda d: [str(_png(d / "s.png")), "Q?", "--answer-budget", "0"],
        ("--answer-budget",),
    ),
    (
        "negative-answer-budget",
        lambda d: [str(_png(d / "s.png")), "Q?", "--answer-budget=-1"],
        ("--answer-budget",),
    ),
    ("zero-max-pixels", lambda d: [str(_png(d / "s.png")), "Q?", "--max-pixels", "0"], ("--max-pixels",)),
    ("empty-question", lambda d: [str(_png(d / "s.png")), "   "], ("question",)),
    (
        "save-into-missing-folder",
        lambda d: [str(_png(d / "s.png")), "Q?", "--save", str(d / "no" / "run.md")],
        ("no", "--save"),
    ),
]


@pytest.mark.parametrize(("case_id", "make", "needles"), RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_run_is_refused_with_one_line(case_id, make, needles, built, home, tmp_path):
    extra = make(tmp_path)
    save = tmp_path / "run.md"
    args = ["ask", *extra, "--model", str(built["small_gguf"])]
    if "--save" not in extra:
        args += ["--save", str(save)]
    if "--answer-budget" not in " ".join(extra):
        args += ["--answer-budget", "8"]
    proc = run_cli(args, tmp_path, home)
    assert_one_clear_error(proc, needles, args=args)
    assert proc.returncode == 2
    assert not save.exists()


def test_overflow_is_refused_before_decoding(built, home, tmp_path):
    """The overflow error comes before any token: stdout stays empty even with --json."""
    args = ["ask", str(_big_image(tmp_path)), "Describe it.", "--model", str(built["small_gguf"]), "--json"]
    proc = run_cli(args, tmp_path, home)
    assert_one_clear_error(proc, ("context",), args=args)
    assert proc.stdout.strip() == ""


# ------------------------------------------------------------------------------------------ existing outputs
def test_convert_refuses_existing_output_unless_force(built, home, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["convert", str(built["src"]), "--to", "gguf", "--quant", "f32", "-o", str(out), "-q"]
    proc = run_cli(args, tmp_path, home)
    assert_one_clear_error(proc, ("exists", "--force"), path=out, args=args)
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path, "taken") == ["taken"]
    proc = run_cli([*args, "--force"], tmp_path, home)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "qvq-manifest.json").is_file()
    assert leftovers(tmp_path, "taken") == ["taken"]


def test_synth_refuses_existing_output_unless_force(home, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["synth", str(out), "--shape", "tiny"]
    proc = run_cli(args, tmp_path, home)
    assert_one_clear_error(proc, ("exists", "--force"), path=out, args=args)
    assert (out / "keep.txt").read_text() == "mine"
    proc = run_cli([*args, "--force"], tmp_path, home)
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert leftovers(tmp_path, "taken") == ["taken"]


def test_synth_refuses_a_file_as_output(home, tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    proc = run_cli(["synth", str(out), "--shape", "tiny"], tmp_path, home)
    assert_one_clear_error(proc, ("not a folder",), path=out)
    assert out.read_text() == "x"


# ------------------------------------------------------------------------------------------ doctor integrity
INTEGRITY_CASES = [
    ("no-config", _no_config, "config.json"),
    ("unsupported-architecture", _unsupported_arch, "unsupported architecture"),
    ("missing-shard", _missing_shard, "missing shard"),
    ("truncated-safetensors", _truncated_safetensors, "truncated"),
    ("header-lies-about-sizes", _lying_header, "offsets span"),
    ("pickle-only", _pickle_only, "pickle"),
    ("gguf-without-mmproj", _gguf_without_mmproj, "no vision projector"),
    ("gguf-other-architecture", _gguf_other_arch, "'llama' is not supported"),
    ("gguf-truncated", _corrupt_gguf, "truncated"),
    ("gguf-garbage", _garbage_gguf, "gguf"),
]


@pytest.mark.parametrize(("case_id", "make", "needle"), INTEGRITY_CASES, ids=[c[0] for c in INTEGRITY_CASES])
def test_integrity_check_names_the_problem(case_id, make, needle, built, tmp_path):
    from qvq_local.integrity import check_model, has_errors

    src = make(built, tmp_path)
    findings = check_model(src)
    errors = [f for f in findings if f.level == "error"]
    assert has_errors(findings), findings
    assert any(needle.lower() in f.message.lower() for f in errors), errors
    assert all("\n" not in f.message for f in findings)
    assert not (tmp_path / "PWNED").exists()


def test_integrity_mmproj_of_another_width(built, tmp_path):
    """A projector from a model of another width beside the text model: the widths are named."""
    import numpy as np
    from gguf import GGUFWriter

    folder = tmp_path / "mismatch"
    folder.mkdir()
    shutil.copy(_gguf_model_file(built["gguf"]), folder)
    w = GGUFWriter(str(folder / "mmproj-other.gguf"), "clip")
    w.add_string("clip.projector_type", "qwen2vl_merger")
    w.add_uint32("clip.vision.projection_dim", 512)
    w.add_tensor("mm.2.weight", np.zeros((512, 64), dtype=np.float32))
    w.add_tensor("mm.2.bias", np.zeros(512, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from qvq_local.integrity import check_model

    errors = [f for f in check_model(folder) if f.level == "error"]
    assert len(errors) == 1 and "width 512" in errors[0].message and "256 wide" in errors[0].message, errors


def test_integrity_good_models_have_no_errors(built):
    from qvq_local.integrity import check_model, has_errors

    for ref in (built["src"], built["gguf"], _gguf_model_file(built["gguf"])):
        findings = check_model(ref)
        assert not has_errors(findings), findings
        assert any(f.level == "ok" for f in findings)


def test_integrity_unknown_reference_is_a_finding(home, monkeypatch):
    from qvq_local.integrity import check_model

    monkeypatch.setenv("QVQ_HOME", str(home / "qvq"))
    findings = check_model("definitely-not-a-model")
    assert [f.level for f in findings] == ["error"]
    findings = check_model("someone/not-downloaded")
    assert [f.level for f in findings] == ["error"] and "not downloaded" in findings[0].message
