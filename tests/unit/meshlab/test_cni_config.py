"""The CNI runtime's pure parts: configuration lists, results and plugin errors."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from meshlab import cni
from meshlab.errors import MeshlabError


def test_node_conflist_is_kindnets_ptp_with_host_local_then_portmap(tmp_path: Path) -> None:
    conf = cni.node_conflist(IPv4Network("10.244.3.0/24"), tmp_path / "ipam")
    assert (conf["name"], conf["cniVersion"]) == ("kindnet", "0.3.1")
    ptp, portmap = conf["plugins"]
    assert ptp["type"] == "ptp"
    assert ptp["ipMasq"] is False, "pod IPs must cross nodes unchanged"
    assert ptp["ipam"]["type"] == "host-local"
    assert ptp["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24"}]]
    assert ptp["ipam"]["dataDir"] == str(tmp_path / "ipam")
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    assert cni.NETWORK_FILE == "10-kindnet.conflist"


def test_the_first_conflist_in_lexical_order_wins(tmp_path: Path) -> None:
    cni.write_conflist(tmp_path, {"name": "b", "plugins": [{"type": "bridge"}]}, "20-b.conflist")
    cni.write_conflist(tmp_path, {"name": "a", "plugins": [{"type": "ptp"}]}, "10-a.conflist")
    assert cni.load_conflist(tmp_path)["name"] == "a"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no CNI network configuration"),
        ("{", "cannot read"),
        (json.dumps({"name": "x", "plugins": []}), "non-empty list"),
        (json.dumps({"name": "x", "plugins": [{"kind": "bridge"}]}), "'type'"),
        (json.dumps({"plugins": [{"type": "bridge"}]}), "needs a 'name'"),
    ],
)
def test_bad_conflists_are_refused(tmp_path: Path, content: str | None, words: str) -> None:
    if content is not None:
        (tmp_path / "10-x.conflist").write_text(content)
    with pytest.raises(MeshlabError, match=words):
        cni.load_conflist(tmp_path)


def test_pod_address_is_the_ip_on_eth0() -> None:
    result = {
        "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/x"}],
        "ips": [
            {"interface": 0, "address": "10.244.0.1/24"},
            {"interface": 2, "address": "10.244.0.7/24", "gateway": "10.244.0.1"},
        ],
    }
    assert cni.pod_address(result) == IPv4Address("10.244.0.7")
    with pytest.raises(MeshlabError, match="no IPv4 address for eth0"):
        cni.pod_address({"interfaces": [], "ips": []})


def test_plugin_errors_keep_the_plugins_code_and_message() -> None:
    out = json.dumps(
        {"cniVersion": "1.0.0", "code": 11, "msg": "failed to allocate", "details": "range is full"}
    )
    assert cni._parse_error(out, "") == (11, "failed to allocate: range is full")
    assert cni._parse_error("", "panic: boom\n") == (None, "panic: boom")


def test_plugin_types_cannot_escape_cni_path(tmp_path: Path) -> None:
    runtime = cni.CniRuntime(host_netns="x", cni_path=str(tmp_path), cache_dir=tmp_path)
    with pytest.raises(MeshlabError, match="invalid CNI plugin type"):
        runtime._find_binary("../bin/sh")
    with pytest.raises(MeshlabError, match="not found in CNI_PATH"):
        runtime._find_binary("bridge")


def test_cni_args_are_what_kubelet_passes() -> None:
    sandbox = cni.PodSandbox(
        container_id="abc", netns_path="/run/netns/p", namespace="ns", name="pod"
    )
    assert sandbox.cni_args() == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod;K8S_POD_INFRA_CONTAINER_ID=abc"
    )
