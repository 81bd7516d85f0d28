//! Running the `btrfs` command-line tool and reading its output: subvolume facts, nested subvolumes,
//! snapshots, deletion, the read-only property and space use.
//!
//! hearth drives btrfs through the `btrfs` program of btrfs-progs rather than through its ioctls: btrfs-progs
//! is the well-kept reference implementation (it is what every btrfs user already runs, and its send and
//! receive carry years of fixes for stream versions, clones and edge cases), while the ioctls need `unsafe`
//! code and hand-kept struct layouts. The price is parsing text meant for people, so every parser here
//! checks the shape of what it reads and returns [`BtrfsError::Parse`] instead of guessing. Commands run
//! with `LC_ALL=C` so messages stay in English.
//!
//! Two ioctls are called directly, each with its reason at [`subvolume_info`] (on the path of every
//! push, where a process per snapshot cost more than the whole `btrfs send | receive` of an empty
//! difference) and [`set_received`] (no command does it); their structs are checked against the kernel's
//! sizes at compile time and their results against `btrfs subvolume show` and `btrfs receive` in tests.
//! They are this crate's only `unsafe` code.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::error::BtrfsError;

/// The program run for every btrfs operation.
pub(crate) const BTRFS: &str = "btrfs";

/// `statfs` magic number of btrfs (`BTRFS_SUPER_MAGIC`).
const BTRFS_SUPER_MAGIC: u64 = 0x9123_683E;

/// The inode number of every subvolume's root directory (`BTRFS_FIRST_FREE_OBJECTID`). btrfs-progs itself
/// recognises subvolumes by it.
const SUBVOL_ROOT_INO: u64 = 256;

/// What `btrfs subvolume show` says about one subvolume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubvolInfo {
    /// The path it was looked up by.
    pub path: PathBuf,
    /// Its name (the last part of its path inside the filesystem).
    pub name: String,
    /// Its own UUID.
    pub uuid: String,
    /// The UUID of the subvolume it is a snapshot of, if any.
    pub parent_uuid: Option<String>,
    /// For a subvolume made by `btrfs receive`, the UUID of the snapshot it was received from.
    pub received_uuid: Option<String>,
    /// The transaction that last changed it. Any change to its files moves this (once committed).
    pub generation: u64,
    /// The transaction that created it; orders snapshots by age.
    pub created_generation: u64,
    /// Its subvolume id.
    pub id: u64,
    /// The transaction that last changed its contents (`ctransid`), which a send stream of it
    /// carries and a receiver records as `stransid`; read by [`subvolume_info`] only (`btrfs
    /// subvolume show` does not print it).
    pub ctransid: Option<u64>,
    /// Whether it is read-only.
    pub readonly: bool,
    /// Its creation time as btrfs prints it (`2026-11-23 22:33:54 +0000`), when known.
    pub created: Option<String>,
    /// Its path relative to the filesystem's top-level subvolume (empty for the top level itself),
    /// when read by `btrfs subvolume show` ([`subvolume_show`]); the ioctl behind
    /// [`subvolume_info`] does not give it.
    pub fs_path: Option<String>,
}

impl SubvolInfo {
    /// The UUID a send stream of this snapshot is known by, and that a receiver stores as its received
    /// UUID: the received UUID when this snapshot was itself received, else its own UUID (the kernel's
    /// `btrfs send` does the same, so chains of send and receive keep one identity).
    pub fn send_uuid(&self) -> &str {
        self.received_uuid.as_deref().unwrap_or(&self.uuid)
    }
}

/// Space used by one subvolume, from `btrfs filesystem du` (data extents only, no metadata; no quotas
/// needed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceUse {
    /// The path measured.
    pub path: PathBuf,
    /// Bytes of data its files refer to.
    pub total: u64,
    /// Bytes referred to by it alone: about what deleting it frees.
    pub exclusive: u64,
    /// Bytes shared with the other paths measured in the same call.
    pub set_shared: u64,
}

