"""The waypoint on meshlab: client pod -> ztunnel -> waypoint -> ztunnel -> server pod.

    python -m bench.waypoint_bench [--seconds 8] [--rounds 3] [--extra-rounds 2]
                                   [--configs plain,security,tracing1,tracing100]
                                   [--json out.json] [--record RESULTS.md] [--logs DIR]

Needs root, the CNI plugins meshlab uses, wrk, nginx-light and Envoy (`make
bench` installs them). The defaults (all four configurations) take about 9
minutes: 3 rounds of ``plain`` (about 3 minutes, as before), then 2 rounds of
each other configuration (``--extra-rounds``; about 2 minutes each, with
their setup and checks). ``--configs plain`` is the bench of before.

The cluster and the three placements are :mod:`bench.mesh.waypoint_lab`'s:
``l4`` (the Service bound to no waypoint: ztunnel to ztunnel), ``ours`` (our
waypoint) and ``envoy`` (Envoy 1.40 as the waypoint, terminating and
originating HBONE, with the same resources meshd sent ours). Each round
measures the placements in turn (the order turning each round), each warmed
up by a second of new connections first; every figure is the median over
the rounds. Both waypoints run on node3, one process each (Envoy
``--concurrency 1``); the ztunnels' TLS suite is pinned to Envoy's
(TLS_AES_128_GCM_SHA256), as in :mod:`bench.mesh_bench`.

The configurations (:mod:`bench.mesh.waypoint_configs`), one after the
other, each applied to our waypoint's Gateway by ``targetRefs`` (Envoy
restarted with what meshd then sent ours) and deleted once measured:

* ``plain``: routing only; l4, ours and envoy;
* ``security``: AuthorizationPolicy ALLOW by the client's principal and
  GET ``/*``, RequestAuthentication with an inline JWKS (an RSA key made at
  start; wrk sends the token it signed), a DENY of requests without a
  request principal, Istio's local rate limit EnvoyFilter with a bucket that
  never runs dry; ours and envoy. Checked first on both waypoints: GET 403
  without the token, 200 with it, POST 403 with it (the ALLOW's operation);
  and Envoy's rate limit filter counting requests;
* ``tracing1`` / ``tracing100``: Telemetry with an OpenTelemetry provider
  (MeshConfig in the ``istio`` ConfigMap), sampling 1 % (Istio's default)
  and 100 % (the worst case), exporting to a real OTLP/gRPC receiver
  (:mod:`bench.mesh.otlp_sink`, in a pod of its own; its CPU is not counted
  as the waypoints', but it shares the machine); ours and envoy. Checked
  first at 100 %: a burst's spans arrive from each waypoint; the spans
  received during the measurement are reported against the requests each
  waypoint served.

L4 is measured in ``plain`` only (no configuration touches it).

Figures, through the Service's VIP (``http://10.96.0.50/``, nginx behind it):

* wrk keep-alive (1 thread, 50 connections): requests/s, p50 and p99;
* wrk with ``Connection: close``: new connections per second (each one a new
  HBONE stream to the waypoint, whose upstream connection is pooled);
* the waypoint's CPU per request (keep-alive run) and per new connection;
* the waypoint's peak RSS (VmHWM, reset to the current RSS when the
  configuration starts; Envoy is a new process each configuration, ours keeps
  its heap from the one before, hence tracing1 before tracing100) at the end
  of the configuration.

Each configuration's table has the ratio ours/Envoy and each proxy's change
from its own ``plain`` figure (the cost of the configuration).

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.hbone_bench import machine
from bench.mesh.load import cpu_of, warm_up, wrk
from bench.mesh.report import fmt, scan_logs
from bench.mesh.shell import BenchError, Log, wait_until
from bench.mesh.waypoint_configs import CONFIGS, JwtIssuer, objects, sampling_of
from bench.mesh.waypoint_lab import BURST, WAYPOINT_PLACEMENTS, WaypointLab
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
TITLES = {
    "plain": "routing only",
    "security": "AuthorizationPolicy (principal + operation), RequestAuthentication (JWT, "
    "inline JWKS), DENY without a request principal, local rate limit (a bucket that "
    "never runs dry)",
    "tracing100": "Telemetry, OpenTelemetry provider, randomSamplingPercentage 100, OTLP/gRPC "
    "receiver in a pod",
    "tracing1": "Telemetry, OpenTelemetry provider, randomSamplingPercentage 1 (Istio's "
    "default), OTLP/gRPC receiver in a pod",
}
WAYPOINTS = ("ours", "envoy")
Add = Callable[..., None]


def measure_placement(
    lab: WaypointLab, seconds: float, add: Add, round_: int, config: str = "plain"
) -> None:
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
    add("requests", keep["requests"] + new["requests"])
    if pids:
        add("cpu_us_per_request", cpu_keep / max(keep["requests"], 1) * 1e6)
        add("cpu_us_per_conn", cpu_new / max(new["requests"], 1) * 1e6)
    errors = keep["errors"] + keep["socket_errors"] + new["errors"] + new["socket_errors"]
    add("errors", errors)
    lab.log(
        f"round {round_} {config}: {lab.mode:5} keep-alive {keep['rps']:8.0f} req/s "
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


# ------------------------------------------------------------- checks before measuring


def check_security(lab: WaypointLab, token_header: str) -> None:
    """On each waypoint: 403 without the token, 200 with it (enforcement, not a typo)."""
    for placement in WAYPOINTS:
        lab.place(placement)  # its path check sends the token (lab.headers)
        without, with_token = lab.status(), lab.status((token_header,))
        forged = lab.status((token_header.rsplit(".", 1)[0] + ".AAAA",))
        post = lab.status((token_header,), method="POST")  # not the ALLOW's operation
        lab.log(
            f"   {placement}: GET {without} without the token, {with_token} with it, "
            f"{forged} with a forged signature; POST with it {post}"
        )
        if without != "403" or with_token != "200" or post != "403":
            raise BenchError(
                f"security on {placement}: GET {without} without the token (want 403), "
                f"{with_token} with it (want 200); POST with it {post} (want 403)"
            )
        if placement == "envoy":
            limited = {
                k: v for k, v in lab.envoys[0].stats().items() if "http_local_rate_limit." in k
            }
            if not any(k.endswith(".enabled") and v for k, v in limited.items()):
                raise BenchError(f"Envoy's local rate limit counted nothing: {limited}")


def check_spans(lab: WaypointLab) -> None:
    """On each waypoint: a burst of requests, and as many spans from it at the receiver."""
    for placement in WAYPOINTS:
        lab.place(placement)
        before = lab.spans()[placement]
        for _ in range(BURST):
            wrong = lab.request()
            if wrong is not None:
                raise BenchError(f"tracing on {placement}: {wrong}")

        def arrived(p: str = placement, base: int = before) -> str | None:
            got = lab.spans()[p] - base
            return None if got >= BURST else f"{got} of {BURST} spans from {p}"

        wait_until(f"{placement}'s spans at the receiver", arrived, 30)
        lab.log(f"   {placement}: {BURST} requests, {lab.spans()[placement] - before} spans")


def settled_spans(lab: WaypointLab, timeout_s: float = 12.0) -> dict[str, int]:
    """The receiver's counts once they stop growing (Envoy flushes every 5 s)."""
    last, deadline = lab.spans(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = lab.spans()
        if now == last:
            break
        last = now
    return last


# ------------------------------------------------------------- one configuration


def run_config(
    lab: WaypointLab,
    config: str,
    issuer: JwtIssuer,
    seconds: float,
    rounds: int,
    log: Log,
) -> dict[str, Any]:
    """Apply ``config``, check it, measure its placements, delete it; its samples."""
    placements = WAYPOINT_PLACEMENTS if config == "plain" else WAYPOINTS
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in placements}
    failures: list[str] = []
    out: dict[str, Any] = {"samples": samples, "failures": failures, "rss": {}}
    docs = objects(config, lab.client_principal, issuer)
    path = lab.dir / f"{config}.yaml"
    path.write_text("\n---\n".join(json.dumps(d) for d in docs) + "\n")
    tracing = sampling_of(config) is not None
    applied = False
    log(f"== configuration {config}: {TITLES[config]}")
    try:
        if tracing:
            lab.start_collector()
        if docs:
            applied = True  # from here on, `meshlab delete` in any case
            lab.apply(path, config)
        lab.headers = (issuer.header,) if config == "security" else ()
        if config == "security":
            check_security(lab, issuer.header)
        if config == "tracing100":
            check_spans(lab)
        lab.reset_peak_rss()
        spans_before = lab.spans() if tracing else {}
        served_before = lab.counted()
        for round_ in range(1, rounds + 1):
            shift = (round_ - 1) % len(placements)
            for placement in placements[shift:] + placements[:shift]:
                lab.place(placement)
                warm_up(lab)

                def add(figure: str, value: float, p: str = placement) -> None:
                    samples[p].setdefault(figure, []).append(value)

                try:
                    measure_placement(lab, seconds, add, round_, config)
                except (BenchError, subprocess.TimeoutExpired) as e:
                    failures.append(f"{config}, round {round_}, {placement}: {e}")
                    log(f"round {round_} {config}: {placement} failed: {e}")
        out["rss"] = {p: lab.peak_rss_mb(p) for p in WAYPOINTS}
        with contextlib.suppress(Exception):  # while this Envoy has handshaken
            out["cipher"] = lab.envoy_cipher()
        if tracing:
            got = settled_spans(lab)
            served = lab.counted()
            out["spans"] = {p: got[p] - spans_before.get(p, 0) for p in (*WAYPOINTS, "other")}
            out["served"] = {p: served[p] - served_before[p] for p in WAYPOINTS}
            log(f"   spans received {out['spans']}, requests served {out['served']}")
    except (BenchError, subprocess.TimeoutExpired) as e:
        failures.append(f"{config}: {e}")
        log(f"configuration {config} failed: {e}")
    finally:
        lab.headers = ()
        try:
            if applied:
                lab.delete(path)  # raises when it cannot: the next configurations would lie
                log(f"   {config}: its {len(docs)} objects deleted, Envoy back to plain")
        finally:
            if tracing:
                lab.stop_collector()
    return out


