# shellcheck shell=bash
# Helpers for every script under scripts/ (sourced, not run). No side effects when sourced.
#
# Why they exist: the scripts run under `set -o pipefail`, where a pipeline whose reader stops
# before the end of its input (`head`, `grep -q`, `grep -m`) fails whenever the writer is still
# writing: the writer dies of SIGPIPE (exit 141) and pipefail makes that the pipeline's status.
# `etcd --version | head -1` failed the set-up of a new machine that way. These helpers read a
# command's whole output first and look at it afterwards; scripts/lint.sh rejects the pattern.

# output_has REGEX CMD [ARG...]: CMD succeeds and a line of its output matches the extended
# regular expression REGEX.
output_has() {
  local re=$1 out
  shift
  out=$("$@") || return 1
  grep -Eq -- "$re" <<<"$out"
}

# first_line CMD [ARG...]: the first line of CMD's output; CMD's exit status.
first_line() {
  local out rc=0
  out=$("$@") || rc=$?
  printf '%s\n' "${out%%$'\n'*}"
  return "$rc"
}

# matching_lines MAX REGEX TEXT: at most MAX lines of TEXT that match REGEX (none is not an error).
matching_lines() {
  grep -E -m "$1" -- "$2" <<<"$3" || true
}
