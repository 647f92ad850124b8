"""``waypoint-ctl explain``: the waypoint's own decision, from a config dump, explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.l7world import CANARY, world
from tests.support.waypoint_harness import config_for
from waypoint import ctl
from waypoint.config.dump import config_dump, config_from_dump
from waypoint.explain import ExplainError, explain

V1 = "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local"
V2 = "inbound-vip|9080|http|reviews-v2.shop.svc.cluster.local"


def dumped() -> dict[str, object]:
    """The canary world as the waypoint's /config_dump shows it."""
    return config_dump(
        config_for(world(CANARY)), node_id="waypoint~x", metadata={}, include_eds=True
    )


def test_the_dump_round_trips_into_the_same_config() -> None:
    config = config_for(world(CANARY))
    again = config_from_dump(json.loads(json.dumps(dumped())))
    assert again.routes == config.routes and again.clusters == config.clusters
    assert again.endpoints == config.endpoints and again.listeners == config.listeners


def test_an_iphone_goes_to_v2_and_the_rest_is_split() -> None:
    config = config_from_dump(dumped())
    iphone = explain(
        config, "GET http://reviews:9080/x -H 'user-agent: Mozilla (iPhone)'", namespace="shop"
    )
    assert iphone.verdict["kind"] == "forward" and iphone.verdict["clusters"] == {V2: 0}
    assert iphone.verdict["endpoints"] == ["10.244.1.21:8080"]
    assert "route shop.canary.0 matches" in iphone.text()
    other = explain(config, "GET http://reviews.shop.svc.cluster.local:9080/x", namespace="shop")
    assert other.verdict["clusters"] == {V1: 90, V2: 10}
    text = other.text()
    assert "route shop.canary.0" in text and "header user-agent" in text and "no," in text
    assert "90.0 %" in text and "10.0 %" in text
    assert set(other.verdict["endpoints"]) == {
        "10.244.1.11:8080",
        "10.244.2.12:8080",
        "10.244.1.21:8080",
    }


def test_a_vip_works_as_well_as_a_name_and_unknown_ones_are_refused() -> None:
    config = config_from_dump(dumped())
    assert explain(config, "GET http://10.96.0.21:9080/", namespace="shop").verdict["clusters"] == {
        V1: 0
    }
    with pytest.raises(ExplainError, match="not a service of this waypoint"):
        explain(config, "GET http://ratings:9080/", namespace="shop")
    with pytest.raises(ExplainError, match="METHOD URL"):
        explain(config, "GET", namespace="shop")


def test_the_command_reads_a_saved_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(dumped()))
    code = ctl.main(
        [
            "-f",
            str(path),
            "-n",
            "shop",
            "-o",
            "json",
            "explain",
            "GET http://reviews:9080/ -H user-agent:iPhone",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["verdict"]["clusters"] == {V2: 0}
    assert ctl.main(["-f", str(path), "-n", "shop", "explain", "GET http://nowhere:1/"]) == 2


MOVED = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: moved, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
"""


def test_a_redirect_is_explained_with_the_location_the_client_would_get() -> None:
    # No -H host: the Host is the URL's, as curl sends it, port and all.
    config = config_for(world(MOVED))
    verdict = explain(config, "GET http://reviews:9080/old/x", namespace="shop").verdict
    assert verdict == {"kind": "redirect", "status": 302, "location": "http://reviews:9080/new/x"}
    told = explain(config, "GET http://reviews:9080/old/x -H host:reviews.shop", namespace="shop")
    # The port is the service port's, as Gateway API says for a redirect without one.
    assert told.verdict["location"] == "http://reviews.shop:9080/new/x"
