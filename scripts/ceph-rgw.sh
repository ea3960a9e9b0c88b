#!/bin/bash
# Single-node Ceph (Pacific 16, Debian packages) + radosgw S3 endpoint on 127.0.0.1:7480.
# No cephadm, no containers, no systemd. Everything (conf, keys, data, logs, pids) lives in DIR.
#
#   ceph-rgw.sh start DIR   # bootstrap on first use, otherwise restart existing cluster
#   ceph-rgw.sh stop  DIR   # stop rgw, osd, mon (by pid files in DIR/run)
#   ceph-rgw.sh status DIR
#
# Env: OBJECTSTORE=memstore|bluestore (default bluestore; only used at bootstrap)
#      RGW_PORT (7480), S3_ACCESS_KEY, S3_SECRET_KEY
# Needs: apt-get install --no-install-recommends ceph-mon ceph-osd radosgw   (ceph-mgr not needed)
set -euo pipefail

CMD=${1:?usage: $0 start|stop|status DIR}
DIR=$(realpath -m "${2:?usage: $0 start|stop|status DIR}")
OBJECTSTORE=${OBJECTSTORE:-bluestore}
RGW_PORT=${RGW_PORT:-7480}
S3_ACCESS_KEY=${S3_ACCESS_KEY:-TESTACCESSKEY0000001}
S3_SECRET_KEY=${S3_SECRET_KEY:-testsecretkey000000000000000000000000001}
CONF=$DIR/ceph.conf
export CEPH_CONF=$CONF
CEPH="ceph -c $CONF --connect-timeout 10"

ts() { date +%s.%N; }
T0=$(ts)
log() { printf '[%6.2fs] %s\n' "$(echo "$(ts) - $T0" | bc)" "$*"; }

wait_for() { # timeout_s description command...
    local t=$1 what=$2; shift 2
    local end=$(( $(date +%s) + t ))
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$end" ]; then log "TIMEOUT waiting for $what"; return 1; fi
        sleep 0.5
    done
    log "ready: $what"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    local fsid=$1
    cat > "$CONF" <<EOF
[global]
fsid = $fsid
mon initial members = a
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public network = 127.0.0.0/8
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
log to stderr = false
err to stderr = true
# single OSD: size 1, no warnings, few PGs, no autoscaler
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon allow pool delete = true
# a throwaway test cluster: the monitor refuses to start below 5 % free disk by default, which a build
# machine's full disk reaches long before the test runs out of room (it writes a few hundred MiB)
mon data avail crit = 1
mon data avail warn = 2
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon max pg per osd = 1000
# small memory footprint
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
rocksdb cache size = 33554432
osd op num shards = 1
osd op num threads per shard = 2
mon osd full ratio = 0.97
mon osd backfillfull ratio = 0.96
mon osd nearfull ratio = 0.95
# CI disks are often >70% full; don't warn about it
mon data avail warn = 1

[mon.a]
# each osdmap change (pool create, osd boot) otherwise waits ~1 s for the next paxos round
paxos propose interval = 0.05
paxos min wait = 0.01
mon data = $DIR/mon
keyring = $DIR/mon/keyring

[osd.0]
osd data = $DIR/osd
keyring = $DIR/osd/keyring
osd objectstore = $OBJECTSTORE
# memstore only saves its RAM contents on a clean umount; fast shutdown (default) skips it
osd fast shutdown = $([ "$OBJECTSTORE" = memstore ] && echo false || echo true)
# memstore: capacity it reports (data lives in RAM; dumped to DIR/osd on clean umount)
memstore device bytes = 4294967296
# bluestore on a sparse file
bluestore block path = $DIR/osd-block.img
bluestore block create = true
bluestore block size = 10737418240
bluestore block db create = false
bluestore block wal create = false

[client.rgw.a]
keyring = $DIR/rgw/keyring
rgw data = $DIR/rgw
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw thread pool size = 32
rgw dns name = localhost
# per-user request counts (radosgw-admin usage show), flushed at once: the tests check qnbd's GET counter
rgw enable usage log = true
rgw usage log tick interval = 1
rgw usage log flush threshold = 1
EOF
}

