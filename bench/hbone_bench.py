"""HBONE side by side on loopback: direct, our pair, an Envoy pair, in one run.

    python -m bench.hbone_bench [--seconds 8] [--rounds 3] [--json out.json] [--record RESULTS.md]

Each pair is a client end (plain TCP in, HBONE out) and a server end (HBONE
in, plain TCP out): ``python -m mesh.hbone forward`` -> ``serve`` for us,
``tcp_proxy``+``tunneling_config`` -> CONNECT-terminating HTTP connection
manager for Envoy (``--concurrency 1``). Both negotiate TLS 1.3 with
TLS_AES_128_GCM_SHA256 over X25519 (BoringSSL's choice; ours is pinned to it
with an OpenSSL config file) and use the same HTTP/2 windows. Figures:

* iperf3 throughput, one stream and ``-P 4``;
* wrk keep-alive requests/s and p50/p99 latency to nginx;
* wrk with ``Connection: close``: new tunnelled connections per second;
* CPU-seconds per GB moved (both proxies of a pair, during the iperf3 runs);
* peak RSS of each proxy process (VmHWM).

Every figure is the median of ``--rounds`` runs, the rounds interleaved
(direct, ours, envoy, direct, ...) so a noisy moment hurts all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.envoy import (
    Envoy,
    client_config,
    envoy_binary,
    free_port,
    negotiated_cipher,
    server_config,
)

REPO = Path(__file__).resolve().parents[1]
SERVER_SAN = "spiffe://cluster.local/ns/bench/sa/server"
CLIENT_SAN = "spiffe://cluster.local/ns/bench/sa/client"
OPENSSL_CONF = """openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = TLS_AES_128_GCM_SHA256
Groups = X25519
"""
# Issue 14's targets for the HBONE pair, as ratios ours/envoy: (direction, bound).
TARGETS: dict[str, tuple[str, float]] = {
    "iperf_1_gbps": (">=", 1.0),
    "iperf_4_gbps": (">=", 1.0),
    "keepalive_rps": (">=", 1.0),
    "keepalive_p50_ms": ("<=", 1.0),
    "keepalive_p99_ms": ("<=", 1.0),
    "newconn_rps": (">=", 1.0),
    "cpu_s_per_gb": ("<=", 1.0),
    "client_rss_mb": ("<=", 0.5),
    "server_rss_mb": ("<=", 0.5),
}
LABELS = {
    "iperf_1_gbps": "iperf3 1 stream (Gbit/s)",
    "iperf_4_gbps": "iperf3 -P 4 (Gbit/s)",
    "keepalive_rps": "wrk keep-alive (req/s)",
    "keepalive_p50_ms": "wrk keep-alive p50 (ms)",
    "keepalive_p99_ms": "wrk keep-alive p99 (ms)",
    "newconn_rps": "new connections (conn/s)",
    "cpu_s_per_gb": "CPU-seconds per GB",
    "client_rss_mb": "client peak RSS (MB)",
    "server_rss_mb": "server peak RSS (MB)",
}


# ------------------------------------------------------------------ processes


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(port: int, timeout_s: float = 15) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


@dataclass
class Pair:
    """A proxy pair in front of one backend; ``port`` is where clients connect."""

    name: str
    port: int
    pids: dict[str, int] = field(default_factory=dict)  # role -> pid
    stop_fns: list[Any] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids.values())

    def stop(self) -> None:
        for fn in reversed(self.stop_fns):
            with contextlib.suppress(Exception):
                fn()


class Lab:
    """Certificates, backends and proxy pairs in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.envoys: list[Envoy] = []
        self._certs()
        (self.dir / "openssl.cnf").write_text(OPENSSL_CONF)

    def _certs(self) -> None:
        from mesh.identity import CertificateAuthority, SpiffeId, generate_key_and_csr

        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.create("cluster.local", now=now)
        (self.dir / "ca.pem").write_bytes(ca.root_pem)
        for name, san in (("server", SERVER_SAN), ("client", CLIENT_SAN)):
            identity = SpiffeId.parse(san)
            key, csr = generate_key_and_csr(identity)
            issued = ca.sign_csr(csr, identity, now=now)
            (self.dir / f"{name}.pem").write_bytes(issued.chain_pem)
            (self.dir / f"{name}.key").write_bytes(key)

    def files(self, name: str) -> dict[str, Path]:
        return {
            "cert": self.dir / f"{name}.pem",
            "key": self.dir / f"{name}.key",
            "ca": self.dir / "ca.pem",
        }

    def spawn(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.dir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        log.close()
        self.processes.append(process)
        return process

    # --------------------------------------------------------- backends

    def iperf_server(self) -> int:
        port = free_port()
        self.spawn(["iperf3", "-s", "-p", str(port)], "iperf3")
        wait_port(port)
        return port

    def nginx(self) -> int:
        port = free_port()
        conf = nginx_config(self.dir / "nginx", f"127.0.0.1:{port}")
        self.spawn(["nginx", "-c", str(conf), "-p", str(conf.parent)], "nginx")
        wait_port(port)
        return port

    # ------------------------------------------------------------ pairs

    def direct(self, backend: int) -> Pair:
        return Pair("direct", backend)

    def ours(self, backend: int) -> Pair:
        hbone, local = free_port(), free_port()
        env = {"OPENSSL_CONF": str(self.dir / "openssl.cnf")}
        python = sys.executable
        server = self.spawn(
            [
                python,
                "-m",
                "mesh.hbone",
                "serve",
                "--listen",
                f"127.0.0.1:{hbone}",
                *self._flags("server"),
                "--log-level",
                "debug",
            ],
            f"ours-server-{backend}",
            env,
        )
        wait_port(hbone)
        client = self.spawn(
            [
                python,
                "-m",
                "mesh.hbone",
                "forward",
                "--listen",
                f"127.0.0.1:{local}",
                "--peer",
                f"127.0.0.1:{hbone}",
                "--target",
                f"127.0.0.1:{backend}",
                "--peer-identity",
                SERVER_SAN,
                *self._flags("client"),
            ],
            f"ours-client-{backend}",
            env,
        )
        wait_port(local)
        pair = Pair("ours", local, {"client": client.pid, "server": server.pid})
        pair.stop_fns += [server.terminate, client.terminate]
        return pair

    def _flags(self, name: str) -> list[str]:
        f = self.files(name)
        return ["--cert", str(f["cert"]), "--key", str(f["key"]), "--ca", str(f["ca"])]

    def envoy(self, backend: int) -> Pair:
        hbone, local = free_port(), free_port()
        server = Envoy(
            server_config(
                listen_port=hbone,
                admin_port=free_port(),
                upstream=("127.0.0.1", backend),
                peer_sans=[CLIENT_SAN],
                **self.files("server"),
            ),
            self.dir,
            f"envoy-server-{backend}",
        ).start()
        client = Envoy(
            client_config(
                listen_port=local,
                admin_port=free_port(),
                peer=("127.0.0.1", hbone),
                authority=f"127.0.0.1:{backend}",
                peer_sans=[SERVER_SAN],
                **self.files("client"),
            ),
            self.dir,
            f"envoy-client-{backend}",
        ).start()
        self.envoys += [server, client]
        assert server.process is not None and client.process is not None
        pair = Pair("envoy", local, {"client": client.process.pid, "server": server.process.pid})
        pair.stop_fns += [server.stop, client.stop]
        pair.envoy_server = server  # type: ignore[attr-defined]
        return pair

    def close(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


# -------------------------------------------------------------------- loads


def nginx_config(root: Path, listen: str) -> Path:
    """An nginx that answers every request with a short body, under ``root``."""
    root.mkdir(exist_ok=True)
    conf = root / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    server {{
        listen {listen} reuseport;
        location / {{ return 200 "hello from nginx\\n"; }}
    }}
}}
""")
    return conf


def iperf(port: int, seconds: float, streams: int) -> tuple[float, int]:
    """(Gbit/s received, bytes received)."""
    out = subprocess.run(
        [
            "iperf3",
            "-c",
            "127.0.0.1",
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            "-J",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    result = json.loads(out.stdout)
    if "error" in result:
        raise RuntimeError(f"iperf3 through port {port}: {result['error']}")
    received = result["end"]["sum_received"]
    return received["bits_per_second"] / 1e9, int(received["bytes"])


_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def wrk(port: int, seconds: float, *, close: bool) -> dict[str, float]:
    argv = ["wrk", "-t1", "-c50", f"-d{seconds:g}s", "--latency", f"http://127.0.0.1:{port}/"]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 60, check=False
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if rps is None:
        raise RuntimeError(f"wrk through port {port} printed no result:\n{out}")
    result = {"rps": float(rps.group(1))}
    for pct, value, unit in _LATENCY.findall(out):
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
        result[f"p{pct}_ms"] = float(value) * scale
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = float(non2xx.group(1)) if non2xx else 0.0
    if errors:
        result["socket_errors"] = float(sum(int(n) for n in re.findall(r"\d+", errors.group(1))))
    return result


# ------------------------------------------------------------------ the run


def measure(seconds: float, rounds: int, log: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hbone-bench-"))
    lab = Lab(work)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in ("direct", "ours", "envoy")}

    def add(pair: str, figure: str, value: float) -> None:
        samples[pair].setdefault(figure, []).append(value)

    rss: dict[str, dict[str, float]] = {"ours": {}, "envoy": {}}
    try:
        iperf_port = lab.iperf_server()
        nginx_port = lab.nginx()
        pairs = {
            "iperf": {
                "direct": lab.direct(iperf_port),
                "ours": lab.ours(iperf_port),
                "envoy": lab.envoy(iperf_port),
            },
            "nginx": {
                "direct": lab.direct(nginx_port),
                "ours": lab.ours(nginx_port),
                "envoy": lab.envoy(nginx_port),
            },
        }
        for round_ in range(rounds):
            for name, pair in pairs["iperf"].items():
                for streams in (1, 4):
                    cpu0 = pair.cpu()
                    gbps, moved = iperf(pair.port, seconds, streams)
                    cpu = pair.cpu() - cpu0
                    add(name, f"iperf_{streams}_gbps", gbps)
                    if name != "direct":
                        add(name, "cpu_s_per_gb", cpu / (moved / 1e9))
                    log(
                        f"round {round_ + 1}: {name:6} iperf3 -P {streams}: {gbps:6.2f} Gbit/s"
                        + (f", {cpu / (moved / 1e9):.2f} CPU-s/GB" if name != "direct" else "")
                    )
            for name, pair in pairs["nginx"].items():
                keep = wrk(pair.port, seconds, close=False)
                add(name, "keepalive_rps", keep["rps"])
                add(name, "keepalive_p50_ms", keep.get("p50_ms", 0.0))
                add(name, "keepalive_p99_ms", keep.get("p99_ms", 0.0))
                new = wrk(pair.port, seconds, close=True)
                add(name, "newconn_rps", new["rps"])
                log(
                    f"round {round_ + 1}: {name:6} wrk keep-alive {keep['rps']:9.0f} req/s "
                    f"p50 {keep.get('p50_ms', 0):.2f} ms p99 {keep.get('p99_ms', 0):.2f} ms; "
                    f"Connection: close {new['rps']:8.0f} conn/s"
                )
        for group_name, group in pairs.items():
            for name in ("ours", "envoy"):
                for role, pid in group[name].pids.items():
                    key = f"{role}_rss_mb"
                    peak = peak_rss_mb(pid)
                    log(f"{name:6} {role} ({group_name} pair): peak RSS {peak:.1f} MB")
                    rss[name][key] = max(rss[name].get(key, 0.0), peak)
        ciphers = {
            "ours": _our_cipher(work),
            "envoy": _envoy_cipher(pairs["iperf"]["envoy"]),
        }
    finally:
        for group in locals().get("pairs", {}).values():
            for pair in group.values():
                pair.stop()
        lab.close()
    figures: dict[str, dict[str, float]] = {}
    for name, by_figure in samples.items():
        figures[name] = {k: statistics.median(v) for k, v in by_figure.items()}
    for name in ("ours", "envoy"):
        figures[name].update(rss[name])
    ratios = {
        k: figures["ours"][k] / figures["envoy"][k] for k in TARGETS if figures["envoy"].get(k)
    }
    shutil.rmtree(work, ignore_errors=True)
    return {
        "figures": figures,
        "ratios": ratios,
        "ciphers": ciphers,
        "samples": samples,
        "seconds": seconds,
        "rounds": rounds,
    }


def _our_cipher(work: Path) -> str:
    for log in sorted(work.glob("ours-server-*.log")):
        found = re.search(r"cipher (\S+)", log.read_text())
        if found:
            return found.group(1)
    return "unknown"


def _envoy_cipher(pair: Pair) -> str:
    envoy: Envoy = pair.envoy_server  # type: ignore[attr-defined]
    return negotiated_cipher(envoy.stats())


# ---------------------------------------------------------------- reporting


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    envoy = envoy_binary()
    envoy_version = "?"
    if envoy is not None:
        out = subprocess.run(
            [str(envoy), "--version"], capture_output=True, text=True, check=False
        ).stdout
        match = re.search(r"/(\d+\.\d+\.\d+)/", out)
        envoy_version = match.group(1) if match else out.strip()[:60]
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "uvloop": version("uvloop"),
        "envoy": envoy_version,
    }


def verdict(figure: str, ratio: float) -> str:
    op, bound = TARGETS[figure]
    ok = ratio >= bound if op == ">=" else ratio <= bound
    return f"{'pass' if ok else 'MISS'} ({op} {bound:g})"


def table(result: dict[str, Any]) -> str:
    figures, ratios = result["figures"], result["ratios"]
    rows = [
        "| figure | direct | ours | envoy | ours/envoy | target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for figure in TARGETS:
        direct = figures["direct"].get(figure)
        ours = figures["ours"].get(figure)
        envoy = figures["envoy"].get(figure)
        ratio = ratios.get(figure)
        rows.append(
            f"| {LABELS[figure]} | {_fmt(direct)} | {_fmt(ours)} | {_fmt(envoy)} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | "
            f"{'' if ratio is None else verdict(figure, ratio)} |"
        )
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def record(path: Path, result: dict[str, Any]) -> None:
    m = result["machine"]
    section = [
        f"## HBONE, {result['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']}, "
        f"{m['openssl']}, uvloop {m['uvloop']}; Envoy {m['envoy']} (`--concurrency 1`).",
        f"TLS: ours {result['ciphers']['ours']} / X25519, Envoy {result['ciphers']['envoy']}.",
        f"Each figure: median of {result['rounds']} interleaved rounds of "
        f"{result['seconds']:g} s on loopback; `make bench` "
        "(`python -m bench.hbone_bench`).",
        "",
        table(result),
        "",
    ]
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    path.write_text(text.rstrip() + "\n\n" + "\n".join(section))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hbone_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--record", type=Path, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    for tool, package in (("iperf3", "iperf3"), ("wrk", "wrk"), ("nginx", "nginx-light")):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} is missing (Debian package {package}; `make bench` installs it)",
                file=sys.stderr,
            )
            return 1
    if envoy_binary() is None:
        print("bench: envoy is missing (`make envoy`)", file=sys.stderr)
        return 1

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = measure(args.seconds, args.rounds, log)
    result["machine"] = machine()
    result["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.record:
        record(args.record, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
