#!/usr/bin/env bash
# Install the Debian packages the project needs, only those that are missing,
# so a second run changes nothing and takes a moment.
set -euo pipefail

PACKAGES=(
    iproute2                    # ip, ip netns: nodes and pods are network namespaces
    iptables                    # in-pod capture rules, the underlay FORWARD rule
    containernetworking-plugins # the real CNI plugins: ptp, host-local, portmap, loopback
    iperf3                      # pod apps and benchmarks
    procps                      # ps, pkill, sysctl
    psmisc                      # fuser, killall for diagnostics
    python3-venv                # the project's virtual environment
    curl                        # requests between pods in the demo
    tcpdump                     # underlay captures in the demo and tests
    gcc                         # builds ztunnel-cni, the static CNI plugin binary
    libc6-dev                   # its static C library
    prometheus                  # examples/observability checked against a real Prometheus
    clang                       # compiles the eBPF capture's programs (make ebpf)
    libbpf-dev                  # their helper headers
    libbpf1                     # loads them (the node agent, through ctypes)
    bpftool                     # the tests read the pods' cgroup attachments with it
)

# `host-deps.sh bench` adds what the benchmarks drive.
if [ "${1:-}" = "bench" ]; then
    PACKAGES+=(wrk nginx-light)
fi
# `host-deps.sh image` adds what builds the container image without a registry.
if [ "${1:-}" = "image" ]; then
    PACKAGES+=(buildah podman runc debootstrap)
fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "host-deps: missing Debian packages: ${missing[*]}" >&2
    echo "host-deps: run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
fi

echo "host-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
