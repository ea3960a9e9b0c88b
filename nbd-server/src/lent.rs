//! Buffers shared by all connections and lent to one only while it holds bytes in them.
//!
//! A connection that is waiting (for its client's next request, or for its own reply to be computed) holds no
//! buffer: a thousand clients at queue depth 1 cost the server a handful of buffers, not a thousand of each kind.
//! [`LentReader`] and [`LentWriter`] are `BufReader` and `BufWriter` whose buffer comes from a [`Shelf`] when
//! bytes arrive and goes back as soon as it is empty; [`Shelf`] is also the pool of reply and payload buffers
//! (a reused buffer is neither zeroed again nor freshly mapped by the allocator, which mattered for streaming
//! reads).

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A bounded stack of spare buffers, shared by every connection of the process.
pub struct Shelf {
    /// The buffers and the sum of their capacities.
    spare: Mutex<(Vec<Vec<u8>>, usize)>,
    /// Most buffers kept.
    count: usize,
    /// Largest capacity kept (larger buffers are freed on return).
    max_capacity: usize,
    /// Most bytes kept in all.
    max_bytes: usize,
}

impl Shelf {
    pub const fn new(count: usize, max_capacity: usize, max_bytes: usize) -> Shelf {
        Shelf { spare: Mutex::new((Vec::new(), 0)), count, max_capacity, max_bytes }
    }

    /// A spare buffer (any length, any contents), or an empty one.
    pub fn take(&self) -> Vec<u8> {
        let Ok(mut s) = self.spare.lock() else { return Vec::new() };
        let v = s.0.pop().unwrap_or_default();
        s.1 -= v.capacity();
        v
    }

    /// A buffer of exactly `n` bytes whose contents the caller overwrites. It may hold another connection's
    /// bytes (another client's write payload): every user fills the whole of it before sending any of it
    /// (`read_at` fills its whole destination, holes and file ends with zeros), so nothing crosses clients.
    pub fn sized(&self, n: usize) -> Vec<u8> {
        let mut v = self.take();
        if v.len() < n {
            v.resize(n, 0);
        } else {
            v.truncate(n);
        }
        v
    }

    /// Keeps `v` for reuse if there is room; frees it otherwise.
    pub fn put(&self, v: Vec<u8>) {
        let c = v.capacity();
        if (4096..=self.max_capacity).contains(&c) {
            if let Ok(mut s) = self.spare.lock() {
                if s.0.len() < self.count && s.1 + c <= self.max_bytes {
                    s.1 += c;
                    s.0.push(v);
                }
            }
        }
    }
}

/// Read buffers: one per connection that has unread bytes buffered.
static READ_SHELF: Shelf = Shelf::new(64, READ_BUFFER, 64 * READ_BUFFER);
/// Write buffers: one per connection gathering replies.
static WRITE_SHELF: Shelf = Shelf::new(64, WRITE_BUFFER, 64 * WRITE_BUFFER);
/// Reply and payload buffers of every connection.
pub static REPLY_SHELF: Shelf = Shelf::new(256, 2 << 20, 32 << 20);

/// Size of a read buffer: a queue of small requests, or a few small writes with their payloads, in one read.
pub const READ_BUFFER: usize = 128 << 10;
/// Size of a write buffer: a batch of replies in one write.
pub const WRITE_BUFFER: usize = 256 << 10;

/// `BufReader` with a buffer lent from a shelf while it holds unread bytes. Reads at least as large as the
/// buffer go straight to the caller's memory.
pub struct LentReader<R> {
    inner: R,
    /// `READ_BUFFER` bytes while lent, empty otherwise.
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
}

impl<R> LentReader<R> {
    pub fn new(inner: R) -> LentReader<R> {
        LentReader { inner, buf: Vec::new(), pos: 0, filled: 0 }
    }

    /// Gives the buffer back (it holds nothing).
    fn give_back(&mut self) {
        self.pos = 0;
        self.filled = 0;
        READ_SHELF.put(std::mem::take(&mut self.buf));
    }

    /// Bytes buffered and not yet read.
    pub fn buffered(&self) -> usize {
        self.filled - self.pos
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for LentReader<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, dst: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if dst.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if me.pos == me.filled {
            if dst.remaining() >= READ_BUFFER {
                return Pin::new(&mut me.inner).poll_read(cx, dst);
            }
            if me.buf.len() != READ_BUFFER {
                me.buf = READ_SHELF.sized(READ_BUFFER);
            }
            let mut rb = ReadBuf::new(&mut me.buf);
            let r = Pin::new(&mut me.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            match r {
                Poll::Ready(Ok(())) if n > 0 => {
                    me.pos = 0;
                    me.filled = n;
                }
                // Nothing came (not yet, the end, or an error): nothing to keep.
                other => {
                    me.give_back();
                    return other;
                }
            }
        }
        let n = dst.remaining().min(me.filled - me.pos);
        dst.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        if me.pos == me.filled {
            me.give_back();
        }
        Poll::Ready(Ok(()))
    }
}

/// `BufWriter` with a buffer lent from a shelf while it holds unwritten bytes. Writes at least as large as the
/// buffer go straight through when nothing is buffered.
pub struct LentWriter<W> {
    inner: W,
    /// Capacity `WRITE_BUFFER` while lent, none otherwise; `buf[written..]` is still to write.
    buf: Vec<u8>,
    written: usize,
}

impl<W> LentWriter<W> {
    pub fn new(inner: W) -> LentWriter<W> {
        LentWriter { inner, buf: Vec::new(), written: 0 }
    }

