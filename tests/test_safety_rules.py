"""Safety rules, enforced on the source and on behaviour.

* No pickle loading anywhere in ``qvq_local/`` or ``convert/`` (``pickle``, ``torch.load``, ``joblib``,
  ``dill``, ``shelve``, ``np.load(allow_pickle=True)``) and no ``trust_remote_code=True``: checked on the
  syntax tree, so comments and docstrings that mention them do not count.
* Chat templates from model files run in a sandbox: a malicious template makes ``qvq ask`` fail with one
  line and never executes (through both backends, and through ``qvq convert``, which copies it).
* Hub ids are validated before any download: bad ids raise ``ModelError`` and huggingface_hub is never
  called.
* ``qvq synth`` and ``qvq convert`` write nothing outside their output folder and the cache folder.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qvq_local.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = [ROOT / "qvq_local", ROOT / "convert"]
CLI = [sys.executable, "-m", "qvq_local.cli"]

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "cloudpickle"}


def _sources() -> list[Path]:
    files = sorted(p for d in SOURCE_DIRS for p in d.rglob("*.py"))
    assert len(files) > 10, files
    return files


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def unsafe_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every pickle import/call, trust_remote_code=True and allow_pickle=True."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BANNED_MODULES:
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name.endswith("torch.load") or name in ("load_state_dict_from_url", "torch.hub.load"):
                found.append((node.lineno, f"{name}()"))
            if (
                name == "__import__"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] in BANNED_MODULES
            ):
                found.append((node.lineno, f"__import__({node.args[0].value!r})"))
            if (
                name.endswith("import_module")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and str(node.args[0].value).split(".")[0] in BANNED_MODULES
            ):
                found.append((node.lineno, f"import_module({node.args[0].value!r})"))
            for kw in node.keywords:
                truthy = not (isinstance(kw.value, ast.Constant) and not kw.value.value)
                if kw.arg == "trust_remote_code" and truthy:
                    found.append((node.lineno, "trust_remote_code=<not False>"))
                if kw.arg == "allow_pickle" and truthy:
                    found.append((node.lineno, f"{name}(allow_pickle=<not False>)"))
                if (
                    kw.arg == "weights_only"
                    and isinstance(kw.value, ast.Constant)
                    and kw.value.value is False
                ):
                    found.append((node.lineno, f"{name}(weights_only=False)"))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (
                    isinstance(key, ast.Constant)
                    and key.value in ("trust_remote_code", "allow_pickle")
                    and not (isinstance(value, ast.Constant) and not value.value)
                ):
                    found.append((node.lineno, f"{{'{key.value}': <not False>}}"))
    return found


def test_scanner_catches_what_it_must():
    """The scanner itself, on code that does each forbidden thing (and on look-alikes that are fine)."""
    bad = """
