"""``python -m mesh.hbone serve`` and ``forward``: the operator's probe, end to end."""

# ruff: noqa: ASYNC220 - starting a process does not block the loop for long

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.envoy import free_port
from tests.unit.hbone.conftest import Pki, Upstream, echo, run
from tests.unit.hbone.test_tunnel import talk


def write(tmp: Path, name: str, pki: Pki) -> list[str]:
    identity = getattr(pki, name)
    (tmp / f"{name}.pem").write_bytes(identity.chain_pem)
    (tmp / f"{name}.key").write_bytes(identity.key_pem)
    (tmp / "ca.pem").write_bytes(identity.roots_pem)
    return [
        "--cert",
        str(tmp / f"{name}.pem"),
        "--key",
        str(tmp / f"{name}.key"),
        "--ca",
        str(tmp / "ca.pem"),
    ]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        p.terminate()
        p.communicate(timeout=10)  # also closes the pipes


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_serve_and_forward_carry_a_connection(
    pki: Pki, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    hbone, local = free_port(), free_port()

    async def body() -> None:
        async with Upstream(echo) as up:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mesh.hbone",
                        "serve",
                        "--listen",
                        f"127.0.0.1:{hbone}",
                        *write(tmp_path, "server", pki),
                    ],
                    text=True,
                    stderr=subprocess.PIPE,
                )
            )
            await wait_port(hbone)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "mesh.hbone",
                        "forward",
                        "--listen",
                        f"127.0.0.1:{local}",
                        "--peer",
                        f"127.0.0.1:{hbone}",
                        "--target",
                        up.authority,
                        "--peer-identity",
                        "spiffe://cluster.local/ns/server/sa/server",
                        *write(tmp_path, "client", pki),
                    ],
                    text=True,
                    stderr=subprocess.PIPE,
                )
            )
            await wait_port(local)
            assert await talk(local, b"through the probe") == b"through the probebye 17"

    run(body)


def test_forward_names_the_identity_it_expected(
    pki: Pki, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    hbone, local = free_port(), free_port()

    async def body() -> None:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mesh.hbone",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{hbone}",
                    *write(tmp_path, "server", pki),
                ],
                text=True,
            )
        )
        await wait_port(hbone)
        forward = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mesh.hbone",
                "forward",
                "--listen",
                f"127.0.0.1:{local}",
                "--peer",
                f"127.0.0.1:{hbone}",
                "--target",
                "127.0.0.1:9",
                "--peer-identity",
                "spiffe://cluster.local/ns/server/sa/other",
                *write(tmp_path, "client", pki),
            ],
            text=True,
            stderr=subprocess.PIPE,
        )
        procs.append(forward)
        await wait_port(local)
        try:
            reply = await talk(local, b"x")
        except ConnectionResetError:
            reply = b""  # the forwarder resets the connection it could not tunnel
        assert reply == b""
        forward.terminate()
        _, err = forward.communicate(timeout=10)
        assert "spiffe://cluster.local/ns/server/sa/other" in err
        assert "presented identity spiffe://cluster.local/ns/server/sa/server" in err

    run(body)


def test_bad_files_are_refused_with_a_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mesh.hbone",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(tmp_path / "nope.pem"),
            "--key",
            str(tmp_path / "nope.key"),
            "--ca",
            str(tmp_path / "ca.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert "nope.pem" in done.stderr
