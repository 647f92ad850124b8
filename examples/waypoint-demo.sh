#!/usr/bin/env bash
# The waypoint part of `make demo`: L7 traffic management for namespace shop,
# the user's own steps (examples/bookstore.yaml, waypoint.yaml, canary.yaml):
# a 90/10 canary measured over 1,000 requests, iPhones routed to v2, the
# Gateway's and route's status, the waypoint's own view, and the waypoint
# that cannot be bypassed: a pod behind it refuses direct traffic, and
# without the waypoint the service is refused, not served past its policy.
# Then what a user of Istio ambient comes for at L7: authorization policies
# (examples/waypoint-policy.yaml), a local rate limit (waypoint-ratelimit.yaml),
# traces to an OTLP collector and access logs (waypoint-telemetry.yaml), and
# the per-service table of the waypoint's metrics
# (examples/observability/service_table.py); each is deleted again after.
# Run as root from the repository root with the virtualenv on PATH.
set -euo pipefail

NAME=${MESHLAB_WAYPOINT_DEMO_NAME:-books}
REVIEWS=http://10.96.0.20:9080/
SPANS=/tmp/$NAME-demo-spans.jsonl

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
RECEIVER_PID=
cleanup() {
    if [ -n "$RECEIVER_PID" ]; then kill "$RECEIVER_PID" 2>/dev/null || true; fi
    rm -f "$SPANS" "$SPANS.err"
    meshlab down --name "$NAME" >/dev/null 2>&1 || true
}
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

# One request from client/sleep: its status, and who answered or why not.
ONE='import json, sys, urllib.error, urllib.request
method, url = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url, method=method, headers={"User-Agent": "curl/8"})
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        d = json.load(r)
        print("  %d %s, answered by %s (%s)" % (r.status, r.reason, d["pod"], d["version"]))
except urllib.error.HTTPError as e:
    print("  %d %s: %s" % (e.code, e.reason, e.read().decode(errors="replace").strip()))
except OSError as e:
    print("  refused (%s)" % type(e).__name__)'
one() {
    printf '$ (in client/sleep) %s %s\n' "$1" "$2"
    meshlab exec --name "$NAME" client/sleep -- python3 -c "$ONE" "$@"
}
# The status of one request, quietly (for waiting until a change is in force).
code() {
    meshlab exec --name "$NAME" client/sleep -- \
        curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" 2>/dev/null || true
}

# N requests from client/sleep at once, on one connection: the statuses, and what
# a refusal said.
BURST='import collections, http.client, sys, urllib.parse
url, n = urllib.parse.urlsplit(sys.argv[1]), int(sys.argv[2])
seen, why = collections.Counter(), {}
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
for _ in range(n):
    conn.request("GET", url.path or "/")
    r = conn.getresponse()
    body = r.read().decode(errors="replace").strip()
    seen[r.status] += 1
    if r.status >= 400 and r.status not in why:
        limit = r.getheader("x-local-rate-limit")
        why[r.status] = "%s%s" % (body, ", x-local-rate-limit: " + limit if limit else "")
print("  " + ", ".join("%d: %d" % kv for kv in sorted(seen.items())))
for status, text in sorted(why.items()):
    print("  (%d: %s)" % (status, text))'
burst() { meshlab exec --name "$NAME" client/sleep -- python3 -c "$BURST" "$REVIEWS" "$@"; }
# Whether the waypoint's config (its /config_dump) has an HTTP filter by that name yet.
has_filter() {
    meshlab exec --name "$NAME" shop/waypoint -- curl -s http://127.0.0.1:15000/config_dump |
        grep "envoy.filters.http.$1" >/dev/null
}

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

step "L7 authorization: no /admin for anyone, and reviews answers only GETs from client/sleep"
run meshlab apply --name "$NAME" -f examples/waypoint-policy.yaml
for _ in $(seq 50); do [ "$(code "${REVIEWS}admin/users")" = 403 ] && break; sleep 0.2; done
one GET "$REVIEWS"
one GET "${REVIEWS}admin/users"
echo "(denied by no-admin, a DENY bound to the whole waypoint)"
one POST "$REVIEWS"
echo "(denied by reviews-readers, an ALLOW for the reviews service: GETs from client/sleep only)"
printf '$ meshlab get authorizationpolicy -n shop -o json  (each status condition)\n'
meshlab get --name "$NAME" authorizationpolicy -n shop -o json | python3 -c 'import json, sys
for item in json.load(sys.stdin)["items"]:
    for c in item["status"]["conditions"]:
        print("  %s: %s=%s, %s" % (item["metadata"]["name"], c["type"], c["status"], c["message"]))'
