#!/usr/bin/env bash
# Side-by-side: the FUSE export of qnbd (`qnbd --fuse FILE`) against qemu-storage-daemon's (`--export
# type=fuse`) on the same 1 GiB fully allocated qcow2, alternating, driven by the same fio jobs on the exported
# file (libaio, O_DIRECT), or on a loop device over it (`loop-*` cases: `losetup --direct-io=on`, the way an
# injection pipeline without the nbd driver gets a block device). Prints each case's median of RUNS for both and
# the ratio qnbd / qsd.
# `uring-*` cases: the same jobs with qnbd taking requests over io_uring (the kernel's fuse.enable_uring set to Y
# while qnbd mounts, N otherwise; put back at the end). qemu-storage-daemon 10.0 does not use io_uring for FUSE.
# Needs root (FUSE mounts, loop devices) and /dev/fuse.
# Usage: benches/fuse-vs-qsd.sh [SECONDS=5] [RUNS=3] [CASES...]
#   (randread randwrite seqread seqwrite loop-randread loop-randwrite loop-seqread loop-seqwrite, and where the
#   kernel has it uring-randread uring-randwrite uring-seqread uring-seqwrite)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
runs=${2:-3}
shift 2 2>/dev/null || shift $#
cases=("$@")
uring_param=/sys/module/fuse/parameters/enable_uring
uring_before=$(cat "$uring_param" 2>/dev/null || true)
if [ ${#cases[@]} -eq 0 ]; then
  cases=(randread randwrite seqread seqwrite loop-randread loop-randwrite loop-seqread loop-seqwrite)
  [ -z "$uring_before" ] || cases+=(uring-randread uring-randwrite uring-seqread uring-seqwrite)
fi
cargo build --release -q -p nbd-server
qnbd=$PWD/target/release/qnbd
dir=$(mktemp -d /var/tmp/qnbd-fuse.XXXXXX)
cleanup() { [ -z "$uring_before" ] || echo "$uring_before" > "$uring_param"; [ -z "${lo:-}" ] || losetup -d "$lo" 2>/dev/null || true; umount "$dir/mnt" 2>/dev/null || true; pkill -f "$dir" 2>/dev/null || true; sleep 0.3; rm -rf "$dir"; }
trap cleanup EXIT
qemu-img create -q -f raw "$dir/base.raw" 1G
qemu-io -f raw -c 'write -P 0x5a 0 1G' "$dir/base.raw" >/dev/null
qemu-img convert -O qcow2 "$dir/base.raw" "$dir/full.qcow2"
rm -f "$dir/base.raw"
mounted() { findmnt -n "$dir/mnt" >/dev/null 2>&1; }
start() { # server case -> pid
  cp --reflink=auto "$dir/full.qcow2" "$dir/img.qcow2"
  : > "$dir/mnt"
  if [ -n "$uring_before" ]; then
    if [ "$1" = qnbd ] && [ "${2#uring-}" != "$2" ]; then echo Y > "$uring_param"; else echo N > "$uring_param"; fi
  fi
  if [ "$1" = qnbd ]; then
    "$qnbd" -f qcow2 --fuse "$dir/mnt" "$dir/img.qcow2" >/dev/null 2>&1 &
  else
    qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$dir/img.qcow2" \
      --blockdev driver=qcow2,node-name=q,file=f \
      --export "type=fuse,id=e,node-name=q,mountpoint=$dir/mnt,writable=on" >/dev/null 2>&1 &
  fi
  local pid=$!
  for _ in $(seq 250); do mounted && break; sleep 0.02; done
  echo "$pid"
}
stop() { kill "$1" 2>/dev/null || true; for _ in $(seq 250); do mounted || break; sleep 0.02; done; wait "$1" 2>/dev/null || true; }
job() {
  local c=${1#uring-}
  case ${c#loop-} in
    randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
    randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=4" ;;
    seqwrite) echo "--rw=write --bs=1M --iodepth=4" ;;
  esac
}
one() { # server case -> value
  local pid v field=iops target="$dir/mnt" c=${2#uring-}
  case ${c#loop-} in seq*) field=bw ;; esac
  pid=$(start "$1" "$2")
  lo=
  if [ "${2#loop-}" != "$2" ]; then
    lo=$(losetup -f --show --direct-io=on "$dir/mnt")
    target=$lo
  fi
  # shellcheck disable=SC2046
  v=$(fio --name=b --filename="$target" --ioengine=libaio --direct=1 --size=1G --time_based --runtime="$secs" \
    $(job "$2") --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; f=sys.argv[1]
v=j["read"][f]+j["write"][f]; print(int(v/1024) if f=="bw" else int(v))' "$field")
  [ -z "$lo" ] || losetup -d "$lo"
  lo=
  stop "$pid"
  echo "$v"
}
echo "# $(uname -r), $(nproc) cores, $(qemu-storage-daemon --version | head -1), qnbd $(git rev-parse --short HEAD)"
printf '%-15s %-6s %10s %10s %7s\n' case unit qnbd qsd ratio
median() { printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"; }
for c in "${cases[@]}"; do
  qs=(); ms=()
  for ((r = 0; r < runs; r++)); do
    # each server goes first in turn
    if ((r % 2 == 0)); then qs+=("$(one qnbd "$c")"); ms+=("$(one qsd "$c")"); else ms+=("$(one qsd "$c")"); qs+=("$(one qnbd "$c")"); fi
  done
  q=$(median "${qs[@]}"); m=$(median "${ms[@]}")
  unit=IOPS; k=${c#uring-}; case ${k#loop-} in seq*) unit=MiB/s ;; esac
  printf '%-15s %-6s %10s %10s %7s\n' "$c" "$unit" "$q" "$m" "$(awk -v a="$q" -v b="$m" 'BEGIN{printf "%.2f", b ? a/b : 0}')"
done
