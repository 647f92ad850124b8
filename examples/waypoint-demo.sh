#!/usr/bin/env bash
# The waypoint part of `make demo`: L7 traffic management for namespace shop,
# the user's own steps (examples/bookstore.yaml, waypoint.yaml, canary.yaml):
# a 90/10 canary measured over 1,000 requests, iPhones routed to v2, the
# Gateway's and route's status, the waypoint's own view, and the waypoint
# that cannot be bypassed: a pod behind it refuses direct traffic, and
# without the waypoint the service is refused, not served past its policy.
# Run as root from the repository root with the virtualenv on PATH.
set -euo pipefail

NAME=${MESHLAB_WAYPOINT_DEMO_NAME:-books}
REVIEWS=http://10.96.0.20:9080/

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
cleanup() { meshlab down --name "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

if [ "$(id -u)" -ne 0 ]; then
    echo "the demo creates network namespaces: run it as root" >&2
    exit 1
fi
cleanup

# N requests from client/sleep, one connection each: how many each version answered.
COUNT='import collections, json, sys, urllib.request
url, n, agent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = collections.Counter()
for _ in range(n):
    try:
        req = urllib.request.Request(url, headers={"User-Agent": agent})
        with urllib.request.urlopen(req, timeout=5) as r:
            seen[json.load(r)["version"]] += 1
    except OSError as e:
        seen["refused (" + type(e).__name__ + ")"] += 1
print("  " + ", ".join("%s: %d (%.1f %%)" % (k, v, 100.0 * v / n) for k, v in sorted(seen.items())))'
count() { meshlab exec --name "$NAME" client/sleep -- python3 -c "$COUNT" "$REVIEWS" "$@"; }

step "A bookstore: reviews v1 (two pods) and v2 (one pod), on two nodes, with the mesh"
run meshlab up -f examples/bookstore.yaml --name "$NAME" --mesh
run meshlab label --name "$NAME" namespace shop istio.io/dataplane-mode=ambient
run meshlab label --name "$NAME" namespace client istio.io/dataplane-mode=ambient

step "A waypoint for namespace shop: a Gateway of class istio-waypoint (its pod starts)"
cat examples/waypoint.yaml
run meshlab apply --name "$NAME" -f examples/waypoint.yaml
run meshlab label --name "$NAME" namespace shop istio.io/use-waypoint=waypoint

step "The canary: iPhones to v2, everyone else 90 % v1 and 10 % v2 (an HTTPRoute)"
run meshlab apply --name "$NAME" -f examples/canary.yaml
for _ in $(seq 50); do
    count 3 probe 2>/dev/null | grep -q 'v[12]' && break
    sleep 0.3
done
run meshlab get --name "$NAME" gateway -n shop
run meshlab get --name "$NAME" httproute -n shop

step "1,000 requests: the split converges to 90/10"
printf '$ (in client/sleep) 1000 x GET %s\n' "$REVIEWS"
count 1000 curl/8
printf '$ (in client/sleep) 50 x GET %s with User-Agent: ...iPhone...\n' "$REVIEWS"
count 50 "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"

step "Every request went client -> ztunnel -> waypoint -> ztunnel -> pod: the waypoint's view"
WP_NODE=$(meshlab status --name "$NAME" -o json | python3 -c 'import json,sys; print(next(p["node"] for p in json.load(sys.stdin)["pods"] if p["name"]=="waypoint"))')
printf '$ curl -s waypoint:15000/clusters (excerpt)\n'
meshlab exec --name "$NAME" shop/waypoint -- curl -s http://127.0.0.1:15000/clusters |
    grep -E '^inbound-vip\|9080\|http\|reviews-v.*::(rq_total|health_flags)::' | head -n 6
printf '$ curl -s waypoint:15020/stats/prometheus | grep istio_requests_total (excerpt)\n'
meshlab exec --name "$NAME" shop/waypoint -- curl -s http://127.0.0.1:15020/stats/prometheus |
    python3 -c 'import re, sys
for line in sys.stdin:
    if line.startswith("istio_requests_total{"):
        l = dict(re.findall(r"(\w+)=\"([^\"]*)\"", line))
        print("  istio_requests_total{reporter=%s, %s -> %s (%s), code %s} %s" % (l["reporter"],
              l["source_principal"], l["destination_workload"], l["destination_version"],
              l["response_code"], line.rsplit(" ", 1)[1].strip()))' | head -n 4
echo "(the waypoint runs on $WP_NODE)"

step "The waypoint cannot be bypassed: a pod behind it refuses a direct connection"
V1_IP=$(meshlab status --name "$NAME" -o json | python3 -c 'import json,sys; print(next(p["ip"] for p in json.load(sys.stdin)["pods"] if p["name"]=="reviews-v1-1"))')
printf '$ (in client/sleep) curl http://%s:8080/\n' "$V1_IP"
meshlab exec --name "$NAME" client/sleep -- curl -sS --max-time 3 "http://$V1_IP:8080/" 2>&1 | sed 's/^/  /' || true
sleep 0.5
grep -ah "ztunnel.access.*bound to waypoint" /run/meshlab/"$NAME"/logs/ztunnel.*.log | tail -n 1 |
    sed -E "s/.*error='([^']*)'.*/  ztunnel: \1/" || true

step "Without its waypoint, the service is refused (Istio would send it past the L7 policy)"
run meshlab delete --name "$NAME" -f examples/waypoint.yaml
sleep 2
count 5 curl/8
grep -ah "missing or not ready" /run/meshlab/"$NAME"/logs/ztunnel.*.log | tail -n 1 |
    grep -oE 'error="[^"]*"' | sed 's/^/  ztunnel: /' || true

step "Tear down"
run meshlab down --name "$NAME"
trap - EXIT
