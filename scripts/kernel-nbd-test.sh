#!/usr/bin/env bash
# kernel-nbd-test.sh - qnbd against the real Linux kernel NBD client, and qnbd --vsock, inside an emulated
# machine. This machine's kernel has no nbd driver, so Debian's stock kernel (its nbd.ko and vsock_loopback.ko)
# boots under qemu-system-x86_64 with TCG and no network device, with qnbd (and nbdinfo, when installed) in a
# busybox initramfs. Images reach the guest over virtio-9p.
#
# In the guest, every step bounded by a timeout:
#   A  qnbd -c /dev/nbd0 on a qcow2 overlay of an MBR+ext4 base; mount nbd0p1 right after -c returns (no
#      waiting, no udev: -c must have read the partition table); read the seed file; write files (one of
#      6 MiB of random data); umount; qnbd -d; the server must be gone when -d returns.
#   B  qnbd -c /dev/nbd1 --connections 4 on a blank qcow2: fdisk, mke2fs, mount, write, umount, -d.
#   C  the ioctl path (--use-ioctl) on a second overlay: mount, write, umount, -d.
#   E  errors: -c on a busy device, -d on a device that is not connected, -c on a missing device.
#   P  pipelines' lines: nova's `qemu-nbd -c DEV IMG` (probed format) and `-d DEV` with a file injected, and
#      libvirt's `qemu-nbd --format qcow2 -r -n -c DEV FILE` (read-only, O_DIRECT) mounted read-only.
#   V  qnbd --vsock PORT in the guest, read by nbdinfo over nbd+vsock://1:PORT (vsock_loopback), and qnbd -L.
# Back on the host: qemu-img check is clean for every image, e2fsck is clean, every file reads back with the
# checksum the guest computed, and the base image is unchanged.
#
# Usage: scripts/kernel-nbd-test.sh [--qnbd PATH] [--cache DIR] [--work DIR] [--timeout SEC]
# Nothing is installed: the kernel, busybox-static and qemu-system-x86 (with the libraries it lacks) are
# fetched with `apt-get download` and unpacked with dpkg -x under --cache (kept between runs). Installing
# qemu-system-x86 from bookworm would remove the qemu-utils 10 backport, so it is never installed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QNBD_BIN=$ROOT/target/release/qnbd
CACHE=${QNBD_VM_CACHE:-/var/tmp/qnbd-vmtest/cache}
WORK=${QNBD_VM_WORK:-/var/tmp/qnbd-vmtest/run}
TIMEOUT=900
while [ $# -gt 0 ]; do
  case "$1" in
    --qnbd) QNBD_BIN=$2; shift 2;;
    --cache) CACHE=$2; shift 2;;
    --work) WORK=$2; shift 2;;
    --timeout) TIMEOUT=$2; shift 2;;
    -h|--help) sed -n '2,25p' "$0"; exit 0;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done