    /// The bytes buffered and not yet written.
    pub fn buffer(&self) -> &[u8] {
        &self.buf[self.written..]
    }

    /// The writer under the buffer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: AsyncWrite + Unpin> LentWriter<W> {
    /// Writes the buffer out and gives it back.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        let mut b = std::mem::take(&mut self.buf);
        if b.capacity() > 0 {
            b.clear();
            WRITE_SHELF.put(b);
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LentWriter<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, src: &[u8]) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if me.buf.len() + src.len() > WRITE_BUFFER {
            ready!(me.poll_drain(cx))?;
        }
        if me.buf.is_empty() && src.len() >= WRITE_BUFFER {
            return Pin::new(&mut me.inner).poll_write(cx, src);
        }
        if me.buf.capacity() == 0 {
            me.buf = WRITE_SHELF.take();
            me.buf.clear();
            me.buf.reserve_exact(WRITE_BUFFER);
        }
        me.buf.extend_from_slice(src);
        Poll::Ready(Ok(src.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn reader_returns_the_stream_in_any_read_sizes_and_holds_no_buffer_when_drained() {
        let data = pattern(3 * READ_BUFFER + 1234);
        let (mut a, b) = tokio::io::duplex(40_000);
        let d = data.clone();
        let feeder = tokio::spawn(async move {
            a.write_all(&d).await.unwrap();
        });
        let mut r = LentReader::new(b);
        let mut got = Vec::new();
        let sizes = [1usize, 28, 4096, 100, READ_BUFFER, 7, 65536, 2 * READ_BUFFER];
        let mut i = 0;
        while got.len() < data.len() {
            let want = sizes[i % sizes.len()].min(data.len() - got.len());
            let mut v = vec![0u8; want];
            r.read_exact(&mut v).await.unwrap();
            got.extend_from_slice(&v);
            i += 1;
        }
        feeder.await.unwrap();
        assert_eq!(got, data);
        assert_eq!(r.buffered(), 0);
        assert!(r.buf.is_empty(), "a drained reader gave its buffer back");
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn reader_keeps_the_buffer_only_while_bytes_wait() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&pattern(100)).await.unwrap();
        let mut r = LentReader::new(b);
        let mut v = [0u8; 28];
        r.read_exact(&mut v).await.unwrap();
        assert_eq!(r.buffered(), 72);
        assert_eq!(r.buf.len(), READ_BUFFER);
        let mut w = [0u8; 72];
        r.read_exact(&mut w).await.unwrap();
        assert_eq!(&w[..], &pattern(100)[28..]);
        assert!(r.buf.is_empty());
    }

    #[tokio::test]
    async fn writer_gathers_small_writes_and_passes_large_ones_through_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            b.read_to_end(&mut v).await.unwrap();
            v
        });
        let mut w = LentWriter::new(a);
        let mut want = Vec::new();
        for (i, n) in [16usize, 4096, WRITE_BUFFER, 3, WRITE_BUFFER - 2, 2 * WRITE_BUFFER + 5, 9].iter().enumerate() {
            let p: Vec<u8> = pattern(*n).iter().map(|x| x.wrapping_add(i as u8)).collect();
            w.write_all(&p).await.unwrap();
            want.extend_from_slice(&p);
            if i == 3 {
                w.flush().await.unwrap();
                assert!(w.buffer().is_empty());
                assert_eq!(w.buf.capacity(), 0, "a flushed writer gave its buffer back");
            }
        }
        assert!(!w.buffer().is_empty());
        w.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), want);
    }

    #[test]
    fn shelf_keeps_at_most_its_count_and_no_oversized_buffers() {
        let s = Shelf::new(2, 8192, 1 << 20);
        s.put(vec![0; 4096]);
        s.put(vec![0; 8192]);
        s.put(vec![0; 5000]);
        s.put(vec![0; 1 << 20]);
        assert_eq!(s.spare.lock().unwrap().0.len(), 2);
        assert_eq!(s.sized(10).len(), 10);
        assert_eq!(s.take().capacity(), 4096);
        assert_eq!(s.take().capacity(), 0);
        assert_eq!(s.spare.lock().unwrap().1, 0);
    }

    #[test]
    fn shelf_keeps_at_most_its_bytes() {
        let s = Shelf::new(10, 8192, 12288);
        s.put(vec![0; 8192]);
        s.put(vec![0; 8192]);
        s.put(vec![0; 4096]);
        assert_eq!(s.spare.lock().unwrap().0.len(), 2);
        assert_eq!(s.spare.lock().unwrap().1, 12288);
    }
}
