#!/usr/bin/env bash
# etcd for the test API servers: bookworm's etcd-server (3.4), extracted with dpkg -x (not
# installed: no service is started, nothing changes on the machine).
# Usage: build-etcd.sh OUTDIR WORKDIR  (K8S_CACHE set). Binary: OUTDIR/bin/etcd.
# Exit 3: the package or suite cannot be reached (reason on stderr).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

OUT=$1
W=$2
papt_setup bookworm \
  "deb [signed-by=$KEYRING] $DEBIAN_MIRROR bookworm main" \
  "deb-src [signed-by=$KEYRING] $DEBIAN_MIRROR bookworm main"
if ! papt_update bookworm; then
  echo "bookworm at $DEBIAN_MIRROR cannot be reached (apt-get update failed)" >&2
  exit 3
fi
rm -rf "$W"
mkdir -p "$W/debs" "$OUT"
if ! (cd "$W/debs" && papt bookworm apt-get -q download etcd-server/bookworm >/dev/null 2>"$W/debs.err"); then
  tail -3 "$W/debs.err" >&2
  echo "apt-get download etcd-server (bookworm) failed" >&2
  exit 3
fi
dpkg -x "$W"/debs/etcd-server_*.deb "$W/root"
dpkg-deb -f "$W"/debs/etcd-server_*.deb Version >"$OUT/SOURCE_VERSION"
rm -rf "$OUT/bin"
mkdir -p "$OUT/bin"
cp "$W/root/usr/bin/etcd" "$OUT/bin/etcd"
"$OUT/bin/etcd" --version | head -1 >&2
