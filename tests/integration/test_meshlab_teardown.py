"""Teardown leaves nothing: after a clean run, a crash, a lost state file, a failed up."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml

from mesh.cluster.statefile import cluster_dir
from tests.integration.conftest import (
    MESHLAB,
    assert_nothing_left,
    http_get,
    leftovers,
    meshlab,
    status,
)


def test_down_removes_every_namespace_link_and_process(cluster_name: str) -> None:
    meshlab("up", "--name", cluster_name, "--nodes", "2", "--pods-per-node", "2")
    left = leftovers(cluster_name)
    assert len(left["netns"]) == 2 + 4
    assert len(left["links"]) == 1 + 2  # bridge and one uplink per node
    assert len(left["processes"]) == 4
    out = meshlab("down", "--name", cluster_name)
    assert f"cluster {cluster_name!r} is down" in out.stderr
    assert_nothing_left(cluster_name)
    again = meshlab("down", "--name", cluster_name)
    assert "nothing to remove" in again.stderr


def test_down_cleans_up_after_meshlab_is_killed_mid_up(cluster_name: str) -> None:
    up = subprocess.Popen(
        [MESHLAB, "up", "--name", cluster_name, "--nodes", "2", "--pods-per-node", "8"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = cluster_dir(cluster_name) / "state.json"
    deadline = time.monotonic() + 60
    started = 0
    while time.monotonic() < deadline and up.poll() is None:
        try:
            started = sum(1 for p in json.loads(state.read_text())["pods"] if "pid" in p)
        except (OSError, ValueError):
            started = 0
        if started >= 3:
            break
        time.sleep(0.02)
    up.send_signal(signal.SIGKILL)
    up.wait()
    assert started >= 3, "the up finished before it could be interrupted"
    assert leftovers(cluster_name)["processes"], "the interrupted up had started pods"

    refused = meshlab("up", "--name", cluster_name, "--nodes", "1", check=False)
    assert refused.returncode == 1 and "already exists" in refused.stderr

    meshlab("down", "--name", cluster_name)
    assert_nothing_left(cluster_name)


def test_down_works_without_the_state_file(cluster_name: str) -> None:
    meshlab("up", "--name", cluster_name, "--nodes", "2", "--pods-per-node", "1")
    shutil.rmtree(cluster_dir(cluster_name))
    assert leftovers(cluster_name)["processes"]
    meshlab("down", "--name", cluster_name)
    assert_nothing_left(cluster_name)


def test_a_failed_up_removes_what_it_made(cluster_name: str, tmp_path: Path) -> None:
    spec = {
        "nodes": [{"name": "node1"}, {"name": "node2"}],
        "pods": [
            {"name": "ok", "node": "node1", "command": ["sleep", "infinity"]},
            {"name": "broken", "node": "node2", "command": ["no-such-program-xyz"]},
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = meshlab("up", "-f", str(path), "--name", cluster_name, check=False)
    assert done.returncode == 1
    assert "no-such-program-xyz" in done.stderr and "not found" in done.stderr
    assert_nothing_left(cluster_name)


def test_two_clusters_coexist(cluster_name: str) -> None:
    other = cluster_name[:-1] + ("x" if cluster_name[-1] != "x" else "y")
    try:
        meshlab("up", "--name", cluster_name, "--nodes", "1", "--pods-per-node", "2")
        meshlab("up", "--name", other, "--nodes", "1", "--pods-per-node", "2")
        a, b = status(cluster_name), status(other)
        assert a["network"]["underlay"] != b["network"]["underlay"]
        # Same pod CIDRs in both: each cluster is sealed off in its own namespaces.
        assert {p["ip"] for p in a["pods"]} == {p["ip"] for p in b["pods"]}
        no_default = meshlab("status", check=False)
        assert no_default.returncode == 1 and "pick one with --name" in no_default.stderr

        meshlab("down", "--name", cluster_name)
        assert_nothing_left(cluster_name)
        b_pod = b["pods"][0]
        reply = http_get(other, b["pods"][1]["name"], f"http://{b_pod['ip']}:8080/")
        assert reply["pod"] == b_pod["name"]
        assert status(other)["phase"] == "Running"
    finally:
        meshlab("down", "--name", other, check=False)
    assert_nothing_left(other)