pub(crate) fn command_line(args: &[&OsStr]) -> String {
    let mut line = BTRFS.to_string();
    for a in args {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    line
}

pub(crate) fn base_command() -> Command {
    let mut cmd = Command::new(BTRFS);
    cmd.env("LC_ALL", "C");
    cmd
}

/// Runs `btrfs ARGS` and returns its standard output; a non-zero exit becomes [`BtrfsError::Command`].
pub(crate) fn run(args: &[&OsStr]) -> Result<String, BtrfsError> {
    let output = base_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BtrfsError::ToolMissing {
            program: BTRFS.into(),
            source,
        })?;
    if !output.status.success() {
        return Err(BtrfsError::Command {
            command: command_line(args),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    String::from_utf8(output.stdout).map_err(|_| BtrfsError::Parse {
        command: command_line(args),
        reason: "output is not UTF-8".into(),
    })
}

/// Whether `path` is the root of a btrfs subvolume. Fails with [`BtrfsError::NotBtrfs`] when the path is
/// not on btrfs at all.
pub fn is_subvolume(path: &Path) -> Result<bool, BtrfsError> {
    let stat = rustix::fs::statfs(path)
        .map_err(|e| BtrfsError::io("checking the filesystem of", path, e.into()))?;
    if !is_btrfs(&stat) {
        return Err(BtrfsError::NotBtrfs { path: path.into() });
    }
    let meta =
        fs::symlink_metadata(path).map_err(|e| BtrfsError::io("reading metadata of", path, e))?;
    Ok(meta.is_dir() && meta.ino() == SUBVOL_ROOT_INO)
}

/// Whether `statfs` says btrfs.
fn is_btrfs(stat: &rustix::fs::StatFs) -> bool {
    // `f_type` is a signed long on some targets; the magic number fits in 32 bits either way.
    #[allow(clippy::unnecessary_cast)]
    let magic = (stat.f_type as u64) & 0xffff_ffff;
    magic == BTRFS_SUPER_MAGIC
}

fn require_subvolume(path: &Path) -> Result<(), BtrfsError> {
    if is_subvolume(path)? {
        Ok(())
    } else {
        Err(BtrfsError::NotASubvolume { path: path.into() })
    }
}

/// `struct btrfs_ioctl_get_subvol_info_args` of the kernel's `include/uapi/linux/btrfs.h`
/// (504 bytes), the answer of `BTRFS_IOC_GET_SUBVOL_INFO`.
#[repr(C)]
struct GetSubvolInfoArgs {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: IoctlTimespec,
    otime: IoctlTimespec,
    stime: IoctlTimespec,
    rtime: IoctlTimespec,
    reserved: [u64; 8],
}

// As for `ReceivedSubvolArgs`: the size is part of the ioctl number, so a wrong layout would not
// even reach the kernel; this check keeps it from compiling.
const _: () = assert!(std::mem::size_of::<GetSubvolInfoArgs>() == 504);

const GET_SUBVOL_INFO: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read::<GetSubvolInfoArgs>(0x94, 60);

/// `BTRFS_ROOT_SUBVOL_RDONLY`: the root item's flag that [`GetSubvolInfoArgs::flags`] carries
/// (not `BTRFS_SUBVOL_RDONLY`, bit 1, of the older subvolume ioctls).
const SUBVOL_RDONLY: u64 = 1 << 0;

/// The facts about the subvolume at `path`, from the kernel (`BTRFS_IOC_GET_SUBVOL_INFO`, Linux
/// 4.18 or later, no privileges needed), without [`SubvolInfo::fs_path`].
///
/// An ioctl rather than `btrfs subvolume show` because this is on the path of every push and
/// every standby's greeting, once per snapshot: each `btrfs` process costs 1-2 ms warm and ~12 ms
/// when its pages are not cached, which made a btrfs push with nothing new 1.5 times slower than
/// `btrfs send | receive` of an empty difference. The fields are the ones `show` prints
/// (`crates/hearth-volume/tests/btrfs.rs` compares the two).
pub fn subvolume_info(path: &Path) -> Result<SubvolInfo, BtrfsError> {
    let dir = open_subvolume(path)?;
    // SAFETY: the opcode reads exactly `size_of::<GetSubvolInfoArgs>()` bytes (checked above
    // against the kernel's struct), which the kernel fills in whole on success.
    #[allow(unsafe_code)]
    let got = unsafe {
        rustix::ioctl::ioctl(
            &dir,
            rustix::ioctl::Getter::<GET_SUBVOL_INFO, GetSubvolInfoArgs>::new(),
        )
    };
    let a = got.map_err(|e| match e {
        rustix::io::Errno::NOTTY => BtrfsError::io(
            "reading subvolume facts of",
            path,
            std::io::Error::other(
                "this kernel has no BTRFS_IOC_GET_SUBVOL_INFO; the btrfs backend needs Linux 4.18 or later (or push with --backend files)",
            ),
        ),
        e => BtrfsError::io("reading subvolume facts of", path, e.into()),
    })?;
    let uuid = |b: &[u8; 16]| -> Option<String> {
        if b.iter().all(|x| *x == 0) {
            return None;
        }
        let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Some(format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        ))
    };
    let name_len = a.name.iter().position(|b| *b == 0).unwrap_or(a.name.len());
    let created = i64::try_from(a.otime.sec)
        .ok()
        .filter(|s| *s > 0)
        .and_then(|s| chrono::DateTime::from_timestamp(s, a.otime.nsec))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S +0000").to_string());
    Ok(SubvolInfo {
        path: path.to_path_buf(),
        name: String::from_utf8_lossy(&a.name[..name_len]).into_owned(),
        uuid: uuid(&a.uuid).ok_or_else(|| BtrfsError::Parse {
            command: format!("BTRFS_IOC_GET_SUBVOL_INFO {}", path.display()),
            reason: "the subvolume has no UUID".into(),
        })?,
        parent_uuid: uuid(&a.parent_uuid),
        received_uuid: uuid(&a.received_uuid),
        generation: a.generation,
        created_generation: a.otransid,
        id: a.treeid,
        ctransid: Some(a.ctransid),
        readonly: a.flags & SUBVOL_RDONLY != 0,
        created,
        fs_path: None,
    })
}

/// The facts about the subvolume at `path` as `btrfs subvolume show` prints them, with its path
/// inside the filesystem ([`SubvolInfo::fs_path`]).
pub fn subvolume_show(path: &Path) -> Result<SubvolInfo, BtrfsError> {
    require_subvolume(path)?;
    let args: [&OsStr; 3] = ["subvolume".as_ref(), "show".as_ref(), path.as_os_str()];
    let text = run(&args)?;
    parse_show(path, &command_line(&args), &text)
}

/// Parses the output of `btrfs subvolume show`: a first line with the path inside the filesystem, then
/// `Key: value` lines up to `Snapshot(s):` (whose list of paths is not needed and may hold colons).
pub(crate) fn parse_show(path: &Path, command: &str, text: &str) -> Result<SubvolInfo, BtrfsError> {
    let bad = |reason: String| BtrfsError::Parse {
        command: command.to_string(),
        reason,
    };
    let mut lines = text.lines();
    let first = lines.next().ok_or_else(|| bad("no output".into()))?.trim();
    let fs_path = if first == "/" || first == "<FS_TREE>" {
        String::new()
    } else {
        first
            .trim_start_matches("<FS_TREE>/")
            .trim_start_matches('/')
            .to_string()
    };
    let mut fields = std::collections::HashMap::new();
    for line in lines {
        let line = line.trim();
        if line.starts_with("Snapshot(s):") || line.starts_with("Quota group") {
            break;
        }
        if let Some((key, value)) = line.split_once(':') {
            fields.insert(key.trim().to_string(), value.trim().to_string());
        }
    }
    let get = |key: &str| {
        fields
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| bad(format!("no {key:?} line")))
    };
    let number = |key: &str| -> Result<u64, BtrfsError> {
        let value = get(key)?;
        value
            .parse()
            .map_err(|_| bad(format!("{key} is not a number: {value:?}")))
    };
    let optional_uuid = |key: &str| -> Result<Option<String>, BtrfsError> {
        let value = get(key)?;
        if value == "-" {
            Ok(None)
        } else if is_uuid(value) {
            Ok(Some(value.to_ascii_lowercase()))
        } else {
            Err(bad(format!("{key} is not a UUID: {value:?}")))
        }
    };
    let uuid = optional_uuid("UUID")?.ok_or_else(|| bad("the subvolume has no UUID".into()))?;
    let name = get("Name")?.to_string();
    let flags = get("Flags")?;
    let created = fields.get("Creation time").filter(|v| *v != "-").cloned();
    Ok(SubvolInfo {
        path: path.to_path_buf(),
        name,
        uuid,
        parent_uuid: optional_uuid("Parent UUID")?,
        received_uuid: optional_uuid("Received UUID")?,
        generation: number("Generation")?,
        created_generation: number("Gen at creation")?,
        id: number("Subvolume ID")?,
        ctransid: None,
        readonly: flags.split(',').any(|f| f.trim() == "readonly"),
        created,
        fs_path: Some(fs_path),
    })
}

/// Whether `s` looks like a UUID as btrfs prints it (8-4-4-4-12 hexadecimal digits).
pub(crate) fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The subvolumes directly inside the subvolume `volume` (at any depth of folders, but not inside another
/// nested subvolume, which is refused anyway), as absolute paths below `volume`.
pub fn nested_subvolumes(volume: &Path) -> Result<Vec<PathBuf>, BtrfsError> {
    let info = subvolume_show(volume)?;
    let fs_path = info.fs_path.unwrap_or_default();
    let args: [&OsStr; 4] = [
        "subvolume".as_ref(),
        "list".as_ref(),
        "-o".as_ref(),
        volume.as_os_str(),
    ];
    let text = run(&args)?;
    parse_list_below(volume, &fs_path, &command_line(&args), &text)
}

/// Parses `btrfs subvolume list -o` lines (`ID 257 gen 7 top level 256 path vol/nested`) into paths below
/// `volume`, whose own path inside the filesystem is `volume_fs_path`.
pub(crate) fn parse_list_below(
    volume: &Path,
    volume_fs_path: &str,
    command: &str,
    text: &str,
) -> Result<Vec<PathBuf>, BtrfsError> {
    let mut nested = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Some((head, path)) = line.split_once(" path ") else {
            return Err(BtrfsError::Parse {
                command: command.into(),
                reason: format!("no path in line {line:?}"),
            });
        };
        if !head.trim_start().starts_with("ID ") {
            return Err(BtrfsError::Parse {
                command: command.into(),
                reason: format!("line does not start with an ID: {line:?}"),
            });
        }
        let path = path.trim_start_matches("<FS_TREE>/");
        let relative = if volume_fs_path.is_empty() {
            Some(path)
        } else {
            path.strip_prefix(volume_fs_path)
                .and_then(|rest| rest.strip_prefix('/'))
        };
        match relative {
            Some(rel) if !rel.is_empty() => nested.push(volume.join(rel)),
            _ => {
                return Err(BtrfsError::Parse {
                    command: command.into(),
                    reason: format!("{path:?} is not below the volume's path {volume_fs_path:?}"),
                });
            }
        }
    }
    nested.sort();
    Ok(nested)
}

/// Refuses a volume that has nested subvolumes, with an error naming each (see
/// [`BtrfsError::NestedSubvolumes`] and docs/volume-btrfs.md for why hearth refuses).
pub fn check_no_nested(volume: &Path) -> Result<(), BtrfsError> {
    let nested = nested_subvolumes(volume)?;
    if nested.is_empty() {
        Ok(())
    } else {
        Err(BtrfsError::NestedSubvolumes {
            volume: volume.into(),
            nested,
        })
    }
}

/// Checks that `name` is a single path component hearth may create.
pub(crate) fn check_name(name: &str) -> Result<(), BtrfsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(BtrfsError::InvalidName {
            name: name.to_string(),
            reason: "a snapshot or folder name must be one path component",
        });
    }
    Ok(())
}

