//! The object store client: settings from options, environment and `~/.aws` files; HEAD, ranged GET and
//! multipart upload, run on this module's runtime and waited for from any thread.

use super::{Location, RemoteSpec};
use crate::error::{Error, ErrorKind, Result};
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Requests in flight at once, per process.
const MAX_IN_FLIGHT: usize = 16;

/// The runtime's handle and the process-wide request slots.
#[derive(Clone)]
struct Runtime {
    handle: tokio::runtime::Handle,
    slots: Arc<tokio::sync::Semaphore>,
}

/// The remote runtime of this process, made on first use. [`stop_runtime`] shuts it down before a fork, so a
/// fork never copies its threads' state half-way; the next request makes a new one (in parent and child).
static RT: Mutex<Option<(tokio::runtime::Runtime, Runtime)>> = Mutex::new(None);

/// Bumped by every [`stop_runtime`]: store clients made before belong to a runtime that is gone.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn runtime() -> Result<Runtime> {
    let mut g = RT.lock().map_err(|_| Error::new(ErrorKind::Io, "remote runtime lock poisoned"))?;
    if let Some((_, r)) = &*g {
        return Ok(r.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("qnbd-remote")
        .enable_all()
        .build()
        .map_err(|e| Error::new(ErrorKind::Io, format!("cannot start the remote I/O runtime: {e}")))?;
    let r = Runtime { handle: rt.handle().clone(), slots: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)) };
    *g = Some((rt, r.clone()));
    Ok(r)
}

/// Shuts the remote runtime down (its threads joined, at most 2 s) and retires every store client made on it.
pub(crate) fn stop_runtime() {
    let taken = RT.lock().ok().and_then(|mut g| g.take());
    GENERATION.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    if let Some((rt, _)) = taken {
        rt.shutdown_timeout(Duration::from_secs(2));
    }
}

/// Runs `fut` on the remote runtime and waits for it from this thread (any thread: a plain channel, never a
/// nested `block_on`).
fn run<T: Send + 'static>(fut: impl std::future::Future<Output = T> + Send + 'static) -> Result<T> {
    let rt = runtime()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| Error::new(ErrorKind::Io, "remote request abandoned"))
}

/// What HEAD says of an object.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub size: u64,
    /// The ETag, or for servers without one the modification time: the version the cache is keyed by.
    pub version: String,
    /// Whether `version` is an ETag that GETs can be conditional on.
    pub etag: bool,
}

/// One object and the client that reaches it.
pub(crate) struct Client {
    /// The store client and the runtime generation it was made in (its connections belong to that runtime).
    store: Mutex<(u64, Arc<dyn ObjectStore>)>,
    spec: RemoteSpec,
    loc: Location,
    path: ObjPath,
    /// The name shown in messages.
    pub url: String,
    /// What identifies the object across processes (endpoint, bucket and key; or the URL).
    pub identity: String,
}

/// The shared AWS files: `[section]` headers and `key = value` lines.
fn ini_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = h.trim() == section;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
    }
    out
}

fn home_file(env: &str, rel: &str) -> Option<String> {
    let path = std::env::var(env).ok().or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/{rel}")))?;
    std::fs::read_to_string(path).ok()
}

/// Settings from `~/.aws/credentials` and `~/.aws/config` for the profile in use.
fn aws_files() -> Vec<(String, String)> {
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
    let mut kv = Vec::new();
    if let Some(t) = home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials") {
        kv.extend(ini_section(&t, &profile));
    }
    if let Some(t) = home_file("AWS_CONFIG_FILE", ".aws/config") {
        let section = if profile == "default" { profile.clone() } else { format!("profile {profile}") };
        kv.extend(ini_section(&t, &section));
    }
    kv
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// The message for a failed request; `what` (with the URL) leads it, or nothing where the caller adds its own.
fn remote_err(url: &str, what: Option<&str>, e: object_store::Error) -> Error {
    let lead = what.map(|w| format!("{w} '{url}': ")).unwrap_or_default();
    let why = match e {
        object_store::Error::NotFound { .. } => "no such object".to_string(),
        object_store::Error::Precondition { .. } => {
            "the object changed after it was opened (base images must not change)".to_string()
        }
        e => e.to_string(),
    };
    Error::new(ErrorKind::Io, format!("{lead}{why}"))
}

impl Client {
    pub fn new(spec: &RemoteSpec, loc: &Location) -> Result<Client> {
        let (store, path, identity) = Self::build(spec, loc)?;
        Ok(Client {
            store: Mutex::new((GENERATION.load(std::sync::atomic::Ordering::Acquire), store)),
            spec: spec.clone(),
            loc: loc.clone(),
            path,
            url: spec.url.clone(),
            identity,
        })
    }

    /// The store client for the current runtime: one made on a runtime since shut down is made again.
    fn store(&self) -> Result<Arc<dyn ObjectStore>> {
        let generation = GENERATION.load(std::sync::atomic::Ordering::Acquire);
        let mut g = self.store.lock().map_err(|_| Error::new(ErrorKind::Io, "remote client lock poisoned"))?;
        if g.0 != generation {
            let (fresh, _, _) = Self::build(&self.spec, &self.loc)?;
            *g = (generation, fresh);
        }
        Ok(g.1.clone())
    }

