//! The file backend: objects are files below a root directory, written durably.
//!
//! Hand-written over `std::fs` rather than `object_store`'s `LocalFileSystem` because durability needs
//! fsyncs that `LocalFileSystem` does not do: each write goes to a temporary name in the target's own
//! directory, the file is fsynced, renamed (or hard-linked, for create-if-absent) into place, and then
//! the directory is fsynced so that the new name survives a power cut. New directories are fsynced into
//! their parents the same way. The blocking calls run on tokio's blocking pool, one hop per operation.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;

use crate::stats::Counters;
use crate::{ObjectInfo, PutOutcome, StoreError, WriteMode};

/// What a write puts into the object: bytes in memory, or the contents of a local file, copied through a
/// small buffer so that memory does not grow with the file.
enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// Temporary files start with this, so listings can skip them and leftovers from a crash are recognisable.
const TMP_PREFIX: &str = ".hearth-tmp-";

pub(crate) struct FileStore {
    root: PathBuf,
    name: String,
}

impl FileStore {
    pub(crate) fn new(root: PathBuf, name: String) -> FileStore {
        FileStore { root, name }
    }

    /// Keys were validated by the caller (relative, no `.`/`..`/empty segments), so joining cannot escape `root`.
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn io_error(&self, key: &str, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::NotFound {
            return StoreError::NotFound {
                store: self.name.clone(),
                key: key.to_string(),
            };
        }
        StoreError::Io {
            store: self.name.clone(),
            key: key.to_string(),
            source,
        }
    }

    /// Runs blocking file work on tokio's blocking pool and maps its errors for `key`.
    async fn blocking<T, F>(&self, key: &str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result.map_err(|e| self.io_error(key, e)),
            Err(join) => Err(StoreError::Io {
                store: self.name.clone(),
                key: key.to_string(),
                source: io::Error::other(join),
            }),
        }
    }

    pub(crate) async fn put(
        &self,
        key: &str,
        data: Bytes,
        timestamp: Option<SystemTime>,
        mode: WriteMode,
    ) -> Result<PutOutcome, StoreError> {
        let path = self.path(key);
        let root = self.root.clone();
        self.blocking(key, move || {
            write_file(&root, &path, Source::Bytes(&data), timestamp, &mode)
        })
        .await
    }

    /// Copies the local file `source` into the object at `key`, durably, and counts one PUT of its size.
    pub(crate) async fn put_file(
        &self,
        key: &str,
        source: &Path,
        timestamp: Option<SystemTime>,
        counters: &Counters,
    ) -> Result<PutOutcome, StoreError> {
        let path = self.path(key);
        let root = self.root.clone();
        let source = source.to_path_buf();
        let size = tokio::fs::metadata(&source)
            .await
            .map(|m| m.len())
            .map_err(|e| self.source_error(key, &source, e))?;
        counters.put(size);
        let outcome = self
            .blocking(key, move || {
                write_file(
                    &root,
                    &path,
                    Source::File(&source),
                    timestamp,
                    &WriteMode::Overwrite,
                )
            })
            .await?;
        Ok(outcome)
    }

    /// Copies the object at `key` into the local file `dest` and returns its size.
    pub(crate) async fn download_to(&self, key: &str, mut dest: File) -> Result<u64, StoreError> {
        let path = self.path(key);
        self.blocking(key, move || {
            let mut from = File::open(&path)?;
            if !from.metadata()?.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "not a regular file",
                ));
            }
            io::copy(&mut from, &mut dest)
        })
        .await
    }

    /// An error reading the local file to upload: named after the file, not the key, and never "not found"
    /// in the store's sense.
    fn source_error(&self, key: &str, source: &Path, err: io::Error) -> StoreError {
        StoreError::Io {
            store: self.name.clone(),
            key: key.to_string(),
            source: io::Error::new(
                err.kind(),
                format!("read the local file {}: {err}", source.display()),
            ),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key);
        self.blocking(key, move || fs::read(path).map(Bytes::from))
            .await
    }

    pub(crate) async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let path = self.path(key);
        let name = self.name.clone();
        let key_owned = key.to_string();
        self.blocking(key, move || -> io::Result<Result<Bytes, StoreError>> {
            let mut file = File::open(&path)?;
            let size = file.metadata()?.len();
            if range.start >= size {
                return Ok(Err(StoreError::Other {
                    store: name,
                    key: key_owned,
                    detail: format!(
                        "byte range {}..{} starts past the end of the {size}-byte object",
                        range.start, range.end
                    ),
                }));
            }
            let end = range.end.min(size);
            file.seek(SeekFrom::Start(range.start))?;
            let mut buf = Vec::with_capacity(usize::try_from(end - range.start).unwrap_or(0));
            file.take(end - range.start).read_to_end(&mut buf)?;
            Ok(Ok(Bytes::from(buf)))
        })
        .await?
    }

    pub(crate) async fn head(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        let path = self.path(key);
        let key_owned = key.to_string();
        self.blocking(key, move || {
            let meta = fs::metadata(&path)?;
            if !meta.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "not a regular file",
                ));
            }
            info(key_owned, &meta)
        })
        .await
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        let prefix_owned = prefix.to_string();
        self.blocking(prefix, move || list_files(&root, &prefix_owned))
            .await
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        self.blocking(key, move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
            match path.parent() {
                Some(dir) => fsync_dir(dir),
                None => Ok(()),
            }
        })
        .await
    }
}

