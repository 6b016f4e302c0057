"""One list of backend names everywhere: every entry point reads qvq_local.backends.registry.

The names and aliases a user types are accepted (and mapped to the same canonical name) by ``qvq ask``,
``qvq config``, ``QVQ_BACKEND``, the API's ``load``/``choose_backend`` and ``qvq bench``; an unknown name is
refused by each with the same one-line message; and no module keeps its own whitelist.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import assert_error

from qvq_local import api, config, hardware, hub
from qvq_local.ask_cmd import AskRequest, load_request
from qvq_local.backends import registry
from qvq_local.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
# the backends that load a model here (the remote one has no model formats; its own tests are in
# test_openai_backend.py)
ALIASES = [
    (alias, spec.name)
    for spec in registry.BACKENDS.values()
    if not spec.has(registry.REMOTE)
    for alias in (spec.name, *spec.aliases)
]


def test_the_llama_aliases_are_registered():
    assert registry.names() == ("mlx", "llama")
    assert registry.names(remote=True) == ("mlx", "llama", "openai")
    assert registry.canonical("OpenAI") == "openai" and registry.get("openai").has(registry.REMOTE)
    for alias in ("llama", "llamacpp", "llama.cpp", "gguf", " LLaMA.cpp "):
        assert registry.canonical(alias) == "llama"
    assert registry.canonical(None) == registry.canonical("") == "auto"
    assert registry.get("gguf").formats == frozenset({"gguf"})
    assert registry.get("mlx").formats == frozenset({"mlx", "hf"})
    assert registry.get("mlx").has(registry.IMAGE_ENCODING) and not registry.get("llama").has(registry.REMOTE)
    with pytest.raises(ValueError):
        registry.get("mlx").has("telepathy")


class _Loaded:
    quantization = "q4"

    def close(self) -> None:
        pass


@pytest.fixture
def installed_everything(monkeypatch):
    real = importlib.util.find_spec
    needed = {m for spec in registry.BACKENDS.values() for m in spec.modules}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: object() if n in needed else real(n, *a, **k)
    )


@pytest.mark.parametrize("alias, name", ALIASES)
def test_every_entry_point_accepts_every_alias(alias, name, tmp_path, monkeypatch, installed_everything):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path))
    monkeypatch.delenv("QVQ_BACKEND", raising=False)
    # qvq config set backend ALIAS stores the canonical name
    assert config.set_value("backend", alias) == name
    assert config.read_file()["backend"] == name
    # QVQ_BACKEND=ALIAS
    monkeypatch.setenv("QVQ_BACKEND", alias.upper())
    assert config.effective()["backend"] == name
    # qvq ask --backend ALIAS -> api.load (maps it, once) -> hardware.choose_backend -> that backend's module
    fmt = sorted(registry.get(name).formats)[0]
    opened = []
    monkeypatch.setattr(
        hub,
        "resolve",
        lambda ref, **kw: SimpleNamespace(name="m", format=fmt, path=tmp_path / "m", quantization=""),
    )
    monkeypatch.setattr(
        registry.BackendSpec,
        "open_model",
        lambda spec, target, options: opened.append(spec.name) or _Loaded(),
    )
    with api.load("m", backend=load_request(AskRequest(backend=alias)).backend) as model:
        assert model.backend == name and opened == [name]
    assert hardware.choose_backend(alias, {fmt}) == name
    # qvq bench --backend ALIAS
    from qvq_local.bench.harness import ALL, _choose_backends

    assert _choose_backends(registry.canonical(alias, extra=(ALL,)), "tiny", None) == [name]


@pytest.mark.parametrize("bad", ["vllm", "cuda", "llama-cpp"])
def test_every_entry_point_refuses_the_same_way(bad, tmp_path, monkeypatch):
    monkeypatch.setenv("QVQ_HOME", str(tmp_path))
    raised = []
    for call in (
        lambda: config.set_value("backend", bad),
        lambda: api.load(str(tmp_path / "m.gguf"), backend=load_request(AskRequest(backend=bad)).backend),
        lambda: hardware.choose_backend(bad, None),
    ):
        with pytest.raises(InputError) as err:
            call()
        assert_error(
            err, "unknown backend", "auto, mlx, llama or openai", "llamacpp, llama.cpp, gguf mean llama"
        )
        raised.append(str(err.value))
    assert len(set(raised)) == 1, raised  # one message, from one place
    from qvq_local.bench.harness import run_bench  # qvq bench also takes "all"

    with pytest.raises(InputError) as err:
        run_bench(home=tmp_path, backend=bad)
    assert_error(err, "unknown backend", "auto, mlx, llama, openai or all", "gguf mean llama")
    with pytest.raises(InputError) as err:  # the remote backend is not a bench target
        run_bench(home=tmp_path, backend="openai")
    assert_error(err, "qvq bench measures the backends that run here, not openai")


def test_one_list_of_names_everywhere():
    from qvq_local import doctor

    assert [row["backend"] for row in doctor.backend_report()] == list(registry.names())
    assert {r["install_hint"] for r in doctor.backend_report()} == {
        registry.get(n).install_hint for n in registry.names()
    }
    assert registry.choices("all") == "auto | mlx | llama | openai | all"
    assert "mlx | llama" in config.SETTINGS["backend"].help


#: What a backend can do beyond the Session protocol, as the objects offer it (registry capabilities).
CAPABILITY_ATTRIBUTES = {
    "tokenize",
    "tokenizer",
    "token_pieces",
    "budget_on_server",
    "gpu_offload",
    "compute_note",
    "mmproj_path",
    "prefix_state",
    "prefix_identity",
    "fork",
    "cpu_buffers",
    "placement",
    "speculation_report",
    "speculation_target",
}


def test_capabilities_are_asked_of_the_registry_not_of_the_objects():
    """Outside the backends, ``getattr``/``hasattr`` on a loaded model or session for a capability, or
    ``inspect.signature`` of its methods, would be a second way of declaring what a backend can do."""
    # the CLI builds Typer commands' signatures from its own functions' (no backend is looked at there)
    own_signatures = {("qvq_local/cli.py", "_asks_questions")}
    offenders = []
    used: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "qvq_local").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("qvq_local/backends/"):  # a backend may look into its library
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        allowed = [
            range(node.lineno, node.end_lineno + 1)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and (rel, node.name) in own_signatures
        ]
        used |= {
            (rel, node.name) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
        } & own_signatures
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2:
                name = node.args[1]
                if isinstance(name, ast.Constant) and name.value in CAPABILITY_ATTRIBUTES:
                    offenders.append(f"{rel}:{node.lineno}: {func.id}(..., {name.value!r})")
            own = any(node.lineno in lines for lines in allowed)
            if isinstance(func, ast.Attribute) and func.attr == "signature" and not own:
                offenders.append(f"{rel}:{node.lineno}: inspect.signature")
    assert offenders == []
    assert used == own_signatures  # an exemption whose function is gone goes too
    assert any(p.parts[-2] == "bench" for p in (ROOT / "qvq_local").rglob("*.py"))  # bench is scanned too


def test_every_capability_and_hook_is_declared_and_checked():
    for spec in registry.BACKENDS.values():
        assert spec.capabilities <= registry.CAPABILITIES and set(spec.hooks) <= registry.HOOKS
    with pytest.raises(ValueError, match="unknown capabilities"):
        registry.BackendSpec(name="x", module="x", capabilities=frozenset({"telepathy"}))
    with pytest.raises(ValueError, match="unknown hooks"):
        registry.BackendSpec(name="x", module="x", hooks={"warp": "x:y"})
    with pytest.raises(ValueError, match="lower case"):
        registry.BackendSpec(name="Auto Mode", module="x")
    # register() is the one hook: a name or alias another backend has is refused, the same spec again is not
    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(registry, "BACKENDS", dict(registry.BACKENDS))
        extra = registry.BackendSpec(name="extra", module="x", aliases=("more",))
        assert registry.register(extra) is extra and registry.register(extra) is extra
        assert registry.canonical(" MORE ") == "extra" and "extra" in registry.names()
        with pytest.raises(ValueError, match="'gguf' already names llama"):
            registry.register(registry.BackendSpec(name="other", module="x", aliases=("gguf",)))
        with pytest.raises(ValueError, match="already names"):
            registry.register(registry.BackendSpec(name="extra", module="y"))
    finally:
        monkeypatch.undo()
    assert "extra" not in registry.BACKENDS


def test_a_broken_plugin_is_one_warning_line_and_qvq_still_runs(tmp_path):
    import subprocess
    import sys

    (tmp_path / "broken_plugin.py").write_text("def qvq_plugin():\n    raise RuntimeError('no GPU here')\n")
    env = {
        **__import__("os").environ,
        "QVQ_PLUGINS": "broken_plugin, missing_plugin",
        "PYTHONPATH": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-m", "qvq_local.cli", "config", "path"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip()
    assert out.stderr.splitlines() == [
        "warning: plugin broken_plugin not loaded (RuntimeError: no GPU here)",
        "warning: plugin missing_plugin not loaded (ModuleNotFoundError: No module named 'missing_plugin')",
    ]


def _string_tuples(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            words = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            yield words


def test_no_module_keeps_its_own_whitelist():
    """A tuple/list/set literal naming two backends (or a backend and its alias) outside the registry is a
    second copy of the list."""
    names = set(registry.names()) | {a for s in registry.BACKENDS.values() for a in s.aliases}
    offenders = []
    for path in sorted((ROOT / "qvq_local").rglob("*.py")):
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for words in _string_tuples(tree):
            hits = words & names
            # a set of model formats ({"mlx", "gguf", "hf"}) shares two words with the names; a whitelist
            # of backends names another one besides
            if len(hits) >= 2 and hits != {"mlx", "gguf"}:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(hits)}")
    assert offenders == []
