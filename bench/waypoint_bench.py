"""The waypoint on meshlab: client pod -> ztunnel -> waypoint -> ztunnel -> server pod.

    python -m bench.waypoint_bench [--seconds 8] [--rounds 3] [--json out.json]
                                   [--record RESULTS.md] [--logs DIR]

Needs root, the CNI plugins meshlab uses, wrk, nginx-light and Envoy (`make
bench` installs them). The defaults take about 3 minutes.

The cluster and the three placements are :mod:`bench.mesh.waypoint_lab`'s:
``l4`` (the Service bound to no waypoint: ztunnel to ztunnel), ``ours`` (our
waypoint) and ``envoy`` (Envoy 1.40 as the waypoint, terminating and
originating HBONE, with the same resources meshd sent ours). Each round
measures the three in turn (the order turning each round), each warmed up
by a second of new connections first; every figure is the median over the
rounds. Both waypoints run on node3, one process each (Envoy
``--concurrency 1``); the ztunnels' TLS suite is pinned to Envoy's
(TLS_AES_128_GCM_SHA256), as in :mod:`bench.mesh_bench`.

Figures, through the Service's VIP (``http://10.96.0.50/``, nginx behind it):

* wrk keep-alive (1 thread, 50 connections): requests/s, p50 and p99;
* wrk with ``Connection: close``: new connections per second (each one a new
  HBONE stream to the waypoint, whose upstream connection is pooled);
* the waypoint's CPU per request (keep-alive run) and per new connection;
* the waypoint's peak RSS (VmHWM) at the end of the run.

Targets (ours/Envoy): requests/s >= 0.5, p99 <= 2, peak RSS <= 1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.hbone_bench import machine
from bench.mesh.load import cpu_of, warm_up, wrk
from bench.mesh.report import fmt, scan_logs
from bench.mesh.shell import BenchError, Log
from bench.mesh.waypoint_lab import WAYPOINT_PLACEMENTS, WaypointLab
from bench.mesh_bench import _missing_tools

TARGETS: dict[str, tuple[str, float]] = {
    "keepalive_rps": (">=", 0.5),
    "keepalive_p99_ms": ("<=", 2.0),
    "peak_rss_mb": ("<=", 1.0),
}
LABELS = {
    "keepalive_rps": "wrk keep-alive (req/s)",
    "keepalive_p50_ms": "wrk keep-alive p50 (ms)",
    "keepalive_p99_ms": "wrk keep-alive p99 (ms)",
    "newconn_rps": "new connections (conn/s)",
    "cpu_us_per_request": "waypoint CPU per keep-alive request (us)",
    "cpu_us_per_conn": "waypoint CPU per new connection (us)",
    "peak_rss_mb": "waypoint peak RSS (MB)",
}


def measure_placement(lab: WaypointLab, seconds: float, add: Any, round_: int) -> None:
    pids = lab.proxy_pids()
    cpu = cpu_of(pids)
    keep = wrk(lab, seconds, close=False)
    cpu_keep = cpu_of(pids) - cpu
    cpu = cpu_of(pids)
    new = wrk(lab, seconds, close=True)
    cpu_new = cpu_of(pids) - cpu
    add("keepalive_rps", keep["rps"])
    add("keepalive_p50_ms", keep.get("p50_ms", 0.0))
    add("keepalive_p99_ms", keep.get("p99_ms", 0.0))
    add("newconn_rps", new["rps"])
    if pids:
        add("cpu_us_per_request", cpu_keep / max(keep["requests"], 1) * 1e6)
        add("cpu_us_per_conn", cpu_new / max(new["requests"], 1) * 1e6)
    errors = keep["errors"] + keep["socket_errors"] + new["errors"] + new["socket_errors"]
    add("errors", errors)
    lab.log(
        f"round {round_}: {lab.mode:5} keep-alive {keep['rps']:8.0f} req/s "
        f"p50 {keep.get('p50_ms', 0):.2f} ms p99 {keep.get('p99_ms', 0):.2f} ms; "
        f"Connection: close {new['rps']:7.0f} conn/s"
        + (
            f"; waypoint CPU {cpu_keep / max(keep['requests'], 1) * 1e6:.0f} us/req, "
            f"{cpu_new / max(new['requests'], 1) * 1e6:.0f} us/conn"
            if pids
            else ""
        )
        + (f"; {errors:.0f} errors (non-2xx + socket)" if errors else "")
    )


def measure(seconds: float, rounds: int, log: Log, logs: Path | None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="waypoint-bench-"))
    lab = WaypointLab(work, log)
    keep_logs = logs / lab.name if logs else Path(tempfile.mkdtemp(prefix=f"wp-{lab.name}-"))
    keep_logs.mkdir(parents=True, exist_ok=True)
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in WAYPOINT_PLACEMENTS}
    failures: list[str] = []
    rss: dict[str, float] = {}
    cipher = "unknown"
    try:
        lab.start()
        for round_ in range(1, rounds + 1):
            shift = (round_ - 1) % len(WAYPOINT_PLACEMENTS)
            for placement in WAYPOINT_PLACEMENTS[shift:] + WAYPOINT_PLACEMENTS[:shift]:
                lab.place(placement)
                warm_up(lab)

                def add(figure: str, value: float, p: str = placement) -> None:
                    samples[p].setdefault(figure, []).append(value)

                try:
                    measure_placement(lab, seconds, add, round_)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    failures.append(f"round {round_}, {placement}: {e}")
                    log(f"round {round_}: {placement} failed: {e}")
        rss = {p: lab.peak_rss_mb(p) for p in ("ours", "envoy")}
        with contextlib.suppress(Exception):
            cipher = lab.envoy_cipher()
    finally:
        lab.close(keep_logs)
        for path in work.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(path, keep_logs / path.name)
        with contextlib.suppress(OSError):
            shutil.copy(work / "ours-config-dump.json", keep_logs / "ours-config-dump.json")
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        p: {k: statistics.median(v) for k, v in by.items() if k != "errors"}
        for p, by in samples.items()
    }
    for placement, mb in rss.items():
        figures[placement]["peak_rss_mb"] = mb
    ratios = {
        k: figures["ours"][k] / figures["envoy"][k]
        for k in LABELS
        if figures["ours"].get(k) and figures["envoy"].get(k)
    }
    return {
        "cluster": lab.name,
        "figures": figures,
        "ratios": ratios,
        "errors": {p: sum(samples[p].get("errors", [])) for p in WAYPOINT_PLACEMENTS},
        "failures": failures,
        "cipher": cipher,
        "seconds": seconds,
        "rounds": rounds,
        "logs": str(keep_logs),
        "mesh_logs": scan_logs(keep_logs),
    }


def table(result: dict[str, Any]) -> str:
    figures, ratios = result["figures"], result["ratios"]
    rows = [
        "| figure | L4 only (no waypoint) | ours | envoy | ours/envoy | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for figure, label in LABELS.items():
        ratio = ratios.get(figure)
        target = "(no target)"
        if figure in TARGETS and ratio is not None:
            op, bound = TARGETS[figure]
            ok = ratio >= bound if op == ">=" else ratio <= bound
            target = f"{'pass' if ok else 'MISS'} ({op} {bound:g})"
        rows.append(
            f"| {label} | {fmt(figures['l4'].get(figure))} | "
            f"{fmt(figures['ours'].get(figure))} | {fmt(figures['envoy'].get(figure))} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {target} |"
        )
    return "\n".join(rows)


def describe(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']}, "
        f"{m['openssl']}, uvloop {m['uvloop']}; Envoy {m['envoy']} (`--concurrency 1`).",
        f"TLS: ztunnels pinned to TLS_AES_128_GCM_SHA256 / X25519; Envoy waypoint "
        f"{result['cipher']}.",
        f"Each figure: median of {result['rounds']} interleaved rounds (l4, ours, envoy, the "
        f"order turning each round) of {result['seconds']:g} s; client pod on node1, server "
        "pod (nginx) on node2, both waypoints on node3 of a meshlab cluster, requests to "
        "the Service VIP; `make bench` (`python -m bench.waypoint_bench`).",
    ]
    if result["failures"]:
        lines.append(f"{len(result['failures'])} load(s) failed: " + "; ".join(result["failures"]))
    errors = result["errors"]
    if any(errors.values()):
        lines.append(
            "Failed requests (non-2xx + socket errors, all rounds): "
            + ", ".join(f"{p} {errors[p]:.0f}" for p in WAYPOINT_PLACEMENTS)
            + "."
        )
    return lines


def record(path: Path, result: dict[str, Any]) -> None:
    section = [f"## Waypoint, {result['date']}", "", *describe(result), "", table(result), ""]
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    path.write_text(text.rstrip() + "\n\n" + "\n".join(section))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.waypoint_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8, help="each load (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--record", type=Path, help="append the table to this markdown file")
    parser.add_argument("--logs", type=Path, help="keep each run's logs in DIR/<cluster>")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    missing = _missing_tools()
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 1

    def log(line: str) -> None:
        if line:
            print(line, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    result = measure(args.seconds, args.rounds, log, args.logs)
    result["machine"] = machine()
    result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["wall_s"] = time.monotonic() - started
    print("\n".join(describe(result)))
    print()
    print(table(result))
    for name, found in result["mesh_logs"].items():
        total = sum(found["messages"].values())
        if total or found["tracebacks"]:
            log(f"{name}: {total} warnings/errors, {found['tracebacks']} tracebacks")
    log(f"logs kept in {result['logs']}; whole run {result['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        record(args.record, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
