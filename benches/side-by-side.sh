#!/usr/bin/env bash
# Side-by-side benchmark: the same images served by qnbd and by qemu-nbd over unix sockets, alternating, driven
# by the same client (fio's nbd engine). Prints IOPS for each, the ratio qnbd / qemu-nbd and each server's
# peak RSS. Usage: benches/side-by-side.sh [SECONDS_PER_RUN=10] [REPEATS=2]
# Cases: 4 KiB random write QD32 into a fresh qcow2 and into an overlay of a raw base (copy-on-write on every
# first touch), 4 KiB random read QD1 and QD32 on a fully allocated qcow2.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
reps=${2:-2}
export PATH=/usr/bin:$PATH
cargo build --release -q -p nbd-server
qnbd=$PWD/target/release/qnbd
dir=$(mktemp -d /var/tmp/qnbd-bench.XXXXXX)
trap 'pkill -f "$dir" 2>/dev/null || true; rm -rf "$dir"' EXIT
qemu-img create -q -f raw "$dir/base.raw" 1G
qemu-io -f raw -c 'write -P 0x5a 0 1G' "$dir/base.raw" >/dev/null
qemu-img convert -O qcow2 "$dir/base.raw" "$dir/full.qcow2"

prep() { # case -> image path (fresh each run)
  case $1 in
    write-fresh) qemu-img create -q -f qcow2 "$dir/img.qcow2" 1G ;;
    write-overlay) qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/img.qcow2" ;;
    read-*) cp --reflink=auto "$dir/full.qcow2" "$dir/img.qcow2" ;;
  esac
}

fio_args() {
  case $1 in
    write-*) echo "--rw=randwrite --iodepth=32" ;;
    read-qd1) echo "--rw=randread --iodepth=1" ;;
    read-qd32) echo "--rw=randread --iodepth=32" ;;
  esac
}

run_one() { # server case -> "iops rss_kib"
  local server=$1 case=$2 sock="$dir/s.sock" pid iops rss
  rm -f "$sock"
  prep "$case"
  if [ "$server" = qnbd ]; then
    "$qnbd" -t -e 4 -f qcow2 -k "$sock" "$dir/img.qcow2" & pid=$!
  else
    qemu-nbd -t -e 4 -f qcow2 -k "$sock" "$dir/img.qcow2" & pid=$!
  fi
  for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.02; done
  # shellcheck disable=SC2046
  iops=$(fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --bs=4k --size=1G --time_based \
    --runtime="$secs" $(fio_args "$case") --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))')
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$iops $rss"
}

printf '%-14s %12s %12s %8s %12s %12s\n' case qnbd_iops qemu_iops ratio qnbd_rss_kb qemu_rss_kb
for case in write-fresh write-overlay read-qd1 read-qd32; do
  qs=(); ms=(); qr=0; mr=0
  for ((r = 0; r < reps; r++)); do
    read -r a b < <(run_one qnbd "$case"); qs+=("$a"); qr=$((b > qr ? b : qr))
    read -r a b < <(run_one qemu-nbd "$case"); ms+=("$a"); mr=$((b > mr ? b : mr))
  done
  q=$(printf '%s\n' "${qs[@]}" | sort -n | tail -1)
  m=$(printf '%s\n' "${ms[@]}" | sort -n | tail -1)
  printf '%-14s %12s %12s %8s %12s %12s\n' "$case" "$q" "$m" "$(awk -v a="$q" -v b="$m" 'BEGIN{printf "%.2f", a/b}')" "$qr" "$mr"
done
