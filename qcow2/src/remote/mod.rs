//! Remote images: `s3://BUCKET/KEY` objects and `http(s)://` URLs, read-only, fetched lazily in aligned chunks
//! into a local cache that every image of a process and every process on a host share ([`cache`]).
//!
//! The object store client is `object_store` (its `aws` and `http` features), running on a small tokio runtime
//! of this module's own: [`crate::storage::Storage`] is synchronous, and its callers (qnbd's request threads,
//! qimg) block on a channel until a fetch completes, which works in and out of any other runtime.
//!
//! Where the settings come from, most specific first:
//! - qemu-style options (`--image-opts driver=qcow2,file.driver=s3,file.bucket=B,file.key=K,file.endpoint=...`);
//! - the usual environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//!   `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...);
//! - the shared files `~/.aws/credentials` and `~/.aws/config` (or `AWS_SHARED_CREDENTIALS_FILE`,
//!   `AWS_CONFIG_FILE`): keys, `region`, `endpoint_url`.
//!
//! Without any credentials, requests go unsigned (public buckets).

pub mod cache;
mod client;

pub use cache::{CacheConfig, RemoteStats};
pub use client::upload;

use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;
use std::sync::Arc;

/// Whether `name` names a remote image (`s3://`, `http://`, `https://`).
pub fn is_remote(name: &str) -> bool {
    ["s3://", "http://", "https://"]
        .iter()
        .any(|p| name.len() > p.len() && name.get(..p.len()).is_some_and(|s| s.eq_ignore_ascii_case(p)))
}

/// Where a remote image lives and how to reach it: the parsed name plus the options given with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RemoteSpec {
    /// `s3://BUCKET/KEY` or an `http(s)://` URL.
    pub url: String,
    /// S3 endpoint (`http://127.0.0.1:7480`); default from the environment and `~/.aws/config`, else AWS.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 access key id.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<String>,
    /// Seconds one request may take before it is retried (qemu curl's `timeout`).
    pub timeout: Option<u64>,
}

/// An object named by a [`RemoteSpec`]: `(bucket, key)` for S3, the URL's base and path for HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    S3 { bucket: String, key: String },
    Http { base: String, path: String },
}

impl RemoteSpec {
    /// The spec for a plain name.
    pub fn from_url(url: &str) -> RemoteSpec {
        RemoteSpec { url: url.to_string(), ..Default::default() }
    }

    /// Whether the name is one qnbd can reach (`s3://BUCKET/KEY`, `http(s)://HOST/PATH`).
    pub fn check(&self) -> Result<()> {
        self.location().map(|_| ())
    }

    pub(crate) fn location(&self) -> Result<Location> {
        let bad = |why: &str| Error::new(ErrorKind::InvalidArgument, format!("'{}': {why}", self.url));
        let (scheme, rest) = self.url.split_once("://").ok_or_else(|| bad("not a URL"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => {
                let (bucket, key) = rest.split_once('/').ok_or_else(|| bad("expected s3://BUCKET/KEY"))?;
                if bucket.is_empty() || key.is_empty() || key.ends_with('/') {
                    return Err(bad("expected s3://BUCKET/KEY"));
                }
                Ok(Location::S3 { bucket: bucket.to_string(), key: key.to_string() })
            }
            "http" | "https" => {
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                if host.is_empty() || path.is_empty() || path.ends_with('/') {
                    return Err(bad("expected http(s)://HOST/PATH naming a file"));
                }
                if path.contains('?') || path.contains('#') {
                    return Err(bad("URLs with a query or fragment are not supported"));
                }
                Ok(Location::Http { base: format!("{scheme}://{host}"), path: path.to_string() })
            }
            _ => Err(bad("only s3://, http:// and https:// are remote images qnbd opens")),
        }
    }
}

/// A remote object opened read-only: the [`Storage`] an image reads through. Reads fetch what the local cache
/// lacks; writes are refused.
pub struct RemoteStorage {
    object: Arc<cache::CachedObject>,
}

impl std::fmt::Debug for RemoteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStorage").field("url", &self.object.url()).finish_non_exhaustive()
    }
}

impl RemoteStorage {
    /// Opens the object `spec` names (one HEAD request) and its cache entry. An object already open in this
    /// process at the same version is shared.
    pub fn open(spec: &RemoteSpec) -> Result<RemoteStorage> {
        let loc = spec.location()?;
        let client = client::Client::new(spec, &loc)?;
        let object = cache::CachedObject::open(client, &spec.url)
            .map_err(|e| e.context(format!("Could not open '{}'", spec.url)))?;
        Ok(RemoteStorage { object })
    }
}

fn read_only(what: &str) -> Error {
    Error::new(ErrorKind::ReadOnly, format!("remote images are read-only ({what})"))
}

impl Storage for RemoteStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.object.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only("write"))
    }
    fn len(&self) -> Result<u64> {
        Ok(self.object.size())
    }
    fn set_len(&self, _len: u64) -> Result<()> {
        Err(read_only("resize"))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _punch: bool) -> Result<()> {
        Err(read_only("write zeroes"))
    }
    fn is_fixed_size(&self) -> bool {
        true
    }
    fn is_remote(&self) -> bool {
        true
    }
}

/// Counters of this process's remote fetches (every object), for `qnbd`'s report and the tests.
pub fn stats() -> RemoteStats {
    cache::global_stats()
}

/// Before a fork: every fetched chunk mapped, no cache thread in the middle of its work. The child makes its
/// own runtime and clients when it reads.
pub fn quiesce() {
    cache::quiesce();
}

/// Sets where the cache lives and how large it may grow, for objects opened from now on.
pub fn configure(c: CacheConfig) {
    cache::set_config(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_remote("s3://b/k"));
        assert!(!is_remote("données.qcow2"));
        assert!(!is_remote("ééé"));
        assert!(is_remote("HTTPS://h/p"));
        assert!(!is_remote("s3://"));
        assert!(!is_remote("/s3://b"));
        assert!(!is_remote("base.qcow2"));
        let l = |u: &str| RemoteSpec::from_url(u).location();
        assert_eq!(l("s3://b/dir/k.qcow2").unwrap(), Location::S3 { bucket: "b".into(), key: "dir/k.qcow2".into() });
        assert_eq!(
            l("http://h:8080/a/b.img").unwrap(),
            Location::Http { base: "http://h:8080".into(), path: "a/b.img".into() }
        );
        for bad in ["s3://b", "s3://b/", "s3:///k", "http://h", "http://h/", "http://h/a?x=1", "ftp://h/a"] {
            assert!(l(bad).is_err(), "{bad}");
        }
    }
}
