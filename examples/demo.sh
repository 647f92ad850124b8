#!/usr/bin/env bash
# The demo behind `make demo`: the mesh on a two-node local cluster, end to end.
# Traffic flows from client/sleep to the echo service; the server namespace joins
# the mesh while it flows and the flows become mTLS without restarting a pod;
# node1 captures its pods with iptables, node2 with eBPF; ztunnel-ctl shows the node; a DENY policy refuses the next request; the
# metrics count what happened; a capture of the underlay shows TLS only; all is
# torn down. Then the waypoint (examples/waypoint-demo.sh): a canary split,
# routing by User-Agent, and a waypoint that cannot be bypassed.
# Run as root from the repository root with the project's virtualenv
# on PATH (the Makefile does both).
set -euo pipefail

NAME=${MESHLAB_DEMO_NAME:-demo}
FILE=${MESHLAB_DEMO_FILE:-examples/cluster.yaml}
VIP=10.96.0.20

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

TRAFFIC_PID=
cleanup() {
    if [ -n "$TRAFFIC_PID" ]; then kill "$TRAFFIC_PID" 2>/dev/null || true; fi
    meshlab down --name "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
    echo "the demo creates network namespaces: run it as root" >&2
    exit 1
fi
meshlab down --name "$NAME" >/dev/null 2>&1 || true # an interrupted demo's leftovers

step "A 2-node cluster with the mesh: meshd, and on each node the node agent, ztunnel and ztunnel-cni"
run meshlab up -f "$FILE" --name "$NAME" --mesh
run meshlab status --name "$NAME"
BRIDGE=$(meshlab status --name "$NAME" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["network"]["bridge"])')
ctl() { printf '$ ztunnel-ctl --node %s %s\n' "$1" "${*:2}"; ztunnel-ctl --cluster "$NAME" --node "$@"; }
ask() { meshlab exec --name "$NAME" client/sleep -- curl -sS --max-time 3 "$@"; }

step "The client namespace joins the mesh (its pod is not restarted); the server stays out for now"
run meshlab label --name "$NAME" namespace client istio.io/dataplane-mode=ambient
for _ in $(seq 50); do ask -o /dev/null "http://$VIP/" 2>/dev/null && break; sleep 0.2; done
echo "client/sleep asks the echo service's VIP $VIP twice a second, in the background:"
SAY='import json, sys
try:
    d = json.load(sys.stdin)
    print("  [traffic] answered by %s (%s), which saw the client as %s"
          % (d["pod"], d["node"], d["client"].rsplit(":", 1)[0]))
except ValueError:
    print("  [traffic] refused")'
( while true; do
    ask "http://$VIP/traffic" 2>/dev/null | python3 -c "$SAY" || true
    sleep 0.5
done ) &
TRAFFIC_PID=$!
sleep 2

step "Today the server is outside the mesh: its traffic crosses the underlay in plaintext"
printf '$ tcpdump -i %s -A  (pod traffic between the nodes)\n' "$BRIDGE"
timeout 5 tcpdump -i "$BRIDGE" -nn -A -l 'tcp and net 10.244.0.0/16' 2>/dev/null |
    grep -a -m 2 -oE 'GET /traffic HTTP/1.1|"pod": "[a-z0-9-]+"' || true

step "The server namespace joins the mesh while the traffic flows: no pod restarts"
run meshlab label --name "$NAME" namespace server istio.io/dataplane-mode=ambient
sleep 3
printf '$ tcpdump -i %s  (pod traffic only, 2 s)\n' "$BRIDGE"
timeout 2 tcpdump -i "$BRIDGE" -nn -q 'tcp and net 10.244.0.0/16' 2>/dev/null | head -n 4 || true
echo "(only port 15008 now: HBONE, mTLS; the request text no longer appears on the wire)"

step "Two capture backends: node1 with Istio's in-pod iptables rules, node2 with eBPF programs"
printf '$ meshlab exec client/sleep -- iptables-save -t nat | grep -c ISTIO   (node1)\n'
meshlab exec --name "$NAME" client/sleep -- iptables-save -t nat | grep -c ISTIO || true
printf '$ meshlab exec server/echo-2 -- iptables-save -t nat | grep -c ISTIO  (node2)\n'
meshlab exec --name "$NAME" server/echo-2 -- iptables-save -t nat | grep -c ISTIO || true
run meshlab exec --name "$NAME" server/echo-2 -- tc filter show dev eth0 ingress
printf '$ ztunnel-ctl --node node2 verify\n'
ztunnel-ctl --cluster "$NAME" --node node2 verify | grep -E "^  [a-z]|capture|drift" || true

step "What node1's ztunnel holds (a slow upload keeps one connection open meanwhile)"
( head -c 6000 /dev/zero | meshlab exec --name "$NAME" client/sleep -- \
    curl -s --max-time 8 --limit-rate 1000 --data-binary @- -o /dev/null "http://$VIP/upload" ||
    echo "  [upload] cut: the policy below re-checked the live connection and closed it" ) &
sleep 1
ctl node1 workloads
ctl node1 certificates
ctl node1 connections
ctl node1 trace --from client/sleep --to "$VIP:80"

step "A DENY policy: client/sleep may no longer reach echo"
cat > /tmp/"$NAME"-deny.yaml <<'EOF'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: server
spec:
  action: DENY
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/client/sa/sleep"]
EOF
run meshlab apply --name "$NAME" -f /tmp/"$NAME"-deny.yaml
rm -f /tmp/"$NAME"-deny.yaml
sleep 2
ECHO2_IP=$(meshlab status --name "$NAME" -o json | python3 -c 'import json,sys; print(next(p["ip"] for p in json.load(sys.stdin)["pods"] if p["name"]=="echo-2"))')
ctl node2 authz-check --from spiffe://cluster.local/ns/client/sa/sleep --to "$ECHO2_IP:8080" || true
kill "$TRAFFIC_PID" 2>/dev/null || true; wait "$TRAFFIC_PID" 2>/dev/null || true; TRAFFIC_PID=

step "Metrics on node2's ztunnel (:15020/metrics, Istio's names and labels)"
printf '$ curl -s node2:15020/metrics | grep istio_tcp_connections\n'
SHOW='import re, sys
for line in sys.stdin:
    if not line.startswith("istio_tcp_connections_"):
        continue
    name, labels, value = re.match(r"(\w+)\{(.*)\} (\S+)", line).groups()
    l = dict(re.findall(r"(\w+)=\"([^\"]*)\"", labels))
    print("%s{reporter=%s, %s -> %s, %s, ... %d labels} %s" % (name, l["reporter"],
          l["source_principal"], l["destination_workload"], l["connection_security_policy"],
          len(l), value))'
meshlab exec --name "$NAME" node/node2 -- curl -s http://127.0.0.1:15020/metrics | python3 -c "$SHOW"
for node in node1 node2; do
    printf '$ curl -s %s:15020/metrics | grep ztunnel_connections_refused\n' "$node"
    meshlab exec --name "$NAME" "node/$node" -- curl -s http://127.0.0.1:15020/metrics |
        grep -E '^ztunnel_connections_refused_total' || echo "(none refused on $node)"
done

step "Tear down: every namespace, link, rule and process with the prefix '$NAME-' goes"
run meshlab down --name "$NAME"
left=$( (ip netns list; ip -o link show) | grep -c -- "$NAME-" || true)
echo "left behind with prefix '$NAME-': $left"
trap - EXIT

# Part two: L7, with a waypoint (examples/waypoint-demo.sh).
exec "$(dirname "$0")/waypoint-demo.sh"
