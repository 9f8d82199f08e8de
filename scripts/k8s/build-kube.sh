#!/usr/bin/env bash
# Builds Kubernetes 1.20.2 server binaries from Debian bookworm's source package `kubernetes`
# with bookworm's Go 1.19 (extracted with dpkg -x, not installed), CGO_ENABLED=0, GOPATH mode.
# Usage: build-kube.sh OUTDIR WORKDIR  (K8S_CACHE set). Binaries land in OUTDIR/bin.
# Exit 3: a package or suite cannot be reached (reason on stderr); other non-zero: build failure.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

# The binaries built from the tree: adding one (e.g. kubectl) is a change of this line only.
KUBE_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
KUBE_VERSION=v1.20.2
# Any Debian revision of this upstream version will do (the mirror keeps only the newest one).
SRC_UPSTREAM='1.20.5+really1.20.2'
GO_PKGS=(golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev)

OUT=${1:?usage: build-kube.sh OUTDIR WORKDIR}
W=${2:?usage: build-kube.sh OUTDIR WORKDIR}
mkdir -p "$OUT" "$W"

papt_suite bookworm || exit 3

srcver=$(papt bookworm apt-cache showsrc kubernetes 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -1)
if [[ -z $srcver ]]; then
  echo "bookworm's source package kubernetes is not on $DEBIAN_MIRROR (deb-src)" >&2
  exit 3
fi
case $srcver in
  "$SRC_UPSTREAM"-*) ;;
  *) log "warning: kubernetes source is $srcver, expected $SRC_UPSTREAM-*; building it anyway" ;;
esac
echo "$srcver" >"$OUT/SOURCE_VERSION"

log "fetching source kubernetes $srcver and ${GO_PKGS[*]} (bookworm)"
rm -rf "$W/src" "$W/debs" "$W/root" "$W/tree" "$W/gopath"
mkdir -p "$W/src" "$W/debs" "$W/root"
if ! (cd "$W/src" && papt bookworm apt-get -q source --download-only "kubernetes=$srcver" >/dev/null 2>"$W/src.err"); then
  tail -3 "$W/src.err" >&2
  echo "apt-get source kubernetes=$srcver failed" >&2
  exit 3
fi
papt_download bookworm "$W/debs" "${GO_PKGS[@]}" || exit 3

log "unpacking"
dpkg-source --no-check -x "$W"/src/kubernetes_*.dsc "$W/tree" >/dev/null
for deb in "$W"/debs/*.deb; do dpkg -x "$deb" "$W/root"; done

GOROOT=$W/root/usr/lib/go-1.19
[[ -x $GOROOT/bin/go ]] || { echo "no go binary in golang-1.19-go" >&2; exit 1; }

# Go >= 1.18 breaks the vendored reflect2 1.0.1 at run time: use Debian's 1.0.2.
reflect2_src=$W/root/usr/share/gocode/src/github.com/modern-go/reflect2
reflect2_dst=$W/tree/vendor/github.com/modern-go/reflect2
[[ -d $reflect2_src ]] || { echo "reflect2 sources missing in golang-github-modern-go-reflect2-dev" >&2; exit 1; }
rm -f "$reflect2_dst"/*.go "$reflect2_dst"/*.s
cp "$reflect2_src"/*.go "$reflect2_dst"/
cp "$reflect2_src"/*.s "$reflect2_dst"/ 2>/dev/null || true
rm -f "$reflect2_dst"/*_test.go

# Go >= 1.19 returns the same pointer from reflect.Zero as the runtime uses for "" in an
# interface, which turns the vendored (go-)openapi type check
#   data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))
# true for every empty string: a CRD then refuses "" where its schema says string (e.g. the label
# value in `nodeSelector: {node-role.kubernetes.io/lb: ""}`), which 1.20 built with Go 1.15 does
# not. Upstream kube-openapi later reduced the check to `data == nil`; do the same.
zero_check='if data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {'
for f in vendor/github.com/go-openapi/validate/type.go vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go; do
  [[ -f $W/tree/$f ]] || continue
  grep -qF "$zero_check" "$W/tree/$f" || { echo "$f: expected zero-value check not found" >&2; exit 1; }
  sed -i "s/$(printf '%s' "$zero_check" | sed 's/[][\\.*^$/]/\\&/g')/if data == nil {/" "$W/tree/$f"
  ! grep -qF "$zero_check" "$W/tree/$f" || { echo "$f: patch did not apply" >&2; exit 1; }
done

# GOPATH mode: the tree at $GOPATH/src/k8s.io/kubernetes.
export GOPATH=$W/gopath
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$W/tree" "$GOPATH/src/k8s.io/kubernetes"
export GOROOT PATH="$GOROOT/bin:$PATH" GO111MODULE=off CGO_ENABLED=0 GOFLAGS='' \
  GOCACHE=$W/gocache GOTOOLCHAIN=local KUBE_VERBOSE=0
cd "$GOPATH/src/k8s.io/kubernetes"
log "go $(go env GOVERSION): make generated_files"
make generated_files >"$W/generated.log" 2>&1 || { tail -30 "$W/generated.log" >&2; exit 1; }

ldflags=(-s -w)
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  p=k8s.io/kubernetes/vendor/$pkg
  ldflags+=(-X "$p.gitVersion=$KUBE_VERSION" -X "$p.gitMajor=1" -X "$p.gitMinor=20"
    -X "$p.gitTreeState=clean" -X "$p.buildDate=1970-01-01T00:00:00Z")
done
pkgs=()
for b in "${KUBE_BINARIES[@]}"; do pkgs+=("./cmd/$b"); done
log "go build ${KUBE_BINARIES[*]}"
mkdir -p "$OUT/bin.new"
go build -trimpath -ldflags "${ldflags[*]}" -o "$OUT/bin.new/" "${pkgs[@]}" >"$W/build.log" 2>&1 ||
  { tail -30 "$W/build.log" >&2; exit 1; }
rm -rf "${OUT:?}/bin"
mv "$OUT/bin.new" "$OUT/bin"
"$OUT/bin/kube-apiserver" --version >&2
