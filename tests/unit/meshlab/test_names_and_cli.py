"""meshlab's naming rules and the parts of its CLI that need no root."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.cluster import parse_spec
from meshlab import cli, names
from meshlab.errors import MeshlabError


@pytest.mark.parametrize("name", ["a", "demo", "t1", "abcdefgh"])
def test_valid_cluster_names(name: str) -> None:
    assert names.validate_cluster_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "1abc", "a-b", "abcdefghi", "a_b", "a.b"])
def test_invalid_cluster_names_say_why(name: str) -> None:
    with pytest.raises(MeshlabError, match="1-8 lowercase letters and digits"):
        names.validate_cluster_name(name)


def test_every_root_link_name_fits_the_kernel_limit() -> None:
    longest = "abcdefgh"
    for link in (names.bridge_name(longest), names.node_uplink_name(longest, 199)):
        assert len(link) <= 15, link
        assert link.startswith(names.prefix(longest))


def test_namespace_names_carry_the_prefix_and_stay_bounded() -> None:
    assert names.pod_netns("demo", "server", "echo-1") == "demo-pod-server-echo-1"
    long = names.pod_netns("demo", "n" * 63, "p" * 253)
    assert long.startswith("demo-pod-") and len(long) <= 200
    assert long != names.pod_netns("demo", "n" * 63, "p" * 252 + "q")


STATE = parse_spec(
    {
        "name": "c1",
        "nodes": [
            {"name": "node1", "netns": "c1-node-node1"},
            {"name": "web", "netns": "c1-node-web"},
        ],
        "namespaces": [{"name": "a"}, {"name": "b"}],
        "pods": [
            {"name": "web", "namespace": "a", "node": "node1", "netns": "c1-pod-a-web"},
            {
                "name": "x",
                "namespace": "a",
                "node": "node1",
                "netns": "c1-pod-a-x",
                "ip": "10.244.0.9",
            },
            {"name": "x", "namespace": "b", "node": "node1", "netns": "c1-pod-b-x"},
        ],
    }
)


def test_exec_targets_resolve_to_the_right_namespace() -> None:
    netns, env, cgroup = cli._resolve_target(STATE, "a/x", None)
    assert netns == "c1-pod-a-x"
    assert cgroup is None  # the pod has no sandbox (container id) recorded: no cgroup
    assert env["POD_NAME"] == "x" and env["POD_NAMESPACE"] == "a" and env["POD_IP"] == "10.244.0.9"
    assert env[names.PROCESS_MARKER_ENV] == "c1"
    assert cli._resolve_target(STATE, "x", "b")[0] == "c1-pod-b-x"
    assert cli._resolve_target(STATE, "node1", None)[0] == "c1-node-node1"
    assert cli._resolve_target(STATE, "node/web", None)[0] == "c1-node-web"
    assert cli._resolve_target(STATE, "node/web", None)[2] is None  # a node has no pod cgroup


def test_ambiguous_and_unknown_targets_are_refused_with_choices() -> None:
    with pytest.raises(MeshlabError, match=r"ambiguous: a/x, b/x"):
        cli._resolve_target(STATE, "x", None)
    with pytest.raises(MeshlabError, match=r"ambiguous: node/web, a/web"):
        cli._resolve_target(STATE, "web", None)
    with pytest.raises(MeshlabError, match=r"no pod or node 'nope'.*known: a/web"):
        cli._resolve_target(STATE, "nope", None)


def test_generated_cluster_shape() -> None:
    cluster = cli.generated_cluster(3, 2)
    assert [n.name for n in cluster.nodes] == ["node1", "node2", "node3"]
    assert [p.node for p in cluster.pods] == ["node1", "node1", "node2", "node2", "node3", "node3"]
    assert len(cluster.endpoints(cluster.services[0])) == 6
    with pytest.raises(MeshlabError):
        cli.generated_cluster(0, 1)


def test_a_bad_cluster_file_is_reported_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("nodes: [{name: node1}]\npods: [{name: p, node: node9}]\n")
    assert cli.main(["up", "-f", str(bad), "--name", "zz"]) == 1
    err = capsys.readouterr().err
    assert "pods[0].node" in err and "node9" in err
    bad.write_text("nodes: [\n")
    assert cli.main(["up", "-f", str(bad)]) == 1
    assert "not valid YAML" in capsys.readouterr().err
    assert cli.main(["up", "-f", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_file_and_generator_flags_conflict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["up", "-f", "x.yaml", "--nodes", "2"]) == 1
    assert "not both" in capsys.readouterr().err


def test_the_example_cluster_file_is_valid() -> None:
    cluster = cli.load_cluster_file(Path(__file__).parents[3] / "examples" / "cluster.yaml")
    assert cluster.name == "demo"
    assert {p.node for p in cluster.pods} == {"node1", "node2"}


@pytest.mark.parametrize(
    "argv",
    [["up", "--name", "zz", "--nodes", "1"], ["down", "--name", "zz"], ["exec", "x", "--", "true"]],
)
def test_commands_that_change_the_host_need_root(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(argv) == 1
    assert "needs root" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["delete", "ap", "-n", "server", "no-sleep"],
        ["delete", "-n", "server", "ap", "no-sleep"],
        ["delete", "ap", "no-sleep", "-n", "server"],
    ],
)
def test_delete_takes_kind_and_name_around_the_namespace_option(argv: list[str]) -> None:
    # As kubectl: the name may follow -n (what the mesh tests and users type).
    args = cli.parse_args(argv)
    assert (args.words, args.namespace) == (["ap", "no-sleep"], "server")


def test_get_takes_an_optional_name_after_options_and_refuses_stray_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = cli.parse_args(["get", "gateway", "-n", "shop", "waypoint"])
    assert (args.words, args.namespace) == (["gateway", "waypoint"], "shop")
    with pytest.raises(SystemExit):
        cli.parse_args(["get", "gateway", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
