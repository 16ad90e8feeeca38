"""ansible/: lint (production profile), syntax, and a real run of the GPU playbook against a
throw-away root prefix on this machine, twice: the second run must change nothing.

The run uses ``connection: local`` with the volume, user and service tasks switched off
by variables (there is no data device to format and no systemd PID 1 here); everything
else, the artifact copy, model sync, env file and units, really happens under the prefix.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.shivbuild import ROOT, Artifact, session_artifact

ANSIBLE_DIR = ROOT / "ansible"
ROLE = ANSIBLE_DIR / "roles" / "stagerd"
PACKAGING = ROOT / "packaging"
VENV_BIN = Path(sys.executable).parent
HAVE_RSYNC = shutil.which("rsync") is not None
SECRETS = {
    "stagerd_s3_access_key": "AKIA-test-access-4f1c",
    "stagerd_s3_secret_key": "s3-secret-9b7e2d",
    "stagerd_redis_url": "redis://:redis-secret-5a1f@127.0.0.1:6379/15",
    "stagerd_database_url": "postgresql://postgres:pg-secret-77c3@127.0.0.1:5432/postgres",
}
SECRET_WORDS = ("AKIA-test-access-4f1c", "s3-secret-9b7e2d", "redis-secret-5a1f", "pg-secret-77c3")
RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.M,
)

pytestmark = pytest.mark.skipif(
    not (VENV_BIN / "ansible-playbook").exists(), reason="ansible-core is not installed"
)


def ansible_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
    }


def recap(output: str) -> dict[str, dict[str, int]]:
    return {
        m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"}
        for m in RECAP.finditer(output)
    }


@dataclass(frozen=True)
class Deployment:
    prefix: Path
    models_src: Path
    artifact: Artifact
    first: subprocess.CompletedProcess[str]
    second: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """gpu.yml applied twice to localhost with everything under a throw-away prefix."""
    base = tmp_path_factory.mktemp("ansible")
    artifact = session_artifact()
    dist = base / "dist"
    dist.mkdir()
    shutil.copy(artifact.path, dist / "stagerd")
    shutil.copy(artifact.path.with_name("stagerd.sha256"), dist / "stagerd.sha256")
    models_src = base / "models-src"
    (models_src / "whisperx").mkdir(parents=True)
    (models_src / "whisperx" / "model.bin").write_bytes(b"\x00weights" * 1000)
    (models_src / "gemma.json").write_text('{"layers": 42}\n')
    prefix = base / "root"
    host_vars: dict[str, Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "stagerd_root_prefix": str(prefix),
        "stagerd_manage_volume": False,
        "stagerd_manage_services": False,
        "stagerd_manage_user": False,
        "stagerd_user": "root",
        "stagerd_group": "root",
        "stagerd_artifact_src": str(dist / "stagerd"),
        "stagerd_s3_endpoint": "http://127.0.0.1:8333",
        "model_source_path": str(models_src),
        "stagerd_sync_models": HAVE_RSYNC,
        "stagerd_env": {"STAGERD_PROCESSOR": "/usr/bin/python3 -m stagerd.samples.wavinfo"},
        **SECRETS,
    }
    inventory = base / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump({"all": {"children": {"gpu_workers": {"hosts": {"gpu-local": host_vars}}}}})
    )
    env = ansible_env(base / "ansible-home")
    cmd = [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "gpu.yml"]
    # -v on the first run prints every task result: secrets must still not appear.
    first = subprocess.run(
        [*cmd, "-v"], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=300
    )
    second = subprocess.run(
        cmd, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=300
    )
    return Deployment(prefix, models_src, artifact, first, second)


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--offline", "--profile", "production"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


def test_playbooks_pass_syntax_check_with_the_example_inventory(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(VENV_BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            "inventory/example",
            "site.yml",
        ],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "playbook: site.yml" in done.stdout


def test_first_run_deploys_and_second_run_changes_nothing(deployment: Deployment) -> None:
    first, second = deployment.first, deployment.second
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr
    assert recap(first.stdout)["gpu-local"]["changed"] > 0
    assert recap(second.stdout) == {
        "gpu-local": {
            **recap(second.stdout)["gpu-local"],
            "changed": 0,
            "failed": 0,
            "unreachable": 0,
        }
    }
    # Handlers only run on change: none were notified the second time.
    assert "RUNNING HANDLER" not in second.stdout


def test_secrets_never_reach_the_output(deployment: Deployment) -> None:
    for run in (deployment.first, deployment.second):
        for word in SECRET_WORDS:
            assert word not in run.stdout + run.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_artifact_installed_verified_and_executable(deployment: Deployment) -> None:
    installed = deployment.prefix / "usr/local/bin/stagerd"
    assert installed.read_bytes() == deployment.artifact.path.read_bytes()
    assert mode(installed) == 0o755
    # The role ran the installed artifact: its --version names the build.
    assert deployment.artifact.build_id in deployment.first.stdout


def test_env_file_is_private_and_complete(deployment: Deployment) -> None:
    env_file = deployment.prefix / "etc/stagerd/stagerd.env"
    assert mode(env_file) == 0o600
    if os.geteuid() == 0:  # root's: the processor runs as the services' user
        assert env_file.stat().st_uid == 0
    assert mode(env_file.parent) == 0o750
    lines = [ln for ln in env_file.read_text().splitlines() if ln and not ln.startswith("#")]
    values = dict(line.split("=", 1) for line in lines)
    assert values == {
        "S3_ENDPOINT": "http://127.0.0.1:8333",
        "S3_ACCESS_KEY": SECRETS["stagerd_s3_access_key"],
        "S3_SECRET_KEY": SECRETS["stagerd_s3_secret_key"],
        "S3_BUCKET": "audio-archives",
        "REDIS_URL": SECRETS["stagerd_redis_url"],
        "DATABASE_URL": SECRETS["stagerd_database_url"],
        "STAGERD_SCRATCH_DIR": "/data/scratch",
        "STAGERD_PROCESSOR": "/usr/bin/python3 -m stagerd.samples.wavinfo",
    }


def test_units_equal_the_packaging_files(deployment: Deployment) -> None:
    etc = deployment.prefix / "etc"
    installed = {
        "stagerd-gpu.service": etc / "systemd/system/stagerd-gpu.service",
        "stagerd-janitor.service": etc / "systemd/system/stagerd-janitor.service",
        "stagerd-janitor.timer": etc / "systemd/system/stagerd-janitor.timer",
        "stagerd-tmpfiles.conf": etc / "tmpfiles.d/stagerd.conf",
    }
    for name, path in installed.items():
        # The test deploys as root (it creates no user); everything else is verbatim.
        expected = (PACKAGING / name).read_text()
        expected = expected.replace("User=stagerd\n", "User=root\n")
        expected = expected.replace("Group=stagerd\n", "Group=root\n")
        assert path.read_text() == expected, name
        assert mode(path) == 0o644
    # Timer chosen: no cron entry, and no transfer unit on a GPU VM.
    assert not (etc / "cron.d/stagerd").exists()
    assert not (etc / "systemd/system/stagerd-transfer.service").exists()


def test_data_layout_and_models_synced(deployment: Deployment) -> None:
    data = deployment.prefix / "data"
    assert mode(data / "models") == 0o755
    assert mode(data / "scratch") == 0o750
    if not HAVE_RSYNC:
        pytest.skip("no rsync on this machine: the model sync was switched off")
    assert (data / "models/whisperx/model.bin").read_bytes() == (
        deployment.models_src / "whisperx/model.bin"
    ).read_bytes()
    assert (data / "models/gemma.json").read_text() == '{"layers": 42}\n'
    assert mode(deployment.prefix / "var/cache/stagerd") == 0o750
    # Nothing reached the real system: fstab untouched, no volume tasks ran.
    assert not (deployment.prefix / "etc/fstab").exists()
    assert "Create the filesystem" not in deployment.first.stdout


def render_role_template(name: str, overrides: dict[str, Any] | None = None) -> str:
    """Render a role template with the role's defaults as the template module does."""
    import jinja2

    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    context = {**defaults, **(overrides or {})}
    env = jinja2.Environment(
        trim_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    return env.from_string((ROLE / "templates" / f"{name}.j2").read_text()).render(context)


@pytest.mark.parametrize(
    "name",
    [
        "stagerd-transfer.service",
        "stagerd.cron",
        "stagerd-gpu.service",
        "stagerd-janitor.service",
        "stagerd-janitor.timer",
        "stagerd-tmpfiles.conf",
    ],
)
def test_every_template_renders_to_its_packaging_file_by_default(name: str) -> None:
    assert render_role_template(name) == (PACKAGING / name).read_text()


def test_templates_follow_the_variables() -> None:
    unit = render_role_template(
        "stagerd-gpu.service",
        {
            "stagerd_drain_timeout": 1200,
            "stagerd_scratch_dir": "/scratch",
            "stagerd_bin": "/opt/stagerd/bin/stagerd",
            "stagerd_gpu_concurrency": 2,
        },
    )
    assert "ExecStart=/opt/stagerd/bin/stagerd gpu --concurrency 2 --drain-timeout 1200\n" in unit
    assert "TimeoutStopSec=1260\n" in unit
    assert "ReadWritePaths=/scratch\n" in unit
