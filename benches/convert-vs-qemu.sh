#!/usr/bin/env bash
# Side-by-side: `qimg convert` against `qemu-img convert` on the same source, alternating the two, `sync`
# before each run so neither pays for the other's writeback. The source is a fully allocated qcow2 (64 KiB
# clusters) holding real, compressible data: the files of /usr/lib and /usr/bin, cycled to SIZE.
# Cases: -O raw, -O raw -S 0, -O qcow2, -O qcow2 -c (deflate), -O qcow2 -c -o compression_type=zstd.
# Prints each case's median times, the ratio qemu-img / qimg (> 1: qimg is faster) and, for -c, both outputs'
# sizes.
# Usage: benches/convert-vs-qemu.sh [SIZE_GIB=4] [RUNS=5] [CASE...]   (cases: raw raw-S0 qcow2 c-zlib c-zstd)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
runs=${2:-5}
shift 2 2>/dev/null || shift $#
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(raw raw-S0 qcow2 c-zlib c-zstd)
cargo build --release -q -p qcow2
qimg=$PWD/target/release/qimg
dir=$(mktemp -d /var/tmp/qnbd-convert.XXXXXX)
trap 'rm -rf "$dir"' EXIT
# The source: real files, cycled until SIZE GiB.
find /usr/lib /usr/bin -type f -size +64k 2>/dev/null | head -2000 | xargs cat 2>/dev/null | head -c 512M > "$dir/seed.bin" || true
: > "$dir/src.raw"
while [ "$(stat -c %s "$dir/src.raw")" -lt $((size << 30)) ]; do cat "$dir/seed.bin" >> "$dir/src.raw"; done
truncate -s "${size}G" "$dir/src.raw"
qemu-img convert -q -f raw -O qcow2 "$dir/src.raw" "$dir/src.qcow2"
rm -f "$dir/src.raw" "$dir/seed.bin"
img=$dir/src.qcow2
t() { local s e; sync; s=$(date +%s%N); "$@"; e=$(date +%s%N); echo $(((e - s) / 1000000)); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
args() {
  case $1 in
    raw) echo "-O raw" ;;
    raw-S0) echo "-O raw -S 0" ;;
    qcow2) echo "-O qcow2" ;;
    c-zlib) echo "-O qcow2 -c" ;;
    c-zstd) echo "-O qcow2 -c -o compression_type=zstd" ;;
  esac
}
echo "# $(nproc) cores, $(qemu-img --version | head -1), ${size} GiB source, median of $runs"
printf '%-8s %12s %12s %8s %14s %14s\n' case qemu-img_ms qimg_ms speedup qemu_img_bytes qimg_bytes
for c in "${cases[@]}"; do
  q=(); o=()
  # shellcheck disable=SC2046
  for ((i = 1; i <= runs; i++)); do
    rm -f "$dir/o"; q+=("$(t qemu-img convert $(args "$c") "$img" "$dir/o")"); qs=$(stat -c %s "$dir/o")
    rm -f "$dir/o"; o+=("$(t "$qimg" convert $(args "$c") "$img" "$dir/o")"); os=$(stat -c %s "$dir/o")
  done
  mq=$(median "${q[@]}"); mo=$(median "${o[@]}")
  printf '%-8s %12s %12s %8s %14s %14s\n' "$c" "$mq" "$mo" "$(awk -v a="$mq" -v b="$mo" 'BEGIN{printf "%.2f", a/b}')" "$qs" "$os"
done
