#!/usr/bin/env bash
# Side-by-side benchmark: the same image files served by qnbd and by qemu-nbd over unix sockets, alternating,
# driven by the same clients (fio's nbd engine; nbdcopy for the streaming cases). Prints one table: IOPS or MiB/s
# for each server, the ratio qnbd / qemu-nbd, and each server's peak RSS.
#
# Usage: benches/side-by-side.sh [SECONDS_PER_RUN=5] [REPEATS=1] [CASES...]   (each number: the median of REPEATS runs)
# qemu-nbd runs with its defaults; cases ending in "/uring" run it with --cache=none --aio=io_uring instead
# (qnbd stays on the page cache there); cases ending in "/direct" run both without the page cache.
# Cases (default: all):
#   read-qd1 read-qd32          4 KiB random read on a fully allocated 1 GiB qcow2 (64 KiB clusters)
#   write-fresh write-alloc     4 KiB random write QD32 into a fresh qcow2 / an allocated one
#   write-alloc-io raw-write-io the same into an allocated qcow2 / a raw file that qemu-io has just written whole
#                               (the second harness's set-up: the file's page cache then holds large folios, and
#                               ext4's buffered write path walks a whole folio for each 4 KiB write; both servers
#                               pay it, and it takes most of qnbd's time)
#   write-bitmaps               write-alloc into an image with two enabled persistent dirty bitmaps (64 KiB and
#                               512 KiB granularity), which both servers keep up to date
#   write-fresh-4c              4 clients (4 connections), each 4 KiB random write QD32 into its own quarter of a
#                               fresh 1 GiB qcow2 (different clusters; most writes soon hit allocated clusters)
#   alloc-4c                    the same into a fresh 64 GiB qcow2 (16 GiB each): nearly every write allocates
#   cow cow-extl2               4 KiB random write QD32 into an overlay of a raw base (with extended L2)
#   read-chain3                 4 KiB random read QD32 through a 3-deep backing chain
#   cow-chain3                  4 KiB random write QD32 into the top of that chain (a copy of it for each run):
#                               three quarters of the clusters written are copied up from the layers below
#   seq-read seq-write          1 MiB sequential read / write, QD4
#   raw-seq-read                the same sequential read of the raw base served by qnbd (the qcow2 ceiling)
#   nbdcopy1 nbdcopy4           nbdcopy of the whole 1 GiB qcow2 to null, five times per run: with 1 and 4 connections
#   raw-nbdcopy1 raw-nbdcopy4   nbdcopy of the raw base through qnbd (the ceilings for nbdcopy1 and nbdcopy4)
#   tls-nbdcopy1                nbdcopy -C 1 over TLS (both servers with the same x509 certificates made here
#                               with openssl, client certificates not required; fio's nbd engine refuses the
#                               tls-certificates URI parameter, so there is no fio case over TLS)
#   tcp-nbdcopy1 tls-tcp-nbdcopy1
#                               nbdcopy -C 1, plain and over TLS, with both servers listening on TCP 127.0.0.1 (a
#                               network client's transport: TCP's buffers and the loopback's processing, not a
#                               unix socket's)
#   qemu-read                   qemu-img convert of the whole qcow2 from the export to null-co (qemu's NBD client,
#                               its 2 MiB requests, up to 8 in flight), three times per run
#   qemu-write                  qemu-img convert of a 1 GiB raw file into a fresh qcow2 through the export (qemu's
#                               NBD client writing, as an upload or a restore does), with its final flush
#   clients1000                 1000 clients at once, each on its own connection doing 4 KiB random reads at QD1
#                               (benches/clients.rs), both servers with -e 1000: aggregate IOPS and peak RSS
#   overlays50                  50 overlays of one base: one qnbd with 50 exports against 50 qemu-nbd processes,
#                               each read in turn (64 MiB sequential); total peak RSS (KiB) is the number
#   read-qd32/uring write-alloc/uring cow/uring seq-read/uring
#   read-qd32/direct write-alloc/direct seq-read/direct seq-write/direct
#                               both servers bypass the page cache: qnbd --cache=none against qemu-nbd
#                               --cache=none --aio=io_uring
# The cases with a raw twin (write-alloc-io, seq-read, nbdcopy1, nbdcopy4) also run qnbd on that twin in the same
# rotation, so that the qcow2/raw ratio, like the qemu-nbd one, compares runs made side by side (columns qnbd_raw
# and qcow2/raw).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
reps=${2:-1}
shift 2 2>/dev/null || shift $#
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(read-qd1 read-qd32 write-fresh write-fresh-4c alloc-4c write-alloc write-bitmaps cow cow-extl2 read-chain3 cow-chain3 seq-read seq-write
  raw-seq-read nbdcopy1 nbdcopy4 raw-nbdcopy4 tcp-nbdcopy1 qemu-read qemu-write overlays50 read-qd32/uring write-alloc/uring cow/uring seq-read/uring
  read-qd32/direct write-alloc/direct seq-read/direct seq-write/direct)
