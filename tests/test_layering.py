"""The architecture as a test: which package may import which (README "Architecture").

An AST walk over every module of ``stagerd/`` (imports inside functions and under
``TYPE_CHECKING`` count too: a lazy import is still a dependency). The rules:

- each module belongs to one layer: foundation < edges < roles < commands < cli;
- a module never imports from a higher layer;
- an edge (one package per external service or resource) never imports another edge,
  and a role never imports another role: they meet only in the layer above;
- a third-party service library is imported only by its edge (boto3/botocore by ``s3``,
  redis by ``queue``, psycopg by ``db``), plus ``ops.selfcheck``, whose job is to check that
  every library loads.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "stagerd"

FOUNDATION = {
    "__init__",
    "_build",
    "errors",
    "units",
    "ids",
    "job",
    "log",
    "metrics",
    "retry",
    "progress",
    "liveness",
    "shutdown",
    "results",
    "recovery",
    "streams",
    "config",
    "fastexit",
}
EDGES = {"s3", "queue", "db", "scratch", "archive", "processor"}
ROLES = {"gpu", "transfer", "janitor", "ops", "stage", "samples"}
LAYER = {
    **dict.fromkeys(FOUNDATION, 0),
    **dict.fromkeys(EDGES, 1),
    **dict.fromkeys(ROLES, 2),
    "commands": 3,
    "cli": 4,
    "__main__": 4,
}
NAMES = {0: "foundation", 1: "edge", 2: "role", 3: "commands", 4: "cli"}
LIBRARIES = {
    "boto3": "s3",
    "botocore": "s3",
    "mypy_boto3_s3": "s3",
    "redis": "queue",
    "psycopg": "db",
    "psycopg_pool": "db",
}
# Deliberate exceptions, each with its reason; the test fails if one is no longer needed.
ALLOWED: dict[tuple[str, str], str] = {
    ("stage", "gpu"): "the seed's API path, a facade",
}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts), path


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every module name imported by *path*, with its line (``from stagerd import x`` -> x)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "stagerd":
                # from stagerd import x: a submodule, or a name of stagerd/__init__.py itself
                for alias in node.names:
                    sub = ROOT / alias.name
                    is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                    yield f"stagerd.{alias.name}" if is_module else "stagerd", node.lineno
            else:
                yield node.module, node.lineno


def _top(module: str) -> str:
    """The first component below ``stagerd`` (``s3.fetch`` -> ``s3``)."""
    return module.split(".", maxsplit=1)[0]


def violations() -> list[str]:
    found = []
    used_exceptions = set()
    for name, path in _modules():
        own = _top(name)
        assert own in LAYER, f"stagerd/{own} has no layer: add it to the README's picture"
        for imported, line in _imports(path):
            where = f"stagerd/{path.relative_to(ROOT)}:{line}"
            root = imported.split(".")[0]
            if root in LIBRARIES:
                edge = LIBRARIES[root]
                if own != edge and name != "ops.selfcheck":
                    key = (name, root)
                    if key in ALLOWED:
                        used_exceptions.add(key)
                        continue
                    found.append(f"{where}: {root} belongs to the {edge} edge")
                continue
            if root != "stagerd" or imported == "stagerd":
                continue
            other = _top(imported.removeprefix("stagerd."))
            if other == own:
                continue
            key = (name, other)
            mine, theirs = LAYER[own], LAYER.get(other)
            assert theirs is not None, f"{where}: imports unknown stagerd.{other}"
            bad = None
            if theirs > mine or (theirs == mine and mine in (1, 2)):
                bad = f"{NAMES[mine]} {own} imports {NAMES[theirs]} {other}"
            if bad:
                if key in ALLOWED:
                    used_exceptions.add(key)
                else:
                    found.append(f"{where}: {bad}")
    found += [
        f"exception {k} is no longer needed: remove it" for k in ALLOWED.keys() - used_exceptions
    ]
    return found


def test_imports_follow_the_layers() -> None:
    assert violations() == []


def test_every_package_has_a_layer() -> None:
    tops = {_top(name) for name, _ in _modules()}
    assert tops <= LAYER.keys(), sorted(tops - LAYER.keys())


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from stagerd.gpu.pipeline import x\n", "edge s3 imports role gpu"),
        ("from stagerd.queue import keys\n", "edge s3 imports edge queue"),
        ("import redis\n", "redis belongs to the queue edge"),
    ],
)
def test_the_checker_catches_a_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str
) -> None:
    # The rules must be able to fail: plant one bad import in a copy of an edge module.
    fake = tmp_path / "stagerd"
    (fake / "s3").mkdir(parents=True)
    (fake / "s3" / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake)
    assert any(expected in v for v in violations())
