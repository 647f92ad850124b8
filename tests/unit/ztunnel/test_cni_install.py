"""Installing ztunnel-cni on a node whose primary CNI is kindnet's, on real directories.

The conf dir holds what kindnetd writes (``10-kindnet.conflist``: ptp with
host-local IPAM, then portmap); the installer must chain after it, put its
entry back when kindnet rewrites the file as it does after a restart
(``.temp`` then rename), wrap a single ``.conf``, and leave nothing on
uninstall. The agent is not ready while the entry is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.unit.hbone.conftest import run
from ztunnel.nodeagent.install import PLUGIN_TYPE, CniInstaller, InstallError, primary
from ztunnel.nodeagent.service import NodeAgent
from ztunnel.nodeagent.view import ClusterView

KINDNET: dict[str, Any] = {
    "cniVersion": "0.3.1",
    "name": "kindnet",
    "plugins": [
        {
            "type": "ptp",
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "dataDir": "/run/cni-ipam-state",
                "routes": [{"dst": "0.0.0.0/0"}],
                "ranges": [[{"subnet": "10.244.1.0/24"}]],
            },
            "mtu": 1500,
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}
ENTRY = {"runDir": "/var/run/ztunnel", "excludeNamespaces": ["istio-system", "kube-system"]}


def kindnet_writes(conf_dir: Path, conf: dict[str, Any] = KINDNET) -> Path:
    """As kindnetd: a .temp file, then a rename over the conflist."""
    path = conf_dir / "10-kindnet.conflist"
    tmp = conf_dir / "10-kindnet.conflist.temp"
    tmp.write_text(json.dumps(conf))
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


@pytest.fixture
def node(tmp_path: Path) -> tuple[CniInstaller, Path, Path]:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    plugin = tmp_path / "image" / PLUGIN_TYPE
    plugin.parent.mkdir()
    plugin.write_bytes(b"\x7fELF the plugin")
    plugin.chmod(0o755)
    installer = CniInstaller(bin_dir=bin_dir, conf_dir=conf_dir, plugin=plugin, entry=ENTRY)
    return installer, conf_dir, bin_dir


def plugins(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_text())["plugins"]]


def test_chains_after_kindnet_and_puts_its_entry_back_after_a_rewrite(
    node: tuple[CniInstaller, Path, Path],
) -> None:
    installer, conf_dir, bin_dir = node
    # Before the primary CNI wrote its file: the binary goes in, the entry waits.
    installer.ensure()
    assert (bin_dir / PLUGIN_TYPE).read_bytes() == installer.plugin.read_bytes()
    assert os.access(bin_dir / PLUGIN_TYPE, os.X_OK)
    assert "no CNI network configuration" in (installer.check() or "")
    path = kindnet_writes(conf_dir)
    (conf_dir / "99-later.conflist").write_text(json.dumps({**KINDNET, "name": "later"}))
    (conf_dir / "00-broken.conflist").write_text("{")  # invalid: not the primary
    assert primary(conf_dir) == path
    assert installer.ensure() is True and installer.check() is None
    conf = json.loads(path.read_text())
    assert plugins(path) == ["ptp", "portmap", PLUGIN_TYPE]
    assert conf["cniVersion"] == "0.3.1" and conf["plugins"][:2] == KINDNET["plugins"]
    assert conf["plugins"][2] == {"type": PLUGIN_TYPE, **ENTRY}
    assert path.stat().st_mode & 0o777 == 0o644
    assert plugins(conf_dir / "99-later.conflist") == ["ptp", "portmap"]  # only the primary
    assert installer.ensure() is False  # nothing to do twice
    # kindnetd restarts and writes its file again, without our entry.
    kindnet_writes(conf_dir)
    assert "lacks the ztunnel-cni entry" in (installer.check() or "")
    assert installer.ensure() is True and plugins(path) == ["ptp", "portmap", PLUGIN_TYPE]
    # A stale entry of ours (another run dir) is replaced, never doubled.
    stale = json.loads(path.read_text())
    stale["plugins"][2]["runDir"] = "/old"
    kindnet_writes(conf_dir, stale)
    installer.ensure()
    assert plugins(path) == ["ptp", "portmap", PLUGIN_TYPE]
    assert json.loads(path.read_text())["plugins"][2]["runDir"] == "/var/run/ztunnel"
    # A new image's binary replaces the old one.
    installer.plugin.write_bytes(b"\x7fELF a newer plugin")
    assert "is not" in (installer.check() or "")
    installer.ensure()
    assert (bin_dir / PLUGIN_TYPE).read_bytes() == b"\x7fELF a newer plugin"
    # Uninstall: kindnet's file as it was, no binary, the other files untouched.
    installer.uninstall()
    assert json.loads(path.read_text()) == KINDNET
    assert not (bin_dir / PLUGIN_TYPE).exists()
    assert (conf_dir / "00-broken.conflist").read_text() == "{"
    assert sorted(p.name for p in conf_dir.iterdir()) == [
        "00-broken.conflist",
        "10-kindnet.conflist",
        "99-later.conflist",
    ]


def test_a_single_conf_is_wrapped_into_a_conflist(node: tuple[CniInstaller, Path, Path]) -> None:
    installer, conf_dir, _ = node
    single = {"cniVersion": "0.4.0", "name": "flannel", "type": "flannel", "delegate": {}}
    (conf_dir / "10-flannel.conf").write_text(json.dumps(single))
    installer.ensure()
    assert not (conf_dir / "10-flannel.conf").exists()
    conf = json.loads((conf_dir / "10-flannel.conflist").read_text())
    assert conf["cniVersion"] == "0.4.0" and conf["name"] == "flannel"
    assert conf["plugins"] == [{"type": "flannel", "delegate": {}}, {"type": PLUGIN_TYPE, **ENTRY}]
    assert installer.check() is None


def test_a_missing_plugin_binary_is_a_clear_error(node: tuple[CniInstaller, Path, Path]) -> None:
    installer, conf_dir, _ = node
    kindnet_writes(conf_dir)
    installer.plugin.unlink()
    with pytest.raises(InstallError, match=r"binary .* is missing from the image"):
        installer.ensure()


class Known:
    def describe(self) -> str:
        return "a fixed view"

    def read(self) -> ClusterView:
        return ClusterView(version=1)  # known, and empty


def test_the_agent_is_ready_only_with_the_plugin_in_the_chain(
    node: tuple[CniInstaller, Path, Path], tmp_path: Path
) -> None:
    installer, conf_dir, _ = node

    async def body() -> None:
        agent = NodeAgent(run_dir=tmp_path / "run", source=Known(), installer=installer)
        await agent.start()
        try:
            await agent.reconcile()
            ready, why = agent.ready()
            assert not ready and "no CNI network configuration" in why
            kindnet_writes(conf_dir)
            await agent.reconcile()
            assert agent.ready() == (True, "ready")
            assert plugins(conf_dir / "10-kindnet.conflist")[-1] == PLUGIN_TYPE
            kindnet_writes(conf_dir)  # rewritten: the next pass puts the entry back
            await agent.reconcile()
            assert agent.ready() == (True, "ready") and installer.installs == 2
        finally:
            await agent.close()

    run(body, timeout_s=20)


def test_the_agent_puts_its_entry_back_at_once_without_waiting_for_a_pass(
    node: tuple[CniInstaller, Path, Path], tmp_path: Path
) -> None:
    """The conf and bin dirs are watched: a rewrite, or the binary removed, is repaired
    by the watch alone (no reconcile pass runs here after the first)."""
    installer, conf_dir, bin_dir = node
    kindnet_writes(conf_dir)

    async def until_chained(deadline_s: float) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not (
            plugins(conf_dir / "10-kindnet.conflist")[-1] == PLUGIN_TYPE
            and (bin_dir / PLUGIN_TYPE).is_file()
        ):
            assert loop.time() - start < deadline_s, "not repaired by the watch"
            await asyncio.sleep(0.005)
        return loop.time() - start

    async def body() -> None:
        agent = NodeAgent(run_dir=tmp_path / "run", source=Known(), installer=installer)
        await agent.start()
        try:
            await agent.reconcile()
            assert agent.ready() == (True, "ready") and installer.installs == 1
            for _ in range(3):
                kindnet_writes(conf_dir)
                await until_chained(2.0)
            (bin_dir / PLUGIN_TYPE).unlink()
            await until_chained(2.0)
            assert installer.installs == 4
            assert agent.ready() == (True, "ready")
        finally:
            await agent.close()

    run(body, timeout_s=20)
