"""A whole run: the cluster up, rounds of the four placements, medians, ratios, logs kept."""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.mesh.lab import MeshLab
from bench.mesh.load import measure_placement, warm_up
from bench.mesh.report import INFORMATIONAL, TARGETS, scan_logs
from bench.mesh.shell import BenchError, Log
from bench.mesh.topology import PLACEMENTS


def _adder(figures: dict[str, list[float]]) -> Callable[[str, float], None]:
    def add(figure: str, value: float) -> None:
        figures.setdefault(figure, []).append(value)

    return add


def _ratios(figures: dict[str, dict[str, float]], over: str, under: str) -> dict[str, float]:
    """``over``'s figures / ``under``'s, those with a target and the informational ones."""
    ratios: dict[str, float] = {}
    for figure in [*TARGETS, *INFORMATIONAL]:
        a, b = figures[over].get(figure), figures[under].get(figure)
        if a is not None and b is not None and b > 0:
            ratios[figure] = a / b
    return ratios


def measure(
    seconds: float, rounds: int, log: Log, *, pin_cipher: bool, logs: Path | None
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    lab = MeshLab(work, log, pin_cipher=pin_cipher)
    # One directory per run (named after its cluster): the logs outlive the cluster.
    if logs is None:
        keep_logs = Path(tempfile.mkdtemp(prefix=f"mesh-bench-{lab.name}-"))
    else:
        keep_logs = logs / lab.name
        keep_logs.mkdir(parents=True, exist_ok=True)
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in PLACEMENTS}
    transitions: list[float] = []
    failures: list[str] = []
    try:
        lab.start()
        for round_ in range(1, rounds + 1):
            # The order turns each round: a placement inherits the TIME_WAIT backlog
            # of the one before it (and ours, connecting from the client's own
            # address, meets the floor's on the very same 4-tuples), so no
            # placement should always come after the same other one.
            shift = (round_ - 1) % len(PLACEMENTS)
            for placement in PLACEMENTS[shift:] + PLACEMENTS[:shift]:
                started = time.monotonic()
                lab.place(placement)
                transitions.append(time.monotonic() - started)
                warm_up(lab)
                try:
                    measure_placement(lab, seconds, _adder(samples[placement]), round_)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    # One failed load costs its sample, not the run (the placement was checked).
                    failures.append(f"round {round_}, {placement}: {e}")
                    log(f"round {round_}: {placement} failed: {e}")
        lab.place("floor")  # stop the Envoys (and read their cipher) before going down
    finally:
        lab.close(keep_logs)
        for path in work.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(path, keep_logs / path.name)
        with contextlib.suppress(OSError):
            shutil.copy(work / "nginx" / "error.log", keep_logs / "nginx-error.log")
        shutil.rmtree(work, ignore_errors=True)
    figures: dict[str, dict[str, float]] = {
        p: {k: statistics.median(v) for k, v in by.items() if k != "errors"}
        for p, by in samples.items()
    }
    floor_p99 = figures["floor"].get("keepalive_p99_ms")
    for placement in ("ours", "ebpf", "envoy"):
        p99 = figures[placement].get("keepalive_p99_ms")
        if p99 is not None and floor_p99 is not None:
            figures[placement]["added_p99_ms"] = p99 - floor_p99
    errors = {p: sum(samples[p].get("errors", [])) for p in PLACEMENTS}
    return {
        "cluster": lab.name,
        "figures": figures,
        # ours (iptables) / envoy under its old name; ebpf / envoy; ebpf / ours.
        "ratios": _ratios(figures, "ours", "envoy"),
        "ratios_ebpf": _ratios(figures, "ebpf", "envoy"),
        "ebpf_vs_iptables": _ratios(figures, "ebpf", "ours"),
        "errors": errors,
        "failures": failures,
        "ciphers": {
            "ours": lab.ciphers.get("ours", "unknown"),
            "envoy": lab.ciphers.get("envoy", "unknown"),
        },
        "pinned_cipher": pin_cipher,
        "samples": samples,
        "seconds": seconds,
        "rounds": rounds,
        "placement_s": statistics.median(transitions) if transitions else 0.0,
        "logs": str(keep_logs),
        "mesh_logs": scan_logs(keep_logs),
    }
