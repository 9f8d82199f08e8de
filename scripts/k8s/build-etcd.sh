#!/usr/bin/env bash
# etcd for the test API servers: bookworm's etcd-server (3.4), extracted with dpkg -x (not
# installed: no service is started, nothing changes on the machine).
# Usage: build-etcd.sh OUTDIR WORKDIR  (K8S_CACHE set). Binary: OUTDIR/bin/etcd.
# Exit 3: the package or suite cannot be reached (reason on stderr).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"

OUT=${1:?usage: build-etcd.sh OUTDIR WORKDIR}
W=${2:?usage: build-etcd.sh OUTDIR WORKDIR}
papt_suite bookworm || exit 3
rm -rf "$W"
mkdir -p "$OUT"
papt_download bookworm "$W/debs" etcd-server || exit 3
dpkg -x "$W"/debs/etcd-server_*.deb "$W/root"
dpkg-deb -f "$W"/debs/etcd-server_*.deb Version >"$OUT/SOURCE_VERSION"
rm -rf "$OUT/bin.new"
mkdir -p "$OUT/bin.new"
cp "$W/root/usr/bin/etcd" "$OUT/bin.new/etcd"
# The binary must run here (`etcd --version` prints several lines: read them all, see lib/common.sh).
first_line "$OUT/bin.new/etcd" --version >&2
rm -rf "${OUT:?}/bin"
mv "$OUT/bin.new" "$OUT/bin"