/// Takes a read-only snapshot of `volume` as `snapshot_dir/name` (`btrfs subvolume snapshot -r`), after
/// checking that the volume has no nested subvolumes. `snapshot_dir` must be on the same filesystem and
/// outside the volume.
pub fn take_snapshot(
    volume: &Path,
    snapshot_dir: &Path,
    name: &str,
) -> Result<SubvolInfo, BtrfsError> {
    check_name(name)?;
    check_no_nested(volume)?;
    let dest = snapshot_dir.join(name);
    if dest.symlink_metadata().is_ok() {
        return Err(BtrfsError::Exists { path: dest });
    }
    run(&[
        "subvolume".as_ref(),
        "snapshot".as_ref(),
        "-r".as_ref(),
        volume.as_os_str(),
        dest.as_os_str(),
    ])?;
    subvolume_info(&dest)
}

/// The subvolumes directly in `dir` (snapshots, or received snapshots in a staging folder), oldest first
/// (by the transaction that created them, then by name). Plain folders and files are ignored.
pub fn list_snapshots(dir: &Path) -> Result<Vec<SubvolInfo>, BtrfsError> {
    let entries = fs::read_dir(dir).map_err(|e| BtrfsError::io("listing", dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| BtrfsError::io("listing", dir, e))?;
        let file_type = entry
            .file_type()
            .map_err(|e| BtrfsError::io("reading the type of", entry.path(), e))?;
        if !file_type.is_dir() {
            continue;
        }
        let path = entry.path();
        if is_subvolume(&path)? {
            out.push(subvolume_info(&path)?);
        }
    }
    sort_oldest_first(&mut out);
    Ok(out)
}

