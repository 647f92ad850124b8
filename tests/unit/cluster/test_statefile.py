"""The state file: versioned, whole-document writes that readers can follow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh.cluster import Cluster, StateFileError, parse_spec
from mesh.cluster.statefile import list_clusters, read_state, state_path, update_state, write_state


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MESHLAB_STATE_DIR", str(tmp_path))
    return tmp_path


def cluster(name: str = "c1") -> Cluster:
    return parse_spec({"name": name, "nodes": [{"name": "n1"}], "namespaces": [{"name": "app"}]})


def test_every_write_bumps_the_resource_version() -> None:
    first = write_state(cluster())
    assert first.resource_version == 1
    relabelled = update_state("c1", lambda c: c.with_namespace_labels("app", {"x": "y"}))
    assert relabelled.resource_version == 2
    loaded = read_state("c1")
    assert loaded.resource_version == 2
    assert dict(loaded.namespace("app").labels) == {"x": "y"}


def test_writes_replace_the_file_whole(state_dir: Path) -> None:
    write_state(cluster())
    write_state(cluster())
    leftovers = [p.name for p in (state_dir / "c1").iterdir() if p.name != "state.json"]
    assert leftovers == []
    assert json.loads(state_path("c1").read_text())["resourceVersion"] == 2


def test_list_clusters_and_missing_cluster() -> None:
    write_state(cluster("b"))
    write_state(cluster("a"))
    assert list_clusters() == ["a", "b"]
    with pytest.raises(StateFileError, match="no cluster named 'zz'"):
        read_state("zz")


def test_a_corrupt_state_file_is_reported_with_its_path() -> None:
    write_state(cluster())
    state_path("c1").write_text("{not json")
    with pytest.raises(StateFileError, match=r"state\.json"):
        read_state("c1")
    state_path("c1").write_text(json.dumps({"nodes": []}))
    with pytest.raises(StateFileError, match="at least one node"):
        read_state("c1")
