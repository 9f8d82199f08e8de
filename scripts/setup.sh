#!/usr/bin/env bash
# Installs everything a fresh Debian (bookworm) machine lacks to build and test marklb.
# Idempotent and quick when everything is already present: each step checks first.
set -euo pipefail
# shellcheck source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

log() { printf '[setup] %s\n' "$*"; }

APT_PACKAGES=(
  # eBPF toolchain: bpf-linker links through LLVM 22
  llvm-22-dev libpolly-22-dev clang-22 libclang-22-dev zlib1g-dev libzstd-dev
  # network-namespace tests and the demo
  iproute2 ethtool iputils-ping netcat-openbsd procps
  # metrics checks
  prometheus
  # the lint step checks scripts/
  shellcheck
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  output_has 'install ok installed' dpkg-query -W -f="\${Status}" "$p" 2>/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # the Debian prometheus package may try to start a service; we run our own instances only.
  pkill -x prometheus 2>/dev/null || true
fi

export PATH="$HOME/.cargo/bin:$PATH"

if ! output_has '^nightly' rustup toolchain list; then
  log "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
# rust-src: -Z build-std=core for bpfel-unknown-none; clippy: the eBPF crate's lint pass.
for c in rust-src clippy; do
  if ! output_has "^$c" rustup component list --toolchain nightly --installed; then
    log "rustup component add $c (nightly)"
    rustup component add "$c" --toolchain nightly
  fi
done
for c in rustfmt clippy; do
  output_has "^$c" rustup component list --installed || rustup component add "$c"
done

if ! command -v bpf-linker >/dev/null || ! output_has '0\.13' bpf-linker --version 2>/dev/null; then
  log "cargo install bpf-linker 0.13 (LLVM 22)"
  LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install bpf-linker --version '^0.13' --locked --no-default-features --features llvm-22
fi

log "ready"
