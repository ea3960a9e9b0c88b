//! Hostile clients, spoken to in raw wire bytes: one that never reads its replies cannot make qnbd hold more
//! than its per-connection budget (while another client is served), and an option header that claims 4 GiB
//! is refused without reading the option's data.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;

/// Greeting and client flags (fixed newstyle, no zeroes): the stream is in option haggling.
fn greet(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&3u32.to_be_bytes()).unwrap();
    c
}

fn option(c: &mut UnixStream, opt: u32, len: u32) {
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&opt.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    c.write_all(&h).unwrap();
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_client_that_never_reads_replies_cannot_grow_the_server_past_its_budget() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("big.raw");
    std::fs::File::create(&img).unwrap().set_len(4 << 30).unwrap();
    let sock = d.path().join("s");
    let srv = Srv(Command::new(QNBD).args(["-f", "raw", "-t", "-e", "4", "-k", s(&sock), s(&img)]).spawn().unwrap());
    wait_for(&sock);
    let mut c = greet(&sock);
    // NBD_OPT_EXPORT_NAME "": export size and flags come back (no zeroes).
    option(&mut c, 1, 0);
    let mut r = [0u8; 10];
    c.read_exact(&mut r).unwrap();
    // 64 READs of 32 MiB, never read back.
    let mut reqs = Vec::new();
    for i in 0..64u64 {
        reqs.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes());
        reqs.extend_from_slice(&i.to_be_bytes());
        reqs.extend_from_slice(&(i * (32 << 20)).to_be_bytes());
        reqs.extend_from_slice(&(32u32 << 20).to_be_bytes());
    }
    c.write_all(&reqs).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Another client is served meanwhile.
    let uri = format!("nbd+unix:///?socket={}", s(&sock));
    ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0 1M 64k", &uri]);
    std::thread::sleep(Duration::from_secs(1));
    let peak = vm_kib(srv.id(), "VmHWM:");
    assert!(peak > 0, "no VmHWM for qnbd");
    assert!(peak < 256 << 10, "qnbd peaked at {peak} KiB with 64 unread 32 MiB replies queued");
    eprintln!("peak RSS with 64 unread 32 MiB READs: {peak} KiB");
    drop(c);
}

#[test]
fn an_option_claiming_4_gib_is_refused_unread_and_the_connection_closed() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.raw");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let sock = d.path().join("s");
    let _srv = Srv(Command::new(QNBD).args(["-f", "raw", "-t", "-k", s(&sock), s(&img)]).spawn().unwrap());
    wait_for(&sock);
    let mut c = greet(&sock);
    // NBD_OPT_LIST with a length of 4 GiB - 1, then option data the server must not wait for.
    option(&mut c, 3, u32::MAX);
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0u8; 64 << 10];
        let mut sent = 0usize;
        while sent < 16 << 20 {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    // The error reply (NBD_REP_ERR_TOO_BIG), then end of stream.
    let mut head = [0u8; 20];
    c.read_exact(&mut head).unwrap();
    assert_eq!(u64::from_be_bytes(head[..8].try_into().unwrap()), 0x3_e889_0455_65a9);
    assert_eq!(u32::from_be_bytes(head[12..16].try_into().unwrap()), (1 << 31) + 9, "NBD_REP_ERR_TOO_BIG");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let sent = writer.join().unwrap();
    assert!(sent < 8 << 20, "the server read {sent} bytes of the option's data");
}
