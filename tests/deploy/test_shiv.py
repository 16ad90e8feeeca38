"""build/shiv.sh and the artifact it makes: reproducible bytes, the build id in --version,
no writable home needed, a refused wrong interpreter, and old extractions pruned."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

from tests.shivbuild import (
    ROOT,
    Artifact,
    build,
    run_shiv_sh,
    session_artifact,
    session_shiv_root,
    sha256_of,
)

PROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
RUNNING = f"{sys.version_info[0]}.{sys.version_info[1]}"


@pytest.fixture(scope="module")
def artifact() -> Artifact:
    return session_artifact()


@pytest.fixture(scope="module")
def shiv_root() -> Path:
    """One extraction shared by the session's tests (see ``first_run``)."""
    return session_shiv_root()


@pytest.fixture(scope="module")
def first_run(artifact: Artifact, shiv_root: Path) -> subprocess.CompletedProcess[str]:
    """The artifact's first start here (unless test_artifact came first): it unpacks and
    compiles everything into the session's SHIV_ROOT."""
    return run_artifact(artifact.path, ["--version"], shiv_root=shiv_root)


def run_artifact(
    artifact: Path,
    args: list[str],
    *,
    shiv_root: Path,
    env: dict[str, str] | None = None,
    python: str | None = None,
) -> subprocess.CompletedProcess[str]:
    # HOME=/dev/null: nothing can be created under it, not even by root, so a run that
    # works proves the artifact needs no writable home.
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/dev/null",
        "SHIV_ROOT": str(shiv_root),
        **(env or {}),
    }
    cmd = [python or sys.executable, str(artifact), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=120)


def test_two_builds_of_the_same_tree_are_byte_identical(artifact: Artifact, tmp_path: Path) -> None:
    again = build(tmp_path / "stagerd", work=tmp_path / "work")
    assert again.build_id == artifact.build_id
    assert again.sha256 == artifact.sha256
    assert (tmp_path / "stagerd").read_bytes() == artifact.path.read_bytes()
    published = (tmp_path / "stagerd.sha256").read_text().split()
    assert published == [artifact.sha256, "stagerd"]


def test_artifact_is_an_executable_zipapp_with_the_stamp(artifact: Artifact) -> None:
    assert os.access(artifact.path, os.X_OK)
    assert artifact.path.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(artifact.path) as zf:
        names = set(zf.namelist())
        stamp = zf.read("site-packages/stagerd/_build.py").decode()
        dates = {info.date_time for info in zf.infolist()}
    assert "site-packages/stagerd/cli.py" in names
    assert "site-packages/bin/stagerd-preamble.py" in names
    assert not any(name.endswith(".pyc") for name in names)
    # Only the S3 service model of botocore's ~450 ships (the others cost start time).
    assert "site-packages/botocore/data/s3/2006-03-01/service-2.json.gz" in names
    assert "site-packages/botocore/data/endpoints.json" in names
    assert not any(name.startswith("site-packages/botocore/data/ec2/") for name in names)
    assert f"BUILD_ID = '{artifact.build_id}'" in stamp
    assert f"PYTHON_VERSION = '{RUNNING}'" in stamp
    # Every entry carries SOURCE_DATE_EPOCH's date, not the build's wall clock.
    assert len(dates) == 1


def test_version_shows_build_id_without_a_writable_home(
    artifact: Artifact, shiv_root: Path, first_run: subprocess.CompletedProcess[str]
) -> None:
    assert first_run.returncode == 0, first_run.stderr
    done = run_artifact(artifact.path, ["--version"], shiv_root=shiv_root)
    assert done.returncode == 0, done.stderr
    assert done.stdout == first_run.stdout
    assert done.stdout.strip() == (
        f"stagerd {PROJECT_VERSION} (build {artifact.build_id}, Python {sys.version.split()[0]})"
    )
    extraction = shiv_root / f"stagerd_{artifact.build_id}"
    assert (extraction / "site-packages" / "stagerd" / "_build.py").is_file()
    # --compile-pyc: the first run compiled everything, so later starts are fast.
    assert list((extraction / "site-packages" / "botocore").glob("__pycache__/*.pyc"))


