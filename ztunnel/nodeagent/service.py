"""The node agent: the CNI plugin's socket, the ZDS server, and the reconcile loop.

* The plugin asks ``add`` for each new pod; the agent reads the cluster view
  at once, and for a mesh pod installs the in-pod capture and hands the pod
  to ztunnel over ZDS, answering only when ztunnel has acked it.
* The view is read again every ``poll_s``; a label change enrolls running
  pods, or un-enrolls them, without restarting them
  (:mod:`ztunnel.nodeagent.reconcile`).
* The capture outlives ztunnel: when ztunnel restarts it reconnects, is sent
  the snapshot of enrolled pods and re-adopts them, and while it is away the
  pods' traffic is still redirected to its (closed) ports: it fails, it never
  leaves uncaptured.
* The namespaces that are ambient are written to ``ambient-namespaces.json``
  so the plugin can fail closed for them when the agent is away.
* A source that can (Kubernetes) is told each enrolled pod's redirection
  state after every pass, ``enabled`` once ztunnel has taken the pod and
  ``pending`` before, and reports it on the pod; it never holds enrollment up.
* A mesh pod of this node that ztunnel-cni never recorded (running before the
  plugin was installed, or started while the primary CNI had dropped its
  entry) is found and recorded by the agent itself
  (:mod:`ztunnel.nodeagent.discover`), then enrolled like the rest.
* When the agent installs ztunnel-cni, the node's CNI dirs are watched
  (inotify, :mod:`ztunnel.nodeagent.watch`) and a rewrite of the conflist is
  repaired at once, not a pass later; each pass checks too.
* :meth:`NodeAgent.ready` is the readiness probe's answer: ready once both
  sockets listen, the view is known (on Kubernetes: Namespaces and the node's
  Pods listed) and one pass has enrolled the pods recorded on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mesh.ambient import in_ambient
from ztunnel.capture import inpod
from ztunnel.capture.backend import Capture, Choice, IptablesCapture
from ztunnel.nodeagent import discover, plugin, reconcile
from ztunnel.nodeagent.install import CniInstaller, InstallError
from ztunnel.nodeagent.records import PodRecord, RecordError, RecordStore
from ztunnel.nodeagent.view import ClusterView
from ztunnel.nodeagent.watch import DirWatch
from ztunnel.zds.agent import ZdsAgent
from ztunnel.zds.protocol import PodInfo, ZdsError

log = logging.getLogger("ztunnel.nodeagent")
ZDS_SOCKET = "zds.sock"
MAX_REQUEST = 128 * 1024 * 1024  # ztunnel-cni reads 16 MiB at most; escaping may grow it 6x
PENDING_DIR = "pending"  # ztunnel-cni's calls made while the agent was away
RETRY_S = 2.0


class ViewSource(Protocol):
    def describe(self) -> str: ...

    def read(self) -> ClusterView: ...


class EnrollError(Exception):
    """A pod could not be enrolled; the message says why."""


class NodeAgent:
    def __init__(
        self,
        *,
        run_dir: Path,
        source: ViewSource,
        dns_capture: bool = True,
        proxy_wait_s: float = 10.0,
        poll_s: float = 0.5,
        netns_exists: Callable[[str], bool] = lambda p: Path(p).exists(),
        installer: CniInstaller | None = None,
        node: str | None = None,
        finder: discover.ProcFinder | None = None,
        capture: Choice | None = None,
    ) -> None:
        # The node's capture backend (iptables unless eBPF was asked for and the node
        # can run it; why not, when it cannot).
        self.choice = capture or Choice(IptablesCapture(dns=dns_capture), "iptables")
        self.capture: Capture = self.choice.backend
        self.installer = installer
        self.node = node  # with it, pods of this node ztunnel-cni did not record are found
        self.finder = finder
        self._discover_retry: dict[tuple[str, str], float] = {}
        self._install_problem: str | None = None
        self.run_dir = run_dir
        self.source = source
        self.dns_capture = dns_capture
        self.proxy_wait_s = proxy_wait_s
        self.poll_s = poll_s
        self.netns_exists = netns_exists
        self.records = RecordStore(run_dir / plugin.PODS_DIR)
        self.zds = ZdsAgent(run_dir / ZDS_SOCKET)
        self.enrolled: dict[str, PodInfo] = {}
        self.failed: dict[str, tuple[float, str]] = {}  # uid -> (retry after, reason)
        self.handed: set[str] = set()  # enrolled pods some ztunnel has acked
        self._capture_retry: dict[str, float] = {}  # uid -> when to try capturing again
        self._lock = asyncio.Lock()
        self._install_lock = asyncio.Lock()
        self._watch: DirWatch | None = None  # the CNI dirs, when the agent installs
        self._install_dirty = False
        self._install_task: asyncio.Future[None] | None = None
        self._server: asyncio.Server | None = None
        self._hint: list[str] | None = None
        self._view_version = -2
        self._listening = False
        self._reconciled = False  # a pass over a known view is done

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.zds.start()
        path = self.run_dir / plugin.SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # A CNI call carries the previous result: allow lines far longer than 64 KiB.
        self._server = await asyncio.start_unix_server(
            self._serve_plugin, path=str(path), limit=MAX_REQUEST
        )
        path.chmod(0o600)
        if self.installer is not None:
            self._start_watch()
        self._listening = True
        log.info("node agent: following %s; plugin socket %s", self.source.describe(), path)

    async def run(self) -> None:
        """Start, then reconcile until cancelled (capture stays in place on exit)."""
        await self.start()
        try:
            while True:
                try:
                    await self.reconcile()
                except Exception:
                    log.exception("node agent: reconcile failed; trying again")
                await asyncio.sleep(self.poll_s)
        finally:
            await self.close()

    def ready(self) -> tuple[bool, str]:
        """Whether the agent can enroll pods now, and if not why (the readiness probe)."""
        if not self._listening:
            return False, "the plugin and ZDS sockets are not listening yet"
        if not self.source.read().known:
            why = getattr(self.source, "error", "")
            return False, f"waiting for {self.source.describe()}" + (f": {why}" if why else "")
        if not self._reconciled:
            return False, "the pods recorded on this node are not reconciled yet"
        if self._install_problem is not None:
            return False, f"ztunnel-cni is not installed: {self._install_problem}"
        return True, "ready"

    def _start_watch(self) -> None:
        try:
            self._watch = DirWatch()
        except OSError as e:
            log.warning("node agent: %s; the CNI dirs are checked on each pass only", e)
            return
        asyncio.get_running_loop().add_reader(self._watch.fd, self._cni_changed)
        self._watch_dirs()

    def _watch_dirs(self) -> None:
        if self._watch is None or self.installer is None:
            return
        for directory in (self.installer.conf_dir, self.installer.bin_dir):
            why = self._watch.add(directory)
            if why is not None:
                log.debug("node agent: %s (checked on each pass)", why)

    def _cni_changed(self) -> None:
        """Something changed in the CNI dirs: check (and repair) now, not on the next pass."""
        if self._watch is None or not self._watch.drain():
            return
        self._install_dirty = True
        if self._install_task is None or self._install_task.done():
            self._install_task = asyncio.ensure_future(self._install_while_dirty())

    async def _install_while_dirty(self) -> None:
        while self._install_dirty:
            self._install_dirty = False
            await self.install_cni()

    async def close(self) -> None:
        self._listening = False
        if self._watch is not None:
            asyncio.get_running_loop().remove_reader(self._watch.fd)
            self._watch.close()
            self._watch = None
        if self._install_task is not None:
            self._install_task.cancel()
            with contextlib.suppress(BaseException):
                await self._install_task
        stop = getattr(self.source, "close", None)
        if stop is not None:
            await asyncio.to_thread(stop)
        if self._server is not None:
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / plugin.SOCKET_NAME).unlink()
        await self.zds.close()

    # -- reconcile ------------------------------------------------------------------------

    async def install_cni(self) -> None:
        """Put ztunnel-cni (back) into the node's CNI chain, if this agent installs it."""
        if self.installer is None:
            return
        async with self._install_lock:
            await self._install_cni(self.installer)
        self._watch_dirs()  # a dir that appeared since (the primary CNI's first file)

    async def _install_cni(self, installer: CniInstaller) -> None:
        before = self._install_problem
        try:
            # One check per pass when all is in place; a repair, and a check again, if not.
            problem = await asyncio.to_thread(installer.check)
            if problem is not None:
                await asyncio.to_thread(installer.ensure)
                problem = await asyncio.to_thread(installer.check)
            self._install_problem = problem
        except (InstallError, OSError) as e:
            self._install_problem = str(e)
        if self._install_problem != before:  # said once, not on every pass
            if self._install_problem is not None:
                log.warning("node agent: ztunnel-cni: %s", self._install_problem)
            else:
                log.info("node agent: ztunnel-cni is in the node's CNI chain")

    async def reconcile(self) -> reconcile.Plan:
        await self.install_cni()
        view = self.source.read()
        if view.known:
            self._write_hint(view)
        self._adopt_pending()
        records, bad = self.records.all()
        for name, why in bad.items():
            log.warning("node agent: ignoring pod record %s: %s", name, why)
        if view.known and self.node is not None:
            for record in await asyncio.to_thread(self._discover, view, records):
                records[record.uid] = record
        async with self._lock:
            now = time.monotonic()
            step = reconcile.plan(view, records, self.enrolled, self.netns_exists)
            for uid in step.unenroll:
                await self._unenroll(uid, records.get(uid))
            for uid in step.forget:
                self._capture_retry.pop(uid, None)
                with contextlib.suppress(RecordError, OSError):
                    self.records.remove(uid)
            for uid in set(self._capture_retry) - set(records):
                del self._capture_retry[uid]  # the pod went (CNI DEL) before it was captured
            for record, info in step.enroll:
                if self._capture_retry.get(record.uid, 0.0) > now:
                    continue  # its capture failed a moment ago: not every poll
                try:
                    await self._enroll(record, info, wait_for_proxy=False)
                except EnrollError as e:
                    self._capture_retry[record.uid] = now + RETRY_S
                    log.warning("node agent: %s/%s: %s", record.namespace, record.name, e)
                else:
                    self._capture_retry.pop(record.uid, None)
            for uid, why in self.zds.refused.items():
                if uid in self.enrolled and uid not in self.failed:
                    self.failed[uid] = (now + RETRY_S, why)  # refused in a snapshot
            for uid, (after, _) in list(self.failed.items()):
                failed = records.get(uid)
                if after > now or uid not in self.enrolled or failed is None:
                    continue
                try:
                    await self._hand_over(failed, self.enrolled[uid], wait_for_proxy=False)
                except EnrollError as e:
                    log.warning("node agent: %s/%s: %s", failed.namespace, failed.name, e)
            if self.zds.proxy_ready.is_set():
                # The connected ztunnel took every pod of its snapshot it did not refuse.
                refused = set(self.zds.refused) | set(self.failed)
                self.handed |= {uid for uid in self.enrolled if uid not in refused}
        if view.known:
            self._report()
            self._reconciled = True
        return step

    def _discover(self, view: ClusterView, records: dict[str, PodRecord]) -> list[PodRecord]:
        """Record the mesh pods of this node that have an address but no record."""
        now = time.monotonic()
        want = [
            key
            for key, facts in view.pods.items()
            if facts.node == self.node
            and self._discover_retry.get(key, 0.0) <= now
            and in_ambient(facts.labels, view.namespaces.get(key[0], {}))
        ]
        missing = discover.unrecorded(view, records, want)
        if not missing:
            return []
        look_up = [f.uid for f in missing if f.uid and not (f.netns and f.sandbox)]
        found = self.finder.find(look_up) if self.finder is not None and look_up else {}
        made = []
        for facts in missing:
            key = (facts.namespace, facts.name)
            record = discover.record_for(facts, found.get(facts.uid))
            if record is None or not self.netns_exists(record.netns):
                self._discover_retry[key] = now + RETRY_S  # not every pass
                log.debug("node agent: %s/%s: no network namespace found yet", *key)
                continue
            try:
                self.records.put(record)
            except (RecordError, OSError) as e:
                log.warning("node agent: %s/%s: cannot record it: %s", *key, e)
                continue
            self._discover_retry.pop(key, None)
            log.info(
                "node agent: %s/%s runs without ztunnel-cni having seen it; found at %s",
                *key,
                record.netns,
            )
            made.append(record)
        return made

    def redirections(self) -> dict[tuple[str, str], str]:
        """Each enrolled pod's redirection state (a pod whose sandbox is being replaced
        may be enrolled twice for a moment: the better state wins)."""
        states: dict[tuple[str, str], str] = {}
        for uid, info in self.enrolled.items():
            key = (info.namespace, info.name)
            if states.get(key) != reconcile.ENABLED:
                states[key] = reconcile.ENABLED if uid in self.handed else reconcile.PENDING
        return states

    def _report(self) -> None:
        report = getattr(self.source, "report", None)
        if report is not None:
            report(self.redirections())

    def _write_hint(self, view: ClusterView) -> None:
        names = reconcile.ambient_namespaces(view)
        if names == self._hint:
            return
        path = self.run_dir / plugin.AMBIENT_HINT
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(names) + "\n")
        tmp.replace(path)
        self._hint = names

    async def _enroll(self, record: PodRecord, info: PodInfo, *, wait_for_proxy: bool) -> None:
        """Capture the pod, then hand it to ztunnel (call with the lock held)."""
        netns = Path(record.netns)
        try:
            if not await asyncio.to_thread(self.capture.installed, netns, record.pod_uid):
                await asyncio.to_thread(self.capture.install, netns, record.pod_uid)
        except (inpod.CaptureError, OSError) as e:
            raise EnrollError(f"capture: {e}") from e
        self.enrolled[record.uid] = info
        log.info(
            "node agent: %s/%s captured (%s, %s)",
            record.namespace,
            record.name,
            self.capture.name,
            record.uid[:12],
        )
        await self._hand_over(record, info, wait_for_proxy=wait_for_proxy)

    async def _hand_over(self, record: PodRecord, info: PodInfo, *, wait_for_proxy: bool) -> None:
        """Give a captured pod to ztunnel; a refusal is retried by :meth:`reconcile`."""
        try:
            if wait_for_proxy:
                try:
                    async with asyncio.timeout(self.proxy_wait_s):
                        await self.zds.proxy_ready.wait()
                except TimeoutError as e:
                    raise ZdsError(f"no ztunnel connected within {self.proxy_wait_s:g} s") from e
            await self.zds.add(record.uid, info, Path(record.netns))
            self.handed.add(record.uid)
        except ZdsError as e:
            if not wait_for_proxy and not self.zds.proxy_ready.is_set():
                # No ztunnel right now: the pod is in the snapshot it gets on connecting.
                log.info("node agent: %s/%s: ztunnel takes it on connecting", *_key(record))
                self.failed.pop(record.uid, None)
                return
            self.failed[record.uid] = (time.monotonic() + RETRY_S, str(e))
            raise EnrollError(f"ztunnel: {e}") from e
        self.failed.pop(record.uid, None)

    async def _unenroll(self, uid: str, record: PodRecord | None) -> None:
        info = self.enrolled.pop(uid, None)
        self.failed.pop(uid, None)
        self.handed.discard(uid)
        self._capture_retry.pop(uid, None)
        if record is not None and self.netns_exists(record.netns):
            try:
                await asyncio.to_thread(self.capture.uninstall, Path(record.netns), record.pod_uid)
            except (inpod.CaptureError, OSError) as e:
                log.warning("node agent: removing capture of %s: %s", uid, e)
        try:
            await self.zds.delete(uid)
        except ZdsError as e:
            log.warning("node agent: telling ztunnel %s left: %s", uid, e)
        if info is not None:
            log.info("node agent: %s/%s un-enrolled", info.namespace, info.name)

    # -- the plugin's requests ------------------------------------------------------------

    async def handle_add(self, record: PodRecord) -> dict[str, Any]:
        view = self.source.read()
        want = reconcile.wanted(view, record)
        refresh = getattr(self.source, "refresh_pod", None)
        if isinstance(want, reconcile.Unknown) and refresh is not None:
            # Created since the last list: ask for this one pod now.
            view = await asyncio.to_thread(refresh, record.namespace, record.name)
            want = reconcile.wanted(view, record)
        if isinstance(want, reconcile.Unknown):
            ns_labels = view.namespaces.get(record.namespace)
            if ns_labels is not None and not in_ambient({}, ns_labels):
                return {"ok": True, "enrolled": False}
            return {
                "ok": False,
                "error": f"pod {record.namespace}/{record.name} is not known to the node agent "
                f"({self.source.describe()}) yet",
            }
        if want is None:
            return {"ok": True, "enrolled": False}
        async with self._lock:
            try:
                await self._enroll(record, want, wait_for_proxy=True)
            except EnrollError as e:
                return {"ok": False, "error": str(e)}
            finally:
                # Captured, maybe not handed over (pending). Not before the first pass:
                # until then the pods recorded before a restart are not enrolled again.
                if self._reconciled:
                    self._report()
        return {"ok": True, "enrolled": True}

    async def handle_del(self, uid: str, record: PodRecord | None = None) -> dict[str, Any]:
        async with self._lock:
            if uid in self.enrolled:
                # iptables rules go with the netns being torn down; the eBPF entry in the
                # node's zt_pods map would not, so that capture is removed now.
                keep = record if self.capture.name == "ebpf" else None
                await self._unenroll(uid, keep)
        return {"ok": True}

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "ready": list(self.ready()),
            "ztunnel": self.zds.proxy_ready.is_set(),
            "view": self.source.read().version,
            "enrolled": sorted(self.enrolled),
            "failed": {uid: why for uid, (_, why) in self.failed.items()},
            "capture": {
                "backend": self.capture.name,
                "requested": self.choice.requested,
                "refused": self.choice.refused,
            },
        }

    async def _serve_plugin(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10.0)
            if line.startswith(b'{"cmd":"cni"'):
                # The ztunnel-cni binary: the exit code on a line, then what it prints.
                rc, out = await self.handle_cni(line)
                reply = f"{rc}\n{out}".encode()
            else:
                reply = json.dumps(await self._answer(line)).encode() + b"\n"
        except (TimeoutError, ValueError, OSError) as e:
            reply = json.dumps({"ok": False, "error": f"bad request: {e}"}).encode() + b"\n"
        with contextlib.suppress(OSError):
            writer.write(reply)
            await writer.drain()
        writer.close()

    async def handle_cni(self, line: bytes) -> tuple[int, str]:
        """A CNI call forwarded by the ztunnel-cni binary: (exit code, what it prints)."""
        version = "1.0.0"
        try:
            call = _forwarded(line)
            version = call.version
            if call.command == "VERSION":
                out = {"cniVersion": version, "supportedVersions": plugin.SUPPORTED_VERSIONS}
                return 0, json.dumps(out) + "\n"
            if call.command == "DEL":
                record = None
                with contextlib.suppress(RecordError, OSError):
                    record = self.records.get(call.uid)
                    self.records.remove(call.uid)
                await self.handle_del(call.uid, record)
                return 0, ""
            if call.command != "ADD":
                return 0, ""  # CHECK, GC, STATUS: nothing to check or collect here
            assert call.record is not None and call.prev is not None
            try:
                self.records.put(call.record)
            except (OSError, RecordError) as e:
                pod = f"{call.record.namespace}/{call.record.name}"
                why = f"cannot record pod {pod}"
                raise plugin.PluginError(plugin.ERR_ENROLL, why, str(e)) from e
            answer = await self.handle_add(call.record)
            if not answer.get("ok"):
                raise plugin.enroll_error(call.record, answer)
            return 0, json.dumps(call.prev) + "\n"
        except plugin.PluginError as e:
            return 1, plugin.error_json(version, e)

    def _adopt_pending(self) -> None:
        """Record the pods ztunnel-cni let start while the agent was away (pending/)."""
        pending = self.run_dir / PENDING_DIR
        if not pending.is_dir():
            return
        for path in sorted(pending.glob("*.json")):
            try:
                call = _forwarded(path.read_bytes())
                if call.record is not None:
                    self.records.put(call.record)
            except (OSError, plugin.PluginError, RecordError) as e:
                log.warning("node agent: ignoring %s: %s", path, e)
            with contextlib.suppress(OSError):
                path.unlink()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            return {"ok": False, "error": f"not JSON: {e}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "not a JSON object"}
        cmd = request.get("cmd")
        if cmd == "status":
            return self.status()
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def _key(record: PodRecord) -> tuple[str, str]:
    return record.namespace, record.name


def _forwarded(line: bytes) -> plugin.Call:
    """The call in a ztunnel-cni request line, checked as the plugin would."""
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise plugin.PluginError(plugin.ERR_DECODING, "the request is not JSON", str(e)) from e
    env, text = request.get("env"), request.get("config")
    if not isinstance(env, dict) or not isinstance(text, str):
        raise plugin.PluginError(plugin.ERR_DECODING, "the request lacks 'env' or 'config'")
    try:
        config = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise plugin.PluginError(
            plugin.ERR_DECODING, "the plugin config on stdin is not JSON", str(e)
        ) from e
    if not isinstance(config, dict):
        raise plugin.PluginError(plugin.ERR_DECODING, "the plugin config is not a JSON object")
    return plugin.prepare({str(k): str(v) for k, v in env.items()}, config)
