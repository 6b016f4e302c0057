"""The package's floors: every module has one, imports only from its own floor or below, and no two modules
import each other in a circle (lazy imports inside functions count too).

The floors are the architecture in one table (README's "How it is built" draws it: ``python
tests/test_layers.py`` prints the picture, and a test checks README holds it).  A new module gets a line
here; a test failing here means an import runs the wrong way: move the shared piece down (a helper two
floors need goes to the lower one), never the importer up.  ``convert/`` is installed as
``qvq_local.convert`` and is read under that name, as Python imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: floor -> the modules on it (a name ending in ``.*`` is a package and everything in it).
FLOORS: dict[int, tuple[str, ...]] = {
    # leaves: import nothing of the package above themselves
    1: (
        "errors",
        "atomic",
        "events",
        "boxed",
        "cpu",
        "build_flags",
        "units",
        "budgets",
        "plugins",
        "strict_json",
        "conversation",
        "formats",
        "formats.*",
    ),
    # declarations: what a family is, what a backend is and can do (data, no behaviour of theirs)
    2: ("families", "families.*", "backends", "backends.base", "backends.options", "backends.registry"),
    # model facts in use: images, the prompt, the language of a question
    3: ("images", "prompt", "lang", "detail", "video", "video_prompt"),
    # the model store: settings file, the machine, references, downloads, the catalogue, fit, checks
    4: ("config", "hardware", "models", "hub", "hub_transfer", "catalogue", "fit", "integrity"),
    # mechanism: the backends (tokens in, tokens out)
    5: ("backends.*", "speculate", "speculate.*"),
    # policy: when thinking ends, chains and their vote, prefix reuse, one question's settings
    6: ("reasoning", "splitter", "loops", "chains", "prefix_cache", "settings"),
    # the API
    7: ("api", "", "model", "question", "driver"),
    # presentation and tools
    8: (
        "render",
        "openai_format",
        "transcript",
        "serve",
        "serve.*",
        "doctor",
        "selftest",
        "batch",
        "bench",
        "bench.*",
        "convert",
        "convert.*",
    ),
    # the command line
    9: ("cli", "ask_cmd", "batch_cmd"),
}


#: what each floor is for, as the README's picture names it
FLOOR_NAMES: dict[int, str] = {
    1: "leaves",
    2: "declarations",
    3: "model facts in use",
    4: "the model store",
    5: "mechanism: tokens",
    6: "policy",
    7: "the API",
    8: "presentation, tools",
    9: "the command line",
}


def floors_picture(width: int = 108) -> str:
    """The floors as the README draws them, top floor first: each floor's modules, a package as ``name/``
    (its modules one by one where some of them sit on another floor)."""
    exact = {name for names in FLOORS.values() for name in names if not name.endswith(".*")}
    modules = sorted(m.removeprefix("qvq_local.") for m in _modules() if m != "qvq_local")
    lines: list[str] = []
    for floor in sorted(FLOORS, reverse=True):
        names: list[str] = []
        for name in FLOORS[floor]:
            if not name.endswith(".*"):
                names.append("qvq_local" if name == "" else name.replace(".", "/"))
                continue
            package = name[:-2]
            if package in names:
                names.remove(package)  # the package and its modules: one entry
            if any(e.startswith(package + ".") for e in exact):
                names += [
                    m.replace(".", "/") for m in modules if m.startswith(package + ".") and m not in exact
                ]
            else:
                names.append(package + "/")
        head = f"{floor}  {FLOOR_NAMES[floor]:<21}"
        line = head
        for i, name in enumerate(names):
            piece = name + (", " if i < len(names) - 1 else "")
            if len(line) + len(piece) > width:
                lines.append(line.rstrip())
                line = " " * len(head)
            line += piece
        lines += [line, "   │" if floor > 1 else ""]
    return "\n".join(lines).rstrip() + "\n"


def _modules() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder, package in (("qvq_local", "qvq_local"), ("convert", "qvq_local.convert")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _resolve(name: str, files: dict[str, Path]) -> str | None:
    if name.startswith("convert"):
        name = "qvq_local." + name
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def _edges(files: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [f"{base}.{a.name}" for a in node.names] or [base]
            for name in names:
                target = _resolve(name, files)
                # a package's own __init__ is not an edge of its modules (Python runs it first anyway)
                if target and target != module and not module.startswith(target + "."):
                    edges[module].add(target)
    return edges


def _floor_of(module: str) -> int | None:
    short = module.removeprefix("qvq_local").removeprefix(".")
    best: tuple[int, int] | None = None  # (specificity, floor)
    for floor, names in FLOORS.items():
        for name in names:
            if name.endswith(".*"):
                hit = short.startswith(name[:-1])
                rank = len(name) - 2
            else:
                hit = short == name
                rank = len(name) + 1000  # an exact name beats a package pattern
            if hit and (best is None or rank > best[0]):
                best = (rank, floor)
    return None if best is None else best[1]


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    missing = sorted(m for m in _modules() if _floor_of(m) is None)
    assert not missing, f"modules with no floor in tests/test_layers.py FLOORS: {missing}"


def test_no_import_runs_up_a_floor():
    files = _modules()
    upward = [
        f"{m} (floor {_floor_of(m)}) imports {t} (floor {_floor_of(t)})"
        for m, targets in sorted(_edges(files).items())
        for t in sorted(targets)
        if (_floor_of(t) or 0) > (_floor_of(m) or 0)
    ]
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)


def test_no_import_circle():
    assert _circles(_edges(_modules())) == []


def test_the_checks_see_a_planted_circle_and_an_upward_import():
    """The graph code itself: a lazy import inside a function is an edge, and a cycle is found."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _circles(edges) == [["a", "b", "c"]]
    files = _modules()
    api = files["qvq_local.api"]
    tree_edges = _edges(files)["qvq_local.api"]
    # api.load imports hub inside the function: still an edge
    assert "qvq_local.hub" in tree_edges and "import hub" not in api.read_text().split("def load")[0]
    assert _floor_of("qvq_local.backends.llamacpp") == 5 and _floor_of("qvq_local.backends.registry") == 2
    assert _floor_of("qvq_local.convert.to_gguf") == 8 and _floor_of("qvq_local") == 7


def test_readme_draws_the_floors():
    """README's picture of the package is this table's (regenerate it with ``python tests/test_layers.py``)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert floors_picture() in readme, "README's floors picture is stale: run python tests/test_layers.py"


if __name__ == "__main__":
    print(floors_picture(), end="")
