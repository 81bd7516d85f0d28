//! Object storage for hearth: one interface over local directories (`file://`) and S3-compatible stores (`s3://`).
//!
//! [`Store`] is what replication code talks to for every object-store operation. It counts requests
//! ([`Store::stats`]) so that the request cost of a replication setting can be measured, and it maps
//! every failure to a [`StoreError`] that names the store and the key and says whether a retry can help.
//!
//! Objects of any size move with bounded memory: [`Store::put_file`] streams a local file into the store (S3
//! multipart uploads of [`DEFAULT_PART_SIZE`] parts above one part, a single PUT below), and
//! [`Store::download`] streams an object into a local file.

mod error;
mod file;
mod location;
mod parts;
mod retry;
mod s3;
mod stats;

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;

pub use error::StoreError;
pub use location::{Credentials, DEFAULT_REGION, Location, S3Location};
pub use parts::{DEFAULT_PART_SIZE, MAX_PARTS, PARTS_IN_FLIGHT, part_size_for};
pub use retry::{RetryPolicy, with_retry};
pub use stats::StoreStats;

use stats::Counters;

/// The S3 user metadata key under which the writer's timestamp is stored, the same key Litestream 0.5 uses
/// (`litestream-timestamp`, sent as `x-amz-meta-litestream-timestamp`, RFC 3339 with fractional seconds).
/// The file backend stores the same timestamp as the file's modification time, as Litestream does.
pub const TIMESTAMP_METADATA_KEY: &str = "litestream-timestamp";

/// Options for a write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutOptions {
    /// The object's own timestamp (for LTX files: the header timestamp). Stored as the file's mtime or as
    /// S3 metadata, and returned by [`Store::head`]. `None` leaves the store's own time.
    pub timestamp: Option<SystemTime>,
    /// When a multipart upload must have sent its parts. Past it, the upload is aborted and the write fails
    /// with [`StoreError::DeadlineReached`]: a caller that stops within a budget passes its deadline so that
    /// no unfinished upload (whose parts S3 keeps and bills) is left behind when the budget runs out. A
    /// single PUT ignores it, since a cancelled PUT leaves nothing.
    pub deadline: Option<tokio::time::Instant>,
}

/// The result of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written. `etag` identifies this version for [`Store::put_if_match`].
    Written { etag: Option<String> },
    /// A conditional write was refused: the object already existed (`put_if_absent`) or no longer had
    /// the expected etag (`put_if_match`).
    PreconditionFailed,
}

/// What the store knows about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store's location.
    pub key: String,
    pub size: u64,
    /// From [`Store::head`]: the timestamp given at write time if there was one, else the store's
    /// last-modified time. From [`Store::list`]: the file's mtime (file backend, which is the written
    /// timestamp) or S3's LastModified (S3 listings carry no user metadata; use `head` for the exact value).
    pub timestamp: SystemTime,
    /// An opaque version identifier for [`Store::put_if_match`].
    pub etag: Option<String>,
}

/// How a write treats an existing object.
#[derive(Clone, Debug)]
pub(crate) enum WriteMode {
    Overwrite,
    /// Only if no object exists (`If-None-Match: *`).
    Create,
    /// Only if the object exists with this etag (`If-Match`).
    Update(String),
}

enum Backend {
    File(file::FileStore),
    S3(s3::S3Store),
}

/// A handle on one store location. Cheap to clone; clones share the connection pool and the counters.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
    name: Arc<str>,
    counters: Arc<Counters>,
    /// The size of one part of a multipart upload; files up to this size go in one PUT.
    part_size: usize,
    /// Whether the store enforces conditional writes, shared by every store on the same bucket (or file
    /// root), so that it is probed once per process however many databases use it.
    conditional: Arc<tokio::sync::OnceCell<bool>>,
}

/// The outcome of [`Store::conditional_writes`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConditionalWrites {
    /// Whether the store enforces `put_if_absent` and `put_if_match`.
    pub supported: bool,
    /// Whether this call ran the probe (true for exactly one caller per bucket and process), so that a
    /// warning about missing support is logged once rather than once per database.
    pub probed_now: bool,
}

