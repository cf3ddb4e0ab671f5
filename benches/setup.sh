#!/usr/bin/env bash
# Installs the benchmark peers, idempotently (run from anywhere):
#   restic 0.14 and borg 1.2 from Debian's packages,
#   borg 1.4 from PyPI into target/peers/borg14-venv (built against
#   Debian's -dev libraries),
#   rustic (crates.io rustic-rs) with `cargo install --locked` into
#   target/peers (bin/rustic).
# benches/run.py finds them there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers="$root/target/peers"
mkdir -p "$peers"
need=()
command -v restic >/dev/null || need+=(restic)
command -v borg >/dev/null || need+=(borgbackup)
for pkg in libssl-dev liblz4-dev libzstd-dev libxxhash-dev libacl1-dev pkg-config python3-dev python3-venv; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
venv="$peers/borg14-venv"
if ! "$venv/bin/borg" --version 2>/dev/null | grep -q '^borg 1\.4'; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q 'borgbackup>=1.4,<1.5'
fi
if ! [ -x "$peers/bin/rustic" ]; then
  # 0.11 or newer (the issue's floor); --locked keeps its tested versions.
  cargo install --locked --root "$peers" rustic-rs
fi
restic version
borg --version
"$venv/bin/borg" --version
"$peers/bin/rustic" --version
