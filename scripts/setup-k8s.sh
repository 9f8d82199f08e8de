#!/usr/bin/env bash
# Builds, once per machine, the real Kubernetes API servers the test suite runs against:
#   etcd                  bookworm's etcd-server (3.4)                    -> $CACHE/etcd/bin/etcd
#   kube-1.20             Kubernetes 1.20.2 from bookworm's source package -> $CACHE/kube-1.20/bin/
#                         (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy)
#   apiextensions         apiextensions-apiserver 0.36 (current CRD semantics, CEL) from sid's
#                         Go libraries + scripts/k8s/apiextensions-server -> $CACHE/apiextensions/bin/
# Everything comes from Debian packages through private apt configurations under $CACHE/apt
# (the machine's /etc/apt is never changed). Each part is cached, keyed on the hash of the
# scripts that build it; its STAMP records that hash and the Debian source version it was built
# from. Quick (no network) when everything is cached.
#
# When a Debian suite or package cannot be reached, the part is not built, the reason is written
# to $CACHE/UNAVAILABLE-<part>, and this script still exits 0: the tests read that file, print
# SKIP with the reason and do not pass silently. A build that fails for any other reason exits 1.
#
# Environment: MARKLB_K8S_CACHE (default /var/cache/marklb/k8s), MARKLB_DEBIAN_MIRROR,
# MARKLB_K8S_PARTS (default "etcd kube-1.20 apiextensions"), MARKLB_K8S_KEEP_BUILD=1 keeps
# the build trees (several GB) under $CACHE/build.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export K8S_CACHE=${MARKLB_K8S_CACHE:-/var/cache/marklb/k8s}
# shellcheck source=k8s/lib.sh
. "$HERE/k8s/lib.sh"
K8S="$HERE/k8s"
PARTS=(${MARKLB_K8S_PARTS:-etcd kube-1.20 apiextensions})

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
    kube-1.20) echo "$K8S/build-kube.sh" ;;
    apiextensions) echo "$K8S/build-apiext.sh" ;;
    *) return 1 ;;
  esac
}
# part_key PART: hash of the contents and relative names of every file PART's build depends on
# (independent of where the repository is checked out).
part_key() {
  local inputs=("k8s/$(basename "$(part_script "$1")")" k8s/lib.sh)
  if [[ $1 == apiextensions ]]; then
    mapfile -t -O 2 inputs < <(cd "$HERE" && find k8s/apiextensions-server -type f | sort)
  fi
  (cd "$HERE" && hash_files "${inputs[@]}")
}

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

failed=0
tools_checked=""
tools_missing=""
for part in "${PARTS[@]}"; do
  script=$(part_script "$part") || { log "unknown part $part"; exit 2; }
  key=$(part_key "$part")
  out="$K8S_CACHE/$part"
  if [[ -f $out/STAMP ]] && grep -qx "key=$key" "$out/STAMP" && [[ -d $out/bin ]]; then
    log "$part: cached ($(sed -n 's/^source=//p' "$out/STAMP"), key $key)"
    rm -f "$K8S_CACHE/UNAVAILABLE-$part"
    continue
  fi
  if [[ -z $tools_checked ]]; then
    tools_missing=$(ensure_tools | tr '\n' ' ')
    tools_checked=1
  fi
  if [[ -n $tools_missing && $part == kube-1.20 ]]; then
    echo "$part cannot be built here: cannot install the Debian packages providing: $tools_missing" \
      >"$K8S_CACHE/UNAVAILABLE-$part"
    log "UNAVAILABLE $part: missing $tools_missing (recorded in $K8S_CACHE/UNAVAILABLE-$part)"
    continue
  fi
  work="$K8S_CACHE/build/$part"
  log "$part: building (key $key) in $work"
  start=$(date +%s)
  rc=0
  bash "$script" "$out" "$work" 2>"$K8S_CACHE/build-$part.err" || rc=$?
  cat "$K8S_CACHE/build-$part.err" >&2
  if ((rc == 0)); then
    {
      echo "key=$key"
      echo "source=$(cat "$out/SOURCE_VERSION" 2>/dev/null)"
      echo "built=$(date -u +%FT%TZ) in $(($(date +%s) - start))s"
    } >"$out/STAMP"
    rm -f "$K8S_CACHE/UNAVAILABLE-$part" "$K8S_CACHE/build-$part.err"
    [[ ${MARKLB_K8S_KEEP_BUILD:-} == 1 ]] || rm -rf "$work"
    log "$part: built in $(($(date +%s) - start))s: $(ls "$out/bin" | tr '\n' ' ')"
  elif ((rc == 3)); then
    err="$K8S_CACHE/build-$part.err"
    reason=$(grep -v '^\[setup-k8s\]' "$err" | tail -1)
    detail=$(grep -m1 '^E:' "$err" || true)
    [[ -n $detail ]] && reason="$reason; apt said: $detail"
    echo "$part cannot be built here: $reason" >"$K8S_CACHE/UNAVAILABLE-$part"
    log "UNAVAILABLE $part: $reason"
    log "  (recorded in $K8S_CACHE/UNAVAILABLE-$part: tests that need it will SKIP and say why)"
  else
    log "FAILED $part (exit $rc): see above and $K8S_CACHE/build-$part.err; build tree kept in $work"
    failed=1
  fi
done
exit $failed
