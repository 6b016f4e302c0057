"""Prepare, on a machine without a GPU, everything a GPU run of tools/gpu/run.py carries with it.

The GPU machine (tools/gpu/README.md) cannot fetch anything and takes at most 64 MiB of working tree and
carried folders per call, so what it lacks is made here and put in ``.gpu/`` (ignored by git, named in the
call's ``carry``):

* ``.gpu/llama-cuda.tar.xz``: llama-cpp-python built with CUDA for sm_90 (the H200) only, installed and
  packed with its shared libraries stored once (a wheel holds each ``.so`` three times);
* ``.gpu/mlx-cuda13.tar.xz``: ``mlx-cuda-13`` (MLX's CUDA build), installed, with its symbol table
  stripped and the machine code for every GPU other than sm_90 zeroed in its fat binary (the wheel is
  90 MB; this makes it fit);
* ``.gpu/wheels/``: the pure-Python (and cp312) wheels the GPU image lacks (``gguf``, ``diskcache``,
  ``mlx``, ``mlx-vlm`` and what they import there);
* ``.gpu/manifest.json``: versions, sizes and the build's wall time.

``.gpu-dry/`` (never carried) holds what only the dry run on this machine needs: the CPU build of MLX,
pip's cuBLAS and CUDA runtime, and a stub ``libcuda.so.1`` so the CUDA build of llama.cpp loads here and
falls back to the CPU.

    python tools/gpu/prepare.py                 # everything (the llama.cpp CUDA build takes long: see README)
    python tools/gpu/prepare.py --only wheels,mlx
    python tools/gpu/prepare.py --check         # sizes against the 64 MiB limit, nothing built

Runs with the project's virtualenv python (it reads the versions installed there, so the GPU runs the
versions the tests here run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from cuda_build import CUDA_ARCH, llama_cmake_args  # tools/gpu/, beside this file

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".gpu"
DRY = ROOT / ".gpu-dry"
#: What one call may take along: tracked files, untracked files git does not ignore, and carried folders.
LIMIT_BYTES = 64 * 2**20
#: The toolkit here: nvcc 13.0, without cuBLAS (pip's wheels below provide it for the build).
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0"))
#: cuBLAS and the CUDA runtime for building (headers, link-time libraries) and for the dry run.  The GPU
#: machine has its own (torch's, CUDA 13); any 13.x has the same sonames.  These are the versions the
#: package index here offers.
CUDA_WHEELS = ("nvidia-cublas==13.1.1.3", "nvidia-cuda-runtime==13.0.96")
#: pip download's platform tags for the GPU machine's Python (cp312, glibc 2.35+).
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
#: Pure-Python (or cp312) distributions the GPU image lacks, with the version installed here.  The image's
#: own list is in the device library's KINDS.md; typer, rich, pillow, numpy, transformers, huggingface_hub,
#: jinja2, tokenizers, safetensors, psutil, pytest, hypothesis, requests, tqdm, pyyaml, opencv are there.
MISSING_THERE = ("gguf", "diskcache", "mlx", "mlx-vlm")


def log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip_download(names: list[str], dest: Path, *, cp312: bool = True) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", dest]
    if cp312:
        cmd += ["--python-version", "3.12", "--implementation", "cp"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
    run(cmd + names)


def unzip(wheel: Path, dest: Path) -> None:
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)


def pack(src: Path, out: Path) -> int:
    """``src``'s contents as ``out`` (tar.xz, identical files stored once as hard links); its size."""
    seen: dict[str, str] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen and path.stat().st_size > 4096:
            path.unlink()
            os.link(seen[digest], path)
        else:
            seen.setdefault(digest, str(path))
    tmp = out.with_suffix(".part")
    with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
        for path in sorted(src.iterdir()):
            tar.add(path, arcname=path.name)
    tmp.replace(out)
    return out.stat().st_size


# ---------------------------------------------------------------- llama-cpp-python with CUDA for sm_90


