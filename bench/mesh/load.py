"""The loads on a placement: iperf3, wrk, the warm-up, one placement measured, its CPU.

The clients run as processes of the client pod (its network namespace and cgroup)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from collections.abc import Callable

from bench.hbone_bench import cpu_seconds
from bench.mesh.lab import MeshLab
from bench.mesh.shell import BenchError
from bench.mesh.topology import IPERF_PORT

WARMUP_S = 1.0


def iperf(lab: MeshLab, seconds: float) -> tuple[float, int]:
    """(Gbit/s, bytes) received, one stream, client pod -> server pod; one retry."""
    duration = str(max(1, round(seconds)))
    last = ""
    for attempt in range(2):
        try:
            out = lab.in_pod(
                lab.client_ns,
                ["iperf3", "-c", lab.server_ip, "-p", str(IPERF_PORT), "-t", duration, "-J"],
                timeout_s=seconds + 60,
                check=False,
            )
            result = json.loads(out)
            if "error" in result:
                raise BenchError(result["error"])
            received = result["end"]["sum_received"]
            return float(received["bits_per_second"]) / 1e9, int(received["bytes"])
        except (BenchError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
            last = str(e)
            lab.log(f"   iperf3 failed (attempt {attempt + 1}: {last}); restarting its server")
            lab.start_iperf()
    raise BenchError(f"iperf3 in placement {lab.mode}: {last}")


_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def wrk(lab: MeshLab, seconds: float, *, close: bool) -> dict[str, float]:
    """wrk from the client pod to what the lab's placements serve (``lab.url``), with the
    lab's ``headers``."""
    argv = ["wrk", "-t1", "-c50", f"-d{seconds:g}s", "--latency"]
    for header in lab.headers:
        argv += ["-H", header]
    if close:
        argv += ["-H", "Connection: close"]
    out = lab.in_pod(
        lab.client_ns,
        [*argv, lab.url],
        timeout_s=seconds + 60,
        check=False,
    )
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise BenchError(f"wrk in placement {lab.mode} printed no result:\n{out}")
    result = {"rps": float(rps.group(1))}
    done = re.search(r"(\d+) requests in", out)
    result["requests"] = float(done.group(1)) if done else 0.0
    for pct, value, unit in _LATENCY.findall(out):
        result[f"p{pct}_ms"] = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(non2xx.group(1)) if non2xx else 0.0
    socket_errors = re.search(r"Socket errors: (.*)", out)
    result["socket_errors"] = (
        float(sum(int(n) for n in re.findall(r"\d+", socket_errors.group(1))))
        if socket_errors
        else 0.0
    )
    return result


def warm_up(lab: MeshLab) -> None:
    """A second of new connections through the placement just made, not measured.

    Each placement starts cold (pods just enrolled, Envoys just started):
    without this the first round of each pays for first calls and allocations.
    """
    with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
        wrk(lab, WARMUP_S, close=True)


def measure_placement(
    lab: MeshLab, seconds: float, add: Callable[[str, float], None], round_: int
) -> None:
    name = lab.mode or "?"
    pids = lab.proxy_pids()
    cpu = cpu_of(pids)
    gbps, moved = iperf(lab, seconds)
    cpu_iperf = cpu_of(pids) - cpu
    add("iperf_gbps", gbps)
    keep = wrk(lab, seconds, close=False)
    add("keepalive_rps", keep["rps"])
    add("keepalive_p50_ms", keep.get("p50_ms", 0.0))
    add("keepalive_p99_ms", keep.get("p99_ms", 0.0))
    cpu = cpu_of(pids)
    new = wrk(lab, seconds, close=True)
    cpu_new = cpu_of(pids) - cpu
    add("newconn_rps", new["rps"])
    if new["requests"]:
        young = lab.client_time_waits(seconds + 2)
        add("client_tw_per_conn", young / new["requests"])
    if pids:
        add("cpu_s_per_gb", cpu_iperf / (moved / 1e9) if moved else 0.0)
        add("cpu_us_per_conn", cpu_new / new["requests"] * 1e6 if new["requests"] else 0.0)
    errors = keep["errors"] + keep["socket_errors"] + new["errors"] + new["socket_errors"]
    add("errors", errors)
    lab.log(
        f"round {round_}: {name:5} iperf3 {gbps:6.2f} Gbit/s; keep-alive {keep['rps']:8.0f} req/s "
        f"p50 {keep.get('p50_ms', 0):.2f} ms p99 {keep.get('p99_ms', 0):.2f} ms; "
        f"Connection: close {new['rps']:7.0f} conn/s"
        + (
            f"; proxies' CPU {cpu_iperf / (moved / 1e9):.2f} s/GB, "
            f"{cpu_new / max(new['requests'], 1) * 1e6:.0f} us/conn"
            if pids and moved
            else ""
        )
        + (f"; {errors:.0f} errors (non-2xx + socket)" if errors else "")
    )


def cpu_of(pids: list[int]) -> float:
    """CPU-seconds used so far by ``pids`` (all their threads)."""
    return sum(cpu_seconds(pid) for pid in pids)
