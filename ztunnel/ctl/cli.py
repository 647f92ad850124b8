"""The ``ztunnel-ctl`` command: ``istioctl ztunnel-config``'s views, and a few of our own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import yaml

from ztunnel.ctl import explain, hostpid, tables, verify
from ztunnel.ctl.document import Dump
from ztunnel.ctl.errors import CtlError
from ztunnel.ctl.fetch import (
    ADMIN_PORT,
    DEFAULT_ADMIN_URL,
    LEVELS,
    FileSource,
    Source,
    admin_source,
    connections,
    log_level,
    node_source,
)

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3

DESCRIPTION = """\
Inspect the ztunnel of one node through its admin API (127.0.0.1:15000 in the
node's network namespace), or a saved /config_dump. The tables are those of
`istioctl ztunnel-config`; authz-check, trace and verify are ours."""

EPILOG = f"""\
where to ask (one of; default --admin {DEFAULT_ADMIN_URL}):
  --node NODE [--cluster NAME]  the ztunnel of a meshlab node, reached inside the
                                node's netns (root; the only running cluster by default)
  --admin URL                   an admin server reachable from here
  -f DUMP.json                  a saved `curl localhost:15000/config_dump` (- for stdin)

exit codes:
  0  done; authz-check allows; trace goes through; verify finds no drift
  1  authz-check denies; trace is refused or denied; verify finds drift
  2  usage error
  3  no answer: ztunnel unreachable, a malformed dump, a command that needs a
     live ztunnel given -f, no such cluster/node/pod/service

examples:
  ztunnel-ctl --node node1 workloads -n shop
  ztunnel-ctl --node node1 services -o json
  ztunnel-ctl -f dump.json authz-check --from spiffe://cluster.local/ns/client/sa/sleep \\
      --to 10.244.1.2:8080
  ztunnel-ctl --node node1 trace --from client/sleep --to echo.server:80
  ztunnel-ctl --node node1 verify"""


def _source_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command: after it they default to
    # SUPPRESS so they never undo what was given before it.
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("where to ask")
    group.add_argument("--node", default=default, help="ask the ztunnel of this meshlab node")
    group.add_argument("--cluster", default=default, help="the meshlab cluster of --node")
    group.add_argument("--admin", metavar="URL", default=default, help="ztunnel's admin URL")
    group.add_argument("-f", "--file", metavar="DUMP.json", default=default, help="a saved dump")
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "short", "json", "yaml"),
        default="table" if top else argparse.SUPPRESS,
        help="table for people (istioctl's 'short'), json or yaml for scripts",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztunnel-ctl",
        usage="ztunnel-ctl [--node NODE [--cluster NAME] | --admin URL | -f DUMP.json] "
        "COMMAND [-o table|json|yaml] [filters]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _source_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, aliases=list(aliases), help=help, description=help)
        _source_options(p, top=False)
        p.set_defaults(command=name)
        return p

    def namespace(p: argparse.ArgumentParser, also: str) -> None:
        p.add_argument(
            "-n", "--namespace", also, dest="namespace", default="", help="only this one"
        )

    p = command("workloads", "the workloads ztunnel knows", ("workload", "w"))
    namespace(p, "--workload-namespace")
    p.add_argument("--address", default="", help="only the workload with this IP")
    p.add_argument("--workload-node", default="", help="only the workloads on this node")
    namespace(
        command("services", "the services ztunnel knows", ("service", "svc", "s")),
        "--service-namespace",
    )
    namespace(
        command("policies", "the authorization policies", ("policy", "pol", "p")),
        "--policy-namespace",
    )
    command(
        "certificates",
        "the certificates of the node's identities",
        ("certificate", "certs", "cert"),
    )
    p = command("connections", "the connections of the enrolled pods", ("cons",))
    namespace(p, "--workload-namespace")
    p.add_argument("--direction", choices=("inbound", "outbound"), default="")
    p.add_argument("--raw", action="store_true", help="addresses, not names")
    p = command("log", "show (or set, with --level) ztunnel's log level")
    p.add_argument("--level", choices=(*LEVELS, "warning", "critical"))
    command("all", "workloads, services, policies, certificates and connections")
    command("config-dump", "the whole /config_dump (JSON, or YAML with -o yaml)")
    p = command("authz-check", "would this source be allowed to reach this destination?")
    p.add_argument("--from", dest="src", required=True, metavar="SPIFFE_ID|IP")
    p.add_argument("--to", dest="dst", required=True, metavar="IP:PORT")
    p = command("trace", "how a new connection from a pod would go, and be authorized")
    p.add_argument("--from", dest="src", required=True, metavar="NAMESPACE/POD")
    p.add_argument("--to", dest="dst", required=True, metavar="HOST:PORT")
    command("verify", "check the enrolled pods' capture, listeners and certificates (root)")
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [o for o in ("node", "admin", "file") if getattr(args, o)]
    if len(given) > 1:
        parser.error(f"at most one of --node, --admin, -f (got {', '.join(given)})")
    if args.cluster and not args.node:
        parser.error("--cluster goes with --node")
    out = out or sys.stdout
    try:
        source: Source
        if args.node:
            source = node_source(args.node, args.cluster)
        elif args.file:
            source = FileSource(args.file)
        else:
            source = admin_source(args.admin or DEFAULT_ADMIN_URL)
        return COMMANDS[args.command](args, source, out)
    except explain.UsageError as e:
        print(f"ztunnel-ctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as e:
        hint = f" ({e.hint})" if e.hint else ""
        print(f"ztunnel-ctl: {e.message}{hint}", file=sys.stderr)
        return EXIT_NO_ANSWER


def _emit(args: argparse.Namespace, out: TextIO, data: object, table: Callable[[], str]) -> None:
    if args.output == "json":
        out.write(json.dumps(data, indent=2) + "\n")
    elif args.output == "yaml":
        out.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
    else:
        out.write(table())


def _filters(args: argparse.Namespace) -> tables.Filters:
    return tables.Filters(
        namespace=getattr(args, "namespace", ""),
        address=getattr(args, "address", ""),
        node=getattr(args, "workload_node", ""),
        direction=getattr(args, "direction", ""),
        raw=getattr(args, "raw", False),
    )


def _workloads(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    dump = source.config_dump()
    chosen = tables.select_workloads(dump, _filters(args))
    _emit(args, out, chosen, lambda: tables.workloads_table(dump, chosen))
    return EXIT_OK


def _services(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    dump = source.config_dump()
    chosen = tables.select_services(dump, _filters(args))
    _emit(args, out, chosen, lambda: tables.services_table(dump, chosen))
    return EXIT_OK


def _policies(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    chosen = tables.select_policies(source.config_dump(), _filters(args))
    _emit(args, out, chosen, lambda: tables.policies_table(chosen))
    return EXIT_OK


def _certificates(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    certs = source.config_dump().certificates()
    _emit(args, out, certs, lambda: tables.certificates_table(certs))
    return EXIT_OK


def _connections(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    f = _filters(args)
    if source.live:
        conns, dump = connections(source)
        if dump is None and not f.raw:
            dump = source.config_dump()  # for the names
    else:
        dump = source.config_dump()
        conns = dump.connections()
        if args.output not in ("json", "yaml"):
            print(
                f"ztunnel-ctl: connections as saved in {source.what}; live ones need "
                "--node or --admin",
                file=sys.stderr,
            )
    chosen = tables.select_connections(conns, f)
    _emit(args, out, chosen, lambda: tables.connections_table(dump, chosen, raw=f.raw))
    return EXIT_OK


def _log(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    if not source.live:
        raise CtlError(
            "log reads and sets a running ztunnel's level, and a saved dump has none",
            "use --node NODE or --admin URL",
        )
    line = log_level(source, args.level)
    level = line.rpartition(" ")[2] if line.startswith("current log level is") else ""
    _emit(args, out, {"level": level, "message": line}, lambda: line + "\n")
    return EXIT_OK


def _all(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    dump = source.config_dump()

    def summary() -> str:
        conns = tables.select_connections(dump.connections(), tables.Filters())
        parts = [
            tables.workloads_table(dump, tables.select_workloads(dump, tables.Filters())),
            tables.services_table(dump, tables.select_services(dump, tables.Filters())),
            tables.policies_table(tables.select_policies(dump, tables.Filters())),
            tables.certificates_table(dump.certificates()),
            tables.connections_table(dump, conns),
        ]
        return "".join("\n" + p for p in parts)

    _emit(args, out, dump.raw, summary)
    return EXIT_OK


def _config_dump(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    raw = source.config_dump().raw
    _emit(args, out, raw, lambda: json.dumps(raw, indent=2) + "\n")
    return EXIT_OK


def _authz_check(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    result = explain.authz_check(source.config_dump(), args.src, args.dst)
    _emit(args, out, result, lambda: explain.render_authz(result))
    return EXIT_OK if result["allowed"] else EXIT_NEGATIVE


def _trace(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    result = explain.trace(source.config_dump(), args.src, args.dst)
    _emit(args, out, result, lambda: explain.render_trace(result))
    return EXIT_OK if result["outcome"] in ("allowed", "passthrough") else EXIT_NEGATIVE


def _verify(args: argparse.Namespace, source: Source, out: TextIO) -> int:
    if not source.live:
        raise CtlError(
            "verify inspects the enrolled pods' network namespaces, and a saved dump cannot",
            "run it as root on the node's host with --node NODE (or --admin URL)",
        )
    if os.geteuid() != 0:
        raise CtlError("verify enters the pods' network namespaces", "run it as root")
    probes = None
    netns = getattr(source, "netns", None)
    if netns is not None:  # ztunnel may be in a container: its pids are not the host's
        probes = verify.Probes(host_path=hostpid.translator(netns, ADMIN_PORT))
    return _verified(args, source.config_dump(), out, probes)


def _verified(
    args: argparse.Namespace, dump: Dump, out: TextIO, probes: verify.Probes | None = None
) -> int:
    result = verify.verify(dump, probes)
    _emit(args, out, result, lambda: verify.render(result))
    return EXIT_NEGATIVE if result["drift"] else EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Source, TextIO], int]] = {
    "workloads": _workloads,
    "services": _services,
    "policies": _policies,
    "certificates": _certificates,
    "connections": _connections,
    "log": _log,
    "all": _all,
    "config-dump": _config_dump,
    "authz-check": _authz_check,
    "trace": _trace,
    "verify": _verify,
}