def cuda_wheels(dest: Path) -> Path:
    """pip's cuBLAS and CUDA runtime unpacked under ``dest``; returns their ``nvidia/cu13`` folder, with
    the unversioned ``.so`` links a linker looks for."""
    cu13 = dest / "nvidia" / "cu13"
    if not (cu13 / "lib" / "libcublas.so.13").exists():
        with tempfile.TemporaryDirectory() as tmp:
            pip_download(list(CUDA_WHEELS), Path(tmp))
            for wheel in Path(tmp).glob("*.whl"):
                unzip(wheel, dest)
    for lib in ("cublas", "cublasLt", "cudart"):
        link = cu13 / "lib" / f"lib{lib}.so"
        if not link.exists():
            link.symlink_to(f"lib{lib}.so.13")
    return cu13


def libcuda_stub(dest: Path) -> Path:
    """A ``libcuda.so`` (soname ``libcuda.so.1``) that defines every driver function ``cuda.h`` declares,
    each returning an error.  Linking against it records the dependency; at run time the GPU machine's
    driver provides the real library.  Here (no driver) it makes CUDA report no device, and llama.cpp
    runs on the CPU, which is what the dry run needs."""
    out = dest / "libcuda.so"
    if out.exists():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    pre = subprocess.run(
        ["gcc", "-E", "-P", "-I", str(CUDA_HOME / "include"), "-x", "c", "-"],
        input="#include <cuda.h>\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    names = sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", pre)))
    if len(names) < 100:
        sys.exit(f"error: only {len(names)} driver functions found in {CUDA_HOME}/include/cuda.h")
    src = dest / "libcuda_stub.c"
    src.write_text("".join(f"int {n}(void) {{ return 999; }}\n" for n in names))
    run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", out, src])
    (dest / "libcuda.so.1").unlink(missing_ok=True)
    (dest / "libcuda.so.1").symlink_to("libcuda.so")
    log(f"stub libcuda.so with {len(names)} driver functions")
    return out