pub(crate) fn sort_oldest_first(snapshots: &mut [SubvolInfo]) {
    snapshots.sort_by(|a, b| {
        (a.created_generation, a.id, &a.name).cmp(&(b.created_generation, b.id, &b.name))
    });
}

/// Deletes the subvolume at `path` (`btrfs subvolume delete`). Only for hearth's own snapshots and
/// subvolumes proved unchanged; see docs/volume-btrfs.md.
pub fn delete_subvolume(path: &Path) -> Result<(), BtrfsError> {
    require_subvolume(path)?;
    run(&["subvolume".as_ref(), "delete".as_ref(), path.as_os_str()]).map(|_| ())
}

/// Makes the subvolume at `path` read-only (`btrfs property set -ts PATH ro true`).
pub fn set_readonly(path: &Path) -> Result<(), BtrfsError> {
    require_subvolume(path)?;
    run(&[
        "property".as_ref(),
        "set".as_ref(),
        "-ts".as_ref(),
        path.as_os_str(),
        "ro".as_ref(),
        "true".as_ref(),
    ])
    .map(|_| ())
}

/// Creates an empty subvolume at `path` (`btrfs subvolume create`); its parent folder must exist.
pub fn create_subvolume(path: &Path) -> Result<(), BtrfsError> {
    run(&["subvolume".as_ref(), "create".as_ref(), path.as_os_str()]).map(|_| ())
}

