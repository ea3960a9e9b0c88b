//! `nbd-clients SOCKET CONNECTIONS SECONDS [SIZE_HINT]`: many NBD clients at once, each on its own unix
//! connection doing 4 KiB random reads at queue depth 1 (the "1000 clients" case of `side-by-side.sh`). Prints
//! the aggregate reads per second over SECONDS, counted once every connection has finished its handshake.
//!
//! A small client of its own (fixed newstyle, `NBD_OPT_EXPORT_NAME` of the default export, simple replies):
//! fio would need a thread per connection, and on two cores its own scheduling would be what is measured.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake: the export size.
async fn handshake(s: &mut UnixStream) -> std::io::Result<u64> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await?;
    if &hello[..8] != b"NBDMAGIC" || u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default()) != IHAVEOPT {
        return Err(std::io::Error::other("not a newstyle NBD server"));
    }
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    let no_zeroes = server_flags & 2 != 0;
    let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&client_flags.to_be_bytes());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    m.extend_from_slice(&0u32.to_be_bytes()); // the default export
    s.write_all(&m).await?;
    let mut info = [0u8; 10];
    s.read_exact(&mut info).await?;
    if !no_zeroes {
        let mut pad = [0u8; 124];
        s.read_exact(&mut pad).await?;
    }
    Ok(u64::from_be_bytes(info[..8].try_into().unwrap_or_default()))
}

/// Reads until `stop`, counting completions in `done`.
async fn reader(
    mut s: UnixStream,
    size: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let blocks = (size / 4096).max(1);
    let mut x = seed | 1;
    let mut req = [0u8; 28];
    let mut hdr = [0u8; 16];
    let mut data = vec![0u8; 4096];
    let mut cookie = 0u64;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * 4096;
        cookie += 1;
        req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[4..8].copy_from_slice(&[0, 0, 0, 0]); // flags 0, NBD_CMD_READ
        req[8..16].copy_from_slice(&cookie.to_be_bytes());
        req[16..24].copy_from_slice(&off.to_be_bytes());
        req[24..28].copy_from_slice(&4096u32.to_be_bytes());
        s.write_all(&req).await?;
        s.read_exact(&mut hdr).await?;
        if u32::from_be_bytes(hdr[..4].try_into().unwrap_or_default()) != SIMPLE_REPLY_MAGIC
            || u32::from_be_bytes(hdr[4..8].try_into().unwrap_or_default()) != 0
            || u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default()) != cookie
        {
            return Err(std::io::Error::other("unexpected reply"));
        }
        s.read_exact(&mut data).await?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    // NBD_CMD_DISC
    req[4..8].copy_from_slice(&[0, 0, 0, 2]);
    let _ = s.write_all(&req).await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        eprintln!("usage: nbd-clients SOCKET CONNECTIONS SECONDS");
        return std::process::ExitCode::FAILURE;
    }
    let (sock, n, secs) = (a[1].clone(), a[2].parse::<usize>().unwrap_or(1000), a[3].parse::<u64>().unwrap_or(5));
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbd-clients: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let r: std::io::Result<f64> = rt.block_on(async move {
        // Connect and finish every handshake first.
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let mut s = UnixStream::connect(&sock).await?;
            let size = handshake(&mut s).await?;
            conns.push((s, size));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(n);
        for (i, (s, size)) in conns.into_iter().enumerate() {
            tasks.push(tokio::spawn(reader(
                s,
                size,
                0x9E37_79B9_7F4A_7C15 ^ (i as u64 * 0x1000_0001),
                stop.clone(),
                done.clone(),
            )));
        }
        // A second of warm-up, then the measured window.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (c0, t0) = (done.load(Ordering::Relaxed), Instant::now());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let (c1, t1) = (done.load(Ordering::Relaxed), t0.elapsed());
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.map_err(std::io::Error::other)??;
        }
        Ok((c1 - c0) as f64 / t1.as_secs_f64())
    });
    match r {
        Ok(iops) => {
            println!("{}", iops as u64);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nbd-clients: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