T0=$(date +%s)
log() { printf '[kernel-nbd %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { log "FAIL: $*"; exit 1; }
[ -x "$QNBD_BIN" ] || die "no qnbd binary at $QNBD_BIN (cargo build --release)"
for t in apt-get dpkg-deb dpkg tar qemu-img mkfs.ext4 debugfs e2fsck objcopy python3 md5sum; do
  command -v "$t" >/dev/null || die "missing tool: $t"
done
mkdir -p "$CACHE/debs"

download() {  # apt-get download into the cache, refreshing the package lists once if they are stale
  ( cd "$CACHE/debs" && timeout 600 apt-get download -q "$@" >/dev/null 2>"$CACHE/debs/err" ) && return 0
  log "apt-get download $* failed; updating the package lists"
  apt-get update -qq >/dev/null 2>&1 || true
  ( cd "$CACHE/debs" && timeout 600 apt-get download -q "$@" >/dev/null 2>"$CACHE/debs/err" ) \
    || { cat "$CACHE/debs/err" >&2; die "apt-get download $*"; }
}
unpack() {  # $1 dest, rest packages
  local dest=$1 p f; shift
  download "$@"
  mkdir -p "$dest"
  for p in "$@"; do
    f=$(ls "$CACHE/debs/${p%%=*}"_*.deb | head -n1)
    dpkg -x "$f" "$dest"
  done
}

# ---- kernel (the modules we need only)
if [ ! -e "$CACHE/kernel/.done" ]; then
  KPKG=$(apt-cache depends linux-image-amd64 | awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64"
  log "downloading $KPKG"
  rm -rf "$CACHE/kernel"; mkdir -p "$CACHE/kernel"
  download "$KPKG"
  dpkg-deb --fsys-tarfile "$(ls "$CACHE/debs/$KPKG"_*.deb | head -n1)" | tar -x -C "$CACHE/kernel" --wildcards \
    './boot/vmlinuz-*' './lib/modules/*/modules.builtin*' './lib/modules/*/modules.order' \
    './lib/modules/*/kernel/drivers/block/*' './lib/modules/*/kernel/drivers/virtio/*' \
    './lib/modules/*/kernel/fs/*' './lib/modules/*/kernel/net/9p/*' './lib/modules/*/kernel/net/vmw_vsock/*' \
    './lib/modules/*/kernel/lib/*' './lib/modules/*/kernel/crypto/*'
  touch "$CACHE/kernel/.done"
fi
KVER=$(ls "$CACHE/kernel/lib/modules" | head -n1)
KMOD="$CACHE/kernel/lib/modules/$KVER"

# ---- busybox
if [ ! -e "$CACHE/busybox/.done" ]; then
  log "downloading busybox-static"
  rm -rf "$CACHE/busybox"; unpack "$CACHE/busybox" busybox-static; touch "$CACHE/busybox/.done"
fi
BUSYBOX=$CACHE/busybox/bin/busybox

# ---- qemu-system-x86_64: installed, or unpacked with the libraries apt says are missing
QEMU_ENV=(); QEMU_FW=()
if command -v qemu-system-x86_64 >/dev/null; then
  QEMU=$(command -v qemu-system-x86_64)
else
  if [ ! -e "$CACHE/qsys/.done" ]; then
    PKGS=$(apt-get install -s --no-install-recommends qemu-system-x86 2>/dev/null | awk '$1=="Inst"{print $2}' | grep -v '^qemu-utils$\|^qemu-block-extra$' || true)
    [ -n "$PKGS" ] || PKGS="qemu-system-x86 qemu-system-common qemu-system-data seabios"
    log "downloading qemu-system-x86 and: $(echo $PKGS)"
    rm -rf "$CACHE/qsys"
    # shellcheck disable=SC2086
    unpack "$CACHE/qsys" $PKGS
    touch "$CACHE/qsys/.done"
  fi
  QEMU=$CACHE/qsys/usr/bin/qemu-system-x86_64
  QEMU_ENV=(env "LD_LIBRARY_PATH=$CACHE/qsys/usr/lib/x86_64-linux-gnu:$CACHE/qsys/lib/x86_64-linux-gnu")
  QEMU_FW=(-L "$CACHE/qsys/usr/share/qemu" -L "$CACHE/qsys/usr/share/seabios" -L "$CACHE/qsys/usr/lib/ipxe/qemu")
fi
log "kernel $KVER; $("${QEMU_ENV[@]}" "$QEMU" --version | head -n1)"

# ---- initramfs
rm -rf "$WORK"
STAGE=$WORK/initramfs; SHARE=$WORK/share
mkdir -p "$STAGE"/{bin,sbin,dev,proc,sys,tmp,run,var,img,mnt,etc,usr/bin,usr/local/bin} "$SHARE"
cp "$BUSYBOX" "$STAGE/bin/busybox"
declare -A SEEN=(); ORDER=()
modfile() { find "$KMOD/kernel" -name "$(echo "$1" | sed 's/[-_]/[-_]/g').ko*" | head -n1; }
add_mod() {
  local m=$1 f deps d
  [ -n "${SEEN[$m]:-}" ] && return 0
  SEEN[$m]=1
  f=$(modfile "$m"); [ -n "$f" ] || die "module $m not found in $KVER"
  deps=$(objcopy -O binary --only-section=.modinfo "$f" /dev/stdout 2>/dev/null | tr '\0' '\n' | sed -n 's/^depends=//p')
  for d in ${deps//,/ }; do add_mod "$d"; done
  ORDER+=("${f#$KMOD/}")
  mkdir -p "$STAGE/lib/modules/$KVER/$(dirname "${f#$KMOD/}")"
  cp "$f" "$STAGE/lib/modules/$KVER/${f#$KMOD/}"
}
for m in virtio_pci 9pnet_virtio 9p crc32c_generic ext4 nbd vsock_loopback; do add_mod "$m"; done
printf '%s\n' "${ORDER[@]}" > "$STAGE/etc/modules.order"

copy_with_libs() {  # a binary and the shared libraries it needs, at their host paths
  local bin=$1 lib
  cp -L "$bin" "$STAGE/usr/local/bin/$(basename "$bin")"
  ldd "$bin" 2>/dev/null | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
    mkdir -p "$STAGE$(dirname "$lib")"; cp -L "$lib" "$STAGE$lib"
  done
}
copy_with_libs "$QNBD_BIN"
HAVE_NBDINFO=0
if command -v nbdinfo >/dev/null; then copy_with_libs "$(command -v nbdinfo)"; HAVE_NBDINFO=1; fi

cat > "$STAGE/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
for m in $(cat /etc/modules.order); do
  case $m in */nbd.ko*) args="nbds_max=6 max_part=8";; *) args="";; esac
  insmod /lib/modules/$(uname -r)/$m $args || echo "@@GUEST insmod $m failed"
done
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 img /img; then
  sh /img/test.sh > /img/guest.log 2>&1
  echo "@@GUEST test rc=$(cat /tmp/test.rc 2>/dev/null || echo 99)"
  cp /tmp/test.rc /img/test.rc 2>/dev/null
  sync; umount /img
else
  echo "@@GUEST cannot mount the 9p share"
fi
poweroff -f
EOF
chmod +x "$STAGE/init"
( cd "$STAGE" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null ) > "$WORK/initrd.cpio"

# ---- images: MBR + ext4 base with a seed file; overlays; a blank image
SECTOR0=2048
mkdir -p "$WORK/seed"
echo "seed written on the host" > "$WORK/seed/seed.txt"
truncate -s 64M "$WORK/disk.raw"
python3 - "$WORK/disk.raw" "$SECTOR0" <<'EOF'
import struct, sys, os
path, start = sys.argv[1], int(sys.argv[2])
total = os.path.getsize(path) // 512
entry = struct.pack('<B3sB3sII', 0, b'\xff\xff\xfe', 0x83, b'\xff\xff\xfe', start, total - start)
with open(path, 'r+b') as f:
    f.seek(446); f.write(entry + b'\0' * 48 + b'\x55\xaa')
EOF
truncate -s $(( 64 * 1024 * 1024 - SECTOR0 * 512 )) "$WORK/part.raw"
mkfs.ext4 -q -F -L qnbdtest -d "$WORK/seed" "$WORK/part.raw"
dd if="$WORK/part.raw" of="$WORK/disk.raw" bs=512 seek=$SECTOR0 conv=notrunc,sparse status=none
qemu-img convert -f raw -O qcow2 "$WORK/disk.raw" "$SHARE/base.qcow2"
rm -f "$WORK/disk.raw" "$WORK/part.raw"
BASE_MD5=$(md5sum < "$SHARE/base.qcow2")
( cd "$SHARE" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2 \
  && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ioctl.qcow2 \
  && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 nova.qcow2 \
  && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 libvirt.qcow2 )
LIBVIRT_MD5=$(md5sum < "$SHARE/libvirt.qcow2")
qemu-img create -q -f qcow2 "$SHARE/blank.qcow2" 64M
qemu-img create -q -f qcow2 "$SHARE/vsock.qcow2" 16M
qemu-img create -q -f qcow2 "$SHARE/spare.qcow2" 16M

cat > "$SHARE/test.sh" <<EOF
HAVE_NBDINFO=$HAVE_NBDINFO
EOF
cat >> "$SHARE/test.sh" <<'EOF'
up() { cut -d' ' -f1 /proc/uptime; }
step() { echo "@@STEP $(up) $*"; }
fail() { echo "@@FAIL $(up) $*"; dmesg | tail -n 30; umount /mnt 2>/dev/null; exit 1; }
gone() { i=0; while kill -0 "$1" 2>/dev/null; do i=$((i+1)); [ $i -gt 100 ] && return 1; sleep 0.1; done; }
echo 1 > /tmp/test.rc
mkdir -p /mnt
step "kernel $(uname -r); interfaces: $(ls /sys/class/net | tr '\n' ' ')"

# A: an existing filesystem through an overlay; mount right after -c returns
timeout 60 qnbd -c /dev/nbd0 -f qcow2 --pid-file /run/a.pid /img/overlay.qcow2 || fail "qnbd -c nbd0 exited $?"
pid=$(cat /run/a.pid)
step "attached nbd0 (server $pid): size $(cat /sys/block/nbd0/size) sectors; $(ls /dev/nbd0p* | tr '\n' ' ')"
mount -t ext4 /dev/nbd0p1 /mnt || fail "mount /dev/nbd0p1 right after -c"
[ "$(cat /mnt/seed.txt)" = "seed written on the host" ] || fail "seed.txt"
echo "hello from the guest" > /mnt/hello.txt
dd if=/dev/urandom of=/mnt/random.bin bs=65536 count=96 2>/dev/null || fail "write random.bin"
md5sum /mnt/random.bin | cut -d' ' -f1 > /img/random.md5
mkdir -p /mnt/dir && for i in 1 2 3 4 5 6 7 8; do echo "file $i" > /mnt/dir/f$i; done
umount /mnt || fail "umount nbd0p1"
timeout 90 qnbd -d /dev/nbd0 || fail "qnbd -d nbd0 exited $?"
kill -0 "$pid" 2>/dev/null && fail "the server still runs after -d returned"
[ -e /sys/block/nbd0/pid ] && fail "nbd0 still connected after -d"
step "A done"

# B: blank image, four connections: partition, mkfs, mount, write
timeout 60 qnbd -c /dev/nbd1 --connections 4 --timeout 60 -f qcow2 /img/blank.qcow2 || fail "qnbd -c nbd1 exited $?"
step "attached nbd1 with 4 connections"
printf 'o\nn\np\n1\n\n\nw\n' | fdisk /dev/nbd1 >/tmp/fdisk.log 2>&1
i=0; while [ ! -e /dev/nbd1p1 ]; do i=$((i+1)); [ $i -gt 100 ] && { cat /tmp/fdisk.log; fail "nbd1p1 after fdisk"; }; sleep 0.1; done
mke2fs -L guestfs /dev/nbd1p1 >/tmp/mke2fs.log 2>&1 || { cat /tmp/mke2fs.log; fail "mke2fs"; }
mount -t ext4 /dev/nbd1p1 /mnt || fail "mount nbd1p1"
echo "made by the guest on nbd1" > /mnt/made.txt
dd if=/dev/urandom of=/mnt/big.bin bs=65536 count=64 2>/dev/null || fail "write big.bin"
md5sum /mnt/big.bin | cut -d' ' -f1 > /img/big.md5
umount /mnt || fail "umount nbd1p1"
timeout 90 qnbd -d /dev/nbd1 || fail "qnbd -d nbd1 exited $?"
step "B done"

# C: the ioctl path
timeout 60 qnbd -c /dev/nbd2 --use-ioctl -f qcow2 --pid-file /run/c.pid /img/ioctl.qcow2 || fail "qnbd -c --use-ioctl exited $?"
pid=$(cat /run/c.pid)
mount -t ext4 /dev/nbd2p1 /mnt || fail "mount nbd2p1 (ioctl path)"
echo "written over the ioctl path" > /mnt/ioctl.txt
umount /mnt || fail "umount nbd2p1"
timeout 90 qnbd -d /dev/nbd2 || fail "qnbd -d nbd2 exited $?"
gone "$pid" || fail "ioctl server still running"
step "C done"

# E: errors
timeout 60 qnbd -c /dev/nbd3 -f qcow2 --pid-file /run/e.pid /img/spare.qcow2 || fail "qnbd -c nbd3"
if timeout 60 qnbd -c /dev/nbd3 -f qcow2 /img/blank.qcow2 2>/tmp/busy.err; then fail "-c on a busy device succeeded"; fi
grep -q busy /tmp/busy.err || { cat /tmp/busy.err; fail "no 'busy' in the error"; }
step "busy: $(cat /tmp/busy.err)"
# SIGTERM to a -c server: it disconnects the device, flushes and exits (data written with fsync survives)
dd if=/dev/zero bs=65536 count=16 2>/dev/null | tr '\000' 'Z' | dd of=/dev/nbd3 bs=65536 conv=fsync 2>/dev/null || fail "write nbd3"
pid=$(cat /run/e.pid)
kill -TERM "$pid"
gone "$pid" || fail "SIGTERM did not stop the -c server"
i=0; while [ -e /sys/block/nbd3/pid ]; do i=$((i+1)); [ $i -gt 100 ] && fail "nbd3 still connected after SIGTERM"; sleep 0.1; done
step "SIGTERM: server gone, nbd3 released"
if timeout 30 qnbd -d /dev/nbd3 2>/tmp/nc.err; then fail "-d on a disconnected device succeeded"; fi
grep -q "not connected" /tmp/nc.err || { cat /tmp/nc.err; fail "no 'not connected' in the error"; }
step "not connected: $(cat /tmp/nc.err)"
if timeout 30 qnbd -c /dev/nbd9 -f qcow2 /img/spare.qcow2 2>/tmp/missing.err; then fail "-c on a missing device succeeded"; fi
step "missing: $(cat /tmp/missing.err)"
step "E done"

# P: the -c lines of pipelines, verbatim but for the program name.
# nova, nova/privsep/fs.py nbd_connect / nbd_disconnect: no format (probed), read-write.
timeout 60 qnbd -c /dev/nbd4 /img/nova.qcow2 || fail "nova's qemu-nbd -c line exited $?"
mount -t ext4 /dev/nbd4p1 /mnt || fail "mount nbd4p1 (nova)"
echo "injected by nova's line" > /mnt/injected.txt
umount /mnt || fail "umount nbd4p1"
timeout 90 qnbd -d /dev/nbd4 || fail "nova's qemu-nbd -d line exited $?"
# libvirt, src/util/virfile.c virFileNBDDeviceAssociate: --format FMT -r -n -c DEV FILE (read-only, no cache).
timeout 60 qnbd --format qcow2 -r -n -c /dev/nbd5 /img/libvirt.qcow2 2>/tmp/libvirt.err || { cat /tmp/libvirt.err; fail "libvirt's qemu-nbd line exited $?"; }
mount -t ext4 -o ro,noload /dev/nbd5p1 /mnt || fail "mount nbd5p1 read-only (libvirt)"
[ "$(cat /mnt/seed.txt)" = "seed written on the host" ] || fail "seed.txt through libvirt's line"
umount /mnt || fail "umount nbd5p1"
timeout 90 qnbd -d /dev/nbd5 || fail "qnbd -d nbd5 exited $?"
step "P done"

# V: vsock in the guest (vsock_loopback)
if [ -e /dev/vsock ] && qnbd --help | grep -q -- --vsock; then
  qnbd --vsock 10809 -t -f qcow2 -x vs /img/vsock.qcow2 & vpid=$!
  sleep 1
  qnbd -L --vsock 10809 --vsock-cid 1 > /tmp/list.txt 2>&1 || { cat /tmp/list.txt; fail "qnbd -L over vsock"; }
  grep -q "export: 'vs'" /tmp/list.txt || { cat /tmp/list.txt; fail "export not listed over vsock"; }
  if [ "$HAVE_NBDINFO" = 1 ]; then
    nbdinfo --size 'nbd+vsock://1:10809/vs' > /tmp/size.txt 2>&1 || { cat /tmp/size.txt; fail "nbdinfo over vsock"; }
    [ "$(cat /tmp/size.txt)" = 16777216 ] || { cat /tmp/size.txt; fail "nbdinfo size over vsock"; }
    step "nbdinfo over vsock: size $(cat /tmp/size.txt)"
  fi
  kill "$vpid"; gone "$vpid" || fail "vsock server did not stop"
  step "V done"
else
  step "V skipped: no /dev/vsock or no --vsock"
fi
step "all steps done"
echo 0 > /tmp/test.rc
EOF

log "booting the guest (TCG, 2 vCPUs, no network)"
set +e
timeout --kill-after=10 "$TIMEOUT" "${QEMU_ENV[@]}" "$QEMU" "${QEMU_FW[@]}" \
  -nodefaults -nic none -no-reboot -machine pc -accel tcg,thread=multi -cpu max -smp 2 -m 1024 \
  -display none -monitor none -serial "file:$WORK/console.log" \
  -kernel "$CACHE/kernel/boot/vmlinuz-$KVER" -initrd "$WORK/initrd.cpio" \
  -append "console=ttyS0 rdinit=/init panic=-1 loglevel=4 mitigations=off" \
  -virtfs "local,path=$SHARE,mount_tag=img,security_model=none,id=img" >"$WORK/qemu.out" 2>&1
QRC=$?
set -e
sed 's/^/    guest| /' "$SHARE/guest.log" 2>/dev/null | grep -E '@@|rror|qnbd' | head -60 || true
[ "$QRC" = 0 ] || { tail -n 30 "$WORK/console.log"; cat "$WORK/qemu.out"; die "qemu exited $QRC (124: timeout)"; }
[ "$(cat "$SHARE/test.rc" 2>/dev/null)" = 0 ] || { cat "$SHARE/guest.log" 2>/dev/null; tail -n 30 "$WORK/console.log"; die "the guest test failed"; }

# ---- on the host: images clean, files back, base untouched
partition() {  # image -> raw partition 1 in $WORK/$2.p1
  qemu-img check "$1" >"$WORK/$2.check" 2>&1 || { cat "$WORK/$2.check"; die "qemu-img check $1"; }
  grep -q "No errors were found" "$WORK/$2.check" || { cat "$WORK/$2.check"; die "qemu-img check $1"; }
  qemu-img convert -O raw "$1" "$WORK/$2.raw"
  local start
  start=$(python3 -c 'import struct,sys; d=open(sys.argv[1],"rb").read(512); assert d[510:]==b"\x55\xaa"; print(struct.unpack("<I",d[454:458])[0])' "$WORK/$2.raw")
  dd if="$WORK/$2.raw" of="$WORK/$2.p1" bs=512 skip="$start" status=none
  e2fsck -fn "$WORK/$2.p1" >"$WORK/$2.fsck" 2>&1 || { cat "$WORK/$2.fsck"; die "e2fsck $2"; }
  log "$(basename "$1"): qemu-img check clean, e2fsck clean"
}
cat_file() { debugfs -R "cat $2" "$WORK/$1.p1" 2>/dev/null; }
dump_md5() { debugfs -R "dump $2 $WORK/dump.bin" "$WORK/$1.p1" >/dev/null 2>&1; md5sum < "$WORK/dump.bin" | cut -d' ' -f1; }

partition "$SHARE/overlay.qcow2" a
[ "$(cat_file a /hello.txt)" = "hello from the guest" ] || die "hello.txt"
[ "$(cat_file a /seed.txt)" = "seed written on the host" ] || die "seed.txt"
[ "$(cat_file a /dir/f8)" = "file 8" ] || die "dir/f8"
[ "$(dump_md5 a /random.bin)" = "$(cat "$SHARE/random.md5")" ] || die "random.bin checksum"
partition "$SHARE/blank.qcow2" b
[ "$(cat_file b /made.txt)" = "made by the guest on nbd1" ] || die "made.txt"
[ "$(dump_md5 b /big.bin)" = "$(cat "$SHARE/big.md5")" ] || die "big.bin checksum"
partition "$SHARE/ioctl.qcow2" c
[ "$(cat_file c /ioctl.txt)" = "written over the ioctl path" ] || die "ioctl.txt"
partition "$SHARE/nova.qcow2" n
[ "$(cat_file n /injected.txt)" = "injected by nova's line" ] || die "injected.txt (nova's line)"
[ "$(md5sum < "$SHARE/libvirt.qcow2")" = "$LIBVIRT_MD5" ] || die "libvirt's read-only line changed the image"
log "nova's and libvirt's -c lines: injected file back, read-only image untouched"
qemu-img check -q "$SHARE/spare.qcow2" || die "spare.qcow2 check"
qemu-io -f qcow2 -c 'read -P 0x5a 0 1M' "$SHARE/spare.qcow2" | grep -q '^read 1048576' || die "data written before SIGTERM is lost"
log "spare.qcow2: the 1 MiB written before SIGTERM reads back"
qemu-img check -q "$SHARE/vsock.qcow2" || die "vsock.qcow2 check"
[ "$(md5sum < "$SHARE/base.qcow2")" = "$BASE_MD5" ] || die "the base image changed"
grep -q "V done" "$SHARE/guest.log" && log "vsock in the guest: served and read"
rm -f "$WORK"/*.raw "$WORK"/*.p1 "$WORK/dump.bin"
log "PASS"
