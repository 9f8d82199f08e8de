#!/usr/bin/env bash
# Lints the shell scripts (`make lint`, so CI): shellcheck over every script below scripts/ and
# .ci/ (sources followed from each script's directory), then one rule shellcheck lacks: no pipeline whose
# reader may stop before the end of its input (`| head`, `| grep -q`, `| grep -m N`,
# `| sed Nq`). Under `set -o pipefail` the writer then dies of SIGPIPE and the pipeline fails
# with 141 whenever the writer was not done yet: `etcd --version | head -1` stopped the set-up
# of a new machine. Use `first_line` / `output_has` / `matching_lines` (scripts/lib/common.sh),
# which read the whole output first.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if ! command -v shellcheck >/dev/null; then
  echo "lint: shellcheck is not installed (Debian package shellcheck; scripts/setup.sh installs it)" >&2
  exit 1
fi
mapfile -t scripts < <(find scripts .ci -type f \( -name '*.sh' -o -name run \) | sort)
shellcheck --external-sources --source-path=SCRIPTDIR "${scripts[@]}"

early_reader='(^|[^|])\|[[:space:]]*(head\b|grep[[:space:]]+([^|]*[[:space:]])?(-[a-zA-Z]*[qm]|--quiet|--silent|--max-count)|sed[[:space:]]+(-n[[:space:]]+)?.?[0-9]+q)'
bad=$(grep -nE "$early_reader" "${scripts[@]}" Makefile | grep -vE '^[^:]+:[0-9]+:[[:space:]]*#' || true)
if [[ -n $bad ]]; then
  echo "lint: a pipeline whose reader can stop early (its writer then dies of SIGPIPE, exit 141" >&2
  echo "under pipefail); read the whole output first (scripts/lib/common.sh):" >&2
  printf '%s\n' "$bad" >&2
  exit 1
fi
echo "lint: ${#scripts[@]} scripts clean (shellcheck, no early-exit pipe readers)"