    fn build(spec: &RemoteSpec, loc: &Location) -> Result<(Arc<dyn ObjectStore>, ObjPath, String)> {
        let timeout = Duration::from_secs(spec.timeout.unwrap_or(30).clamp(1, 3600));
        let options = ClientOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(Duration::from_secs(5))
            .with_allow_http(true);
        // Transient failures (a restarting gateway) are retried with backoff for a while, then fail the read.
        let retry = RetryConfig {
            max_retries: 4,
            retry_timeout: Duration::from_secs(20),
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
        };
        let bad = |e: object_store::Error| Error::new(ErrorKind::InvalidArgument, format!("'{}': {e}", spec.url));
        match loc {
            Location::S3 { bucket, key } => {
                let files = aws_files();
                let file = |k: &str| files.iter().find(|(fk, _)| fk == k).map(|(_, v)| v.clone());
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(options)
                    .with_retry(retry);
                let endpoint = spec.endpoint.clone().or_else(|| {
                    env("AWS_ENDPOINT_URL_S3")
                        .or_else(|| env("AWS_ENDPOINT_URL"))
                        .or_else(|| env("AWS_ENDPOINT"))
                        .or_else(|| file("endpoint_url"))
                });
                if let Some(e) = &endpoint {
                    // A gateway of one's own (Ceph RGW, MinIO) answers path-style requests.
                    let virtual_hosted =
                        env("AWS_VIRTUAL_HOSTED_STYLE_REQUEST").is_some_and(|v| v.eq_ignore_ascii_case("true"));
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(virtual_hosted);
                }
                let region = spec
                    .region
                    .clone()
                    .or_else(|| env("AWS_REGION"))
                    .or_else(|| env("AWS_DEFAULT_REGION"))
                    .or_else(|| file("region"))
                    .unwrap_or_else(|| "us-east-1".to_string());
                b = b.with_region(region);
                let key_id = spec.access_key_id.clone().or_else(|| env("AWS_ACCESS_KEY_ID"));
                let secret = spec.secret_access_key.clone().or_else(|| env("AWS_SECRET_ACCESS_KEY"));
                match (key_id, secret) {
                    (Some(k), Some(s)) => {
                        b = b.with_access_key_id(k).with_secret_access_key(s);
                        if spec.access_key_id.is_some() {
                            // Keys given with the image do not mix with a session token from elsewhere.
                            b = b.with_token("");
                        }
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(Error::new(
                            ErrorKind::InvalidArgument,
                            "an S3 access key id and its secret access key must be given together \
                             (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or access-key-id and secret-access-key)"
                                .to_string(),
                        ));
                    }
                    (None, None) => match (file("aws_access_key_id"), file("aws_secret_access_key")) {
                        (Some(k), Some(s)) => {
                            b = b.with_access_key_id(k).with_secret_access_key(s);
                            if let Some(t) = file("aws_session_token") {
                                b = b.with_token(t);
                            }
                        }
                        // No credentials anywhere: a public bucket, requests unsigned (never the instance
                        // metadata service, which would stall a machine outside a cloud).
                        _ if env("AWS_CONTAINER_CREDENTIALS_FULL_URI").is_none()
                            && env("AWS_WEB_IDENTITY_TOKEN_FILE").is_none() =>
                        {
                            b = b.with_skip_signature(true)
                        }
                        _ => {}
                    },
                }
                let store = b.build().map_err(bad)?;
                let path = ObjPath::from(key.as_str());
                let identity = format!("s3://{}/{bucket}/{key}", endpoint.unwrap_or_else(|| "aws".to_string()));
                Ok((Arc::new(store), path, identity))
            }
            Location::Http { base, path } => {
                let store = object_store::http::HttpBuilder::new()
                    .with_url(base.as_str())
                    .with_client_options(options)
                    .with_retry(retry)
                    .build()
                    .map_err(bad)?;
                let path = ObjPath::from_url_path(path)
                    .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("'{}': bad path: {e}", spec.url)))?;
                Ok((Arc::new(store), path, spec.url.clone()))
            }
        }
    }

    /// HEAD: size and version.
    pub fn head(&self) -> Result<Head> {
        let (store, path, url) = (self.store()?, self.path.clone(), self.url.clone());
        super::cache::HEADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let m = run(async move { store.head(&path).await })?.map_err(|e| remote_err(&url, None, e))?;
        match m.e_tag.filter(|e| !e.is_empty()) {
            // A weak ETag (`W/"..."`) names the version, but `If-Match` never matches one.
            Some(e) if e.starts_with("W/") => Ok(Head { size: m.size, version: e, etag: false }),
            Some(e) => Ok(Head { size: m.size, version: e, etag: true }),
            // object_store reads a missing Last-Modified as the epoch: nothing then tells versions apart.
            None if m.last_modified.timestamp() == 0 => Err(Error::unsupported(
                "the server gives neither an ETag nor a modification time, so a changed object could not be told \
                 from the cached one",
            )),
            None => Ok(Head { size: m.size, version: m.last_modified.to_rfc3339(), etag: false }),
        }
    }

    /// GETs the byte ranges `[start, end)` of the version `head` names, concurrently, each holding one of the
    /// process's request slots. A range fails alone; `Err((e, true))`: the object changed since it was opened.
    pub fn get_many(
        &self,
        ranges: &[(u64, u64)],
        head: &Head,
    ) -> Result<Vec<std::result::Result<bytes::Bytes, (Error, bool)>>> {
        let if_match = head.etag.then(|| head.version.clone());
        let slots = runtime()?.slots.clone();
        let store = self.store()?;
        let mut tasks = Vec::with_capacity(ranges.len());
        for &(start, end) in ranges {
            let (store, path, if_match, slots) = (store.clone(), self.path.clone(), if_match.clone(), slots.clone());
            tasks.push(async move {
                let _slot = slots.acquire_owned().await;
                let opts = GetOptions { if_match, range: Some(GetRange::Bounded(start..end)), ..Default::default() };
                // The body is taken piece by piece, never past what was asked: a server that ignores the
                // range (or lies about it) cannot make this allocate more.
                let want = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
                let mut body = store.get_opts(&path, opts).await?.into_stream();
                let mut out = bytes::BytesMut::with_capacity(want.min(8 << 20));
                while let Some(piece) = body.next().await {
                    let piece = piece?;
                    if piece.len() > want.saturating_sub(out.len()) {
                        return Err(object_store::Error::Generic {
                            store: "remote",
                            source: "the server sent more bytes than the range asked for".into(),
                        });
                    }
                    out.extend_from_slice(&piece);
                }
                Ok(out.freeze())
            });
        }
        let results = run(async move {
            let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
            let mut out = Vec::with_capacity(handles.len());
            for h in handles {
                out.push(h.await);
            }
            out
        })?;
        Ok(results
            .into_iter()
            .zip(ranges)
            .map(|(r, &(start, end))| {
                let what = format!("Could not read bytes {start}..{end} of");
                let got = match r {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        let changed = matches!(e, object_store::Error::Precondition { .. });
                        return Err((remote_err(&self.url, Some(&what), e), changed));
                    }
                    Err(e) => return Err((Error::new(ErrorKind::Io, format!("{what} '{}': {e}", self.url)), false)),
                };
                let want = end.saturating_sub(start);
                if got.len() as u64 != want {
                    return Err((
                        Error::new(
                            ErrorKind::Io,
                            format!("{what} '{}': the server sent {} bytes, not {want}", self.url, got.len()),
                        ),
                        false,
                    ));
                }
                Ok(got)
            })
            .collect())
    }
}

