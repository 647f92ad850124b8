"""The container image (``make image``, ``deploy/Containerfile``), run in a real runtime.

podman runs it with runc, as on these machines (`--ulimit host` and a
containers.conf with ``default_ulimits = []``: the sandbox refuses raising
rlimits); no network. Skipped, with the reason, where podman or the image is
missing: ``make test`` builds the image first when run as root (CI).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.unit.deploy.render import containers, render

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/ambient-mesh:0.1.0"


def _version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def _programs() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return sorted(tomllib.load(f)["project"]["scripts"])


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (`make image` installs it)")
    found = subprocess.run(["podman", "image", "exists", IMAGE], check=False)
    if found.returncode != 0:
        pytest.skip(f"the image {IMAGE} is not built (`make image`)")
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return ["env", f"CONTAINERS_CONF={conf}", "podman"]


def run_in_image(podman: list[str], script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*podman, "run", "--rm", "--runtime", "runc", "--ulimit", "host", "--network", "none",
         IMAGE, "sh", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_every_program_runs_from_the_image_as_uid_1337(podman: list[str]) -> None:
    programs = _programs()
    checks = " ".join(
        # The CNI plugin speaks CNI, not --help: ask it its versions, as a runtime would.
        f"(CNI_COMMAND=VERSION {p} > /dev/null && echo ok {p}) || echo FAIL {p};"
        if p == "ztunnel-cni"
        else f"({p} --help > /dev/null && echo ok {p}) || echo FAIL {p};"
        for p in programs
    )
    done = run_in_image(podman, f"id -u; {checks}")
    assert done.returncode == 0, done.stderr
    uid, *results = done.stdout.split("\n")
    assert uid == "1337"
    assert sorted(r for r in results if r) == sorted(f"ok {p}" for p in programs), done.stdout


def test_the_image_has_what_the_data_plane_drives_and_no_build_tools(podman: list[str]) -> None:
    done = run_in_image(
        podman,
        "for t in iptables-restore iptables-save ip; do command -v $t || echo MISSING $t; done;"
        "for t in gcc cc pip pip3; do command -v $t && echo PRESENT $t; done; true",
    )
    assert "MISSING" not in done.stdout and "PRESENT" not in done.stdout, done.stdout


def test_the_image_is_labelled_with_its_version_and_source(podman: list[str]) -> None:
    out = subprocess.run(
        [*podman, "image", "inspect", IMAGE], capture_output=True, text=True, check=True
    )
    labels = json.loads(out.stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.version"] == _version()
    assert labels["org.opencontainers.image.source"].startswith("https://")


def test_every_command_the_manifests_run_is_in_the_image(podman: list[str]) -> None:
    commands = sorted(
        {c["command"][0] for _, c in containers(render("default")) if c.get("command")}
    )
    assert commands, "the manifests name no command"
    done = run_in_image(podman, " ".join(f"command -v {c} || echo MISSING {c};" for c in commands))
    assert "MISSING" not in done.stdout, done.stdout
