#!/usr/bin/env bash
# The main job in one command: build qnbd, make a disk image, serve it over NBD on a unix socket, and read
# it back with standard clients (nbdinfo, qemu-img). Installs the clients when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:$PATH
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
# A 64 MiB raw base with a message, and a qcow2 overlay on it that changes part of it.
truncate -s 64M "$dir/base.raw"
printf 'hello from the base image\n' | dd of="$dir/base.raw" conv=notrunc status=none
qemu-img create -q -f qcow2 -b base.raw -F raw "$dir/disk.qcow2"
qemu-io -c 'write -P 0x51 1M 64k' "$dir/disk.qcow2" >/dev/null
target/release/qimg info "$dir/disk.qcow2"
echo
target/release/qnbd -r -t -e 4 -A -x disk -D "demo overlay" -k "$dir/nbd.sock" "$dir/disk.qcow2" &
pid=$!
for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && break; sleep 0.05; done
uri="nbd+unix:///disk?socket=$dir/nbd.sock"
echo "== nbdinfo $uri"
nbdinfo "$uri"
echo "== nbdinfo --map=qemu:allocation-depth"
nbdinfo --map=qemu:allocation-depth "$uri"
echo "== first bytes, read over NBD by qemu-io"
qemu-io -r -f raw -c 'read -v 0 32' "$uri" | head -2
echo "== qemu-img compare (NBD export against the image file)"
qemu-img compare "$uri" "$dir/disk.qcow2"