export PATH=/usr/bin:$PATH
# QNBD=path runs another qnbd binary; QNBD_BEFORE=path also runs that one (say, a build of an older commit) in
# the same run, alternating with the others, and adds its numbers and the after/before ratio to the table.
if [ -z "${QNBD:-}" ]; then
  cargo build --release -q -p nbd-server
fi
cargo build --release -q -p qnbd-benches --bin nbd-clients
clients_bin=$PWD/target/release/nbd-clients
qnbd=${QNBD:-$PWD/target/release/qnbd}
# 1000 clients need more than the usual 1024 descriptors, for the servers and the client.
ulimit -n 8192 2>/dev/null || true
dir=$(mktemp -d /var/tmp/qnbd-bench.XXXXXX)
trap 'pkill -f "$dir" 2>/dev/null || true; sleep 0.2; rm -rf "$dir"' EXIT
qemu-img create -q -f raw "$dir/base.raw" 1G
qemu-io -f raw -c 'write -P 0x5a 0 1G' "$dir/base.raw" >/dev/null
qemu-img convert -O qcow2 "$dir/base.raw" "$dir/full.qcow2"
# TLS: a CA and a server certificate for localhost (the tls-* cases)
pki() {
  command -v openssl >/dev/null || apt-get install -y -q openssl >/dev/null
  mkdir -p "$dir/pki/server" "$dir/pki/client"
  (cd "$dir/pki" &&
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=bench-ca 2>/dev/null &&
    openssl req -newkey rsa:2048 -nodes -keyout server/server-key.pem -out server.csr -subj /CN=localhost 2>/dev/null &&
    printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' > ext.cnf &&
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 2 -extfile ext.cnf \
      -out server/server-cert.pem 2>/dev/null &&
    cp ca-cert.pem server/ && cp ca-cert.pem client/)
}
for c in "${cases[@]}"; do case $c in tls-*) pki; break ;; esac; done
# The TCP cases' port on 127.0.0.1: a free one, from the kernel's ephemeral range.
tcp_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# a 3-deep chain: every layer holds a quarter of the data
qemu-img create -q -f qcow2 "$dir/c1.qcow2" 1G
qemu-io -f qcow2 -c 'write -P 1 0 256M' "$dir/c1.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b c1.qcow2 -F qcow2 "$dir/c2.qcow2"
qemu-io -f qcow2 -c 'write -P 2 256M 256M' "$dir/c2.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b c2.qcow2 -F qcow2 "$dir/c3.qcow2"
qemu-io -f qcow2 -c 'write -P 3 512M 256M' "$dir/c3.qcow2" >/dev/null

