#!/usr/bin/env bash
# Runs every test of qnbd on a fresh Debian machine with Rust: installs what the tests use (only when missing),
# then formatting, lints, unit and integration tests against the real qemu-img / qemu-io / libnbd / fio,
# a quick criterion run and a fuzz smoke of every target.
# Then the kernel NBD client test: qnbd -c/-d and --vsock inside an emulated Debian machine
# (scripts/kernel-nbd-test.sh; packages cached in /var/tmp/qnbd-vmtest/cache between runs).
# Env: FUZZ_SECONDS (default 25) per fuzz target from its seeds, FUZZ_EMPTY_SECONDS (default 15) from nothing; SKIP_FUZZ=1, SKIP_BENCH=1, SKIP_VM=1 to skip those parts.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/bin:$PATH   # Debian's python3 (for nbdsh) before any pyenv shim
step() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

step "packages"
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
command -v fio >/dev/null || need+=(fio)
# the FUSE + loop test and the kernel NBD test (an emulated machine, packages fetched with apt-get download)
for t in losetup:mount openssl:openssl mkfs.ext4:e2fsprogs debugfs:e2fsprogs objcopy:binutils dpkg-deb:dpkg md5sum:coreutils; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
command -v curl >/dev/null || need+=(curl)
# the S3 test: a single-node Ceph cluster with radosgw (scripts/ceph-rgw.sh), without the recommended extras
ceph=()
for t in ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw; do
  command -v "${t%%:*}" >/dev/null || ceph+=("${t#*:}")
done
if [ ${#need[@]} -gt 0 ] || [ ${#ceph[@]} -gt 0 ]; then
  echo "installing: ${need[*]} ${ceph[*]}"
  apt-get update -qq
  [ ${#need[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  [ ${#ceph[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${ceph[@]}" >/dev/null
fi
qemu-img --version | head -1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings

step "cargo test (release)"
cargo test --workspace --release -q 2>&1 | grep -Ev '^$|^running 0 tests|^test result: ok. 0 passed'

if [ "${SKIP_VM:-0}" != 1 ]; then
  step "kernel NBD client and vsock in an emulated machine"
  scripts/kernel-nbd-test.sh --qnbd target/release/qnbd
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step "criterion benches (quick)"
  cargo bench --workspace -q -- --quick --noplot 2>&1 | grep -E 'time:|error' || true
fi

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  step "fuzz smoke"
  command -v cargo-fuzz >/dev/null || cargo install --locked -q cargo-fuzz
  (
    cd fuzz
    cargo fuzz build -s none
    for t in $(cargo fuzz list); do
      mkdir -p "corpus/$t"
      seeds=()
      [ -d "corpus_seed/$t" ] && seeds=("corpus_seed/$t")
      dict=()
      case $t in qcow2_*) dict=(-dict=qcow2.dict) ;; nbd_*) dict=(-dict=nbd.dict) ;; esac
      echo "fuzz $t for ${FUZZ_SECONDS:-25}s from the seeds, ${FUZZ_EMPTY_SECONDS:-15}s from an empty corpus"
      cargo fuzz run -s none "$t" "corpus/$t" "${seeds[@]}" -- "${dict[@]}" \
        -max_total_time="${FUZZ_SECONDS:-25}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=0 2>&1 |
        grep -E 'Done|ERROR|panicked|crash-' || true
      # From nothing too: seeds steer the fuzzer past the header checks, and away from what lies before them.
      empty=$(mktemp -d)
      cargo fuzz run -s none "$t" "$empty" -- "${dict[@]}" \
        -max_total_time="${FUZZ_EMPTY_SECONDS:-15}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=0 2>&1 |
        grep -E 'Done|ERROR|panicked|crash-' || true
      rm -rf "$empty"
      # A crash leaves an artifact; fail on it.
      if ls "artifacts/$t"/crash-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* >/dev/null 2>&1; then
        echo "fuzz target $t found a failure: fuzz/artifacts/$t"; exit 1
      fi
    done
  )
fi
step "all tests passed"