/// Uploads the local file `src` to the remote name `dst` (`s3://BUCKET/KEY`) with a multipart upload: parts of
/// 16 MiB (more for files over 144 GiB, to stay under S3's 10,000 parts), at most 4 in flight. A failure aborts
/// the upload, leaving no object behind.
pub fn upload(src: &std::path::Path, dst: &RemoteSpec) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let loc = dst.location()?;
    if !matches!(loc, Location::S3 { .. }) {
        return Err(Error::unsupported(format!("'{}': only s3:// names can be written", dst.url)));
    }
    let client = Client::new(dst, &loc)?;
    let f = std::fs::File::open(src).map_err(|e| Error::io(format!("Could not open '{}'", src.display()), e))?;
    let len = f.metadata().map_err(|e| Error::io(format!("stat of '{}'", src.display()), e))?.len();
    let (store, path, url, name) = (client.store()?, client.path.clone(), dst.url.clone(), src.display().to_string());
    run(async move {
        let err = |e: object_store::Error| Error::new(ErrorKind::Io, format!("Could not write '{url}': {e}"));
        let part = usize::try_from(len.div_ceil(9000).next_multiple_of(1 << 20)).unwrap_or(usize::MAX).max(16 << 20);
        let mut f = tokio::fs::File::from_std(f);
        let mut w =
            object_store::WriteMultipart::new_with_chunk_size(store.put_multipart(&path).await.map_err(err)?, part);
        let mut buf = vec![0u8; 4 << 20];
        let failed = loop {
            let n = match f.read(&mut buf).await {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) => break Some(Error::io(format!("Could not read '{name}'"), e)),
            };
            if let Err(e) = w.wait_for_capacity(4).await {
                break Some(err(e));
            }
            w.write(&buf[..n]);
        };
        match failed {
            None => w.finish().await.map(|_| ()).map_err(err),
            Some(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    })?
}

#[cfg(test)]
mod tests {
    use super::ini_section;

    #[test]
    fn aws_files() {
        let t = "[default]\naws_access_key_id = A\n# c\n[profile x]\nregion=eu\nendpoint_url = http://h:1\n";
        assert_eq!(ini_section(t, "default"), vec![("aws_access_key_id".to_string(), "A".to_string())]);
        assert_eq!(ini_section(t, "profile x").len(), 2);
        assert!(ini_section(t, "y").is_empty());
    }
}