prep() { # case -> the image to serve (made fresh for each run)
  rm -f "$dir/img.qcow2"
  case ${1%%/*} in
    write-fresh | write-fresh-4c | seq-write | qemu-write) qemu-img create -q -f qcow2 "$dir/img.qcow2" 1G; echo "$dir/img.qcow2" ;;
    alloc-4c) qemu-img create -q -f qcow2 "$dir/img.qcow2" 64G; echo "$dir/img.qcow2" ;;
    cow) qemu-img create -q -f qcow2 -b "$dir/base.raw" -F raw "$dir/img.qcow2"; echo "$dir/img.qcow2" ;;
    cow-extl2) qemu-img create -q -f qcow2 -o extended_l2=on -b "$dir/base.raw" -F raw "$dir/img.qcow2"; echo "$dir/img.qcow2" ;;
    read-chain3 | cow-chain3) cp "$dir/c3.qcow2" "$dir/img.qcow2"; echo "$dir/img.qcow2" ;;
    write-bitmaps)
      cp --reflink=auto "$dir/full.qcow2" "$dir/img.qcow2"
      qemu-img bitmap --add "$dir/img.qcow2" b0
      qemu-img bitmap --add -g 512k "$dir/img.qcow2" b1
      echo "$dir/img.qcow2" ;;
    write-alloc-io)
      qemu-img create -q -f qcow2 "$dir/img.qcow2" 1G
      qemu-io -c 'write -P 0x5a 0 1G' "$dir/img.qcow2" >/dev/null
      echo "$dir/img.qcow2" ;;
    raw-write-io)
      qemu-img create -q -f raw "$dir/img.raw" 1G
      qemu-io -f raw -c 'write -P 0x5a 0 1G' "$dir/img.raw" >/dev/null
      echo "$dir/img.raw" ;;
    raw-*) echo "$dir/base.raw" ;;
    *) cp --reflink=auto "$dir/full.qcow2" "$dir/img.qcow2"; echo "$dir/img.qcow2" ;;
  esac
}

fio_args() {
  case ${1%%/*} in
    write-fresh-4c) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --offset_increment=256M --group_reporting" ;;
    alloc-4c) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --offset_increment=16G --group_reporting" ;;
    write-* | raw-write* | cow*) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    read-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
    read-qd32 | read-chain3) echo "--rw=randread --bs=4k --iodepth=32" ;;
    seq-read | raw-seq-read) echo "--rw=read --bs=1M --iodepth=4" ;;
    seq-write) echo "--rw=write --bs=1M --iodepth=4" ;;
  esac
}

start() { # server image sock [uring] -> pid   ($clients: the -e limit, default 8; $port: TCP instead of sock)
  local server=$1 img=$2 sock=$3 uring=${4:-} fmt=qcow2 e=${clients:-8}
  case $img in *.raw) fmt=raw ;; esac
  rm -f "$sock"
  local listen=(-k "$sock")
  [ -z "${port:-}" ] || listen=(-b 127.0.0.1 -p "$port")
  local direct=()
  [ "$uring" = direct ] && direct=(--cache=none)
  [ "$uring" = tls ] && direct=(--object "tls-creds-x509,id=tls0,dir=$dir/pki/server,endpoint=server,verify-peer=off" --tls-creds tls0)
  if [ "$server" = qnbd ]; then
    "$qnbd" -t -e "$e" -f "$fmt" "${direct[@]}" "${listen[@]}" "$img" >/dev/null 2>&1 &
  elif [ "$server" = before ]; then
    "$QNBD_BEFORE" -t -e "$e" -f "$fmt" "${direct[@]}" "${listen[@]}" "$img" >/dev/null 2>&1 &
  elif [ "$uring" = tls ]; then
    qemu-nbd -t -e "$e" -f "$fmt" "${direct[@]}" "${listen[@]}" "$img" >/dev/null 2>&1 &
  elif [ -n "$uring" ]; then
    qemu-nbd -t -e "$e" -f "$fmt" --cache=none --aio=io_uring "${listen[@]}" "$img" >/dev/null 2>&1 &
  else
    qemu-nbd -t -e "$e" -f "$fmt" "${listen[@]}" "$img" >/dev/null 2>&1 &
  fi
  local pid=$!
  if [ -n "${port:-}" ]; then
    # Listening once a connection succeeds (the probe connection just ends: both servers take that).
    for _ in $(seq 250); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.02; done
  else
    for _ in $(seq 250); do [ -S "$sock" ] && break; sleep 0.02; done
  fi
  echo "$pid"
}

rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

stop() { # pid sock: stop the server and wait until it (and qnbd's commit helper, same command line) is gone,
  # so the next run's image is not still locked or flushed by this one
  kill "$1" 2>/dev/null || true
  for _ in $(seq 500); do pgrep -f -- "$2" >/dev/null || return 0; sleep 0.02; done
  pkill -9 -f -- "$2" || true
}

run_one() { # server case -> "value rss_kib"
  local server=$1 case=$2 sock="$dir/s.sock" img pid val uring= clients=8 port=
  [ "$case" = clients1000 ] && clients=1000
  local uri
  case $case in */uring) uring=1 ;; */direct) uring=direct ;; tls-*) uring=tls ;; esac
  case $case in tcp-* | tls-tcp-*) port=$tcp_port ;; esac
  uri="nbd+unix:///?socket=$sock"
  [ "$uring" = tls ] && uri="nbds+unix:///?socket=$sock&tls-certificates=$dir/pki/client&tls-hostname=localhost"
  [ -z "$port" ] || uri="nbd://127.0.0.1:$port/"
  [ -z "$port" ] || [ "$uring" != tls ] || uri="nbds://localhost:$port/?tls-certificates=$dir/pki/client"
  img=$(prep "$case")
  # A server bypassing the page cache reads what the disk has: the fresh copy is written back first, so that no
  # run pays for (or gains from) the writeback of the copy still under way. The whole machine's dirty pages go
  # too (the earlier cases leave gigabytes): their writeback would otherwise share the disk with whichever
  # server runs while it lasts.
  [ -z "$uring" ] || [ "$uring" = tls ] || sync
  pid=$(start "$server" "$img" "$sock" $uring)
  case ${case%%/*} in
    clients1000)
      val=$("$clients_bin" "$sock" 1000 "$secs") ;;
    qemu-read)
      local t0 t1
      t0=$(date +%s.%N)
      for _ in 1 2 3; do
        qemu-img convert -n -f raw "$uri" --target-image-opts driver=null-co,size=1073741824 2>/dev/null
      done
      t1=$(date +%s.%N)
      val=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%d", 3*1024/(b-a)}') ;;
    qemu-write)
      local t0 t1
      t0=$(date +%s.%N)
      qemu-img convert -n -f raw -O raw "$dir/base.raw" "$uri" 2>/dev/null
      t1=$(date +%s.%N)
      val=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%d", 1024/(b-a)}') ;;
    nbdcopy* | raw-nbdcopy* | tls-nbdcopy* | tcp-nbdcopy* | tls-tcp-nbdcopy*)
      local n=${case##*nbdcopy} t0 t1
      # Five copies per run: one takes a fifth of a second, where a stray wakeup on two cores is 10 %.
      t0=$(date +%s.%N)
      for _ in 1 2 3 4 5; do nbdcopy --connections="$n" "$uri" null: 2>/dev/null; done
      t1=$(date +%s.%N)
      val=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%d", 5*1024/(b-a)}') ;;
    *)
      local field=iops size=1G
      case $case in seq-* | raw-seq-*) field=bw ;; write-fresh-4c) size=256M ;; alloc-4c) size=16G ;; esac
      # shellcheck disable=SC2046
      val=$(fio --name=b --ioengine=nbd --uri="$uri" --size="$size" --time_based \
        --runtime="$secs" $(fio_args "$case") --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; f=sys.argv[1]
v=j["read"][f]+j["write"][f]; print(int(v/1024) if f=="bw" else int(v))' "$field") ;;
  esac
  local r; r=$(rss "$pid")
  if [ -n "$port" ]; then stop "$pid" "$img"; else stop "$pid" "$sock"; fi
  echo "$val $r"
}

raw_twin() { # case -> the raw case whose number is the ceiling of this qcow2 case, if any
  case $1 in
    write-alloc-io) echo raw-write-io ;;
    seq-read | nbdcopy1 | nbdcopy4) echo "raw-$1" ;;
  esac
}

overlays50() { # server -> "total_peak_rss_kib seconds"
  local server=$1 i pids=() t0 t1 total=0
  for i in $(seq 50); do
    qemu-img create -q -f qcow2 -b "$dir/full.qcow2" -F qcow2 "$dir/ov$i.qcow2"
  done
  t0=$(date +%s.%N)
  if [ "$server" = qnbd ]; then
    local args=()
    for i in $(seq 50); do args+=(-x "ov$i"); done
    for i in $(seq 50); do args+=("$dir/ov$i.qcow2"); done
    rm -f "$dir/o.sock"
    "$qnbd" -t -e 8 -f qcow2 -k "$dir/o.sock" "${args[@]}" >/dev/null 2>&1 & pids=($!)
    for _ in $(seq 250); do [ -S "$dir/o.sock" ] && break; sleep 0.02; done
    for i in $(seq 50); do
      fio --name=b --ioengine=nbd --uri="nbd+unix:///ov$i?socket=$dir/o.sock" --rw=read --bs=1M --size=64M \
        --output-format=json >/dev/null 2>&1
    done
  else
    for i in $(seq 50); do
      rm -f "$dir/o$i.sock"
      qemu-nbd -t -f qcow2 -k "$dir/o$i.sock" "$dir/ov$i.qcow2" >/dev/null 2>&1 & pids+=($!)
    done
    for i in $(seq 50); do
      for _ in $(seq 250); do [ -S "$dir/o$i.sock" ] && break; sleep 0.02; done
      fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$dir/o$i.sock" --rw=read --bs=1M --size=64M \
        --output-format=json >/dev/null 2>&1
    done
  fi
  t1=$(date +%s.%N)
  for p in "${pids[@]}"; do total=$((total + $(rss "$p"))); done
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 500); do pgrep -f -- "$dir/o" >/dev/null || break; sleep 0.02; done
  rm -f "$dir"/ov*.qcow2
  echo "$total $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')"
}

unit() {
  case $1 in
    seq-* | raw-seq-* | nbdcopy* | raw-nbdcopy* | tls-* | tcp-* | qemu-*) echo MiB/s ;;
    overlays50) echo "RSS KiB" ;;
    *) echo IOPS ;;
  esac
}

median() { # values -> the median (of an even count, the lower middle one)
  printf '%s\n' "$@" | sort -n | sed -n "$((($# + 1) / 2))p"
}

echo "# $(uname -r), $(nproc) cores, $(qemu-nbd --version | head -1), qnbd ${QNBD:-$(git rev-parse --short HEAD 2>/dev/null)}${QNBD_BEFORE:+, before: $QNBD_BEFORE}"
extra() { # before-value after-value -> the extra columns when QNBD_BEFORE is set
  [ -n "${QNBD_BEFORE:-}" ] || return 0
  printf ' %12s %7s' "$1" "$(awk -v a="$2" -v b="$1" 'BEGIN{if (b ~ /^[0-9]+$/ && b > 0) printf "%.2f", a/b; else print "-"}')"
}
printf '%-18s %-8s %12s %12s %7s %12s %12s' case unit qnbd qemu-nbd ratio qnbd_rss_kb qemu_rss_kb
[ -z "${QNBD_BEFORE:-}" ] || printf ' %12s %7s' before after/before
printf ' %12s %9s' qnbd_raw qcow2/raw
echo
twin() { # qcow2-value raw-values... -> the qnbd_raw and qcow2/raw columns ("- -" without raw values)
  local q=$1; shift
  if [ $# -eq 0 ]; then printf ' %12s %9s' - -; return; fi
  local r; r=$(median "$@")
  printf ' %12s %9s' "$r" "$(awk -v a="$q" -v b="$r" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')"
}
for case in "${cases[@]}"; do
  if [ "$case" = overlays50 ]; then
    read -r q qt < <(overlays50 qnbd)
    read -r m mt < <(overlays50 qemu-nbd)
    # lower is better here: the ratio is qnbd / qemu-nbd of total RSS
    printf '%-18s %-8s %12s %12s %7s %12s %12s' "$case" "RSS-KiB" "$q" "$m" \
      "$(awk -v a="$q" -v b="$m" 'BEGIN{printf "%.2f", a/b}')" "(${qt}s)" "(${mt}s)"
    extra - -
    twin -
    echo
    continue
  fi
  server_b=qemu-nbd
  case $case in raw-*) server_b=skip ;; esac
  qs=(); ms=(); bs=(); rs=(); qr=0; mr=0
  raw=$(raw_twin "$case")
  # The servers take turns going first (the first run after an image is prepared measures a little lower).
  order=(qnbd qemu-nbd before raw)
  for ((r = 0; r < reps; r++)); do
    for srv in "${order[@]}"; do
      case $srv in
        qnbd) read -r a b < <(run_one qnbd "$case"); qs+=("$a"); qr=$((b > qr ? b : qr)) ;;
        qemu-nbd) [ "$server_b" = skip ] || { read -r a b < <(run_one qemu-nbd "$case"); ms+=("$a"); mr=$((b > mr ? b : mr)); } ;;
        before) [ -z "${QNBD_BEFORE:-}" ] || { read -r a b < <(run_one before "$case"); bs+=("$a"); } ;;
        raw) [ -z "$raw" ] || { read -r a b < <(run_one qnbd "$raw"); rs+=("$a"); } ;;
      esac
    done
    order=("${order[@]:1}" "${order[0]}")
  done
  q=$(median "${qs[@]}")
  bq=-
  [ ${#bs[@]} -eq 0 ] || bq=$(median "${bs[@]}")
  if [ "$server_b" = skip ]; then
    printf '%-18s %-8s %12s %12s %7s %12s %12s' "$case" "$(unit "$case")" "$q" - - "$qr" -
    extra "$bq" "$q"
    twin "$q"
    echo
    continue
  fi
  m=$(median "${ms[@]}")
  printf '%-18s %-8s %12s %12s %7s %12s %12s' "$case" "$(unit "$case")" "$q" "$m" \
    "$(awk -v a="$q" -v b="$m" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')" "$qr" "$mr"
  extra "$bq" "$q"
  twin "$q" ${rs[@]+"${rs[@]}"}
  echo
done
