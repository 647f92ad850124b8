"""``/config_dump``: what this ztunnel holds, in Istio ztunnel's camelCase JSON shape.

``workloads``, ``services`` and ``policies`` are the xDS snapshot
(:func:`mesh.model.dump.dump_state`); ``certificates`` each identity's
state, chain and roots; ``workloadState`` each enrolled pod with its live
connections and (our addition, for ``ztunnel-ctl verify`` on the node) the
path of its network namespace; ``config`` this ztunnel's own settings.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.identity.store import CertState, CertStatus
from mesh.model.dump import dump_state

if TYPE_CHECKING:
    from ztunnel.runtime import Ztunnel


def _time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def certs(pem: bytes) -> list[dict[str, str]]:
    """Each certificate of a PEM bundle as ``{pem, serialNumber, validFrom, expirationTime}``."""
    out = []
    for cert in x509.load_pem_x509_certificates(pem):
        out.append(
            {
                "pem": cert.public_bytes(Encoding.PEM).decode(),
                "serialNumber": f"{cert.serial_number:x}",
                "validFrom": _time(cert.not_valid_before_utc),
                "expirationTime": _time(cert.not_valid_after_utc),
            }
        )
    return out


def _certificate(status: CertStatus) -> dict[str, Any]:
    cert = status.certificate
    if status.state is CertState.AVAILABLE:
        state = "Available"
    elif status.state is CertState.INITIALIZING:
        state = "Initializing"
    else:
        state = f"Unavailable: {status.last_error or 'no valid certificate'}"
    return {
        "identity": str(status.identity),
        "state": state,
        "certChain": certs(cert.chain_pem) if cert else [],
        "rootCerts": certs(cert.root_pem) if cert else [],
    }


def config_dump(ztunnel: Ztunnel, *, node: str = "", xds_address: str = "") -> dict[str, Any]:
    index = ztunnel.index()
    doc: dict[str, Any] = dump_state(index.state)
    store = ztunnel.certificates.store
    now = datetime.now(UTC)
    statuses = [store.status(identity, now) for identity in store.identities()]
    doc["certificates"] = [
        _certificate(s) for s in sorted((s for s in statuses if s), key=lambda s: str(s.identity))
    ]
    by_pod: dict[str, dict[str, list[dict[str, object]]]] = {}
    for conn in list(ztunnel.telemetry.live):
        entry = by_pod.setdefault(conn.pod, {"inbound": [], "outbound": []})
        fields = conn.as_dict()
        del fields["workload"], fields["direction"]
        entry[conn.direction].append(fields)
    doc["workloadState"] = {
        uid: {
            "state": "Up",
            "info": {
                "name": pod.pod.name,
                "namespace": pod.pod.namespace,
                "trustDomain": ztunnel.trust_domain,
                "serviceAccount": pod.pod.service_account,
            },
            "netns": f"/proc/{os.getpid()}/fd/{pod.netns_fd}",
            "capture": pod.capture,
            "connections": by_pod.get(pod.key, {"inbound": [], "outbound": []}),
        }
        for uid, pod in sorted(ztunnel.pods.items())
    }
    ready, why = ztunnel.ready()
    doc["config"] = {
        "node": node,
        "xdsAddress": xds_address,
        "trustDomain": ztunnel.trust_domain,
        "synced": index.state.synced,
        "ready": ready,
        "readyReason": why,
        "pid": os.getpid(),
        "bpfDir": str(ztunnel.bpf_dir) if ztunnel.bpf_dir is not None else None,
    }
    return doc
