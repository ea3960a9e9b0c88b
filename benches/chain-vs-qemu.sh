#!/usr/bin/env bash
# Side-by-side: qimg's chain commands against qemu-img's on the same images, alternating the two, fresh copies
# of the images before each run, `sync` before each so neither pays for the other's writeback.
# The images: a 4 GiB base (fully allocated qcow2, 64 KiB clusters) holding real data (the files of /usr/lib and
# /usr/bin, cycled), a second base that differs from it in one 1 MiB of every 4 MiB, and a 4 GiB overlay on
# the first with 1 MiB of every 2 MiB written (half of it allocated).
# Cases:  commit       qemu-img commit OV            (the overlay's 2 GiB written into the base, the overlay emptied)
#         rebase       qemu-img rebase -b BASE2 OV   (safe mode: the clusters where the bases differ copied up)
#         flatten      qemu-img rebase -b "" OV      (the base's 2 GiB that the overlay lacks copied up)
# Prints each case's median times and the ratio qemu-img / qimg (> 1: qimg is faster); checks that both
# results read the same.
# Usage: benches/chain-vs-qemu.sh [SIZE_GIB=4] [RUNS=3] [CASE...]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
runs=${2:-3}
shift 2 2>/dev/null || shift $#
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(commit rebase flatten)
cargo build --release -q -p qcow2
qimg=$PWD/target/release/qimg
dir=$(mktemp -d /var/tmp/qnbd-chain.XXXXXX)
trap 'rm -rf "$dir"' EXIT
find /usr/lib /usr/bin -type f -size +64k 2>/dev/null | head -2000 | xargs cat 2>/dev/null | head -c 512M > "$dir/seed.bin" || true
: > "$dir/src.raw"
while [ "$(stat -c %s "$dir/src.raw")" -lt $((size << 30)) ]; do cat "$dir/seed.bin" >> "$dir/src.raw"; done
truncate -s "${size}G" "$dir/src.raw"
mkdir -p "$dir/t"
qemu-img convert -q -f raw -O qcow2 "$dir/src.raw" "$dir/t/base.qcow2"
qemu-img convert -q -f raw -O qcow2 "$dir/src.raw" "$dir/t/base2.qcow2"
rm -f "$dir/src.raw"
# The second base: 1 MiB of every 4 MiB rewritten; the overlay: 1 MiB of every 2 MiB written.
cmds2=(); cmdsov=()
for ((m = 0; m < size * 1024; m += 4)); do cmds2+=(-c "write -P $((m % 251)) ${m}M 1M"); done
for ((m = 1; m < size * 1024; m += 2)); do cmdsov+=(-c "write -P $((m % 241)) ${m}M 1M"); done
qemu-io -f qcow2 "${cmds2[@]}" "$dir/t/base2.qcow2" > /dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$dir/t/ov.qcow2"
qemu-io -f qcow2 "${cmdsov[@]}" "$dir/t/ov.qcow2" > /dev/null
rm -f "$dir/seed.bin"
t() { local s e; sync; s=$(date +%s%N); "$@" > /dev/null; e=$(date +%s%N); echo $(((e - s) / 1000000)); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
fresh() { rm -rf "$dir/$1"; cp -r "$dir/t" "$dir/$1"; }
run() {
  local tool=$1 c=$2 w=$dir/$3
  case $c in
    commit) t "$tool" commit "$w/ov.qcow2" ;;
    rebase) t "$tool" rebase -b base2.qcow2 -F qcow2 "$w/ov.qcow2" ;;
    flatten) t "$tool" rebase -b "" "$w/ov.qcow2" ;;
  esac
}
result() {
  case $1 in
    commit) echo "$dir/$2/base.qcow2" ;;
    *) echo "$dir/$2/ov.qcow2" ;;
  esac
}
echo "# $(nproc) cores, $(qemu-img --version | head -1), ${size} GiB images, median of $runs"
printf '%-8s %12s %12s %8s\n' case qemu-img_ms qimg_ms speedup
for c in "${cases[@]}"; do
  q=(); o=()
  for ((i = 1; i <= runs; i++)); do
    fresh a; q+=("$(cd "$dir/a" && run qemu-img "$c" a)")
    fresh b; o+=("$(cd "$dir/b" && run "$qimg" "$c" b)")
    qemu-img compare -q "$(result "$c" a)" "$(result "$c" b)" || { echo "$c: the results differ" >&2; exit 1; }
  done
  mq=$(median "${q[@]}"); mo=$(median "${o[@]}")
  printf '%-8s %12s %12s %8s\n' "$c" "$mq" "$mo" "$(awk -v a="$mq" -v b="$mo" 'BEGIN{printf "%.2f", a/b}')"
done