/// The argument of `BTRFS_IOC_SET_RECEIVED_SUBVOL` (`struct btrfs_ioctl_received_subvol_args` of
/// the kernel's `include/uapi/linux/btrfs.h`, 200 bytes on 64-bit Linux).
#[repr(C)]
struct ReceivedSubvolArgs {
    uuid: [u8; 16],
    stransid: u64,
    rtransid: u64,
    stime: IoctlTimespec,
    rtime: IoctlTimespec,
    flags: u64,
    reserved: [u64; 16],
}

/// `struct btrfs_ioctl_timespec`: seconds and nanoseconds, padded to 16 bytes.
#[repr(C)]
struct IoctlTimespec {
    sec: u64,
    nsec: u32,
}

// The layout is the kernel's ABI: a mismatch would make the ioctl number (which encodes the size)
// unknown to the kernel, so this check keeps a wrong struct from compiling at all.
const _: () = assert!(std::mem::size_of::<ReceivedSubvolArgs>() == 200);

const SET_RECEIVED_SUBVOL: rustix::ioctl::Opcode =
    rustix::ioctl::opcode::read_write::<ReceivedSubvolArgs>(0x94, 37);

/// Records on the writable subvolume at `path` that it is the received copy of the snapshot
/// `uuid` whose stream carried `stransid`, as `btrfs receive` does when a stream ends; then makes
/// it read-only. Afterwards `btrfs receive` finds it as the parent of incremental streams of that
/// snapshot, exactly like a subvolume it received itself.
///
/// This is the one ioctl hearth calls directly, and the one place with `unsafe` code in this
/// crate: btrfs-progs has no command that sets a received UUID (only `receive` does, at the end of
/// a stream), and hearth's first copy of a btrfs volume is written by the files backend, which
/// resumes where it stopped and writes each byte once, instead of by `btrfs receive`.
pub fn set_received(path: &Path, uuid: &str, stransid: u64) -> Result<(), BtrfsError> {
    let parsed = parse_uuid(uuid).ok_or_else(|| BtrfsError::InvalidName {
        name: uuid.to_string(),
        reason: "not a UUID",
    })?;
    let dir = open_subvolume(path)?;
    let mut args = ReceivedSubvolArgs {
        uuid: parsed,
        stransid,
        rtransid: 0,
        stime: IoctlTimespec { sec: 0, nsec: 0 },
        rtime: IoctlTimespec { sec: 0, nsec: 0 },
        flags: 0,
        reserved: [0; 16],
    };
    // SAFETY: `args` has the layout of the kernel's struct (checked by size above, field by field
    // from the uapi header), lives across the call, and the opcode encodes read-write access to
    // exactly that many bytes; the kernel writes only `rtransid` and `rtime` back.
    #[allow(unsafe_code)]
    let done = unsafe {
        rustix::ioctl::ioctl(
            &dir,
            rustix::ioctl::Updater::<SET_RECEIVED_SUBVOL, ReceivedSubvolArgs>::new(&mut args),
        )
    };
    done.map_err(|e| BtrfsError::io("recording the received UUID of", path, e.into()))?;
    set_readonly(path)
}