/// The conditional-write probe results of this process, by what they depend on: the S3 client's bucket,
/// endpoint and key (not the prefix), or the file root.
fn conditional_cells() -> &'static Mutex<HashMap<String, Arc<tokio::sync::OnceCell<bool>>>> {
    static CELLS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::OnceCell<bool>>>>> =
        OnceLock::new();
    CELLS.get_or_init(Default::default)
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

impl Store {
    /// Prepares a store for `location`. Sends no request: a wrong bucket or wrong credentials show up on
    /// the first operation. Credentials are resolved here (see [`S3Location::resolve_credentials`]).
    pub fn open(location: &Location) -> Result<Store, StoreError> {
        let name: Arc<str> = location.describe().into();
        let (backend, scope) = match location {
            Location::File { root } => (
                Backend::File(file::FileStore::new(root.clone(), name.to_string())),
                format!("file://{}", root.display()),
            ),
            Location::S3(s3) => {
                let env = |var: &str| std::env::var(var).ok();
                let credentials = s3.resolve_credentials(&env)?;
                let scope = s3::client_key(s3, credentials.as_ref());
                (Backend::S3(s3::S3Store::new(s3, credentials)?), scope)
            }
        };
        let conditional = match conditional_cells().lock() {
            Ok(mut cells) => Arc::clone(cells.entry(scope).or_default()),
            // A poisoned map only loses the sharing: this store probes for itself.
            Err(_) => Arc::default(),
        };
        Ok(Store {
            backend: Arc::new(backend),
            name,
            counters: Arc::default(),
            part_size: DEFAULT_PART_SIZE,
            conditional,
        })
    }

    /// This store with another multipart part size (at least 1 byte; S3 wants at least 5 MiB for every
    /// part but the last). The clone shares the client and the counters. Meant for tests that need
    /// multipart uploads without gigabytes, and for tuning.
    pub fn with_part_size(mut self, bytes: usize) -> Store {
        self.part_size = bytes.max(1);
        self
    }

    /// The multipart part size: files larger than this are uploaded in parts of this size.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    /// The store's secret-free name, as used in error messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The request counters so far.
    pub fn stats(&self) -> StoreStats {
        self.counters.snapshot()
    }

    /// Writes `data` at `key`, replacing any existing object. Durable when it returns.
    pub async fn put(
        &self,
        key: &str,
        data: Bytes,
        options: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        self.write(key, data, options, WriteMode::Overwrite).await
    }

    /// Writes `data` at `key` only if no object exists there. Whether the store enforces this is what
    /// [`Store::probe_conditional_writes`] finds out: Garage 2.5.0 ignores the condition and overwrites.
    pub async fn put_if_absent(
        &self,
        key: &str,
        data: Bytes,
        options: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        self.write(key, data, options, WriteMode::Create).await
    }

    /// Writes `data` at `key` only if the object there still has `etag`.
    pub async fn put_if_match(
        &self,
        key: &str,
        etag: &str,
        data: Bytes,
        options: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        self.write(key, data, options, WriteMode::Update(etag.to_string()))
            .await
    }

    async fn write(
        &self,
        key: &str,
        data: Bytes,
        options: PutOptions,
        mode: WriteMode,
    ) -> Result<PutOutcome, StoreError> {
        self.check_key(key)?;
        self.counters.put(data.len() as u64);
        match &*self.backend {
            Backend::File(f) => f.put(key, data, options.timestamp, mode).await,
            Backend::S3(s) => s.put(&self.name, key, data, options.timestamp, mode).await,
        }
    }

