#!/usr/bin/env bash
# Builds scripts/k8s/apiextensions-server (a small main around k8s.io/apiextensions-apiserver)
# in GOPATH mode from Debian sid's packaged Kubernetes Go libraries and sid's Go, offline.
# Usage: build-apiext.sh OUTDIR WORKDIR  (K8S_CACHE set). Binary: OUTDIR/bin/apiextensions-apiserver.
# Exit 3: a package or suite cannot be reached (reason on stderr); other non-zero: build failure.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

ROOT_PKG=golang-k8s-apiextensions-apiserver-dev
OUT=${1:?usage: build-apiext.sh OUTDIR WORKDIR}
W=${2:?usage: build-apiext.sh OUTDIR WORKDIR}
mkdir -p "$OUT" "$W"

papt_suite sid || exit 3
ver=$(papt sid apt-cache show "$ROOT_PKG" 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -1)
if [[ -z $ver ]]; then
  echo "$ROOT_PKG is not in sid on $DEBIAN_MIRROR" >&2
  exit 3
fi
echo "$ver" >"$OUT/SOURCE_VERSION"

# Every Go library package (golang-*) that the apiextensions-apiserver library needs, and Go.
mapfile -t pkgs < <(papt sid apt-cache depends --recurse --no-recommends --no-suggests \
  --no-conflicts --no-breaks --no-replaces --no-enhances "$ROOT_PKG" golang-go 2>/dev/null |
  grep -E '^golang-' | sort -u)
log "fetching $ROOT_PKG $ver and ${#pkgs[@]} Go packages (sid)"
rm -rf "$W/debs" "$W/root" "$W/gopath"
mkdir -p "$W/debs" "$W/root"
papt_download sid "$W/debs" "${pkgs[@]}" || exit 3
log "unpacking"
for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$W/root"; done

GOROOT=$(find "$W/root/usr/lib" -maxdepth 1 -name 'go-1.*' -type d | sort -V | tail -1)
[[ -x $GOROOT/bin/go ]] || { echo "no go binary in sid's golang-go" >&2; exit 1; }
export GOPATH=$W/gopath
mkdir -p "$GOPATH/src/marklb.io"
# Debian's Go libraries live in /usr/share/gocode/src: that is the second GOPATH entry.
rm -rf "$GOPATH/src/marklb.io/apiextensions-server"
cp -r "$HERE/apiextensions-server" "$GOPATH/src/marklb.io/"
export GOPATH="$GOPATH:$W/root/usr/share/gocode"
export GOROOT PATH="$GOROOT/bin:$PATH" GO111MODULE=off CGO_ENABLED=0 GOFLAGS='' \
  GOCACHE=$W/gocache GOTOOLCHAIN=local GOPROXY=off

# The Go libraries 0.N.P are Kubernetes 1.N.P: the server says v1.N.P (as kube-apiserver would).
up=${ver%%-*}
up=${up%%+*}
minor=$(cut -d. -f2 <<<"$up")
patch=$(cut -d. -f3 <<<"$up")
major=1
gitver=v$major.$minor.$patch
ldflags=(-s -w)
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=(-X "$p.gitVersion=$gitver" -X "$p.gitMajor=$major" -X "$p.gitMinor=$minor"
    -X "$p.gitTreeState=clean" -X "$p.buildDate=1970-01-01T00:00:00Z")
done
log "$(go version): go build apiextensions-apiserver ($gitver)"
mkdir -p "$OUT/bin.new"
(cd "${GOPATH%%:*}/src/marklb.io/apiextensions-server" &&
  go build -trimpath -ldflags "${ldflags[*]}" -o "$OUT/bin.new/apiextensions-apiserver" .) \
  >"$W/build.log" 2>&1 || { tail -40 "$W/build.log" >&2; exit 1; }
rm -rf "${OUT:?}/bin"
mv "$OUT/bin.new" "$OUT/bin"