fn write_file(
    root: &Path,
    path: &Path,
    data: Source<'_>,
    timestamp: Option<SystemTime>,
    mode: &WriteMode,
) -> io::Result<PutOutcome> {
    let dir = path.parent().unwrap_or(root);
    ensure_dir(dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{file_name}-{:016x}",
        rand::random::<u64>()
    ));
    let result = write_tmp_and_place(dir, path, &tmp, data, timestamp, mode);
    // The temporary name is gone after a rename; after a link, a refusal or an error it must be removed.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %tmp.display(), error = %e, "cannot remove temporary file"),
    }
    result
}

fn write_tmp_and_place(
    dir: &Path,
    path: &Path,
    tmp: &Path,
    data: Source<'_>,
    timestamp: Option<SystemTime>,
    mode: &WriteMode,
) -> io::Result<PutOutcome> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(tmp)?;
    match data {
        Source::Bytes(bytes) => file.write_all(bytes)?,
        Source::File(source) => {
            // A missing source file is the caller's mistake, not a missing object: keep it from turning
            // into the store's NotFound.
            let mut from = File::open(source).map_err(|e| {
                io::Error::new(
                    if e.kind() == io::ErrorKind::NotFound {
                        io::ErrorKind::InvalidInput
                    } else {
                        e.kind()
                    },
                    format!("read the local file {}: {e}", source.display()),
                )
            })?;
            io::copy(&mut from, &mut file)?;
        }
    }
    if let Some(timestamp) = timestamp {
        file.set_modified(timestamp)?;
    }
    file.sync_all()?;
    // Inode, size and mtime do not change on rename or link, so the etag can be taken from the temp file.
    let etag = etag_of(&file.metadata()?);
    drop(file);

    match mode {
        WriteMode::Overwrite => fs::rename(tmp, path)?,
        // link(2) fails with EEXIST if the name is taken, which makes create-if-absent atomic.
        WriteMode::Create => match fs::hard_link(tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Ok(PutOutcome::PreconditionFailed);
            }
            Err(e) => return Err(e),
        },
        WriteMode::Update(expected) => {
            // Writers that replace an object conditionally all lock the current file before comparing and
            // renaming, so two of them cannot both see the same etag and both replace it. The lock is on the
            // inode that the name points to; holding it and checking that the name still points to that
            // inode means no other conditional writer got in between. Unconditional puts do not lock.
            // A missing object is the normal "precondition failed" case for If-Match, not an error.
            let current = match File::open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(PutOutcome::PreconditionFailed);
                }
                Err(e) => return Err(e),
            };
            current.lock()?;
            let held = current.metadata()?;
            let now = fs::metadata(path)?;
            if held.ino() != now.ino() || held.dev() != now.dev() || &etag_of(&now) != expected {
                return Ok(PutOutcome::PreconditionFailed);
            }
            fs::rename(tmp, path)?;
            drop(current);
        }
    }
    fsync_dir(dir)?;
    Ok(PutOutcome::Written { etag: Some(etag) })
}

/// An etag for a file: inode, size and modification time. Each write creates a new inode, so the etag changes
/// on every write; the one weak spot is a reused inode number with equal size and timestamp.
fn etag_of(meta: &fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}-{:x}.{:x}\"",
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

fn info(key: String, meta: &fs::Metadata) -> io::Result<ObjectInfo> {
    Ok(ObjectInfo {
        key,
        size: meta.len(),
        timestamp: meta.modified()?,
        etag: Some(etag_of(meta)),
    })
}

/// Creates `dir` and any missing parents, fsyncing each parent that gained an entry.
fn ensure_dir(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} exists and is not a directory", dir.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        ensure_dir(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another writer created it first: fine, and that writer fsyncs the parent.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match parent {
        Some(parent) => fsync_dir(parent),
        None => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

fn list_files(root: &Path, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
    // A missing root is an empty store (nothing written yet), like Litestream; a root that is a file is
    // a configuration mistake and must not look like an empty store.
    match fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!(
                    "the store root {} exists and is not a directory",
                    root.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let start = if prefix.is_empty() {
        root.to_path_buf()
    } else {
        root.join(prefix)
    };
    let mut out = Vec::new();
    let mut pending = vec![(start, prefix.to_string())];
    while let Some((dir, key_prefix)) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // The prefix names no directory (missing, or a file): nothing is stored under it.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.kind() == io::ErrorKind::NotADirectory =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(path = %entry.path().display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let key = if key_prefix.is_empty() {
                name
            } else {
                format!("{key_prefix}/{name}")
            };
            let meta = match fs::metadata(entry.path()) {
                Ok(meta) => meta,
                // Deleted between readdir and stat.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                pending.push((entry.path(), key));
            } else if meta.is_file() {
                out.push(info(key, &meta)?);
            }
        }
    }
    Ok(out)
}