    /// Writes the contents of the local file at `path` to `key`, replacing any existing object, with bounded
    /// memory whatever the file's size. Durable when it returns. The file must not change meanwhile.
    ///
    /// S3: a file up to [`Store::part_size`] goes in one PUT, as [`Store::put`] would send it; a larger one
    /// is a multipart upload (CreateMultipartUpload, one UploadPart per part with up to
    /// [`PARTS_IN_FLIGHT`] at once, CompleteMultipartUpload, each counted as a PUT), with the same
    /// metadata. A failed multipart upload is aborted (counted as a DELETE), so it leaves no object and no
    /// stored parts. Files: streamed into a temporary file, fsynced and renamed, as [`Store::put`] does.
    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        options: PutOptions,
    ) -> Result<PutOutcome, StoreError> {
        self.check_key(key)?;
        match &*self.backend {
            Backend::File(f) => {
                f.put_file(key, path, options.timestamp, &self.counters)
                    .await
            }
            Backend::S3(s) => {
                s.put_file(
                    &self.name,
                    key,
                    path,
                    &options,
                    self.part_size,
                    &self.counters,
                )
                .await
            }
        }
    }

    /// Copies the object at `key` into the local file `path` (created or truncated), streaming, and returns
    /// its size. Memory stays bounded whatever the object's size. The file is not fsynced: this is for
    /// working copies, not for data that must survive a crash.
    pub async fn download(&self, key: &str, path: &Path) -> Result<u64, StoreError> {
        self.check_key(key)?;
        let file = std::fs::File::create(path).map_err(|e| StoreError::Io {
            store: self.name.to_string(),
            key: key.to_string(),
            source: std::io::Error::new(
                e.kind(),
                format!("create the local file {}: {e}", path.display()),
            ),
        })?;
        self.download_to(key, &file).await
    }

    /// Like [`Store::download`], into `dest` at its current offset: several objects can be downloaded one
    /// after another into one working file (one file created instead of one per object), each at the
    /// offset where the previous one ended.
    pub async fn download_to(&self, key: &str, dest: &std::fs::File) -> Result<u64, StoreError> {
        self.check_key(key)?;
        // A duplicate descriptor shares the offset, so the caller's file moves on by what was written.
        let dest = dest.try_clone().map_err(|e| StoreError::Io {
            store: self.name.to_string(),
            key: key.to_string(),
            source: e,
        })?;
        self.counters.get();
        let size = match &*self.backend {
            Backend::File(f) => f.download_to(key, dest).await?,
            Backend::S3(s) => s.download_to(&self.name, key, dest).await?,
        };
        self.counters.got_bytes(size);
        Ok(size)
    }

    /// Reads the whole object at `key`.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.check_key(key)?;
        self.counters.get();
        let data = match &*self.backend {
            Backend::File(f) => f.get(key).await?,
            Backend::S3(s) => s.get(&self.name, key).await?,
        };
        self.counters.got_bytes(data.len() as u64);
        Ok(data)
    }

    /// Reads bytes `range` of the object at `key`. A range reaching past the end is cut at the end;
    /// a range starting past the end is an error.
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.check_key(key)?;
        if range.start > range.end {
            return Err(StoreError::Other {
                store: self.name.to_string(),
                key: key.to_string(),
                detail: format!("invalid byte range {}..{}", range.start, range.end),
            });
        }
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        self.counters.get();
        let data = match &*self.backend {
            Backend::File(f) => f.get_range(key, range).await?,
            Backend::S3(s) => s.get_range(&self.name, key, range).await?,
        };
        self.counters.got_bytes(data.len() as u64);
        Ok(data)
    }

    /// Size, timestamp and etag of the object at `key`.
    pub async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        self.check_key(key)?;
        self.counters.head();
        match &*self.backend {
            Backend::File(f) => f.head(key).await,
            Backend::S3(s) => s.head(&self.name, key).await,
        }
    }

    /// Every object under `prefix` (a `/`-separated directory-like prefix: `ltx/0` lists `ltx/0/...`, not
    /// `ltx/01`; empty lists everything), sorted by key, all pages. A missing directory or empty bucket
    /// prefix gives an empty list.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            self.check_key(prefix)?;
        }
        let mut objects = match &*self.backend {
            Backend::File(f) => {
                self.counters.lists(1);
                f.list(prefix).await?
            }
            Backend::S3(s) => {
                let objects = s.list(&self.name, prefix).await;
                let count = objects.as_ref().map_or(0, Vec::len);
                self.counters.lists(stats::list_pages(count));
                objects?
            }
        };
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Deletes the object at `key`. Deleting a missing object succeeds, as on S3.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.check_key(key)?;
        self.counters.delete();
        match &*self.backend {
            Backend::File(f) => f.delete(key).await,
            Backend::S3(s) => s.delete(&self.name, key).await,
        }
    }

    /// Finds out whether the store really enforces `put_if_absent`, by trying it: writes a probe object
    /// twice with `If-None-Match: *` and checks that the second write is refused, then deletes the probe.
    /// True for the file backend; false for Garage 2.5.0, which ignores the header. Costs three or four
    /// requests. Errors that a retry could fix are returned rather than read as "unsupported".
    pub async fn probe_conditional_writes(&self) -> Result<bool, StoreError> {
        let key = format!(".hearth-probe-{:016x}", rand::random::<u64>());
        let second = match self
            .put_if_absent(&key, Bytes::from_static(b"1"), PutOptions::default())
            .await
        {
            Ok(PutOutcome::Written { .. }) => {
                self.put_if_absent(&key, Bytes::from_static(b"2"), PutOptions::default())
                    .await
            }
            // The probe key is random, so a refusal of the first write means the condition is not
            // evaluated correctly: report it as unsupported.
            Ok(PutOutcome::PreconditionFailed) => Ok(PutOutcome::Written { etag: None }),
            Err(err) => Err(err),
        };
        let cleanup = self.delete(&key).await;
        let supported = match second {
            Ok(PutOutcome::PreconditionFailed) => true,
            Ok(PutOutcome::Written { .. }) => false,
            Err(err) if err.is_retryable() => return Err(err),
            Err(err @ (StoreError::AccessDenied { .. } | StoreError::NoSuchBucket { .. })) => {
                return Err(err);
            }
            // Any other refusal (for example 501 Not Implemented) means the store cannot do it.
            Err(err) => {
                tracing::debug!(store = %self.name, error = %err, "conditional write probe refused");
                false
            }
        };
        cleanup?;
        Ok(supported)
    }

    /// Whether the store enforces conditional writes, found out by [`Store::probe_conditional_writes`] once
    /// per bucket (or file root) and process: a hundred databases in one bucket cost one probe. Callers
    /// that arrive while the probe runs wait for its answer. A failed probe is not remembered.
    pub async fn conditional_writes(&self) -> Result<ConditionalWrites, StoreError> {
        let mut probed_now = false;
        let supported = *self
            .conditional
            .get_or_try_init(|| async {
                probed_now = true;
                self.probe_conditional_writes().await
            })
            .await?;
        Ok(ConditionalWrites {
            supported,
            probed_now,
        })
    }

    fn check_key(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key).map_err(|reason| StoreError::InvalidKey {
            store: self.name.to_string(),
            key: key.to_string(),
            reason: reason.to_string(),
        })
    }
}

/// Keys are relative `/`-separated paths. Anything that could escape the store's directory or that S3 and a
/// file system would read differently is refused.
fn validate_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.starts_with('/') {
        return Err("the key must be relative, without a leading `/`");
    }
    if key.contains('\0') || key.contains('\\') {
        return Err("the key may not contain NUL or `\\`");
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err("the key may not contain empty segments (`//` or a trailing `/`)"),
            "." | ".." => return Err("the key may not contain `.` or `..` segments"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        let ok = [
            "a",
            "ltx/0/0000000000000001-0000000000000001.ltx",
            "dir/.hidden",
            "a..b",
        ];
        for key in ok {
            assert_eq!(validate_key(key), Ok(()), "{key}");
        }
        let bad = [
            "", "/abs", "a/../b", "..", "./a", "a//b", "a/", "a\\b", "a\0b",
        ];
        for key in bad {
            assert!(validate_key(key).is_err(), "{key:?} should be refused");
        }
    }
}
