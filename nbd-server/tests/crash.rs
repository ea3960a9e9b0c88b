//! kill -9 at a few hundred random moments while a client writes through qnbd: after each kill,
//! `qemu-img check` finds no corruption, and every block acknowledged before the last completed FLUSH reads
//! back. Each 4 KiB block carries a sequence number, its own index and a crc32, so a torn or stale block is
//! told apart from a right one.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;
const BLOCK: usize = 4096;
const BLOCKS: u64 = 4096; // 16 MiB

fn block(idx: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&idx.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seq as u8).wrapping_add(i as u8).wrapping_mul(7);
    }
    let crc = crc32fast::hash(&b[8..]);
    b[0..4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// (seq, idx) of a block read back, or None if it is torn or never written.
fn parse(b: &[u8]) -> Option<(u64, u64)> {
    let crc = u32::from_le_bytes(b[0..4].try_into().ok()?);
    (crc == crc32fast::hash(&b[8..]) && b[8..].iter().any(|&x| x != 0))
        .then(|| (u64::from_le_bytes(b[8..16].try_into().unwrap()), u64::from_le_bytes(b[16..24].try_into().unwrap())))
}

struct Client(UnixStream);

impl Client {
    fn connect(sock: &Path) -> Option<Client> {
        let mut s = UnixStream::connect(sock).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g).ok()?;
        s.write_all(&3u32.to_be_bytes()).ok()?;
        // NBD_OPT_GO on the default export.
        let mut o = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        o.extend_from_slice(&7u32.to_be_bytes());
        o.extend_from_slice(&6u32.to_be_bytes());
        o.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        s.write_all(&o).ok()?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).ok()?;
            let kind = u32::from_be_bytes(h[12..16].try_into().ok()?);
            let len = u32::from_be_bytes(h[16..20].try_into().ok()?) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).ok()?;
            if kind == 1 {
                return Some(Client(s));
            }
            if kind & 0x8000_0000 != 0 {
                return None;
            }
        }
    }

    /// Sends a request and waits for its simple reply; false if the server is gone or failed it.
    fn req(&mut self, kind: u16, off: u64, payload: &[u8], cookie: u64) -> bool {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&off.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        if self.0.write_all(&r).is_err() {
            return false;
        }
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).is_ok() && h[4..8] == [0, 0, 0, 0]
    }
}

#[test]
fn kill_9_at_hundreds_of_points_keeps_acknowledged_flushed_blocks() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", base.to_str().unwrap(), "16M"]);
    let img = d.path().join("disk.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-b",
            "base.raw",
            "-F",
            "raw",
            img.to_str().unwrap(),
        ],
    );
    let rounds: u64 = std::env::var("CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    // For each block: the sequence number acknowledged before the last completed FLUSH.
    let mut durable: Vec<u64> = vec![0; BLOCKS as usize];
    let mut seq = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..rounds {
        let sock = d.path().join(format!("c{round}.sock"));
        let mut srv = Command::new(QNBD)
            .args(["-t", "-k", sock.to_str().unwrap(), img.to_str().unwrap()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(2));
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let kill_after = Duration::from_micros(x % 40_000);
        let pid = srv.id();
        let killer = std::thread::spawn(move || {
            std::thread::sleep(kill_after);
            // SIGKILL: no chance to flush.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        });
        let mut pending: Vec<(u64, u64)> = Vec::new();
        if let Some(mut c) = Client::connect(&sock) {
            loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let idx = (x >> 8) % BLOCKS;
                seq += 1;
                if !c.req(1, idx * BLOCK as u64, &block(idx, seq), seq) {
                    break;
                }
                pending.push((idx, seq));
                if seq.is_multiple_of(16) {
                    if !c.req(3, 0, &[], seq) {
                        break;
                    }
                    for (i, s) in pending.drain(..) {
                        durable[i as usize] = s;
                    }
                }
            }
        }
        killer.join().unwrap();
        let _ = srv.wait();
        wait_gone(sock.to_str().unwrap());
        assert_check_clean(&img, &format!("round {round}"));
        // Read back every block; those acknowledged before a completed FLUSH must be there (or newer).
        if round % 10 == 9 || round + 1 == rounds {
            let raw = d.path().join("read.raw");
            ok("qemu-img", &["convert", "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
            let data = std::fs::read(&raw).unwrap();
            for (i, &want) in durable.iter().enumerate() {
                if want == 0 {
                    continue;
                }
                let b = &data[i * BLOCK..(i + 1) * BLOCK];
                let got = parse(b);
                assert!(
                    matches!(got, Some((s, idx)) if s >= want && idx == i as u64),
                    "round {round}: block {i} should hold seq >= {want}, holds {got:?}"
                );
            }
        }
    }
    // The kills must have landed among real writes and flushes, not before the first one.
    assert!(seq > rounds * 4, "only {seq} writes in {rounds} rounds");
    assert!(durable.iter().filter(|&&s| s > 0).count() > 100, "too few flushed blocks to check");
}
