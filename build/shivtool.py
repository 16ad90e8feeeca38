"""Helpers for build/shiv.sh: the dependency lock, the build id, the build stamp.

Kept in Python (not bash) because these steps need marker evaluation, hashing and JSON:

* ``lock``: resolve ``[project].dependencies`` of pyproject.toml for every supported
  CPython minor version (binary wheels only) and write one pinned requirements file. pip
  supplies versions and metadata; the dependency graph is walked here with markers
  evaluated for every micro release, so a pin that only part of a minor version needs
  (async-timeout below 3.11.3) carries a ``python_full_version`` marker, and one lock
  serves GPU VMs on 3.10, 3.11.2 and 3.13 alike.
* ``select``: the pins of the lock that some micro release of one target minor version
  needs. pip evaluates markers against the interpreter running pip, not against
  ``--python-version``, so the build filters the lock itself and installs the result with
  ``--no-deps``.
* ``requires``: for the artifact's start-up check, which import names each pin provides
  and on which micro releases it is needed.
* ``build-id``: a digest of every input of the artifact. Same inputs, same id, same bytes.
* ``stage-package``: copy the package sources into the staged site-packages.
* ``stamp``: write ``stagerd/_build.py`` into the staged copy of the package.

Run only by build/shiv.sh, with the build interpreter (standard library plus pip).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
LOCK_PLATFORM = "manylinux2014_x86_64"
# Files of the package that never go into the artifact's inputs.
SKIP_PARTS = {"__pycache__"}
SKIP_NAMES = {"_build.py"}


def project_metadata() -> dict[str, object]:
    try:
        import tomllib
    except ImportError:  # Python 3.10 as the build interpreter: pip vendors tomli
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["project"])


# Markers are evaluated for every micro release of a minor version up to this one: a pin
# like async-timeout's ``python_full_version < "3.11.3"`` applies to part of 3.11 only.
MAX_MICRO = 40


def _packaging():  # type: ignore[no-untyped-def]
    try:
        from packaging import markers, requirements
    except ImportError:  # a bare build venv: pip always vendors packaging
        from pip._vendor.packaging import markers, requirements  # type: ignore[no-redef]
    return markers, requirements


def environment(minor: str, micro: int) -> dict[str, str]:
    """The marker environment of CPython *minor*.*micro* on Linux."""
    return {
        "python_version": minor,
        "python_full_version": f"{minor}.{micro}",
        "implementation_name": "cpython",
        "implementation_version": f"{minor}.{micro}",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    }


def resolve(python_version: str, requirements: list[str]) -> dict[str, dict[str, object]]:
    """Ask pip which distributions a fresh install would pick: name -> pip's metadata.

    pip evaluates markers against the interpreter running it, never against
    ``--python-version`` (its report's environment says 3.11.7 when asked for 3.10), so
    this only serves as a source of versions and metadata; :func:`closure` decides which
    distributions each target really needs."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        abi = "cp" + python_version.replace(".", "")
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
            "--ignore-installed", "--report", str(report), "--target", str(Path(tmp, "t")),
            "--python-version", python_version, "--implementation", "cp", "--abi", abi,
            "--platform", LOCK_PLATFORM, "--only-binary=:all:", *requirements,
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        data = json.loads(report.read_text())
    return {_normalise(item["metadata"]["name"]): item["metadata"] for item in data["install"]}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure(
    requirements: list[str], metadata: dict[str, dict[str, object]], env: dict[str, str]
) -> tuple[set[str], list[str]]:
    """Walk the dependency graph from *requirements* with markers evaluated in *env*.

    Returns the needed distribution names, and the requirement strings of those needed
    but missing from *metadata* (pip left them out: their marker was false for pip's own
    interpreter)."""
    _, reqs = _packaging()
    needed: set[str] = set()
    missing: list[str] = []
    todo = [(reqs.Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = _normalise(req.name)
        if name not in metadata:
            missing.append(f"{req.name}{req.specifier}")
            continue
        extras = sorted(req.extras)
        key = f"{name}[{','.join(extras)}]"
        if key in needed:
            continue
        needed.add(key)
        for raw in metadata[name].get("requires_dist") or []:  # type: ignore[attr-defined]
            child = reqs.Requirement(str(raw))
            todo.extend((child, e) for e in extras or [""])
    return {k.split("[", 1)[0] for k in needed}, missing


def resolve_minor(minor: str, requirements: list[str]) -> dict[str, tuple[str, set[int]]]:
    """name -> (version, the micro releases of *minor* that need it)."""
    extra: list[str] = []
    for _ in range(8):
        metadata = resolve(minor, requirements + extra)
        micros: dict[str, set[int]] = defaultdict(set)
        missing: set[str] = set()
        for micro in range(MAX_MICRO + 1):
            names, lacking = closure(requirements, metadata, environment(minor, micro))
            for name in names:
                micros[name].add(micro)
            missing.update(lacking)
        new = sorted(missing - set(extra))
        if not new:
            return {n: (str(metadata[n]["version"]), m) for n, m in micros.items()}
        extra += new
    raise SystemExit(f"shivtool: the dependencies for Python {minor} did not converge")


def _marker_for(where: dict[str, set[int]]) -> str:
    """A marker true exactly on the (minor, micro) points of *where*."""
    terms = []
    for minor in sorted(where, key=lambda v: tuple(map(int, v.split(".")))):
        micros = sorted(where[minor])
        if micros == list(range(MAX_MICRO + 1)):
            terms.append(f'python_version == "{minor}"')
            continue
        start = prev = micros[0]
        for micro in [*micros[1:], None]:
            if micro is not None and micro == prev + 1:
                prev = micro
                continue
            low = f'python_full_version >= "{minor}.{start}"'
            if prev == MAX_MICRO:
                terms.append(f'(python_version == "{minor}" and {low})')
            else:
                terms.append(f'({low} and python_full_version < "{minor}.{prev + 1}")')
            if micro is not None:
                start = prev = micro
    return " or ".join(terms)


def write_lock(path: Path) -> None:
    requirements = [str(r) for r in project_metadata()["dependencies"]]  # type: ignore[attr-defined]
    # name -> version -> minor -> micros that need it
    pins: dict[str, dict[str, dict[str, set[int]]]] = defaultdict(lambda: defaultdict(dict))
    for minor in LOCK_PYTHONS:
        for name, (version, micros) in resolve_minor(minor, requirements).items():
            pins[name][version][minor] = micros
    everywhere = {minor: set(range(MAX_MICRO + 1)) for minor in LOCK_PYTHONS}
    lines = [
        "# The runtime dependencies of stagerd, pinned. Generated by `build/shiv.sh --lock`",
        "# from pyproject.toml [project].dependencies, resolved with pip for CPython",
        f"# {', '.join(LOCK_PYTHONS)} on {LOCK_PLATFORM} (binary wheels only).",
        "# Markers are evaluated for every micro release (python_full_version), not only",
        "# the build interpreter's: a pin needed by part of a minor version says which part.",
        "# build/shiv.sh installs every pin that some release of its target minor needs,",
        "# with --no-deps; the artifact checks at start-up that the running one has its own.",
        lock_inputs_line(),
    ]
    for name in sorted(pins):
        for version in sorted(pins[name]):
            where = pins[name][version]
            marker = "" if where == everywhere else f" ; {_marker_for(where)}"
            lines.append(f"{name}=={version}{marker}")
    path.write_text("\n".join(lines) + "\n")


def lock_inputs_line() -> str:
    requirements = [str(r) for r in project_metadata()["dependencies"]]  # type: ignore[attr-defined]
    return "# Inputs: " + "; ".join(requirements)


def check_fresh(lock: Path) -> None:
    """Exit 2 if pyproject's dependencies changed since *lock* was resolved."""
    if lock_inputs_line() not in lock.read_text().splitlines():
        raise SystemExit(
            f"shiv.sh: {lock} is stale: pyproject.toml [project].dependencies changed; "
            "run build/shiv.sh --lock and commit the result"
        )


def lock_entries(lock: Path, python_version: str) -> list[tuple[str, list[int]]]:
    """``(name==version, micros)`` for the pins of *lock* that some micro release of
    *python_version* (X.Y) needs, with the micros that need it."""
    check_fresh(lock)
    markers, _ = _packaging()
    minor = ".".join(python_version.split(".")[:2])
    entries = []
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, _, marker = (part.strip() for part in line.partition(";"))
        micros = list(range(MAX_MICRO + 1))
        if marker:
            parsed = markers.Marker(marker)
            micros = [m for m in micros if parsed.evaluate(environment(minor, m))]
        if micros:
            entries.append((requirement, micros))
    if not entries:
        raise SystemExit(f"shiv.sh: {lock} has no pins for Python {python_version}")
    return entries


def select(lock: Path, python_version: str) -> list[str]:
    """The ``name==version`` pins of *lock* that an artifact for *python_version* holds:
    every pin some micro release of it needs (one artifact serves 3.11.2 and 3.11.9)."""
    return [requirement for requirement, _ in lock_entries(lock, python_version)]


def import_names(site: Path) -> dict[str, list[str]]:
    """distribution name -> its top-level import names, read from the installed RECORDs."""
    names: dict[str, list[str]] = {}
    for record in sorted(site.glob("*.dist-info/RECORD")):
        dist = _normalise(record.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0])
        tops = set()
        for row in record.read_text().splitlines():
            first = row.split(",", 1)[0].split("/", 1)
            top = first[0]
            if top.endswith((".dist-info", ".data")) or top in {"..", "bin", "__pycache__"}:
                continue
            if len(first) == 1:
                if not top.endswith((".py", ".so")):
                    continue
                top = top.split(".", 1)[0]
            if top.isidentifier():
                tops.add(top)
        names[dist] = sorted(tops)
    return names


def requires(lock: Path, python_version: str, site: Path) -> list[list[object]]:
    """The start-up check's table: ``[requirement, import name, micros]`` for every pin,
    so the artifact can tell, without ``packaging``, what its running Python needs."""
    names = import_names(site)
    table: list[list[object]] = []
    for requirement, micros in lock_entries(lock, python_version):
        dist = _normalise(requirement.split("==", 1)[0])
        for module in names.get(dist, []):
            table.append([requirement, module, micros])
    return table


def _package_files() -> list[Path]:
    files = []
    for path in sorted((ROOT / "stagerd").rglob("*")):
        rel = path.relative_to(ROOT)
        if path.is_dir() or SKIP_PARTS & set(rel.parts) or path.name in SKIP_NAMES:
            continue
        if path.suffix in {".pyc", ".pyo"}:
            continue
        files.append(path)
    return files


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.strip()


def build_id(pins: list[str], target: dict[str, str]) -> str:
    """``g<commit>[-dirty]-<digest>``: the digest covers every input of the artifact."""
    digest = hashlib.sha256()
    for path in _package_files():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    for name in ("build/shiv.sh", "build/shivtool.py", "build/shiv-preamble.py"):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    digest.update(json.dumps({"pins": pins, "target": target}, sort_keys=True).encode())
    commit = _git("rev-parse", "--short=8", "HEAD")
    if not commit:
        return digest.hexdigest()[:16]
    inputs = ["stagerd", "build", "pyproject.toml"]
    dirty = "-dirty" if _git("status", "--porcelain", "--", *inputs) else ""
    return f"g{commit}{dirty}-{digest.hexdigest()[:12]}"


def stage_package(site: Path) -> None:
    """Copy the package sources (exactly the files the build id covers) into *site*."""
    for path in _package_files():
        dest = site / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(path.read_bytes())


def stamp(path: Path, values: dict[str, object]) -> None:
    lines = ['"""Stamped by build/shiv.sh when the artifact was built; not in git."""', ""]
    lines += [f"{key} = {value!r}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shivtool")
    sub = parser.add_subparsers(dest="command", required=True)
    p_lock = sub.add_parser("lock")
    p_lock.add_argument("lock", type=Path)
    p_select = sub.add_parser("select")
    p_select.add_argument("lock", type=Path)
    p_select.add_argument("python_version")
    p_id = sub.add_parser("build-id")
    p_id.add_argument("lock", type=Path)
    p_id.add_argument("target_json")
    p_stamp = sub.add_parser("stamp")
    p_stamp.add_argument("path", type=Path)
    p_stamp.add_argument("values_json")
    p_requires = sub.add_parser("requires")
    p_requires.add_argument("lock", type=Path)
    p_requires.add_argument("python_version")
    p_requires.add_argument("site", type=Path)
    p_stage = sub.add_parser("stage-package")
    p_stage.add_argument("site", type=Path)
    sub.add_parser("version")
    args = parser.parse_args(argv)

    if args.command == "lock":
        write_lock(args.lock)
    elif args.command == "select":
        print("\n".join(select(args.lock, args.python_version)))
    elif args.command == "build-id":
        target = json.loads(args.target_json)
        print(build_id(select(args.lock, target["python_version"]), target))
    elif args.command == "requires":
        print(json.dumps(requires(args.lock, args.python_version, args.site)))
    elif args.command == "stamp":
        stamp(args.path, json.loads(args.values_json))
    elif args.command == "stage-package":
        stage_package(args.site)
    elif args.command == "version":
        print(project_metadata()["version"])
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))
