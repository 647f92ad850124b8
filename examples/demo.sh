#!/usr/bin/env bash
# The demo behind `make demo`: a two-node local cluster, a request across it,
# a label change, and a clean teardown. Run as root from the repository root
# with the project's virtualenv on PATH (the Makefile does both).
set -euo pipefail

NAME=${MESHLAB_DEMO_NAME:-demo}
FILE=${MESHLAB_DEMO_FILE:-examples/cluster.yaml}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() { meshlab down --name "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
    echo "the demo creates network namespaces: run it as root" >&2
    exit 1
fi

# A previous demo that was interrupted may have left its cluster behind.
meshlab down --name "$NAME" >/dev/null 2>&1 || true

step "Bring up a 2-node cluster: node and pod network namespaces, pods wired by the real CNI plugins"
run meshlab up -f "$FILE" --name "$NAME"

step "What is running"
run meshlab status --name "$NAME"

ECHO2_IP=$(meshlab status --name "$NAME" -o json |
    python3 -c 'import json,sys; print(next(p["ip"] for p in json.load(sys.stdin)["pods"] if p["name"]=="echo-2"))')
SLEEP_IP=$(meshlab status --name "$NAME" -o json |
    python3 -c 'import json,sys; print(next(p["ip"] for p in json.load(sys.stdin)["pods"] if p["name"]=="sleep"))')

step "A request from client/sleep on node1 to server/echo-2 on node2 (pod CIDRs routed between nodes)"
run meshlab exec --name "$NAME" client/sleep -- \
    curl -sS --retry 20 --retry-connrefused --retry-delay 1 --max-time 5 "http://$ECHO2_IP:8080/hello"
echo "(the echo pod saw the client as $SLEEP_IP: pod addresses cross nodes without NAT)"

step "Label the server namespace, as later issues do to put it in the mesh"
run meshlab label --name "$NAME" namespace server istio.io/dataplane-mode=ambient
meshlab status --name "$NAME" | sed -n '/^NAMESPACE  LABELS/,/^$/p'

step "Tear down: every namespace, link, rule and process with the prefix '$NAME-' goes"
run meshlab down --name "$NAME"
left=$( (ip netns list; ip -o link show) | grep -c -- "$NAME-" || true)
echo "left behind with prefix '$NAME-': $left"
trap - EXIT
