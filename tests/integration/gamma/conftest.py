"""The cluster every GAMMA case runs in: one per package run, torn down after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.conftest import assert_nothing_left, mesh_args, meshlab, unique_name
from tests.integration.gamma.harness import (
    CLUSTER_FILE,
    CONSUMER_NS,
    NS,
    WAYPOINT,
    Case,
    Expect,
    Http,
    converge,
)


@pytest.fixture(scope="package")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Upstream's base manifests, in the mesh, bound to the namespace's waypoint."""
    name = unique_name()
    try:
        meshlab("up", "-f", str(CLUSTER_FILE), "--name", name, *mesh_args())
        for ns in (NS, CONSUMER_NS):
            meshlab("label", "--name", name, "namespace", ns, "istio.io/dataplane-mode=ambient")
        waypoint = tmp_path_factory.mktemp("gamma") / "waypoint.yaml"
        waypoint.write_text(WAYPOINT)
        meshlab("apply", "--name", name, "-f", str(waypoint))
        meshlab("label", "--name", name, "namespace", NS, "istio.io/use-waypoint=waypoint")
        # Through the waypoint: it adds X-Forwarded-Proto, as Istio's does.
        through = Expect(headers={"X-Forwarded-Proto": "http"})
        converge(name, [Case("up", Http(url="http://echo/"), through)], timeout_s=60)
        yield name
    finally:
        meshlab("down", "--name", name, check=False)
        assert_nothing_left(name)
