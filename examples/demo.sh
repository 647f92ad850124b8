#!/usr/bin/env bash
# The demo behind `make demo`: a two-node local cluster, a request across it,
# meshd following the cluster and what it tells the node agents (a label
# change, a policy), and a clean teardown. Run as root from the repository root
# with the project's virtualenv on PATH (the Makefile does both).
set -euo pipefail

NAME=${MESHLAB_DEMO_NAME:-demo}
FILE=${MESHLAB_DEMO_FILE:-examples/cluster.yaml}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

MESHD_PID=
cleanup() {
    if [ -n "$MESHD_PID" ]; then kill "$MESHD_PID" 2>/dev/null || true; wait "$MESHD_PID" 2>/dev/null || true; fi
    meshlab down --name "$NAME" >/dev/null 2>&1 || true
}
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

step "Start meshd, the control plane: xDS on 15010 (plaintext) and 15012 (TLS), status on 15014"
printf '$ meshd --source meshlab:%s &\n' "$NAME"
meshd --source "meshlab:$NAME" --log-level warning &
MESHD_PID=$!
for _ in $(seq 100); do
    curl -sf http://127.0.0.1:15014/ready >/dev/null 2>&1 && break
    sleep 0.1
done
ROOT=$(python3 -c "from mesh.cluster.statefile import cluster_dir; print(cluster_dir('$NAME') / 'ca' / 'root-cert.pem')")
feed() { python -m mesh.xds --target 127.0.0.1:15012 --root "$ROOT" --node ztunnel~node1; }

step "What a node agent is told: subscribe over TLS, checked against the mesh root meshd created"
printf '$ python -m mesh.xds --target 127.0.0.1:15012 --root %s\n' "$ROOT"
feed

step "Label the server namespace ambient: its workloads switch to HBONE in the feed"
run meshlab label --name "$NAME" namespace server istio.io/dataplane-mode=ambient
sleep 1
feed

step "An AuthorizationPolicy: only client/sleep may reach echo, on 8080"
run meshlab apply --name "$NAME" -f examples/policy.yaml
sleep 1
feed

step "meshd's own view (GET /debug/status): generation, counts, translation passes, refusals"
curl -s http://127.0.0.1:15014/debug/status |
    python3 -c 'import json,sys; s=json.load(sys.stdin); print({k: s[k] for k in ("generation","workloads","services","policies","rejected","translation")})'
kill "$MESHD_PID"; wait "$MESHD_PID" 2>/dev/null || true; MESHD_PID=

step "Tear down: every namespace, link, rule and process with the prefix '$NAME-' goes"
run meshlab down --name "$NAME"
left=$( (ip netns list; ip -o link show) | grep -c -- "$NAME-" || true)
echo "left behind with prefix '$NAME-': $left"
trap - EXIT
