#!/usr/bin/env bash
# Builds marklb's container images as OCI image archives, without a container engine:
#
#   $TARGET_DIR/images/marklb-agent.oci.tar   docker.io/marklb/marklb-agent:<version>
#   $TARGET_DIR/images/marklb-operator.oci.tar docker.io/marklb/marklb-operator:<version>
#                                             (runs as 65532:65532, not root)
#   $TARGET_DIR/images/marklb-pause.oci.tar   docker.io/marklb/marklb-pause:<version>
#                                             (the sandbox image of the test cluster)
#   $TARGET_DIR/images/marklb-echo.oci.tar    docker.io/marklb/marklb-echo:<version>
#                                             (the echo server of the Services tests)
#
# from release binaries built for x86_64-unknown-linux-musl (static: the image holds the binary
# and nothing else; the agent's eBPF object is embedded in it by agent/build.rs), packed by
# tools/image (`marklb-image`). Labels: org.opencontainers.image.{title,description,version,
# revision,created,source,licenses}. The archives are reproducible: the creation time is
# SOURCE_DATE_EPOCH (default: the time of the last commit).
#
# Prints one line per image: `IMAGE <name> <archive>`; the list is also in images.txt.
# Import into a containerd: `ctr -n k8s.io images import <archive>` (the cluster harness does it).
# Used by `make image` and by the cluster tests (which run it so the images match the sources;
# a no-op rebuild takes a few seconds).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=../lib/common.sh
. "$ROOT/scripts/lib/common.sh"
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
CARGO=${CARGO:-cargo}
TRIPLE=x86_64-unknown-linux-musl
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$TARGET_DIR/images
REGISTRY=${MARKLB_IMAGE_REPO:-docker.io/marklb}
mkdir -p "$OUT"
exec 8>"$OUT/.lock"
flock 8

log() { printf '[image] %s\n' "$*" >&2; }

if ! output_has "^$TRIPLE\$" rustup target list --installed 2>/dev/null; then
  log "rustup target add $TRIPLE"
  rustup target add "$TRIPLE" >&2
fi
start=$(date +%s)
# One build: the packer itself is static too and runs here (no second, host-target build).
"$CARGO" build --release --target "$TRIPLE" -p marklb-agent -p marklb-operator -p marklb-image \
  --bin marklb-agent --bin marklb-operator --bin marklb-pause --bin marklb-echo --bin marklb-image >&2
BIN=$TARGET_DIR/$TRIPLE/release
TOOL=$BIN/marklb-image

version=$("$BIN/marklb-agent" --version | awk '{print $2}')
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%FT%TZ)
common=(
  --label "org.opencontainers.image.version=$version"
  --label "org.opencontainers.image.revision=$revision"
  --label "org.opencontainers.image.created=$created"
  --label "org.opencontainers.image.source=https://example.invalid/marklb"
  --label "org.opencontainers.image.licenses=Apache-2.0"
  --label "org.opencontainers.image.vendor=marklb"
)
: >"$OUT/images.txt.new"
image() { # image NAME BINARY DESCRIPTION ARGS...
  local name=$1 bin=$2 desc=$3
  shift 3
  local ref="$REGISTRY/$name:$version" archive="$OUT/$name.oci.tar"
  "$TOOL" build --binary "$bin" --name "$ref" --output "$archive" "${common[@]}" \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.description=$desc" "$@" >&2
  echo "IMAGE $ref $archive" | tee -a "$OUT/images.txt.new"
}
image marklb-agent "$BIN/marklb-agent" \
  "marklb node agent: XDP L4 load balancer with NIC flow-mark acceleration" --arg=--help
image marklb-operator "$BIN/marklb-operator" \
  "marklb operator: LoadBalancers to per-node states, the agent DaemonSet and conditions" \
  --user=65532:65532 --arg=--help
image marklb-pause "$BIN/marklb-pause" "sandbox (pause) container for marklb's test cluster"
image marklb-echo "$BIN/marklb-echo" "TCP/UDP echo server answering with its pod and node (marklb's Services tests)"
mv "$OUT/images.txt.new" "$OUT/images.txt"
log "done in $(($(date +%s) - start))s"
