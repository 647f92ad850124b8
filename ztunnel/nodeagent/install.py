"""Installing ``ztunnel-cni`` into the node's CNI, as istio-cni's install-cni does.

* The plugin binary is copied into the CNI bin dir (atomically: a temporary
  file beside it, then a rename, so a runtime never runs half a binary).
* Our entry is appended to the **primary** network configuration: the first
  valid ``*.conf``/``*.conflist``/``*.json`` of the conf dir in lexical order,
  the one kubelet's runtime uses (on kind ``10-kindnet.conflist``). A single
  ``.conf`` is wrapped into a ``.conflist`` with its plugin first, as Istio
  does. An older entry of ours is replaced; the file's mode is kept.
* :meth:`CniInstaller.check` says whether that still holds, and
  :meth:`CniInstaller.ensure` puts it back when the primary CNI rewrote its
  file (kindnet does after a restart) or a new primary appeared; the agent
  calls it as soon as its watch on the dirs fires, and on every pass, and is
  not ready while it fails.
* :meth:`CniInstaller.uninstall` removes our entry and the binary. The agent
  does so only when it is being removed for good (on Kubernetes, its
  DaemonSet is gone); when it is only restarting, the entry stays, so pods
  started meanwhile fail closed instead of starting uncaptured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("ztunnel.nodeagent.install")
PLUGIN_TYPE = "ztunnel-cni"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
WRAPPED_NAME = "k8s-pod-network"  # Istio's name for a .conf it wraps


class InstallError(Exception):
    """The plugin cannot be installed; the message says what and why."""


def _load(path: Path) -> dict[str, Any] | None:
    """A valid network configuration (list), or None: a conflist needs plugins, a conf a type."""
    try:
        conf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(conf, dict):
        return None
    if path.suffix == ".conflist":
        plugins = conf.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            return None
        return conf if all(isinstance(p, dict) for p in plugins) else None
    return conf if isinstance(conf.get("type"), str) else None


def primary(conf_dir: Path) -> Path | None:
    """The first valid configuration file of ``conf_dir`` by name, as libcni picks it."""
    if not conf_dir.is_dir():
        return None
    for path in sorted(conf_dir.iterdir()):
        if path.suffix in CONF_EXTENSIONS and path.is_file() and _load(path) is not None:
            return path
    return None


def with_entry(conf: dict[str, Any], entry: dict[str, Any], *, conflist: bool) -> dict[str, Any]:
    """``conf`` (a conflist, or a single conf to wrap) with our entry last, once."""
    if conflist:
        plugins = [p for p in conf["plugins"] if p.get("type") != PLUGIN_TYPE]
        return {**conf, "plugins": [*plugins, entry]}
    single = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
    return {
        "cniVersion": conf.get("cniVersion", "0.3.1"),
        "name": conf.get("name", WRAPPED_NAME),
        "plugins": [single, entry],
    }


def without_entry(conf: dict[str, Any]) -> dict[str, Any]:
    return {**conf, "plugins": [p for p in conf["plugins"] if p.get("type") != PLUGIN_TYPE]}


def _write(path: Path, conf: dict[str, Any], mode: int) -> None:
    tmp = path.with_name(f".{path.name}.ztunnel.tmp")
    tmp.write_text(json.dumps(conf, indent=2) + "\n")
    tmp.chmod(mode)
    tmp.replace(path)


class CniInstaller:
    def __init__(
        self, *, bin_dir: Path, conf_dir: Path, plugin: Path, entry: dict[str, Any]
    ) -> None:
        self.bin_dir = bin_dir
        self.conf_dir = conf_dir
        self.plugin = plugin
        self.entry = {"type": PLUGIN_TYPE, **entry}
        self.installs = 0  # how often the entry had to be (re)written

    @property
    def target(self) -> Path:
        return self.bin_dir / PLUGIN_TYPE

    def _same_binary(self) -> bool:
        try:
            have, want = self.target.stat(), self.plugin.stat()
        except OSError:
            return False
        return (have.st_size, int(have.st_mtime)) == (want.st_size, int(want.st_mtime))

    def _chained(self, path: Path, conf: dict[str, Any]) -> bool:
        """Whether the configuration at ``path`` ends with our entry, as it is now."""
        plugins = conf.get("plugins") if path.suffix == ".conflist" else None
        return isinstance(plugins, list) and bool(plugins) and plugins[-1] == self.entry

    def check(self) -> str | None:
        """None when the binary and the entry are in place; otherwise what is wrong."""
        if not self.target.is_file() or not os.access(self.target, os.X_OK):
            return f"{self.target} is missing"
        if not self._same_binary():
            return f"{self.target} is not {self.plugin}"
        path = primary(self.conf_dir)
        if path is None:
            return f"no CNI network configuration in {self.conf_dir} yet (the primary CNI's)"
        conf = _load(path)
        assert conf is not None
        if not self._chained(path, conf):
            return f"{path} lacks the {PLUGIN_TYPE} entry"
        return None

    def ensure(self) -> bool:
        """Put what is missing back; True if something had to be written."""
        if self.check() is None:
            return False
        if not self.plugin.is_file():
            raise InstallError(f"the plugin binary {self.plugin} is missing from the image")
        wrote = False
        if not self._same_binary():
            tmp = self.bin_dir / f".{PLUGIN_TYPE}.tmp"
            try:
                shutil.copy2(self.plugin, tmp)  # with its mtime: see _same_binary
                tmp.chmod(0o755)
                tmp.replace(self.target)
            except OSError as e:
                raise InstallError(f"cannot copy {self.plugin} to {self.target}: {e}") from e
            log.info("cni: installed %s", self.target)
            wrote = True
        path = primary(self.conf_dir)
        if path is None:
            return wrote  # nothing to chain onto yet; check() keeps saying why
        conf = _load(path)
        assert conf is not None
        conflist = path.suffix == ".conflist"
        if not self._chained(path, conf):
            new = with_entry(conf, self.entry, conflist=conflist)
            dest = path if conflist else path.with_suffix(".conflist")
            try:
                _write(dest, new, path.stat().st_mode & 0o777)
                if dest != path:
                    path.unlink()
            except OSError as e:
                raise InstallError(f"cannot write {dest}: {e}") from e
            self.installs += 1
            log.info("cni: %s entry added to %s", PLUGIN_TYPE, dest)
            wrote = True
        return wrote

    def uninstall(self) -> None:
        """Remove our entry from every configuration list that has it, and the binary."""
        for path in sorted(self.conf_dir.glob("*.conflist")) if self.conf_dir.is_dir() else []:
            conf = _load(path)
            if conf is None or not any(p.get("type") == PLUGIN_TYPE for p in conf["plugins"]):
                continue
            try:
                _write(path, without_entry(conf), path.stat().st_mode & 0o777)
                log.info("cni: %s entry removed from %s", PLUGIN_TYPE, path)
            except OSError as e:
                log.warning("cni: cannot remove our entry from %s: %s", path, e)
        with contextlib.suppress(FileNotFoundError):
            self.target.unlink()
            log.info("cni: removed %s", self.target)
