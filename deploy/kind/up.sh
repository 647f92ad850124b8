#!/usr/bin/env bash
# Install the mesh on a kind cluster and show it working, for users with Docker:
#
#   deploy/kind/up.sh            # create the cluster, build and load the image,
#                                # install, run the sample, ztunnel-ctl on a node
#   deploy/kind/up.sh down       # delete the cluster
#
# Needs docker, kind and kubectl on PATH, and what `make image` needs (Debian's
# buildah and podman: it installs them as root). Environment: CLUSTER (default
# ambient), GATEWAY_API (the Gateway API release whose CRDs are installed,
# default v1.4.0), BASE_IMAGE (the image's Python base, default the public
# python:3.11-slim-bookworm). None of this runs on the project's CI machines
# (no Docker, no registry); deploy/README.md says what is checked there instead.
set -euo pipefail

CLUSTER=${CLUSTER:-ambient}
GATEWAY_API=${GATEWAY_API:-v1.4.0}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# The tag the manifests name (deploy/base/kustomization.yaml), as containerd spells it.
TAG=$(sed -n 's/^ *newTag: *//p' "$ROOT/deploy/base/kustomization.yaml" | head -1)
IMAGE=docker.io/library/ambient-mesh:$TAG

step() { printf '\n== %s\n' "$*"; }

for tool in docker kind kubectl; do
    command -v "$tool" > /dev/null || { echo "up.sh: $tool is not on PATH" >&2; exit 1; }
done

if [ "${1:-}" = down ]; then
    kind delete cluster --name "$CLUSTER"
    exit 0
fi

step "kind cluster $CLUSTER: one control plane, two workers"
if ! kind get clusters | grep -qx "$CLUSTER"; then
    kind create cluster --name "$CLUSTER" --config "$HERE/cluster.yaml"
fi
kubectl config use-context "kind-$CLUSTER" > /dev/null

step "the image, built FROM $BASE_IMAGE, loaded into the nodes"
make -C "$ROOT" --no-print-directory image BASE_IMAGE="$BASE_IMAGE" IMAGE="ambient-mesh:$TAG"
podman tag "localhost/ambient-mesh:$TAG" "$IMAGE"
archive=$(mktemp --suffix=.tar)
trap 'rm -f "$archive"' EXIT
podman save --quiet -o "$archive" "$IMAGE"
kind load image-archive "$archive" --name "$CLUSTER"

step "the Gateway API CRDs ($GATEWAY_API), as Istio's docs install them"
kubectl get crd gateways.gateway.networking.k8s.io > /dev/null 2>&1 \
    || kubectl apply -f "https://github.com/kubernetes-sigs/gateway-api/releases/download/$GATEWAY_API/standard-install.yaml"

step "the mesh: kubectl apply -k deploy/"
kubectl apply -k "$ROOT/deploy"
kubectl -n istio-system rollout status deployment/meshd --timeout=180s
kubectl -n istio-system rollout status daemonset/ztunnel-node-agent --timeout=180s
kubectl -n istio-system rollout status daemonset/ztunnel --timeout=180s

step "the sample: namespace demo, labelled istio.io/dataplane-mode=ambient"
kubectl apply -k "$HERE"
kubectl -n demo rollout status deployment/echo --timeout=180s
kubectl -n demo rollout status deployment/client --timeout=180s
kubectl -n demo get pods \
    -o custom-columns='POD:.metadata.name,NODE:.spec.nodeName,REDIRECTION:.metadata.annotations.ambient\.istio\.io/redirection'

step "a request from the client to echo, through the ztunnels (HBONE between nodes)"
kubectl -n demo exec deploy/client -- python3 -c \
    'import urllib.request; print(urllib.request.urlopen("http://echo.demo/").read().decode())'

step "ztunnel-ctl against the ztunnel of the client's node (kubectl port-forward)"
node=$(kubectl -n demo get pod -l app=client -o jsonpath='{.items[0].spec.nodeName}')
zt=$(kubectl -n istio-system get pod -l app=ztunnel --field-selector "spec.nodeName=$node" \
    -o jsonpath='{.items[0].metadata.name}')
kubectl -n istio-system port-forward "pod/$zt" 15000:15000 > /dev/null &
forward=$!
trap 'kill $forward 2> /dev/null; rm -f "$archive"' EXIT
for _ in $(seq 50); do
    curl -fsS -o /dev/null http://127.0.0.1:15000/config_dump 2> /dev/null && break
    sleep 0.2
done
PATH="$ROOT/.venv/bin:$PATH" ztunnel-ctl --admin http://127.0.0.1:15000 workloads

step "done: kubectl -n demo ..., or deploy/kind/up.sh down"
