#!/usr/bin/env bash
# Side-by-side: a base image in S3 (a local radosgw, scripts/ceph-rgw.sh), read through NBD by the same client
# (fio's nbd engine, 64 KiB random reads, QD16), served by
#   - qnbd: a qcow2 overlay whose backing file is s3://bench/base.raw, cache folder fresh for each cold run;
#   - nbdkit's curl plugin with its cache filter, on the same object by URL (public-read, so no signature:
#     a presigned URL reads the same bytes the same way);
# and, warm (the same offsets again, from the filled cache), qnbd's overlay on S3 against the same overlay on a
# local copy of the base.
# Prints the median of RUNS for each and the ratios. Needs root (apt, ceph), ceph-mon/ceph-osd/radosgw, nbdkit,
# fio and curl (installed when missing).
# Usage: benches/s3-vs-nbdkit.sh [RUNS=3] [IOS=2048]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
ios=${2:-2048}
need=()
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v fio >/dev/null || need+=(fio)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v curl >/dev/null || need+=(curl)
[ ${#need[@]} -eq 0 ] || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
for t in ceph-mon ceph-osd radosgw; do
  command -v $t >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ceph-mon ceph-osd radosgw >/dev/null
done
cargo build --release -q -p nbd-server -p qcow2
qnbd=$PWD/target/release/qnbd
qimg=$PWD/target/release/qimg
dir=$(mktemp -d /var/tmp/qnbd-s3bench.XXXXXX)
rgw=/var/tmp/qnbd-rgw-bench
cleanup() { [ -s "$dir/fio.err" ] && tail -5 "$dir/fio.err"; pkill -f "$dir" 2>/dev/null || true; sleep 0.3; scripts/ceph-rgw.sh stop "$rgw" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
rm -rf "$rgw"
scripts/ceph-rgw.sh start "$rgw" >/dev/null
export AWS_ACCESS_KEY_ID=TESTACCESSKEY0000001 AWS_SECRET_ACCESS_KEY=testsecretkey000000000000000000000000001
export AWS_ENDPOINT_URL=http://127.0.0.1:7480
s3curl() { curl -sSf -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" --aws-sigv4 "aws:amz:us-east-1:s3" \
  --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$@"; }
s3curl -X PUT "$AWS_ENDPOINT_URL/bench" >/dev/null
# A 1 GiB raw base of incompressible data.
head -c 1G /dev/urandom > "$dir/base.raw"
s3curl -T "$dir/base.raw" -H "x-amz-acl: public-read" "$AWS_ENDPOINT_URL/bench/base.raw" >/dev/null
url=$AWS_ENDPOINT_URL/bench/base.raw
QNBD_CACHE_DIR=$dir/qimg-cache "$qimg" create -q -f qcow2 -b s3://bench/base.raw -F raw "$dir/ov-s3.qcow2"
"$qimg" create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/ov-local.qcow2"
sock=$dir/s.sock
start() { # what cache: sets $pid (listening on $sock); not in a subshell, which nbdkit does not outlive
  rm -f "$sock"
  case $1 in
    qnbd-s3) cp "$dir/ov-s3.qcow2" "$dir/ov.qcow2"; "$qnbd" -t -e 0 --cache-dir "$2" -k "$sock" "$dir/ov.qcow2" >/dev/null 2>&1 & ;;
    qnbd-local) cp "$dir/ov-local.qcow2" "$dir/ov.qcow2"; "$qnbd" -t -e 0 -k "$sock" "$dir/ov.qcow2" >/dev/null 2>&1 & ;;
    nbdkit) nbdkit -f -r -U "$sock" --filter=cache curl "url=$url" cache-on-read=true >/dev/null 2>>"$dir/fio.err" & ;;
  esac
  pid=$!
  # Listening, not only bound (nbdkit makes the socket file before it listens).
  for _ in $(seq 500); do nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null 2>&1 && break; sleep 0.02; done
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
fio_iops() { # -> IOPS of one pass: $ios random 64 KiB reads at QD16 (at most 20 s), the same offsets every time
  fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randread --bs=64k --iodepth=16 \
    --size=1G --number_ios="$ios" --randrepeat=1 --randseed=42 --runtime=20 --output-format=json 2>>"$dir/fio.err" |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(int(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"]))'
}
cold() { # server -> $v: IOPS from an empty cache
  rm -rf "$dir/cache"
  start "$1" "$dir/cache"
  v=$(fio_iops)
  stop "$pid"
}
warm() { # server -> $v: IOPS of the second pass (the first fills the cache)
  rm -rf "$dir/cache"
  start "$1" "$dir/cache"
  fio_iops >/dev/null
  v=$(fio_iops)
  stop "$pid"
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { python3 -c "print('%.2f' % ($1 / $2))"; }
declare -a q n w l
for _ in $(seq "$runs"); do
  cold qnbd-s3; q+=("$v"); cold nbdkit; n+=("$v")
  warm qnbd-s3; w+=("$v"); warm qnbd-local; l+=("$v")
done
mq=$(median "${q[@]}"); mn=$(median "${n[@]}"); mw=$(median "${w[@]}"); ml=$(median "${l[@]}")
echo "# $(uname -r), $(nproc) cores, nbdkit $(nbdkit --version | awk '{print $2}'), qnbd $(git rev-parse --short HEAD), $ios reads of 64 KiB at QD16, median of $runs"
printf '%-44s %10s %10s %7s\n' case qnbd peer ratio
printf '%-44s %10s %10s %7s\n' "cold: S3 overlay vs nbdkit curl+cache (IOPS)" "$mq" "$mn" "$(ratio "$mq" "$mn")"
printf '%-44s %10s %10s %7s\n' "warm: S3 overlay vs local-base overlay" "$mw" "$ml" "$(ratio "$mw" "$ml")"
echo "runs: cold qnbd ${q[*]}; cold nbdkit ${n[*]}; warm s3 ${w[*]}; warm local ${l[*]}"