run meshlab delete --name "$NAME" -f examples/waypoint-policy.yaml
for _ in $(seq 50); do [ "$(code "${REVIEWS}admin/users")" = 200 ] && break; sleep 0.2; done

step "A local rate limit at the waypoint (Istio's EnvoyFilter recipe): 10 requests, then 429"
run meshlab apply --name "$NAME" -f examples/waypoint-ratelimit.yaml
for _ in $(seq 50); do has_filter local_ratelimit && break; sleep 0.2; done
printf '$ (in client/sleep) 20 x GET %s, at once\n' "$REVIEWS"
burst 20
run meshlab get --name "$NAME" envoyfilter -n shop
run meshlab delete --name "$NAME" -f examples/waypoint-ratelimit.yaml
for _ in $(seq 50); do has_filter local_ratelimit || break; sleep 0.2; done

step "Traces and access logs: a span per request to an OTLP collector in the mesh, a log line"
rm -f "$SPANS" "$SPANS.err"
printf '$ (in client/sleep, in the background) python3 -m tests.support.otlp --listen 0.0.0.0:4317 --out %s\n' "$SPANS"
meshlab exec --name "$NAME" client/sleep -- \
    python3 -m tests.support.otlp --listen 0.0.0.0:4317 --out "$SPANS" >/dev/null 2>"$SPANS.err" &
RECEIVER_PID=$!
run meshlab apply --name "$NAME" -f examples/waypoint-telemetry.yaml
for _ in $(seq 60); do # until the waypoint has the Telemetry and the collector its spans
    count 1 probe >/dev/null
    [ -s "$SPANS" ] && break
    sleep 0.3
done
printf '$ (in client/sleep) 4 x GET %s, 2 of them with User-Agent: ...iPhone...\n' "$REVIEWS"
count 2 curl/8
count 2 "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)"
SPANS_SAY='import json, sys
status = {0: "UNSET", 1: "OK", 2: "ERROR"}
spans = [json.loads(line) for line in open(sys.argv[1])]
spans = [s for s in spans if s["attributes"].get("user_agent") != "probe"]
if sys.argv[2:] == ["--last-request-id"]:
    print(spans[-1]["attributes"].get("guid:x-request-id", "") if spans else "")
    sys.exit()
for s in spans:
    a = s["attributes"]
    print("  trace %s  %s  http %s (status %s) -> %s" % (
        s["trace_id"], s["name"], a.get("http.status_code"), status.get(s["status_code"]),
        a.get("upstream_cluster", "-").rsplit("|", 1)[-1].split(".")[0]))
if spans:
    print("  (each from service.name=%s, with the tag team=%s of the Telemetry)" % (
        spans[-1]["resource"].get("service.name"), spans[-1]["attributes"].get("team")))'
for _ in $(seq 25); do [ "$(python3 -c "$SPANS_SAY" "$SPANS" | grep -c '^  trace')" -ge 4 ] && break; sleep 0.2; done
printf '$ (the spans the collector received, one per request)\n'
python3 -c "$SPANS_SAY" "$SPANS"
[ -s "$SPANS" ] || sed 's/^/  (no spans) receiver: /' "$SPANS.err"
RID=$(python3 -c "$SPANS_SAY" "$SPANS" --last-request-id)
printf '$ grep %s /run/meshlab/%s/logs/shop.waypoint.log  (that request, in the access log)\n' \
    "${RID:-REQUEST-ID}" "$NAME"
grep -a -- "${RID:-no request id}" /run/meshlab/"$NAME"/logs/shop.waypoint.log | tail -n 1 |
    sed 's/^/  /'
run meshlab get --name "$NAME" telemetry -n shop
run meshlab delete --name "$NAME" -f examples/waypoint-telemetry.yaml
kill "$RECEIVER_PID" 2>/dev/null || true; wait "$RECEIVER_PID" 2>/dev/null || true; RECEIVER_PID=
rm -f "$SPANS" "$SPANS.err"

step "The per-service table: the waypoint's metrics (and each ztunnel's) by destination_service"
printf '$ (curl -s waypoint:15020/stats/prometheus; curl -s node1:15020/metrics; curl -s node2:15020/metrics) |\n'
printf '      python3 examples/observability/service_table.py\n'
{
    meshlab exec --name "$NAME" shop/waypoint -- curl -s http://127.0.0.1:15020/stats/prometheus
    for node in node1 node2; do
        meshlab exec --name "$NAME" "node/$node" -- curl -s http://127.0.0.1:15020/metrics
    done
} | python3 examples/observability/service_table.py | sed 's/^./  &/'
echo "(the canary's requests count against the backend each went to, reviews-v1 or reviews-v2;"
echo " those the waypoint answered itself, 403 and 429, against reviews, the service asked)"

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
