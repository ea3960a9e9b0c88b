#!/usr/bin/env bash
# The kernel's ceiling for `write-alloc-io` (side-by-side.sh): 4 KiB random writes into an image file that qemu-io
# has just written whole, whose page cache then holds large folios (ext4's buffered write walks a whole folio's
# buffer heads for each 4 KiB write, under the inode lock, so writers of one file take turns). Measures, in turn:
#   fio alone on the raw file (psync, one thread, --invalidate=0 so that fio keeps the page cache and its folios):
#     what the kernel does for one writer, with no server and no socket;
#   qnbd and qemu-nbd serving such a raw file and such a qcow2 (fio's nbd engine, QD32, over a unix socket).
# Each run gets a fresh image. Prints every run, then the medians, each server's share of the ceiling, and qnbd /
# qemu-nbd per format.
#
# Usage: benches/write-ceiling.sh [SECONDS_PER_RUN=5] [ROUNDS=5]      (QNBD=path runs another qnbd binary)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-5}
export PATH=/usr/bin:$PATH
if [ -z "${QNBD:-}" ]; then
  cargo build --release -q -p nbd-server
fi
qnbd=${QNBD:-$PWD/target/release/qnbd}
dir=$(mktemp -d /var/tmp/qnbd-ceiling.XXXXXX)
trap 'pkill -f "$dir" 2>/dev/null || true; sleep 0.3; rm -rf "$dir"' EXIT
iops() { python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'; }

prep() { # format -> a fresh image that qemu-io wrote whole
  rm -f "$dir"/img.*
  qemu-img create -q -f "$1" "$dir/img.$1" 1G
  qemu-io -f "$1" -c 'write -P 0x5a 0 1G' "$dir/img.$1" >/dev/null
  sync
  echo "$dir/img.$1"
}

one() { # who format -> IOPS
  local img pid
  img=$(prep "$2")
  case $1 in
    fio)
      fio --name=b --filename="$img" --ioengine=psync --invalidate=0 --rw=randwrite --bs=4k --size=1G \
        --time_based --runtime="$secs" --output-format=json 2>/dev/null | iops
      return ;;
    qnbd) "$qnbd" -t -e 4 -f "$2" -k "$dir/s.sock" "$img" >/dev/null 2>&1 & ;;
    qemu-nbd) qemu-nbd -t -e 4 -f "$2" -k "$dir/s.sock" "$img" >/dev/null 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 250); do [ -S "$dir/s.sock" ] && break; sleep 0.02; done
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$dir/s.sock" --rw=randwrite --bs=4k --iodepth=32 \
    --size=1G --time_based --runtime="$secs" --output-format=json 2>/dev/null | iops
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -f "$dir/s.sock"
  # qnbd's commit helper has the same command line: gone too before the next image is made
  for _ in $(seq 500); do pgrep -f -- "$dir/img" >/dev/null || break; sleep 0.02; done
}

echo "# $(uname -r), $(nproc) cores, $(qemu-nbd --version | head -1), qnbd ${QNBD:-$(git rev-parse --short HEAD 2>/dev/null)}"
order=("fio raw" "qnbd raw" "qemu-nbd raw" "qnbd qcow2" "qemu-nbd qcow2")
declare -A runs
for ((r = 0; r < rounds; r++)); do
  for x in "${order[@]}"; do
    # shellcheck disable=SC2086
    v=$(one $x)
    echo "$x $v"
    runs[$x]="${runs[$x]:-} $v"
  done
  order=("${order[@]:1}" "${order[0]}")
done
median() { printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"; }
# shellcheck disable=SC2086
ceiling=$(median ${runs["fio raw"]})
echo "median IOPS: fio alone on the raw file (the ceiling) $ceiling"
for f in raw qcow2; do
  # shellcheck disable=SC2086
  q=$(median ${runs["qnbd $f"]})
  # shellcheck disable=SC2086
  m=$(median ${runs["qemu-nbd $f"]})
  awk -v f="$f" -v q="$q" -v m="$m" -v c="$ceiling" 'BEGIN{printf "%-5s qnbd %d (%.2f of the ceiling), qemu-nbd %d (%.2f), qnbd / qemu-nbd %.2f\n", f, q, q/c, m, m/c, q/m}'
done