def test_artifact_runs_modules_with_its_own_libraries(
    artifact: Artifact, shiv_root: Path, first_run: subprocess.CompletedProcess[str]
) -> None:
    code = "import psycopg, boto3, stagerd; print(psycopg.pq.__impl__, stagerd.__file__)"
    done = run_artifact(
        artifact.path, ["-c", code], shiv_root=shiv_root, env={"SHIV_INTERPRETER": "1"}
    )
    assert done.returncode == 0, done.stderr
    impl, location = done.stdout.split()
    assert impl == "binary"
    assert location.startswith(str(shiv_root))


def _fake_extraction(root: Path, build_id: str) -> Path:
    """What an older build leaves under SHIV_ROOT: its tree and shiv's lock file."""
    tree = root / f"stagerd_{build_id}"
    (tree / "site-packages" / "stagerd").mkdir(parents=True)
    (tree / "site-packages" / "stagerd" / "__init__.py").write_text("")
    (root / f".stagerd_{build_id}_lock").write_text("")
    return tree


@pytest.fixture
def held_lock() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def test_old_extractions_are_pruned_unless_in_use(
    artifact: Artifact, tmp_path: Path, held_lock: list[int]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    stale = _fake_extraction(root, "g00000000-aaaaaaaaaaaa")
    running = _fake_extraction(root, "g11111111-bbbbbbbbbbbb")
    # A process of the "running" build holds its extraction (as the preamble does).
    fd = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    held_lock.append(fd)
    fcntl.flock(fd, fcntl.LOCK_SH)
    # An extraction in progress: shiv holds the lock file while it unpacks into .tmp.
    unpacking = root / "stagerd_g22222222-cccccccccccc.tmp"
    unpacking.mkdir()
    lock_fd = os.open(root / ".stagerd_g22222222-cccccccccccc_lock", os.O_RDWR | os.O_CREAT)
    held_lock.append(lock_fd)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    # Not ours: another zipapp's extraction and an unrelated directory.
    (root / "stagerd-tools_deadbeef").mkdir()
    (root / "other").mkdir()
    env = {"SHIV_COMPILE_PYC": "0"}

    done = run_artifact(artifact.path, ["--version"], shiv_root=root, env=env)

    assert done.returncode == 0, done.stderr
    assert not stale.exists()
    assert not (root / ".stagerd_g00000000-aaaaaaaaaaaa_lock").exists()
    assert (running / "site-packages" / "stagerd" / "__init__.py").is_file()
    assert unpacking.is_dir()
    assert (root / "stagerd-tools_deadbeef").is_dir() and (root / "other").is_dir()
    assert (root / f"stagerd_{artifact.build_id}" / "site-packages").is_dir()
    assert not [p for p in root.iterdir() if ".prune-" in p.name]

    # Once the old worker exits, the next start removes its copy too.
    os.close(held_lock.pop(0))
    done = run_artifact(artifact.path, ["--version"], shiv_root=root, env=env)
    assert done.returncode == 0, done.stderr
    assert not running.exists()

    # STAGERD_SHIV_PRUNE=0 keeps everything.
    kept = _fake_extraction(root, "g33333333-dddddddddddd")
    done = run_artifact(
        artifact.path, ["--version"], shiv_root=root, env={**env, "STAGERD_SHIV_PRUNE": "0"}
    )
    assert done.returncode == 0, done.stderr
    assert kept.is_dir()


def _other_python() -> str | None:
    """A CPython of another minor version: on PATH, or installed by pyenv beside ours."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in ("3.12", "3.10", "3.13"):
        if minor == RUNNING:
            continue
        candidates = [shutil.which(f"python{minor}"), f"/usr/bin/python{minor}"]
        candidates += sorted(str(p) for p in pyenv.glob(f"{minor}.*/bin/python{minor}"))
        for found in filter(None, candidates):
            if not Path(found).is_file():
                continue
            if subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
                return found
    return None


def test_wrong_python_is_refused_with_one_line(
    artifact: Artifact, shiv_root: Path, first_run: subprocess.CompletedProcess[str]
) -> None:
    other = _other_python()
    if other is None:
        pytest.skip("no second CPython minor version on this machine")
    # The shared extraction exists already, so this run goes straight to the preamble.
    done = run_artifact(artifact.path, ["--version"], shiv_root=shiv_root, python=other)
    assert done.returncode == 2
    assert f"built for Python {RUNNING}" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_lock_pins_depend_on_the_target_python() -> None:
    sys.path.insert(0, str(ROOT / "build"))
    try:
        import shivtool
    finally:
        sys.path.remove(str(ROOT / "build"))
    lock = ROOT / "build" / "requirements.lock"
    py310 = shivtool.select(lock, "3.10")
    py312 = shivtool.select(lock, "3.12")
    names = {pin.split("==")[0] for pin in py312}
    assert {"boto3", "redis", "typer", "psycopg", "psycopg-binary", "tenacity"} <= names
    assert all("==" in pin and ";" not in pin for pin in py310 + py312)
    # One pin per distribution for any one target, even where versions differ by Python.
    assert len(names) == len(py312)
    assert len({pin.split("==")[0] for pin in py310}) == len(py310)


def test_lock_matches_the_project_dependencies() -> None:
    """A dependency added to pyproject.toml without re-locking fails here, not in prod."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lock_lines = (ROOT / "build" / "requirements.lock").read_text().splitlines()
    assert "# Inputs: " + "; ".join(dependencies) in lock_lines


def test_build_id_changes_with_the_target() -> None:
    ids = set()
    for extra in (
        [],
        ["--python-version", "3.10"],
        ["--platform", "manylinux_2_28_x86_64"],
        ["--interpreter", "/usr/bin/python3.12"],
        ["--aws-services", "all"],
        ["--aws-services", "s3,sts"],
    ):
        done = run_shiv_sh(["--print-build-id", *extra], timeout=120)
        assert done.returncode == 0, done.stderr
        ids.add(done.stdout.strip())
    assert len(ids) == 6


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    done = run_shiv_sh(["--python-version", "twelve", "--work", str(tmp_path)], timeout=60)
    assert done.returncode == 2
    assert "--python-version" in done.stderr
    done = run_shiv_sh(["--frobnicate"], timeout=60)
    assert done.returncode == 2
    assert "unknown argument" in done.stderr


@pytest.mark.slow
def test_cross_build_for_another_python_runs_there(tmp_path: Path) -> None:
    other = _other_python()
    if other is None:
        pytest.skip("no second CPython minor version on this machine")
    version = subprocess.run(
        [other, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = build(
        tmp_path / "stagerd", work=tmp_path / "work", extra=["--python-version", version]
    )
    code = "import psycopg, sys; print(psycopg.pq.__impl__, '%d.%d' % sys.version_info[:2])"
    done = run_artifact(
        target.path,
        ["-c", code],
        shiv_root=tmp_path / "root",
        env={"SHIV_INTERPRETER": "1", "SHIV_COMPILE_PYC": "0"},
        python=other,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["binary", version]
    assert sha256_of(target.path) == target.sha256


def _shivtool():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(ROOT / "build"))
    try:
        import shivtool
    finally:
        sys.path.remove(str(ROOT / "build"))
    return shivtool


def test_lock_follows_full_version_markers() -> None:
    """redis needs async-timeout below Python 3.11.3 only: the 3.11 artifact must carry it
    (Debian 12 runs 3.11.2), 3.12 must not, and the lock says which micro releases need it."""
    shivtool = _shivtool()
    lock = ROOT / "build" / "requirements.lock"
    entries = dict(shivtool.lock_entries(lock, "3.11"))
    timeout_pin = next(pin for pin in entries if pin.startswith("async-timeout=="))
    assert entries[timeout_pin] == [0, 1, 2]
    assert timeout_pin in shivtool.select(lock, "3.10")
    assert not any(pin.startswith("async-timeout==") for pin in shivtool.select(lock, "3.12"))


def test_closure_walks_markers_and_extras_per_micro_release() -> None:
    """The dependency walk (pure logic over pip's metadata) for two 3.11 releases."""
    shivtool = _shivtool()
    metadata = {
        "redis": {"version": "8.1.0", "requires_dist": [
            "async-timeout>=4.0.3; python_full_version < '3.11.3'",
            "hiredis>=3.2.0; extra == 'hiredis'",
        ]},
        "psycopg": {"version": "3.3.9", "requires_dist": [
            'typing-extensions>=4.6; python_version < "3.13"',
            'psycopg-binary==3.3.9; implementation_name != "pypy" and extra == "binary"',
        ]},
        "psycopg-binary": {"version": "3.3.9", "requires_dist": None},
        "typing-extensions": {"version": "4.16.0", "requires_dist": None},
    }  # fmt: skip
    top = ["redis>=5", "psycopg[binary]>=3.1"]
    old, missing_old = shivtool.closure(top, metadata, shivtool.environment("3.11", 2))
    new, missing_new = shivtool.closure(top, metadata, shivtool.environment("3.11", 7))
    assert old == new == {"redis", "psycopg", "psycopg-binary", "typing-extensions"}
    assert missing_old == ["async-timeout>=4.0.3"]
    assert missing_new == []


def test_marker_for_covers_exactly_the_given_releases() -> None:
    shivtool = _shivtool()
    from packaging.markers import Marker

    everything = set(range(shivtool.MAX_MICRO + 1))
    where = {"3.10": everything, "3.11": {0, 1, 2}, "3.12": {5, 6} | (everything - set(range(9)))}
    marker = Marker(shivtool._marker_for(where))
    for minor in ("3.10", "3.11", "3.12", "3.13"):
        for micro in range(shivtool.MAX_MICRO + 1):
            expected = micro in where.get(minor, set())
            assert marker.evaluate(shivtool.environment(minor, micro)) is expected, (minor, micro)


def _debian_python_below_3113() -> str | None:
    """/usr/bin/python3 when it is a 3.11 older than 3.11.3 (Debian 12: 3.11.2)."""
    probe = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:3])"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return None
    major, minor, micro = (int(part) for part in probe.stdout.split())
    return "/usr/bin/python3" if (major, minor) == (3, 11) and micro < 3 else None


def test_artifact_loads_every_role_on_a_distribution_python_below_3113(
    artifact: Artifact, tmp_path: Path
) -> None:
    """The day-one failure on Debian 12: redis-py imports async_timeout on 3.11.2. The
    artifact built here (on 3.11.7) must carry it; selfcheck imports every role's modules;
    and an extraction that lost a locked module is refused in one line naming it."""
    python = _debian_python_below_3113()
    if python is None or RUNNING != "3.11":
        pytest.skip("needs a 3.11 build and /usr/bin/python3 older than 3.11.3")
    root = tmp_path / "shiv-root"
    done = run_artifact(artifact.path, ["selfcheck", "--json"], shiv_root=root, python=python)
    assert done.returncode == 0, done.stderr
    assert '"ok": true' in done.stdout
    site = next(root.glob("stagerd_*/site-packages"))
    shutil.rmtree(site / "async_timeout")
    done = run_artifact(artifact.path, ["--version"], shiv_root=root, python=python)
    assert done.returncode == 2
    assert "lacks async-timeout==" in done.stderr
    assert "(import async_timeout)" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    # 3.11.7 needs no async_timeout, so the same extraction still starts there.
    done = run_artifact(artifact.path, ["--version"], shiv_root=root)
    assert done.returncode == 0, done.stderr


def test_selfcheck_names_a_module_that_does_not_load(artifact: Artifact, tmp_path: Path) -> None:
    root = tmp_path / "shiv-root"
    done = run_artifact(artifact.path, ["selfcheck"], shiv_root=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("selfcheck: ok (")
    site = next(root.glob("stagerd_*/site-packages"))
    (site / "stagerd" / "metrics.py").write_text("import no_such_module_here\n")
    done = run_artifact(artifact.path, ["selfcheck"], shiv_root=root)
    assert done.returncode == 1
    assert "stagerd.metrics does not load: ModuleNotFoundError" in done.stderr
    assert "no_such_module_here" in done.stderr
    assert "Traceback" not in done.stderr


def test_shiv_sh_prepares_its_own_build_environment_on_a_fresh_clone(tmp_path: Path) -> None:
    """No project venv yet (a fresh clone): shiv.sh must not fall back to a system Python
    without shiv; it makes build/work/buildenv (here under --work) and builds."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"BUILD_PYTHON", "VIRTUAL_ENV", "PYTHONPATH"}
    }
    env["STAGERD_VENV"] = str(tmp_path / "no-venv-here")
    env["STAGERD_WHEELHOUSE"] = str(ROOT / "build" / "work" / "wheels")
    env["PATH"] = "/usr/bin:/bin"  # the system python3, which has no shiv
    out = tmp_path / "dist" / "stagerd"
    done = subprocess.run(
        ["bash", str(ROOT / "build" / "shiv.sh"), "-o", str(out), "--work", str(tmp_path / "w"),
         "--python-version", RUNNING],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "preparing the build environment" in done.stderr
    assert (tmp_path / "w" / "buildenv" / "bin" / "python").is_file()
    assert out.is_file()
    assert (tmp_path / "dist" / "stagerd.sha256").read_text().split()[0] == sha256_of(out)