start_mon() { ceph-mon -c "$CONF" -i a; }
start_osd() { ceph-osd -c "$CONF" -i 0; }
start_rgw() { radosgw -c "$CONF" -n client.rgw.a; }

osd_up() { $CEPH osd dump 2>/dev/null | grep -q '^osd.0 up'; }
rgw_up() { curl -sf -o /dev/null "http://127.0.0.1:$RGW_PORT/"; }

bootstrap() {
    mkdir -p "$DIR"/{mon,osd,rgw,log,run}
    local fsid; fsid=$(uuidgen)
    write_conf "$fsid"
    log "bootstrap fsid=$fsid objectstore=$OBJECTSTORE"
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
    log "mon mkfs done"
    start_mon
    wait_for 60 "mon quorum" $CEPH mon stat
    $CEPH config set mon auth_allow_insecure_global_id_reclaim false >/dev/null 2>&1 || true

    # OSD: register id+key in the mon, then mkfs the object store
    local osd_uuid key; osd_uuid=$(uuidgen); key=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$key" > "$DIR/osd-secret.json"
    local id; id=$($CEPH osd new "$osd_uuid" -i "$DIR/osd-secret.json")
    [ "$id" = 0 ] || { log "unexpected osd id $id"; exit 1; }
    printf '[osd.0]\n\tkey = %s\n' "$key" > "$DIR/osd/keyring"
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" --keyring "$DIR/osd/keyring" >"$DIR/log/osd-mkfs.log" 2>&1
    log "osd mkfs done"
    start_osd
    wait_for 120 "osd.0 up" osd_up

    $CEPH auth get-or-create client.rgw.a mon 'allow rw' osd 'allow rwx' -o "$DIR/rgw/keyring"
    start_rgw
    wait_for 180 "rgw http on 127.0.0.1:$RGW_PORT" rgw_up
    radosgw-admin -c "$CONF" user create --uid=test --display-name="test user" \
        --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >"$DIR/log/user-create.json"
    log "s3 user created (access key $S3_ACCESS_KEY)"
}

case "$CMD" in
start)
    if [ ! -f "$CONF" ]; then
        bootstrap
    else
        log "restarting existing cluster in $DIR"
        pid_alive "$DIR/run/mon.a.pid" || start_mon
        wait_for 60 "mon quorum" $CEPH mon stat
        pid_alive "$DIR/run/osd.0.pid" || start_osd
        wait_for 120 "osd.0 up" osd_up
        pid_alive "$DIR/run/client.rgw.a.pid" || start_rgw
        wait_for 180 "rgw http on 127.0.0.1:$RGW_PORT" rgw_up
    fi
    log "S3 endpoint http://127.0.0.1:$RGW_PORT  access=$S3_ACCESS_KEY secret=$S3_SECRET_KEY"
    ;;
stop)
    for n in client.rgw.a osd.0 mon.a; do
        f=$DIR/run/$n.pid
        if pid_alive "$f"; then
            p=$(cat "$f"); kill -TERM "$p"
            for _ in $(seq 1 120); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
            if kill -0 "$p" 2>/dev/null; then log "$n ($p) did not exit, SIGKILL"; kill -KILL "$p"; fi
            log "stopped $n (pid $p)"
        fi
        rm -f "$f"
    done
    ;;
status)
    for n in mon.a osd.0 client.rgw.a; do
        f=$DIR/run/$n.pid
        if pid_alive "$f"; then p=$(cat "$f"); echo "$n pid=$p rss_kb=$(awk '/VmRSS/{print $2}' /proc/$p/status) peak_rss_kb=$(awk '/VmHWM/{print $2}' /proc/$p/status) cpu_s=$(awk '{print ($14+$15)/100}' /proc/$p/stat)"; else echo "$n down"; fi
    done
    $CEPH -s 2>/dev/null || true
    ;;
*) echo "usage: $0 start|stop|status DIR" >&2; exit 2 ;;
esac
