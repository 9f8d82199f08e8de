#!/usr/bin/env bash
# Builds or extracts, once per machine, the Kubernetes parts the test suite runs:
#   etcd                  bookworm's etcd-server (3.4)                    -> $CACHE/etcd/bin/etcd
#   node                  bookworm's containerd, runc, CNI plugins and kubectl 1.20.2, for the
#                         test cluster's nodes (scripts/k8s/build-node.sh) -> $CACHE/node/bin, cni/
#   kube-1.20             Kubernetes 1.20.2 from bookworm's source package -> $CACHE/kube-1.20/bin/
#                         (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy)
#   apiextensions         apiextensions-apiserver 0.36 (current CRD semantics, CEL) from sid's
#                         Go libraries + scripts/k8s/apiextensions-server -> $CACHE/apiextensions/bin/
# Everything comes from Debian packages through private apt configurations (scripts/k8s/lib.sh;
# the machine's /etc/apt is never changed). Each part is cached, keyed on the hash of the
# scripts that build it; its STAMP records that hash and the Debian source version it was built
# from. Quick (no network) when everything is cached.
#
# Fresh runs (CI): with MARKLB_SETUP_FRESH_DIR set to a directory (empty at the start of the
# run), the cheap parts (etcd, node: seconds each) ignore their cache and are extracted again
# with apt state of that directory, as on a brand-new machine; a part is done so once per
# directory. Only the builds (kube-1.20, apiextensions: minutes) stay cached by their key.
#
# When a Debian suite or package cannot be reached, the part is not built and the reason is
# written to $CACHE/UNAVAILABLE-<part>: the tests read that file and print SKIP with the reason,
# and this script exits 0, unless MARKLB_CLUSTER_REQUIRED=1 (CI): then it exits 1. A build that
# fails for any other reason exits 1.
#
# Environment: MARKLB_K8S_CACHE (default /var/cache/marklb/k8s), MARKLB_DEBIAN_MIRROR,
# MARKLB_K8S_PARTS (default "etcd kube-1.20 apiextensions"), MARKLB_K8S_KEEP_BUILD=1 keeps
# the build trees (several GB) under $CACHE/build, MARKLB_SETUP_FRESH_DIR, MARKLB_CLUSTER_REQUIRED.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export K8S_CACHE=${MARKLB_K8S_CACHE:-/var/cache/marklb/k8s}
# shellcheck source=k8s/lib.sh
. "$HERE/k8s/lib.sh"
K8S="$HERE/k8s"
read -ra PARTS <<<"${MARKLB_K8S_PARTS:-etcd kube-1.20 apiextensions}"
REQUIRED=${MARKLB_CLUSTER_REQUIRED:-0}

mkdir -p "$K8S_CACHE"
exec 9>"$K8S_CACHE/.lock"
if ! flock -n 9; then
  log "another setup-k8s.sh is running; waiting for it"
  flock 9
fi

# part_script PART: the build script of PART.
part_script() {
  case $1 in
    etcd) echo "$K8S/build-etcd.sh" ;;
    node) echo "$K8S/build-node.sh" ;;
    kube-1.20) echo "$K8S/build-kube.sh" ;;
    apiextensions) echo "$K8S/build-apiext.sh" ;;
    *) return 1 ;;
  esac
}
# part_cheap PART: whether PART is extracted from packages in seconds (redone in fresh runs).
part_cheap() { [[ $1 == etcd || $1 == node ]]; }
# part_key PART: hash of the contents and relative names of every file PART's build depends on
# (independent of where the repository is checked out).
part_key() {
  local inputs=("k8s/$(basename "$(part_script "$1")")" k8s/lib.sh lib/common.sh)
  if [[ $1 == apiextensions ]]; then
    mapfile -t -O 3 inputs < <(cd "$HERE" && find k8s/apiextensions-server -type f | sort)
  fi
  (cd "$HERE" && hash_files "${inputs[@]}")
}
# part_cached PART KEY: whether the cache holds PART built with KEY (and, in a fresh run, was
# extracted again during this run).
part_cached() {
  local out="$K8S_CACHE/$1"
  [[ -f $out/STAMP && -d $out/bin ]] || return 1
  grep -qx "key=$2" "$out/STAMP" || return 1
  if [[ -n ${MARKLB_SETUP_FRESH_DIR:-} ]] && part_cheap "$1"; then
    [[ -f $MARKLB_SETUP_FRESH_DIR/done-$1 ]] || return 1
  fi
}
# bin_names DIR: the file names in DIR, on one line.
bin_names() { find "$1" -mindepth 1 -maxdepth 1 -printf '%f ' | sort; }

