//! Small durable-write helpers shared by the state files, keys and manifests: write to a
//! temporary name, fsync, rename into place, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// How [`write_atomic`] may treat an existing file at the target path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Existing {
    /// Replace it (state files).
    Replace,
    /// Fail with `AlreadyExists` (keys).
    Keep,
}

/// Writes `bytes` to `path` so that after a crash `path` holds either its old content or all of
/// the new: temporary file in the same directory, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    existing: Existing,
) -> io::Result<()> {
    let tmp = tmp_name(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    let flags = match existing {
        Existing::Replace => rustix::fs::RenameFlags::empty(),
        Existing::Keep => rustix::fs::RenameFlags::NOREPLACE,
    };
    if let Err(e) = rustix::fs::renameat_with(rustix::fs::CWD, &tmp, rustix::fs::CWD, path, flags) {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    sync_parent(path)
}

/// Fsyncs the directory holding `path`, so a rename or creation in it is durable.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => File::open(p)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp.{}", std::process::id()));
    PathBuf::from(s)
}