def summarize(config: str, run: dict[str, Any]) -> dict[str, Any]:
    samples = run["samples"]
    figures = {
        p: {k: statistics.median(v) for k, v in by.items() if k not in ("errors", "requests")}
        for p, by in samples.items()
    }
    for placement, mb in run["rss"].items():
        figures.setdefault(placement, {})["peak_rss_mb"] = mb
    ours, envoy = figures.get("ours", {}), figures.get("envoy", {})
    ratios = {k: ours[k] / envoy[k] for k in LABELS if ours.get(k) and envoy.get(k)}
    out: dict[str, Any] = {
        "figures": figures,
        "ratios": ratios,
        "errors": {p: sum(samples[p].get("errors", [])) for p in samples},
        "requests": {p: sum(samples[p].get("requests", [])) for p in samples},
        "failures": run["failures"],
    }
    for key in ("spans", "served"):
        if key in run:
            out[key] = run[key]
    return out


def add_costs(configs: dict[str, dict[str, Any]]) -> None:
    """Each configuration's figures against its proxy's plain ones: ``value / plain``."""
    plain = configs.get("plain")
    if plain is None:
        return
    for config, result in configs.items():
        if config == "plain":
            continue
        result["vs_plain"] = {
            p: {
                k: v / plain["figures"][p][k]
                for k, v in result["figures"].get(p, {}).items()
                if plain["figures"].get(p, {}).get(k)
            }
            for p in WAYPOINTS
        }