def build_llama(manifest: dict, jobs: int) -> None:
    llama_version = version("llama_cpp_python")
    cu13 = cuda_wheels(DRY / "cuda")
    stub = libcuda_stub(DRY / "libcuda-stub")
    cmake_args = llama_cmake_args(CUDA_HOME, cu13, stub, native=False)  # carried: no -march=native
    env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    work = DRY / "llama-build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.monotonic()
    with open(work / "build.log", "w") as fh:
        cmd = ["nice", "-n", "19", sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir"]
        cmd += ["--no-binary", "llama-cpp-python", "-v", "-w", work / "wheel"]
        cmd += [f"llama-cpp-python=={llama_version}"]
        log(
            f"building llama-cpp-python {llama_version} with CUDA for sm_{CUDA_ARCH} ({jobs} jobs; log: {fh.name})"
        )
        run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    build_s = time.monotonic() - start
    manifest["llama"] = {
        "version": llama_version,
        "cmake_args": cmake_args,
        "build_wall_s": round(build_s),
        "build_jobs": jobs,
    }
    log(f"llama-cpp-python CUDA: built in {build_s / 60:.1f} min")
    pack_llama(manifest)


def pack_llama(manifest: dict) -> None:
    """The CUDA wheel built by ``build_llama``, installed and packed.  Its fat binary holds sm_90 machine
    code and compute_90 PTX, which an H200 never compiles when the machine code is there: the PTX is
    replaced by a stand-in as in MLX's build (``keep_one_arch``), which makes the pack fit the call."""
    work = DRY / "llama-build"
    wheel = next((work / "wheel").glob("llama_cpp_python-*.whl"))
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    unzip(wheel, stage)
    for extra in ("lib", "include"):  # the CMake install's second copy: llama_cpp loads llama_cpp/lib only
        shutil.rmtree(stage / extra, ignore_errors=True)
    libs = sorted((stage / "llama_cpp" / "lib").glob("libggml-cuda.so*"))
    stats = {}
    for lib in libs:  # the wheel holds each library three times (.so, .so.0, .so.0.x.y); pack() dedups
        stats = keep_one_arch(lib, int(CUDA_ARCH))
    checked = check_fatbin(libs[0], f"sm_{CUDA_ARCH}")
    log(f"cuobjdump: {checked}")
    size = pack(stage, CARRY / "llama-cuda.tar.xz")
    manifest.setdefault("llama", {}).update(
        wheel_bytes=wheel.stat().st_size, fatbin_bytes=stats, cuobjdump=checked, packed_bytes=size
    )
    log(f"llama-cpp-python CUDA: wheel {wheel.stat().st_size / 2**20:.1f} MiB, packed {size / 2**20:.1f} MiB")


#: Parts of llama-cpp-python's source its build never reads (llama.cpp as a subproject builds no tests,
#: examples or tools; only tools/mtmd): left out of ``llama-src.tar.xz``.
SRC_DROP = (
    ".git",  # the sdist carries llama.cpp's git pack (38 MB)
    "docs",
    "examples",
    "tests",
    "docker",
    "scripts",
    "vendor/llama.cpp/models",
    "vendor/llama.cpp/docs",
    "vendor/llama.cpp/benches",
    "vendor/llama.cpp/tests",
    "vendor/llama.cpp/examples",
    "vendor/llama.cpp/pocs",
    "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/conversion",
    "vendor/llama.cpp/app",
    "vendor/llama.cpp/media",
)
#: ggml's backends besides these are added only when enabled (ggml_add_backend), and none is here
SRC_BACKENDS = ("ggml-cpu", "ggml-cuda")


def build_src(manifest: dict) -> None:
    """llama-cpp-python's source, trimmed to what its CUDA build reads: run.py builds it on the GPU
    machine (16 cores) when no build made here is carried."""
    llama_version = version("llama_cpp_python")
    work = DRY / "llama-src"
    sdist = work / f"llama_cpp_python-{llama_version}.tar.gz"
    for path in work.glob("*"):
        if path != sdist:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        run([*cmd, "-d", work, f"llama-cpp-python=={llama_version}"])
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    top = work / f"llama_cpp_python-{llama_version}"
    for rel in SRC_DROP:
        shutil.rmtree(top / rel, ignore_errors=True)
    for tool in (top / "vendor" / "llama.cpp" / "tools").iterdir():
        if tool.is_dir() and tool.name != "mtmd":
            shutil.rmtree(tool)
    for backend in (top / "vendor" / "llama.cpp" / "ggml" / "src").glob("ggml-*"):
        if backend.is_dir() and backend.name not in SRC_BACKENDS:
            shutil.rmtree(backend)
    stage = work / "stage"
    stage.mkdir()
    top.rename(stage / "llama-cpp-python")
    size = pack(stage, CARRY / "llama-src.tar.xz")
    manifest["llama_src"] = {
        "version": llama_version,
        "sdist_bytes": sdist.stat().st_size,
        "packed_bytes": size,
    }
    log(
        f"llama-cpp-python {llama_version} source: sdist {sdist.stat().st_size / 2**20:.1f} MiB -> packed {size / 2**20:.1f} MiB"
    )


def build_dry_llama(manifest: dict) -> None:
    """The dry run's llama-cpp-python: the one installed in this virtualenv (its wheel is py3-none, so
    Python 3.12 loads it too), packed as the CUDA build would be."""
    import llama_cpp

    pkg = Path(llama_cpp.__file__).parent
    dist = next(pkg.parent.glob("llama_cpp_python-*.dist-info"))
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        shutil.copytree(pkg, stage / "llama_cpp", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(dist, stage / dist.name)
        size = pack(stage, DRY / "llama-cpu.tar.xz")
    log(f"dry run's llama-cpp-python (this venv's CPU build): packed {size / 2**20:.1f} MiB")


# ---------------------------------------------------------------- MLX's CUDA build, cut to sm_90

FATBIN_MAGIC = 0xBA55ED50
#: An entry's flag for a compressed payload (its compressed size at byte 16, full size at 56).
COMPRESSED = 0x8000


def _section(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of ELF section ``name`` (readelf: no ELF library needed)."""
    out = subprocess.run(
        ["readelf", "-S", "-W", str(path)], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+[0-9a-f]+\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m and m.group(1) == name:
            return int(m.group(2), 16), int(m.group(3), 16)
    raise SystemExit(f"error: {path}: no {name} section")


#: An entry's flag for machine code built for an ``a`` target (sm_90a: Hopper-only instructions).
ARCH_SPECIFIC = 0x100000
_STUB_KERNEL = "__global__ void qvq_stub(float *a) { a[threadIdx.x] += 1.0f; }\n"


def _stub(kind: int, sm: int, specific: bool, tmp: Path) -> bytes | None:
    """A one-kernel cubin (kind 2) or PTX text (kind 1) for ``sm``, built uncompressed by this machine's
    nvcc: the stand-in for machine code an sm_90 GPU never runs.  None where nvcc cannot build it."""
    target = f"{sm}{'a' if specific else ''}"
    src = tmp / "stub.cu"
    src.write_text(_STUB_KERNEL)
    out = tmp / f"stub_{kind}_{target}"
    flag = ["-cubin", f"-arch=sm_{target}"] if kind == 2 else ["-ptx", f"-arch=compute_{target}"]
    nvcc = [str(CUDA_HOME / "bin" / "nvcc"), *flag, "-compress-mode=none", str(src), "-o", str(out)]
    if subprocess.run(nvcc, capture_output=True).returncode != 0:
        return None
    return out.read_bytes() + (b"\0" if kind == 1 else b"")


def keep_one_arch(path: Path, arch: int) -> dict:
    """Replace, in place, every fat-binary entry in ``path`` that is not machine code for ``arch`` (SASS
    for other GPUs, and PTX: the only PTX in MLX's wheel is for compute_120, which an sm_90 GPU cannot
    compile) by a valid one-kernel stand-in for the same target, stored uncompressed and padded with
    zeros to the entry's size.  Entry headers and sizes stay, so the file's layout stays; every entry is
    still a valid cubin or PTX text of the target its header names (a loader or cuobjdump that reads
    them all finds nothing broken), and the bytes an sm_90 GPU never reads become zeros that the xz
    archive stores in almost nothing.  An entry smaller than its stand-in is left as it is.  Returns
    the bytes per (kind, arch, what was done).

    Fat binary layout (CUDA's ``fatbinary`` format): a 16-byte header (magic 0xBA55ED50, version,
    header size, payload size), then entries, each a header (kind 1 PTX / 2 ELF at 0, header size at 4,
    padded payload size at 8, compressed size at 16, SM version at 28, flags at 40, full size at 56)
    followed by its payload; read off nvcc's own output with and without ``-compress-mode``.
    """
    import struct

    offset, size = _section(path, ".nv_fatbin")
    stubs: dict[tuple[int, int, bool], bytes | None] = {}
    stats: dict[str, int] = {}
    with open(path, "r+b") as fh, tempfile.TemporaryDirectory() as tmp:
        fh.seek(offset)
        data = bytearray(fh.read(size))
        pos = 0
        while pos + 16 <= len(data):
            magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
            if magic != FATBIN_MAGIC:
                pos += 8  # fat binaries are 8-byte aligned in the section
                continue
            entry, end = pos + hsize, pos + hsize + fsize
            while entry < end:
                kind, _ev, ehsize, padded = struct.unpack_from("<HHII", data, entry)
                sm = struct.unpack_from("<I", data, entry + 28)[0]
                flags = struct.unpack_from("<Q", data, entry + 40)[0]
                specific = bool(flags & ARCH_SPECIFIC)
                done = "kept"
                if not (kind == 2 and sm == arch):
                    key = (kind, sm, specific)
                    if key not in stubs:
                        stubs[key] = _stub(kind, sm, specific, Path(tmp))
                    stub = stubs[key]
                    if stub is not None and len(stub) <= padded:
                        body = entry + ehsize
                        data[body : body + padded] = stub + bytes(padded - len(stub))
                        struct.pack_into("<Q", data, entry + 40, flags & ~COMPRESSED)
                        struct.pack_into("<I", data, entry + 16, 0)  # no compressed size
                        struct.pack_into("<Q", data, entry + 56, 0)  # no uncompressed size
                        done = "stubbed"
                    else:
                        done = "kept-small" if stub is not None else "kept-no-stub"
                name = (
                    f"{'sass' if kind == 2 else 'ptx' if kind == 1 else kind}_{sm}{'a' if specific else ''}"
                )
                stats[f"{name}_{done}"] = stats.get(f"{name}_{done}", 0) + padded
                entry += ehsize + padded
            pos = end
        if not any(k.startswith(f"sass_{arch}") for k in stats):
            raise SystemExit(f"error: {path}: no sm_{arch} machine code in its fat binary; nothing changed")
        fh.seek(offset)
        fh.write(data)
    return stats


def check_fatbin(path: Path, kept: str) -> str:
    """cuobjdump (from pip, here) must list every entry of the changed library and unpack its ``kept``
    code (``sm_90a``, ``sm_90``) into valid cubins: the format was kept.  Returns what it saw."""
    tools = DRY / "cuobjdump"
    exe = tools / "nvidia" / "cu13" / "bin" / "cuobjdump"
    if not exe.exists():
        with tempfile.TemporaryDirectory() as tmp:
            pip_download(["nvidia-cuda-cuobjdump==13.*"], Path(tmp), cp312=False)
            for wheel in Path(tmp).glob("*.whl"):
                unzip(wheel, tools)
        exe.chmod(0o755)
    listed = subprocess.run([str(exe), "-lelf", "-lptx", str(path)], capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(f"error: cuobjdump cannot read {path} after the change: {listed.stderr.strip()}")
    targets = sorted(set(re.findall(r"\.(sm_\w+|compute_\w+)\.(?:cubin|ptx)", listed.stdout)))
    with tempfile.TemporaryDirectory() as tmp:  # the kept machine code still unpacks to valid cubins
        subprocess.run([str(exe), "-xelf", kept, str(path)], cwd=tmp, capture_output=True, check=True)
        cubins = list(Path(tmp).glob(f"*.{kept}.cubin"))
        bad = [c.name for c in cubins if c.read_bytes()[:4] != b"\x7fELF"]
        if not cubins or bad:
            raise SystemExit(f"error: {path}: the {kept} code does not unpack to valid cubins ({bad[:3]})")
    return f"{len(listed.stdout.splitlines())} entries ({', '.join(targets)}); {len(cubins)} {kept} cubins unpack"


def build_mlx(manifest: dict) -> None:
    mlx_version = version("mlx")
    work = DRY / "mlx-cuda"
    shutil.rmtree(work, ignore_errors=True)
    pip_download([f"mlx-cuda-13=={mlx_version}"], work / "download")
    wheel = next((work / "download").glob("mlx_cuda_13-*.whl"))
    stage = work / "stage"
    unzip(wheel, stage)
    lib = stage / "mlx" / "lib" / "libmlx.so"
    before = lib.stat().st_size
    run(["strip", "--strip-unneeded", lib])  # .symtab/.strtab: 26 MB the dynamic linker never reads
    stats = keep_one_arch(lib, int(CUDA_ARCH))
    checked = check_fatbin(lib, f"sm_{CUDA_ARCH}a")
    log(f"cuobjdump: {checked}")
    size = pack(stage, CARRY / "mlx-cuda13.tar.xz")
    manifest["mlx_cuda"] = {
        "version": mlx_version,
        "wheel_bytes": wheel.stat().st_size,
        "libmlx_bytes": before,
        "fatbin_bytes": stats,
        "cuobjdump": checked,
        "packed_bytes": size,
    }
    log(
        f"mlx-cuda-13 {mlx_version}: wheel {wheel.stat().st_size / 2**20:.1f} MiB -> packed {size / 2**20:.1f} MiB"
    )


# ---------------------------------------------------------------- pure-Python wheels, dry-run assets


def build_wheels(manifest: dict) -> None:
    dest = CARRY / "wheels"
    shutil.rmtree(dest, ignore_errors=True)
    pins = [f"{name}=={version(name)}" for name in MISSING_THERE]
    pip_download(pins, dest)
    manifest["wheels"] = {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}


#: The GPU image's Python packages that qvq-local, llama-cpp-python, mlx-vlm and the tests use, at the
#: versions KINDS.md lists where it lists one: the dry run's stand-in for the GPU machine's python3.
IMAGE_PACKAGES = (
    "transformers==5.17.0",
    "huggingface_hub==1.33.0",
    "tokenizers==0.23.2",
    "safetensors==0.8.0",
    "numpy",
    "pillow",
    "typer",
    "rich",
    "jinja2",
    "psutil",
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "requests",
    "tqdm",
    "pyyaml",
    "typing-extensions",
    "sentencepiece",
    "opencv-python-headless",
    "scipy",
    "matplotlib",
    # the on-machine llama.cpp build (pip install --no-build-isolation)
    "scikit-build-core",
    "cmake",
    "ninja",
)


def find_python312() -> str:
    """A Python 3.12 here (the GPU machine's version) for the stand-in image."""
    candidates = [
        shutil.which("python3.12"),
        *sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")),
    ]
    for cand in candidates:
        if (
            cand
            and subprocess.run(
                [str(cand), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True
            ).returncode
            == 0
        ):
            return str(cand)
    sys.exit(
        "error: no Python 3.12 here (the dry run stands in for the GPU machine's python3 3.12); "
        "install one (pyenv install 3.12, or apt-get install python3.12)"
    )


def build_dry(manifest: dict) -> None:
    """What the dry run here uses instead of the GPU machine's: a Python 3.12 virtualenv with the image's
    packages (``.gpu-dry/image``), MLX's CPU build (cp312), cuBLAS and the CUDA runtime from pip, the
    stub libcuda."""
    cuda_wheels(DRY / "cuda")
    libcuda_stub(DRY / "libcuda-stub")
    dest = DRY / "wheels"
    shutil.rmtree(dest, ignore_errors=True)
    pip_download([f"mlx-cpu=={version('mlx')}"], dest)
    build_dry_llama(manifest)
    image = DRY / "image"
    if not (image / "bin" / "python3").exists():
        run([find_python312(), "-m", "venv", image])
    run([image / "bin" / "python3", "-m", "pip", "install", "-q", *IMAGE_PACKAGES])


# ---------------------------------------------------------------- sizes


def tree_bytes() -> dict:
    """What a call sends: tracked files plus untracked files git does not ignore, and the carried folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    tracked = sum((ROOT / f).stat().st_size for f in listed if f and (ROOT / f).is_file())
    shared = ROOT / "shared"
    shared_bytes = sum(p.stat().st_size for p in shared.rglob("*") if p.is_file()) if shared.is_dir() else 0
    carried = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file()) if CARRY.is_dir() else 0
    total = tracked + shared_bytes + carried
    return {"tree": tracked, "shared": shared_bytes, "carried": carried, "total": total, "limit": LIMIT_BYTES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", default="wheels,mlx,dry,llama", help="Comma-separated: wheels, mlx, dry, llama."
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="Parallel compile jobs (llama).")
    ap.add_argument("--check", action="store_true", help="Only report the sizes against the 64 MiB limit.")
    args = ap.parse_args()
    CARRY.mkdir(exist_ok=True)
    DRY.mkdir(exist_ok=True)
    manifest_path = CARRY / "manifest.json"

    def read_manifest() -> dict:
        return json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    if not args.check:
        steps = {
            "wheels": build_wheels,
            "mlx": build_mlx,
            "src": build_src,
            "dry": build_dry,
            "llama-pack": pack_llama,  # again from the wheel the last llama build left
        }
        for name in args.only.split(","):
            name = name.strip()
            before = read_manifest()
            part = json.loads(json.dumps(before))  # a copy: what this part changes is what differs
            if name == "llama":
                build_llama(part, args.jobs)
            elif name in steps:
                steps[name](part)
            else:
                sys.exit(f"error: --only: unknown part {name!r} (wheels, mlx, src, dry, llama, llama-pack)")
            # read again before writing: another prepare.py (the long llama build) may have written since
            manifest = read_manifest()
            manifest.update({k: v for k, v in part.items() if before.get(k) != v})
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    sizes = tree_bytes()
    for key in ("tree", "shared", "carried", "total"):
        log(f"{key:>8}: {sizes[key] / 2**20:6.1f} MiB")
    missing = [n for n in ("mlx-cuda13.tar.xz", "wheels") if not (CARRY / n).exists()]
    if not (CARRY / "llama-cuda.tar.xz").exists():
        if (CARRY / "llama-src.tar.xz").exists():
            log("no llama.cpp CUDA build here: run.py builds it on the GPU machine from llama-src.tar.xz")
        else:
            missing.append("llama-cuda.tar.xz or llama-src.tar.xz")
    if missing:
        log(f"not built yet: {', '.join(missing)}")
    if sizes["total"] > LIMIT_BYTES:
        sys.exit(f"error: {sizes['total'] / 2**20:.1f} MiB would travel; a call takes at most 64 MiB")
    log(f"fits: {sizes['total'] / 2**20:.1f} of 64 MiB")


if __name__ == "__main__":
    main()
