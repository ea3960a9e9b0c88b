#!/usr/bin/env bash
# Side-by-side: `qimg convert -O raw` against `qemu-img convert -O raw` on the same fully allocated qcow2
# (64 KiB clusters), alternating the two, `sync` before each run so neither pays for the other's writeback.
# Prints each run and the medians; ratio < 1 means qimg is faster.
# Usage: benches/convert-vs-qemu.sh [SIZE_GIB=4] [RUNS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
runs=${2:-5}
cargo build --release -q -p qcow2
qimg=$PWD/target/release/qimg
dir=$(mktemp -d /var/tmp/qnbd-convert.XXXXXX)
trap 'rm -rf "$dir"' EXIT
img=$dir/full.qcow2
qemu-img create -q -f qcow2 "$img" "${size}G"
cmds=()
for ((g = 0; g < size; g++)); do cmds+=(-c "write -P $((0x50 + g)) ${g}G 1G"); done
qemu-io "${cmds[@]}" "$img" >/dev/null
t() { local s e; sync; s=$(date +%s%N); "$@"; e=$(date +%s%N); echo $(((e - s) / 1000000)); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
q=(); o=()
for ((i = 1; i <= runs; i++)); do
  rm -f "$dir/o.raw"; q+=("$(t qemu-img convert -O raw "$img" "$dir/o.raw")")
  rm -f "$dir/o.raw"; o+=("$(t "$qimg" convert -O raw "$img" "$dir/o.raw")")
  echo "run $i: qemu-img ${q[-1]} ms, qimg ${o[-1]} ms"
done
mq=$(median "${q[@]}"); mo=$(median "${o[@]}")
echo "median of $runs (${size} GiB): qemu-img ${mq} ms, qimg ${mo} ms, ratio qimg/qemu-img = $(awk -v a="$mo" -v b="$mq" 'BEGIN{printf "%.2f", a/b}')"