def measure(
    seconds: float,
    rounds: int,
    log: Log,
    logs: Path | None,
    configs: tuple[str, ...] = CONFIGS,
    extra_rounds: int = 2,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="waypoint-bench-"))
    lab = WaypointLab(work, log)
    keep_logs = logs / lab.name if logs else Path(tempfile.mkdtemp(prefix=f"wp-{lab.name}-"))
    keep_logs.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    cipher = "unknown"
    try:
        issuer = JwtIssuer()
        lab.start()
        for config in configs:
            try:
                runs[config] = run_config(
                    lab, config, issuer, seconds, rounds if config == "plain" else extra_rounds, log
                )
            except (BenchError, subprocess.TimeoutExpired) as e:
                # Its objects could not be deleted: what follows would not be measured clean.
                failures.append(f"{config}: {e}; the configurations after it not measured")
                log(f"configuration {config}: {e}; stopping here")
                break
        cipher = next(
            (r["cipher"] for r in runs.values() if "unknown" not in r.get("cipher", "unknown")),
            cipher,
        )
    finally:
        lab.close(keep_logs)
        for path in [*work.glob("*.log"), *work.glob("*.yaml"), *work.glob("ours-config-dump*")]:
            with contextlib.suppress(OSError):
                shutil.copy(path, keep_logs / path.name)
        shutil.rmtree(work, ignore_errors=True)
    results = {config: summarize(config, run) for config, run in runs.items()}
    add_costs(results)
    plain = results.get("plain", {"figures": {}, "ratios": {}, "errors": {}})
    return {
        "cluster": lab.name,
        "configs": results,
        # The plain configuration, where it always was.
        "figures": plain["figures"],
        "ratios": plain["ratios"],
        "errors": plain["errors"],
        "failures": failures + [f for r in results.values() for f in r["failures"]],
        "cipher": cipher,
        "seconds": seconds,
        "rounds": rounds,
        "extra_rounds": extra_rounds,
        "logs": str(keep_logs),
        "mesh_logs": scan_logs(keep_logs),
    }


