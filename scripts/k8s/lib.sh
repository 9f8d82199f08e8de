# shellcheck shell=bash
# Shared helpers for scripts/setup-k8s.sh and scripts/k8s/build-*.sh (sourced, not run).
# Private apt configurations: own sources list, own lists and cache under $K8S_APT/<name>;
# the machine's /etc/apt is only read (keyring), never changed.
#
# K8S_APT is $K8S_CACHE/apt, or the fresh-run directory (MARKLB_SETUP_FRESH_DIR, see
# scripts/setup-k8s.sh): then every index is downloaded again, as on a new machine.

: "${K8S_CACHE:?K8S_CACHE must be set}"
# shellcheck source=../lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"
DEBIAN_MIRROR=${MARKLB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
if [[ -n ${MARKLB_SETUP_FRESH_DIR:-} ]]; then
  K8S_APT=$MARKLB_SETUP_FRESH_DIR/apt
else
  K8S_APT=$K8S_CACHE/apt
fi

log() { printf '[setup-k8s] %s\n' "$*" >&2; }

# papt_setup NAME LINE...: write the sources list of the private configuration NAME.
papt_setup() {
  local name=$1
  shift
  local d="$K8S_APT/$name"
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/parts"
  printf '%s\n' "$@" >"$d/sources.list.new"
  if ! cmp -s "$d/sources.list.new" "$d/sources.list" 2>/dev/null; then
    mv "$d/sources.list.new" "$d/sources.list"
    rm -f "$d/updated"
  else
    rm -f "$d/sources.list.new"
  fi
}

# papt_opts NAME: print the apt options (one a line) of the private configuration NAME.
papt_opts() {
  local d="$K8S_APT/$1"
  printf '%s\n' \
    -o "Dir::Etc::sourcelist=$d/sources.list" \
    -o "Dir::Etc::sourceparts=$d/parts" \
    -o "Dir::State::Lists=$d/lists" \
    -o "Dir::Cache=$d/cache" \
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" \
    -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false" \
    -o "Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false" \
    -o "Acquire::Retries=2" -o "Acquire::http::Timeout=30"
}

# papt NAME CMD ARGS...: run apt-get/apt-cache CMD with the private configuration NAME.
papt() {
  local name=$1 tool=$2
  shift 2
  local opts
  mapfile -t opts < <(papt_opts "$name")
  "$tool" "${opts[@]}" "$@"
}

# papt_update NAME: apt-get update of the private configuration (at most once a day).
# Returns non-zero, with the reason on stderr, when the suite cannot be reached.
papt_update() {
  local name=$1 d="$K8S_APT/$1" out
  if [[ -f $d/updated && -n $(find "$d/updated" -mmin -1440 2>/dev/null) ]]; then
    return 0
  fi
  if ! out=$(papt "$name" apt-get -q update --error-on=any 2>&1); then
    matching_lines 5 '^(E|W|Err):' "$out" >&2
    return 1
  fi
  touch "$d/updated"
}

# papt_suite SUITE: the private configuration SUITE (Debian SUITE main; bookworm with its
# sources too, for build-kube.sh), updated. Non-zero with the reason on stderr when the suite
# cannot be reached.
papt_suite() {
  local suite=$1 lines
  lines=("deb [signed-by=$KEYRING] $DEBIAN_MIRROR $suite main")
  [[ $suite == bookworm ]] && lines+=("deb-src [signed-by=$KEYRING] $DEBIAN_MIRROR $suite main")
  papt_setup "$suite" "${lines[@]}"
  if ! papt_update "$suite"; then
    echo "$suite at $DEBIAN_MIRROR cannot be reached (apt-get update failed)" >&2
    return 1
  fi
}

# papt_download SUITE DIR PKG...: download the .deb files of PKG... (from SUITE) into DIR.
# Non-zero with apt's reason on stderr when one cannot be downloaded.
papt_download() {
  local suite=$1 dir=$2
  shift 2
  mkdir -p "$dir"
  if ! (cd "$dir" && papt "$suite" apt-get -q download "${@/%//$suite}" >/dev/null 2>"$dir/download.err"); then
    tail -3 "$dir/download.err" >&2
    echo "apt-get download $* ($suite) failed" >&2
    return 1
  fi
}

# sha256 of files (content and name), short.
hash_files() { sha256sum "$@" | sha256sum | cut -c1-16; }
