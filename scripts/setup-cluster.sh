#!/usr/bin/env bash
# Set-up for the real one-node Kubernetes cluster of the tests (`marklb_tests::cluster`,
# `make cluster-up`), cached per machine like scripts/setup-k8s.sh (same cache, same conventions):
#
#   kube-1.20, etcd   built by scripts/setup-k8s.sh (run for those parts here if missing):
#                     kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
#                     1.20.2 (`--version` and `/version` say v1.20.2) and etcd 3.4
#   node              bookworm's containerd (with ctr and containerd-shim-runc-v2), runc,
#                     containernetworking-plugins and kubernetes-client (kubectl 1.20.2),
#                     extracted with dpkg -x into $CACHE/node (not installed: no service is
#                     started, nothing else on the machine changes) -> $CACHE/node/bin, cni/
#   host tools        iptables and conntrack (apt-get install: kubelet and kube-proxy run them
#                     from PATH)
#   rust target       x86_64-unknown-linux-musl (the static agent binary of the images)
#
# When a Debian suite or package cannot be reached, the part is not built, the reason is written to
# $CACHE/UNAVAILABLE-<part> and the script still exits 0: the cluster tests print SKIP with the
# reason. Any other failure exits 1. Quick (no network) when everything is cached.
#
# Environment: MARKLB_K8S_CACHE (default /var/cache/marklb/k8s), MARKLB_DEBIAN_MIRROR.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export K8S_CACHE=${MARKLB_K8S_CACHE:-/var/cache/marklb/k8s}
# shellcheck source=k8s/lib.sh
. "$HERE/k8s/lib.sh"
log() { printf '[setup-cluster] %s\n' "$*" >&2; }

# Debian packages extracted into $CACHE/node, and the files taken from each.
NODE_PKGS=(containerd runc containernetworking-plugins kubernetes-client)
HOST_TOOLS=(iptables:iptables iptables-save:iptables ip6tables:iptables conntrack:conntrack)

mkdir -p "$K8S_CACHE"

# 1. The Kubernetes binaries and etcd (setup-k8s.sh keeps its own cache and lock).
need=()
for part in etcd kube-1.20; do
  [[ -f $K8S_CACHE/$part/STAMP || -f $K8S_CACHE/UNAVAILABLE-$part ]] || need+=("$part")
done
if ((${#need[@]})); then
  log "building ${need[*]} with scripts/setup-k8s.sh"
  MARKLB_K8S_PARTS="${need[*]}" bash "$HERE/setup-k8s.sh"
fi

exec 9>"$K8S_CACHE/.lock-cluster"
if ! flock -n 9; then
  log "another setup-cluster.sh is running; waiting for it"
  flock 9
fi

# 2. Host tools kubelet and kube-proxy run from PATH.
missing=()
for t in "${HOST_TOOLS[@]}"; do
  command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null 2>&1 || true
  still=()
  for t in "${HOST_TOOLS[@]}"; do command -v "${t%%:*}" >/dev/null || still+=("${t#*:}"); done
  if ((${#still[@]})); then
    echo "cannot install the Debian packages $(printf '%s\n' "${still[@]}" | sort -u | tr '\n' ' ')(apt-get install failed); kubelet and kube-proxy need them" \
      >"$K8S_CACHE/UNAVAILABLE-host-tools"
    log "UNAVAILABLE host-tools: $(cat "$K8S_CACHE/UNAVAILABLE-host-tools")"
  else
    rm -f "$K8S_CACHE/UNAVAILABLE-host-tools"
  fi
else
  rm -f "$K8S_CACHE/UNAVAILABLE-host-tools"
fi

# 3. The static target of the images (rustup downloads it once).
if command -v rustup >/dev/null || [[ -x $HOME/.cargo/bin/rustup ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    log "rustup target add x86_64-unknown-linux-musl"
    rustup target add x86_64-unknown-linux-musl >/dev/null
  fi
fi

# 4. containerd, runc, CNI plugins, kubectl 1.20 (part `node`).
part=node
out=$K8S_CACHE/$part
key=$(cd "$HERE" && hash_files setup-cluster.sh k8s/lib.sh)
if [[ -f $out/STAMP ]] && grep -qx "key=$key" "$out/STAMP" && [[ -x $out/bin/containerd ]]; then
  log "$part: cached ($(sed -n 's/^source=//p' "$out/STAMP"), key $key)"
  rm -f "$K8S_CACHE/UNAVAILABLE-$part"
  exit 0
fi

unavailable() {
  echo "$part cannot be set up here: $*" >"$K8S_CACHE/UNAVAILABLE-$part"
  log "UNAVAILABLE $part: $* (recorded in $K8S_CACHE/UNAVAILABLE-$part: the cluster tests will SKIP and say why)"
  exit 0
}

start=$(date +%s)
W=$K8S_CACHE/build/$part
rm -rf "$W"
mkdir -p "$W/debs" "$W/root"
papt_setup bookworm \
  "deb [signed-by=$KEYRING] $DEBIAN_MIRROR bookworm main" \
  "deb-src [signed-by=$KEYRING] $DEBIAN_MIRROR bookworm main"
papt_update bookworm 2>"$W/update.err" ||
  unavailable "bookworm at $DEBIAN_MIRROR cannot be reached (apt-get update failed: $(head -1 "$W/update.err"))"
if ! (cd "$W/debs" && papt bookworm apt-get -q download "${NODE_PKGS[@]/%//bookworm}" >/dev/null 2>"$W/debs.err"); then
  unavailable "apt-get download ${NODE_PKGS[*]} (bookworm) failed: $(grep -m1 '^E:' "$W/debs.err" || tail -1 "$W/debs.err")"
fi
versions=()
for p in "${NODE_PKGS[@]}"; do
  deb=$(ls "$W"/debs/"${p}"_*.deb)
  dpkg -x "$deb" "$W/root"
  versions+=("$p=$(dpkg-deb -f "$deb" Version)")
done

rm -rf "$out.new"
mkdir -p "$out.new/bin" "$out.new/cni"
for b in containerd containerd-shim-runc-v2 ctr; do cp "$W/root/usr/bin/$b" "$out.new/bin/"; done
cp "$W/root/usr/sbin/runc" "$out.new/bin/runc"
cp "$W/root/usr/bin/kubectl" "$out.new/bin/kubectl"
cp "$W"/root/usr/lib/cni/* "$out.new/cni/"
echo "${versions[*]}" >"$out.new/SOURCE_VERSION"

# Every shared library the extracted binaries need must be on the machine.
for f in "$out.new"/bin/* "$out.new"/cni/bridge; do
  if ldd "$f" 2>/dev/null | grep -q 'not found'; then
    rm -rf "$out.new"
    unavailable "$(basename "$f") needs shared libraries this machine lacks: $(ldd "$f" | grep 'not found' | awk '{print $1}' | tr '\n' ' ')"
  fi
done
"$out.new/bin/containerd" --version >&2
"$out.new/bin/runc" --version | head -1 >&2
"$out.new/bin/kubectl" version --client --short >&2 2>/dev/null || true
{
  echo "key=$key"
  echo "source=${versions[*]}"
  echo "built=$(date -u +%FT%TZ) in $(($(date +%s) - start))s"
} >"$out.new/STAMP"
rm -rf "$out"
mv "$out.new" "$out"
rm -rf "$W" "$K8S_CACHE/UNAVAILABLE-$part"
log "$part: ready in $(($(date +%s) - start))s: $(ls "$out/bin" | tr '\n' ' ')"