import pickle
from joblib import load
import dill as d
torch.load("x.pt")
np.load("x.npy", allow_pickle=True)
AutoModel.from_pretrained("x", trust_remote_code=True)
f(**{"trust_remote_code": True})
importlib.import_module("pickle")
torch.load("y", weights_only=False)
"""
    good = '''
"""pickle files are never loaded; trust_remote_code=True is refused."""
np.load("x.npy")
np.load("x.npy", allow_pickle=False)
AutoProcessor.from_pretrained("x", trust_remote_code=False)
# torch.load("x")
'''
    assert len(unsafe_uses(ast.parse(bad))) == 10
    assert unsafe_uses(ast.parse(good)) == []


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_loading_or_remote_code(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert unsafe_uses(tree) == [], f"{path.relative_to(ROOT)}: {unsafe_uses(tree)}"


# ------------------------------------------------------------------------------------------ hub ids
BAD_HUB_IDS = [
    "../../etc",
    "a/b/c",
    "http://x",
    "https://huggingface.co/Qwen/QVQ-72B-Preview",
    "owner/",
    "/name",
    "a//b",
    "a/b?c",
    "a/..",
    "../a",
    "-a/b",
    "a/b-",
    "a--b/c",
    "a/b c",
    "a/b\nc",
    "~/models",
    "a\\b",
    "C:/x",
    "a/b#main",
    "\x00/x",
    "a" * 200 + "/b",
]


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Any huggingface_hub network entry point fails the test if called."""
    import huggingface_hub

    def boom(*args, **kwargs):
        pytest.fail(f"huggingface_hub was called with {args} {kwargs}")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)
    monkeypatch.setenv("QVQ_HOME", str(tmp_path / "qvq"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("ref", BAD_HUB_IDS, ids=repr)
def test_bad_hub_ids_never_reach_the_hub(ref, no_hub, tmp_path):
    from qvq_local import hub, models

    with pytest.raises(ModelError):
        hub.pull(ref, progress=False)
    with pytest.raises(ModelError):
        hub.resolve(ref, download=True, progress=False)
    with pytest.raises(ModelError):
        models.check_hub_id(ref)
    assert not (tmp_path / "qvq" / "hub").exists() or not any((tmp_path / "qvq" / "hub").iterdir())


def test_trailing_newline_is_not_a_hub_id(no_hub):
    """``re.match`` with ``$`` accepts "a/b\\n"; a pasted id with a newline must not reach the hub as is."""
    from qvq_local import hub, models

    with pytest.raises(ModelError):
        models.check_hub_id("a/b\n")
    with pytest.raises(ModelError):
        hub.pull("a/b\n", progress=False)


@pytest.mark.parametrize("ref", ["../../etc", "a/b/c", "http://x"])
def test_bad_hub_ids_through_the_cli(ref, tmp_path):
    env = _env(tmp_path)
    for args in (["pull", ref], ["convert", ref, "--to", "gguf"]):
        proc = subprocess.run(
            [*CLI, *args], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and ref in lines[0], proc.stderr
    assert not (tmp_path / "qvq" / "hub").exists()


# -------------------------------------------------------------------------------------- subprocess helpers
def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QVQ_")}
    env.update(
        HOME=str(root / "home"),
        QVQ_HOME=str(root / "qvq"),
        HF_HUB_OFFLINE="1",
        MLX_DISABLE_COMPILE="1",
        TOKENIZERS_PARALLELISM="false",
        TMPDIR=str(root / "tmpdir"),
        NO_COLOR="1",
    )
    (root / "home").mkdir(exist_ok=True)
    (root / "tmpdir").mkdir(exist_ok=True)
    return env


def _run(args: list[str], cwd: Path, env: dict, timeout: float = 300):
    return subprocess.run(
        [*CLI, *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ------------------------------------------------------------------------------------------ writes
def test_synth_and_convert_write_only_their_outputs(tmp_path):
    root = tmp_path
    env = _env(root)
    work = root / "work"
    work.mkdir()
    before = _snapshot(root)
    assert _run(["synth", "src", "--shape", "tiny", "--dtype", "f32"], work, env).returncode == 0
    proc = _run(
        ["convert", "src", "--to", "gguf", "--quant", "f32", "--mmproj-quant", "f32", "-o", "out", "-q"],
        work,
        env,
    )
    assert proc.returncode == 0, proc.stderr
    proc = _run(
        ["convert", "src", "--to", "gguf", "--quant", "f32", "--mmproj-quant", "f32", "-q"], work, env
    )
    assert proc.returncode == 0, proc.stderr  # default output: the cache, QVQ_HOME/models
    new = _snapshot(root) - before
    allowed = ("work/src", "work/out", "qvq")
    stray = sorted(p for p in new if not any(p == a or p.startswith(a + "/") for a in allowed))
    assert stray == [], f"written outside the output and cache folders: {stray}"
    assert not any(part.startswith(".") for p in new for part in Path(p).parts), (
        f"hidden partial files left: {[p for p in new if '/.' in '/' + p]}"
    )
    assert (root / "qvq" / "models").is_dir()


# ------------------------------------------------------------------------------------------ templates
MALICIOUS_TEMPLATE = (
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
    "{{ c()._module.__builtins__['open']('MARKER', 'w').write('pwned') }}{% endif %}{% endfor %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


def _template(marker: Path) -> str:
    return MALICIOUS_TEMPLATE.replace("MARKER", str(marker))


def test_template_payload_really_executes_without_a_sandbox(tmp_path):
    """Proves the payload is live: plain Jinja runs it (so the sandbox is what stops it below)."""
    import jinja2

    marker = tmp_path / "PWNED"
    jinja2.Environment().from_string(_template(marker)).render(messages=[])
    assert marker.read_text() == "pwned"


@pytest.fixture(scope="module")
def evil_models(tmp_path_factory):
    """The tiny source with a malicious chat template, and its GGUF conversion (which carries it)."""
    root = tmp_path_factory.mktemp("evil")
    env = _env(root)
    marker = root / "PWNED"
    assert _run(["synth", "src", "--shape", "tiny", "--dtype", "f32"], root, env).returncode == 0
    src = root / "src"
    (src / "chat_template.json").write_text(json.dumps({"chat_template": _template(marker)}))
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = _template(marker)
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").write_text(_template(marker))
    proc = _run(
        ["convert", "src", "--to", "gguf", "--quant", "f32", "--mmproj-quant", "f32", "-o", "gguf", "-q"],
        root,
        env,
    )
    convert_error = None if proc.returncode == 0 else proc.stderr
    yield {
        "root": root,
        "env": env,
        "src": src,
        "gguf": root / "gguf",
        "marker": marker,
        "convert_error": convert_error,
    }
    # the models are large next to the rest of pytest's temporary folders: gone once the module is done
    shutil.rmtree(root, ignore_errors=True)


def test_convert_does_not_run_the_template(evil_models):
    assert not evil_models["marker"].exists()
    err = evil_models["convert_error"]
    if err is not None:  # refusing the template at convert time is fine too, with one clear line
        assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1


@pytest.mark.parametrize("which", ["src", "gguf"])
def test_malicious_template_fails_ask_with_one_line(which, evil_models):
    if which == "gguf" and evil_models["convert_error"] is not None:
        pytest.skip("convert refused the template (checked above)")
    from PIL import Image

    root = evil_models["root"]
    image = root / "img.png"
    Image.new("RGB", (56, 56), "blue").save(image)
    save = root / f"run-{which}.md"
    args = [
        "ask",
        str(image),
        "What?",
        "--model",
        str(evil_models[which]),
        "--think-budget",
        "4",
        "--answer-budget",
        "4",
        "--save",
        str(save),
    ]
    proc = _run(args, root, evil_models["env"])
    shown = f"rc={proc.returncode}\nstdout={proc.stdout[-1500:]}\nstderr={proc.stderr[-3000:]}"
    assert not evil_models["marker"].exists(), "the template ran code"
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, shown
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "template" in lines[0].lower(), shown
    assert not save.exists()
