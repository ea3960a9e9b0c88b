//! A whole connection from raw client bytes: handshake and transmission over an in-memory stream, against an
//! in-memory writable export. No panic, no hang; the server ends when the client's bytes run out.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nbd_server::export::{DetectZeroes, Export, Exports};
use qcow2::{BlockDevice, Result, Status};
use std::sync::{Arc, RwLock};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Mem(RwLock<Vec<u8>>);

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        self.0.read().map(|v| v.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let v = self.0.read().unwrap();
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        let half = offset < 32768;
        let end = if half { 32768 } else { self.size() };
        Ok(Status {
            len: len.min(end - offset).max(1),
            depth: 0,
            present: half,
            zero: !half,
            data: half,
            compressed: false,
            offset: None,
            file: None,
            alloc_depth: u32::from(half),
        })
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> Result<()> {
        let mut v = self.0.write().unwrap();
        v[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _u: bool, _f: bool) -> Result<()> {
        let mut v = self.0.write().unwrap();
        v[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Bitmap "b0": every other 4 KiB granule dirty.
    fn dirty_run(&self, bitmap: &str, offset: u64, len: u64) -> Result<Option<(bool, u64)>> {
        if bitmap != "b0" {
            return Ok(None);
        }
        let n = (4096 - offset % 4096).min(len).max(1);
        Ok(Some(((offset / 4096) % 2 == 0, n)))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    let data = data.to_vec();
    rt.block_on(async move {
        let export = Arc::new(Export {
            name: "disk".into(),
            description: String::new(),
            device: Arc::new(Mem(RwLock::new(vec![0u8; 65536]))),
            read_only: false,
            unmap: true,
            detect_zeroes: DetectZeroes::On,
            allocation_depth: true,
            bitmaps: vec!["b0".into()],
            multi_conn: true,
            fresh: None,
            cache: Default::default(),
        });
        let exports = Exports { list: vec![export], ..Default::default() };
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            let mut server = server;
            if let Ok(Some(t)) = nbd_server::server::handshake(&mut server, &exports).await {
                if let Some(e) = exports.find(&t.export.name).cloned() {
                    let (rd, wr) = tokio::io::split(server);
                    let _ = nbd_server::transmission::run(rd, wr, t, e).await;
                }
            }
        });
        let (mut crd, mut cwr) = tokio::io::split(&mut client);
        let send = async {
            let _ = cwr.write_all(&data).await;
            let _ = cwr.shutdown().await;
        };
        let drain = async {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = crd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        };
        let all = async {
            tokio::join!(send, drain);
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all).await;
        drop(client);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), srv).await;
    });
});