/// Opens the root folder of the subvolume at `path` for an ioctl, without following a symlink
/// there, and checks on the open folder that it is a subvolume's root (so nothing can be swapped
/// in between the check and the ioctl).
fn open_subvolume(path: &Path) -> Result<fs::File, BtrfsError> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let dir = fs::File::from(
        rustix::fs::open(path, flags, Mode::empty())
            .map_err(|e| BtrfsError::io("opening", path, e.into()))?,
    );
    let stat = rustix::fs::fstatfs(&dir)
        .map_err(|e| BtrfsError::io("checking the filesystem of", path, e.into()))?;
    if !is_btrfs(&stat) {
        return Err(BtrfsError::NotBtrfs { path: path.into() });
    }
    let meta = dir
        .metadata()
        .map_err(|e| BtrfsError::io("reading metadata of", path, e))?;
    if meta.ino() != SUBVOL_ROOT_INO {
        return Err(BtrfsError::NotASubvolume { path: path.into() });
    }
    Ok(dir)
}

/// The 16 bytes of a UUID written as btrfs prints it.
fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    if !is_uuid(s) {
        return None;
    }
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// Commits the filesystem's current transaction, so generation numbers reflect every write made so
/// far: `syncfs(2)`, which on btrfs writes back dirty data and commits, as `btrfs filesystem sync`
/// does, without starting a process.
pub fn sync_filesystem(path: &Path) -> Result<(), BtrfsError> {
    let dir = fs::File::open(path).map_err(|e| BtrfsError::io("opening", path, e))?;
    rustix::fs::syncfs(&dir)
        .map_err(|e| BtrfsError::io("syncing the filesystem of", path, e.into()))
}

