#!/usr/bin/env bash
# The node's runtime for the test cluster: bookworm's containerd (with ctr and
# containerd-shim-runc-v2), runc, containernetworking-plugins and kubernetes-client (kubectl
# 1.20.2), extracted with dpkg -x (not installed: no service is started, nothing else on the
# machine changes).
# Usage: build-node.sh OUTDIR WORKDIR  (K8S_CACHE set). Binaries: OUTDIR/bin (containerd,
# containerd-shim-runc-v2, ctr, runc, kubectl) and OUTDIR/cni (the CNI plugins).
# Exit 3: a package or suite cannot be reached, or the binaries need shared libraries this
# machine lacks (reason on stderr).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

NODE_PKGS=(containerd runc containernetworking-plugins kubernetes-client)
OUT=${1:?usage: build-node.sh OUTDIR WORKDIR}
W=${2:?usage: build-node.sh OUTDIR WORKDIR}

papt_suite bookworm || exit 3
rm -rf "$W"
mkdir -p "$W/root" "$OUT"
papt_download bookworm "$W/debs" "${NODE_PKGS[@]}" || exit 3
versions=()
for p in "${NODE_PKGS[@]}"; do
  debs=("$W"/debs/"$p"_*.deb)
  dpkg -x "${debs[0]}" "$W/root"
  versions+=("$p=$(dpkg-deb -f "${debs[0]}" Version)")
done

new=$OUT/new
rm -rf "$new"
mkdir -p "$new/bin" "$new/cni"
for b in containerd containerd-shim-runc-v2 ctr kubectl; do cp "$W/root/usr/bin/$b" "$new/bin/"; done
cp "$W/root/usr/sbin/runc" "$new/bin/runc"
cp "$W"/root/usr/lib/cni/* "$new/cni/"

# Every shared library the extracted binaries need must be on the machine.
for f in "$new"/bin/* "$new"/cni/bridge; do
  libs=$(ldd "$f" 2>/dev/null || true)
  if [[ $libs == *'not found'* ]]; then
    echo "$(basename "$f") needs shared libraries this machine lacks: $(matching_lines 20 'not found' "$libs" | awk '{print $1}' | tr '\n' ' ')" >&2
    exit 3
  fi
done
# They must run here (each prints several lines: read them all, see lib/common.sh).
"$new/bin/containerd" --version >&2
first_line "$new/bin/runc" --version >&2
first_line "$new/bin/kubectl" version --client --short >&2

echo "${versions[*]}" >"$OUT/SOURCE_VERSION"
rm -rf "${OUT:?}/bin" "${OUT:?}/cni"
mv "$new/bin" "$new/cni" "$OUT/"
rmdir "$new"