# ------------------------------------------------------------- report


def _target(figure: str, ratio: float | None) -> str:
    if figure not in TARGETS or ratio is None:
        return "(no target)"
    op, bound = TARGETS[figure]
    ok = ratio >= bound if op == ">=" else ratio <= bound
    return f"{'pass' if ok else 'MISS'} ({op} {bound:g})"


def _change(x: float | None) -> str:
    return "-" if x is None else f"{(x - 1) * 100:+.0f} %"


def table(result: dict[str, Any], config: str = "plain") -> str:
    one = result["configs"][config] if "configs" in result else result
    figures, ratios = one["figures"], one["ratios"]
    if config == "plain":
        rows = [
            "| figure | L4 only (no waypoint) | ours | envoy | ours/envoy | target |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for figure, label in LABELS.items():
            ratio = ratios.get(figure)
            rows.append(
                f"| {label} | {fmt(figures.get('l4', {}).get(figure))} | "
                f"{fmt(figures.get('ours', {}).get(figure))} | "
                f"{fmt(figures.get('envoy', {}).get(figure))} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} | {_target(figure, ratio)} |"
            )
        return "\n".join(rows)
    vs = one.get("vs_plain", {})
    rows = [
        "| figure | ours | envoy | ours/envoy | target | ours vs its plain | envoy vs its plain |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for figure, label in LABELS.items():
        ratio = ratios.get(figure)
        rows.append(
            f"| {label} | {fmt(figures.get('ours', {}).get(figure))} | "
            f"{fmt(figures.get('envoy', {}).get(figure))} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {_target(figure, ratio)} | "
            f"{_change(vs.get('ours', {}).get(figure))} | "
            f"{_change(vs.get('envoy', {}).get(figure))} |"
        )
    return "\n".join(rows)


def costs(result: dict[str, Any]) -> list[str]:
    """One sentence per configuration: what it costs each proxy of its plain req/s and CPU."""
    lines = []
    for config, one in result["configs"].items():
        vs = one.get("vs_plain")
        if not vs:
            continue
        parts = []
        for p, name in (("ours", "ours"), ("envoy", "Envoy")):
            rps = vs.get(p, {}).get("keepalive_rps")
            cpu = vs.get(p, {}).get("cpu_us_per_request")
            if rps is None:
                parts.append(f"{name} -")
                continue
            lost = (1 - rps) * 100
            parts.append(
                f"{name} {lost:.0f} % of its req/s"
                + (" (more than its plain: noise)" if lost < 0 else "")
                + ("" if cpu is None else f" ({_change(cpu)} CPU per request)")
            )
        lines.append(f"* `{config}` costs " + ", ".join(parts) + ".")
    return lines


def describe(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    configs = list(result.get("configs", {"plain": {}}))
    extra = [c for c in configs if c != "plain"]
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
    if extra:
        lines.append(
            f"Configurations {', '.join(extra)}: {result.get('extra_rounds', '?')} round(s) of "
            "ours and envoy each, measured after plain (each applied to the waypoint by "
            "`meshlab apply`, Envoy restarted with what meshd then sent ours, deleted after); "
            "peak RSS since the configuration started (VmHWM reset to the RSS then: ours "
            "starts where the configuration before left it, Envoy afresh)."
        )
    if result["failures"]:
        lines.append(f"{len(result['failures'])} load(s) failed: " + "; ".join(result["failures"]))
    for config, one in result.get("configs", {}).items():
        errors = one.get("errors", {})
        if any(errors.values()):
            lines.append(
                f"Failed requests in {config} (non-2xx + socket errors, all rounds): "
                + ", ".join(f"{p} {n:.0f}" for p, n in errors.items())
                + "."
            )
    return lines


def _spans_line(one: dict[str, Any]) -> str | None:
    spans = one.get("spans")
    if spans is None:
        return None
    served = one.get("served", {})
    parts = []
    for p in WAYPOINTS:
        n = served.get(p, 0)
        share = f" ({spans[p] / n * 100:.1f} % of the {n:,} requests it served)" if n else ""
        parts.append(f"{p} {spans[p]:,}{share}")
    return "Spans at the receiver during the measurement: " + ", ".join(parts) + "."


def sections(result: dict[str, Any]) -> list[str]:
    """The tables after the description: plain's, then each configuration's, then the costs."""
    out = [table(result, "plain") if "plain" in result["configs"] else "", ""]
    for config, one in result["configs"].items():
        if config == "plain":
            continue
        out += [f"### Waypoint with {config}: {TITLES[config]}", ""]
        spans = _spans_line(one)
        if spans:
            out += [spans, ""]
        out += [table(result, config), ""]
    lines = costs(result)
    if lines:
        out += ["Cost of each configuration (keep-alive req/s lost against plain):", "", *lines, ""]
    return out


def record(path: Path, result: dict[str, Any]) -> None:
    section = [f"## Waypoint, {result['date']}", "", *describe(result), "", *sections(result)]
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    path.write_text(text.rstrip() + "\n\n" + "\n".join(section).rstrip() + "\n")


def _configs(text: str) -> tuple[str, ...]:
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {', '.join(unknown) or '(none)'}; known: {','.join(CONFIGS)}"
        )
    return tuple(dict.fromkeys(chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.waypoint_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8, help="each load (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of plain (default 3)")
    parser.add_argument(
        "--extra-rounds",
        type=int,
        default=2,
        help="rounds of each other configuration (default 2)",
    )
    parser.add_argument(
        "--configs",
        type=_configs,
        default=CONFIGS,
        help=f"the configurations to measure, in order (default {','.join(CONFIGS)})",
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--record", type=Path, help="append the tables to this markdown file")
    parser.add_argument("--logs", type=Path, help="keep each run's logs in DIR/<cluster>")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1 or args.extra_rounds < 1:
        parser.error("--seconds, --rounds and --extra-rounds must be at least 1")
    missing = _missing_tools()
    if missing:
        print(f"bench: {missing}", file=sys.stderr)
        return 1

    def log(line: str) -> None:
        if line:
            print(line, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    result = measure(args.seconds, args.rounds, log, args.logs, args.configs, args.extra_rounds)
    result["machine"] = machine()
    result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["wall_s"] = time.monotonic() - started
    print("\n".join(describe(result)))
    print()
    print("\n".join(sections(result)).rstrip())
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
