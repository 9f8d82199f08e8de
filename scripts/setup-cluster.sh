#!/usr/bin/env bash
# Set-up for the real Kubernetes cluster of the tests (`marklb_tests::cluster`,
# `make cluster-up`), cached per machine like scripts/setup-k8s.sh (same cache, same conventions):
#
#   kube-1.20, etcd, node   built or extracted by scripts/setup-k8s.sh: kube-apiserver,
#                           kube-controller-manager, kube-scheduler, kubelet, kube-proxy 1.20.2
#                           (`--version` and `/version` say v1.20.2), etcd 3.4, and bookworm's
#                           containerd (with ctr and containerd-shim-runc-v2), runc, CNI plugins
#                           and kubectl 1.20.2 (dpkg -x, not installed: no service is started)
#   host tools              iptables and conntrack (apt-get install: kubelet and kube-proxy run
#                           them from PATH)
#   rust target             x86_64-unknown-linux-musl (the static agent binary of the images)
#
# A part that cannot be set up here is recorded in $CACHE/UNAVAILABLE-<part> and the script exits
# 0 (the cluster tests print SKIP with the reason), or 1 with MARKLB_CLUSTER_REQUIRED=1 (CI).
# Any other failure exits 1. Quick (no network) when everything is cached.
#
# Environment: as scripts/setup-k8s.sh (MARKLB_K8S_CACHE, MARKLB_DEBIAN_MIRROR,
# MARKLB_SETUP_FRESH_DIR, MARKLB_CLUSTER_REQUIRED).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export K8S_CACHE=${MARKLB_K8S_CACHE:-/var/cache/marklb/k8s}
# shellcheck source=k8s/lib.sh
. "$HERE/k8s/lib.sh"
log() { printf '[setup-cluster] %s\n' "$*" >&2; }
REQUIRED=${MARKLB_CLUSTER_REQUIRED:-0}

HOST_TOOLS=(iptables:iptables iptables-save:iptables ip6tables:iptables conntrack:conntrack)
mkdir -p "$K8S_CACHE"

# 1. Host tools kubelet and kube-proxy run from PATH.
missing_tools() {
  local t
  for t in "${HOST_TOOLS[@]}"; do command -v "${t%%:*}" >/dev/null || echo "${t#*:}"; done | sort -u
}
mapfile -t missing < <(missing_tools)
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null 2>&1 || true
  mapfile -t missing < <(missing_tools)
fi
if ((${#missing[@]})); then
  echo "cannot install the Debian packages ${missing[*]} (apt-get install failed); kubelet and kube-proxy need them" \
    >"$K8S_CACHE/UNAVAILABLE-host-tools"
  log "UNAVAILABLE host-tools: $(cat "$K8S_CACHE/UNAVAILABLE-host-tools")"
  [[ $REQUIRED != 1 ]] || { log "MARKLB_CLUSTER_REQUIRED=1: failing"; exit 1; }
else
  rm -f "$K8S_CACHE/UNAVAILABLE-host-tools"
fi

# 2. The static target of the images (rustup downloads it once).
if command -v rustup >/dev/null || [[ -x $HOME/.cargo/bin/rustup ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! output_has '^x86_64-unknown-linux-musl$' rustup target list --installed; then
    log "rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl >/dev/null
  fi
fi

# 3. The binaries (setup-k8s.sh keeps its own cache, keys and lock).
MARKLB_K8S_PARTS="etcd node kube-1.20" bash "$HERE/setup-k8s.sh"