/// How much data each of `paths` refers to, and how much of it no other file or snapshot shares
/// (`btrfs filesystem du -s --raw`). This needs no quotas, but it reads every file's extent map, so it
/// costs time in proportion to the number of files; call it for status, not on every sync.
pub fn exclusive_bytes(paths: &[PathBuf]) -> Result<Vec<SpaceUse>, BtrfsError> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let mut args: Vec<&OsStr> = vec![
        "filesystem".as_ref(),
        "du".as_ref(),
        "-s".as_ref(),
        "--raw".as_ref(),
    ];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    let text = run(&args)?;
    parse_du(paths, &command_line(&args), &text)
}

/// Parses `btrfs filesystem du -s --raw`: a header, then one line per path given, in order:
/// `Total Exclusive Set-shared Filename`.
pub(crate) fn parse_du(
    paths: &[PathBuf],
    command: &str,
    text: &str,
) -> Result<Vec<SpaceUse>, BtrfsError> {
    let bad = |reason: String| BtrfsError::Parse {
        command: command.into(),
        reason,
    };
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("Total"))
        .collect();
    if rows.len() != paths.len() {
        return Err(bad(format!(
            "{} row(s) for {} path(s)",
            rows.len(),
            paths.len()
        )));
    }
    rows.iter()
        .zip(paths)
        .map(|(row, path)| {
            let mut numbers = row.split_whitespace();
            let mut next = |what: &str| -> Result<u64, BtrfsError> {
                let field = numbers
                    .next()
                    .ok_or_else(|| bad(format!("no {what} in {row:?}")))?;
                if field == "-" {
                    return Ok(0);
                }
                field
                    .parse()
                    .map_err(|_| bad(format!("{what} is not a number in {row:?}")))
            };
            Ok(SpaceUse {
                path: path.clone(),
                total: next("total")?,
                exclusive: next("exclusive")?,
                set_shared: next("set shared")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW_RO: &str = "snaps/s1
\tName: \t\t\ts1
\tUUID: \t\t\tc13bc6b7-3ae2-1945-bcd4-32b50945c6e9
\tParent UUID: \t\t28c49e56-4e09-6d43-b905-8c5781dc62fd
\tReceived UUID: \t\t-
\tCreation time: \t\t2026-11-23 22:33:54 +0000
\tSubvolume ID: \t\t258
\tGeneration: \t\t7
\tGen at creation: \t7
\tParent ID: \t\t5
\tTop level ID: \t\t5
\tFlags: \t\t\treadonly
\tSend transid: \t\t0
\tSend time: \t\t2026-11-23 22:33:54 +0000
\tReceive transid: \t0
\tReceive time: \t\t-
\tSnapshot(s):
\t\t\t\tweird: name
";

    #[test]
    fn parses_subvolume_show() {
        let info = parse_show(Path::new("/m/snaps/s1"), "btrfs subvolume show", SHOW_RO).unwrap();
        assert_eq!(info.name, "s1");
        assert_eq!(info.fs_path.as_deref(), Some("snaps/s1"));
        assert_eq!(info.uuid, "c13bc6b7-3ae2-1945-bcd4-32b50945c6e9");
        assert_eq!(
            info.parent_uuid.as_deref(),
            Some("28c49e56-4e09-6d43-b905-8c5781dc62fd")
        );
        assert_eq!(info.received_uuid, None);
        assert_eq!(
            (info.generation, info.created_generation, info.id),
            (7, 7, 258)
        );
        assert!(info.readonly);
        assert_eq!(info.created.as_deref(), Some("2026-11-23 22:33:54 +0000"));
        assert_eq!(info.send_uuid(), info.uuid);
    }

    #[test]
    fn parses_writable_and_received_and_top_level() {
        let received = SHOW_RO
            .replace(
                "Received UUID: \t\t-",
                "Received UUID: \t\tAB2A3BD9-459F-434B-93BB-9132DCB8E475",
            )
            .replace("readonly", "-");
        let info = parse_show(Path::new("x"), "c", &received).unwrap();
        assert!(!info.readonly);
        assert_eq!(
            info.received_uuid.as_deref(),
            Some("ab2a3bd9-459f-434b-93bb-9132dcb8e475")
        );
        assert_eq!(info.send_uuid(), "ab2a3bd9-459f-434b-93bb-9132dcb8e475");
        let top = SHOW_RO.replacen("snaps/s1", "/", 1);
        assert_eq!(
            parse_show(Path::new("x"), "c", &top)
                .unwrap()
                .fs_path
                .as_deref(),
            Some("")
        );
    }

    #[test]
    fn rejects_malformed_show_output() {
        let cases = [
            ("", "no output"),
            ("x\n\tName: a\n", "no \"UUID\" line"),
            (
                &SHOW_RO.replace("\t7\n\tGen at", "\tseven\n\tGen at") as &str,
                "not a number",
            ),
            (&SHOW_RO.replace("c13bc6b7-", "zz") as &str, "not a UUID"),
            (
                &SHOW_RO.replace(
                    "\tUUID: \t\t\tc13bc6b7-3ae2-1945-bcd4-32b50945c6e9",
                    "\tUUID: -",
                ) as &str,
                "no UUID",
            ),
        ];
        for (text, want) in cases {
            let err = parse_show(Path::new("x"), "c", text).unwrap_err();
            assert!(matches!(err, BtrfsError::Parse { .. }), "{err}");
            assert!(err.to_string().contains(want), "{err} should say {want}");
        }
    }

    #[test]
    fn parses_nested_list() {
        let text = "ID 257 gen 7 top level 256 path vol/nested\nID 259 gen 9 top level 256 path vol/a b/c path d\n";
        let got = parse_list_below(Path::new("/m/vol"), "vol", "c", text).unwrap();
        assert_eq!(
            got,
            vec![
                PathBuf::from("/m/vol/a b/c path d"),
                PathBuf::from("/m/vol/nested")
            ]
        );
        // The top-level subvolume as the volume: paths are already relative to it.
        let got = parse_list_below(
            Path::new("/m"),
            "",
            "c",
            "ID 256 gen 7 top level 5 path <FS_TREE>/vol\n",
        )
        .unwrap();
        assert_eq!(got, vec![PathBuf::from("/m/vol")]);
        assert!(
            parse_list_below(Path::new("/m"), "", "c", "")
                .unwrap()
                .is_empty()
        );
        for bad in [
            "garbage\n",
            "ID 1 gen 1 top level 5 path other/x\n",
            "ID 1 gen 1 top level 5 path vol\n",
        ] {
            assert!(
                matches!(
                    parse_list_below(Path::new("/m/vol"), "vol", "c", bad),
                    Err(BtrfsError::Parse { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_du() {
        let text = "     Total   Exclusive  Set shared  Filename\n  1048576      4096   1044480  /m/s 1\n         0           0           -  /m/s2\n";
        let paths = [PathBuf::from("/m/s 1"), PathBuf::from("/m/s2")];
        let got = parse_du(&paths, "c", text).unwrap();
        assert_eq!(got[0].total, 1_048_576);
        assert_eq!(got[0].exclusive, 4096);
        assert_eq!(got[0].set_shared, 1_044_480);
        assert_eq!(got[1].path, paths[1]);
        assert_eq!(got[1].set_shared, 0);
        assert!(parse_du(&paths[..1], "c", text).is_err());
        assert!(parse_du(&paths[..1], "c", "Total\n x 1 2 /a\n").is_err());
    }

    #[test]
    fn uuid_shape_and_names() {
        assert!(is_uuid("c13bc6b7-3ae2-1945-bcd4-32b50945c6e9"));
        assert!(!is_uuid("c13bc6b7-3ae2-1945-bcd4-32b50945c6e"));
        assert!(!is_uuid("-"));
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name("2026-11-23T22:00:00Z.1").is_ok());
    }
}