# Tools the builds need (kube-1.20: make generated_files needs rsync) and the tests need
# (openssl makes the service-account key pair). Prints what is still missing.
ensure_tools() {
  local missing=() t
  for t in rsync:rsync make:make dpkg-source:dpkg-dev flock:util-linux openssl:openssl; do
    command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/dev/null 2>&1 || true
  fi
  for t in rsync make dpkg-source openssl; do command -v "$t" >/dev/null || echo "$t"; done
}

# unavailable PART REASON: record why PART cannot be set up here.
unavailable() {
  echo "$1 cannot be set up here: $2" >"$K8S_CACHE/UNAVAILABLE-$1"
  log "UNAVAILABLE $1: $2"
  if [[ $REQUIRED == 1 ]]; then
    log "  MARKLB_CLUSTER_REQUIRED=1: every part must be set up; failing"
    failed=1
  else
    log "  (recorded in $K8S_CACHE/UNAVAILABLE-$1: tests that need it will SKIP and say why)"
  fi
}

if [[ -n ${MARKLB_SETUP_FRESH_DIR:-} ]]; then
  mkdir -p "$MARKLB_SETUP_FRESH_DIR"
  log "fresh run: cheap parts extracted again, apt state in $MARKLB_SETUP_FRESH_DIR"
fi
failed=0
tools_checked=""
tools_missing=""
for part in "${PARTS[@]}"; do
  script=$(part_script "$part") || { log "unknown part $part"; exit 2; }
  key=$(part_key "$part")
  out="$K8S_CACHE/$part"
  if part_cached "$part" "$key"; then
    log "$part: cached ($(sed -n 's/^source=//p' "$out/STAMP"), key $key)"
    rm -f "$K8S_CACHE/UNAVAILABLE-$part"
    continue
  fi
  if [[ -z $tools_checked ]]; then
    tools_missing=$(ensure_tools | tr '\n' ' ')
    tools_checked=1
  fi
  if [[ -n $tools_missing && $part == kube-1.20 ]]; then
    unavailable "$part" "cannot install the Debian packages providing: $tools_missing"
    continue
  fi
  work="$K8S_CACHE/build/$part"
  log "$part: building (key $key) in $work"
  start=$(date +%s)
  rc=0
  err="$K8S_CACHE/build-$part.err"
  bash "$script" "$out" "$work" 2>"$err" || rc=$?
  cat "$err" >&2
  if ((rc == 0)); then
    {
      echo "key=$key"
      echo "source=$(cat "$out/SOURCE_VERSION" 2>/dev/null)"
      echo "built=$(date -u +%FT%TZ) in $(($(date +%s) - start))s"
    } >"$out/STAMP"
    rm -f "$K8S_CACHE/UNAVAILABLE-$part" "$err"
    [[ ${MARKLB_K8S_KEEP_BUILD:-} == 1 ]] || rm -rf "$work"
    [[ -z ${MARKLB_SETUP_FRESH_DIR:-} ]] || touch "$MARKLB_SETUP_FRESH_DIR/done-$part"
    log "$part: built in $(($(date +%s) - start))s: $(bin_names "$out/bin")"
  elif ((rc == 3)); then
    reason=$(grep -v '^\[setup-k8s\]' "$err" | tail -1)
    detail=$(matching_lines 1 '^E:' "$(cat "$err")")
    [[ -n $detail ]] && reason="$reason; apt said: $detail"
    unavailable "$part" "$reason"
  else
    log "FAILED $part (exit $rc): see above and $err; build tree kept in $work"
    failed=1
  fi
done
exit $failed
