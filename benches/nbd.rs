//! The NBD hot paths: request decode, reply encode, and whole 4 KiB READ and WRITE requests through the
//! transmission phase (the same code qnbd runs) against an in-memory export, over an in-memory stream.

use criterion::{criterion_group, criterion_main, Criterion};
use nbd_server::export::{DetectZeroes, Export};
use nbd_server::negotiate::Transmit;
use nbd_server::proto::reply::{self, Style};
use nbd_server::proto::request::{self, Request};
use nbd_server::proto::{NBD_CMD_READ, NBD_CMD_WRITE};
use qcow2::{BlockDevice, Result, Status};
use std::hint::black_box;
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A RAM disk.
struct Ram(RwLock<Vec<u8>>);

impl BlockDevice for Ram {
    fn size(&self) -> u64 {
        self.0.read().map(|v| v.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let v = self.0.read().expect("lock");
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        Ok(Status {
            len: len.min(self.size() - offset),
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: None,
            file: None,
            alloc_depth: 1,
        })
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        self.0.write().expect("lock")[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_quick(&self, buf: &[u8], offset: u64) -> Option<Result<()>> {
        Some(self.write_at(buf, offset, false))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool, _fua: bool) -> Result<()> {
        self.0.write().expect("lock")[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fn codec(c: &mut Criterion) {
    let req = Request { flags: 0, kind: NBD_CMD_READ, cookie: 7, offset: 1 << 20, length: 4096 };
    let simple = request::encode(&req, false);
    let extended = request::encode(&req, true);
    c.bench_function("nbd_request_decode", |b| b.iter(|| request::decode(black_box(&simple), false)));
    c.bench_function("nbd_request_decode_extended", |b| b.iter(|| request::decode(black_box(&extended), true)));
    c.bench_function("nbd_reply_encode_simple", |b| b.iter(|| reply::simple(black_box(7), black_box(0))));
    c.bench_function("nbd_reply_encode_data_chunk_header", |b| {
        b.iter(|| {
            let mut v = Vec::with_capacity(40);
            reply::data_header(&mut v, Style::Structured, 1, black_box(7), 0, 1 << 20, 4096);
            v
        })
    });
}

fn whole_requests(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let export = Arc::new(Export {
        name: String::new(),
        description: String::new(),
        device: Arc::new(Ram(RwLock::new(vec![0x5a; 64 << 20]))),
        read_only: false,
        unmap: false,
        detect_zeroes: DetectZeroes::Off,
        allocation_depth: false,
        bitmaps: Vec::new(),
        multi_conn: false,
        fresh: None,
        cache: Default::default(),
    });
    let t = Transmit { export: export.meta(), style: Style::Simple, contexts: Vec::new() };
    let (mut client, server) = tokio::io::duplex(1 << 20);
    rt.spawn(async move {
        let (rd, wr) = tokio::io::split(server);
        let _ = nbd_server::transmission::run(rd, wr, t, export).await;
    });
    let read = request::encode(&Request { flags: 0, kind: NBD_CMD_READ, cookie: 1, offset: 8192, length: 4096 }, false);
    let mut write =
        request::encode(&Request { flags: 0, kind: NBD_CMD_WRITE, cookie: 2, offset: 8192, length: 4096 }, false);
    write.extend_from_slice(&[0x33; 4096]);
    let mut reply = vec![0u8; 16 + 4096];
    c.bench_function("nbd_whole_read_4k", |b| {
        b.iter(|| {
            rt.block_on(async {
                client.write_all(&read).await.expect("send");
                client.read_exact(&mut reply).await.expect("reply");
            })
        })
    });
    c.bench_function("nbd_whole_write_4k", |b| {
        b.iter(|| {
            rt.block_on(async {
                client.write_all(&write).await.expect("send");
                client.read_exact(&mut reply[..16]).await.expect("reply");
            })
        })
    });
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the last request succeeded");
}

criterion_group!(benches, codec, whole_requests);
criterion_main!(benches);
