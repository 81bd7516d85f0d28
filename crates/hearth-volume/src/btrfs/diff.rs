//! Telling "only read on this host" from "changed on this host" for a replaced live subvolume whose
//! generation moved.
//!
//! Reading a file on btrfs with the default `relatime` mount option updates its access time once when
//! the access time is older than the change time, which is always so for files made by `btrfs receive`
//! (receive sets access and modification times, the kernel sets the change time to the time of receive).
//! An access-time update is a change to the subvolume and moves its generation, so the generation alone
//! would call every standby copy that anyone read (a backup, `hearth volume verify`) diverged. To tell the
//! two apart, hearth asks btrfs itself for the difference between the received snapshot the live copy
//! was made from and the replaced copy, without file data (`btrfs send --no-data -p SOURCE REPLACED |
//! btrfs receive --dump`): the copy is unchanged when that difference holds nothing but `utimes` commands
//! whose modification and change times equal the source's, i.e. only access times moved. Anything else
//! (a write, a new or removed name, a mode, owner or xattr change) counts as changed.

use std::ffi::OsString;
use std::io::{Seek, SeekFrom};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::error::BtrfsError;
use super::tool;

/// One `utimes` command of a dump: the path below the subvolume and the times in seconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Utimes {
    pub(crate) path: PathBuf,
    pub(crate) mtime: i64,
    pub(crate) ctime: i64,
}

/// Reads a `btrfs receive --dump` text. Returns the `utimes` commands when every command is a `utimes`
/// (besides the leading `snapshot`), and `None` as soon as anything else appears or a line cannot be read,
/// which the caller treats as "changed".
pub(crate) fn utimes_only(dump: &str) -> Option<Vec<Utimes>> {
    let mut out = Vec::new();
    for (i, line) in dump.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let tokens = tokenize(line);
        let (cmd, path) = (tokens.first()?, tokens.get(1)?);
        match cmd.as_str() {
            "snapshot" if i == 0 => continue,
            "utimes" => {}
            _ => return None,
        }
        let path = unescape(path)?;
        // Paths are `./<subvolume name>/<path inside>`; the subvolume's own root is `./<name>/`.
        let inside = {
            let bytes = path.into_vec();
            let rest = bytes.strip_prefix(b"./")?;
            let slash = rest.iter().position(|&b| b == b'/');
            match slash {
                Some(at) => rest[at + 1..].to_vec(),
                None => Vec::new(),
            }
        };
        let field = |key: &str| {
            tokens[2..]
                .iter()
                .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
                .and_then(parse_time)
        };
        out.push(Utimes {
            path: PathBuf::from(OsString::from_vec(inside)),
            mtime: field("mtime")?,
            ctime: field("ctime")?,
        });
    }
    Some(out)
}

/// Splits a dump line at whitespace that is not escaped with a backslash; escapes are kept.
fn tokenize(line: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            current.push(c);
            if let Some(next) = chars.next() {
                current.push(next);
            }
        } else if c.is_whitespace() {
            if !current.is_empty() {
                tokens.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

/// Undoes btrfs-progs' path escaping in dumps: `\a \b \e \f \n \r \t \v`, `\ `, `\\` and three-digit
/// octal for other unprintable bytes.
fn unescape(s: &str) -> Option<OsString> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let next = *bytes.get(i + 1)?;
        let (byte, used) = match next {
            b'a' => (0x07, 2),
            b'b' => (0x08, 2),
            b'e' => (0x1b, 2),
            b'f' => (0x0c, 2),
            b'n' => (b'\n', 2),
            b'r' => (b'\r', 2),
            b't' => (b'\t', 2),
            b'v' => (0x0b, 2),
            b' ' => (b' ', 2),
            b'\\' => (b'\\', 2),
            b'0'..=b'7' => {
                let digits = bytes.get(i + 1..i + 4)?;
                let text = std::str::from_utf8(digits).ok()?;
                (u8::from_str_radix(text, 8).ok()?, 4)
            }
            _ => return None,
        };
        out.push(byte);
        i += used;
    }
    Some(OsString::from_vec(out))
}

/// Parses `2026-11-23T22:44:25+0000` (strftime `%FT%T%z`) into seconds since the epoch.
fn parse_time(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if rest.len() != 13 {
        return None;
    }
    let (time, zone) = rest.split_at(8);
    let mut t = time.splitn(3, ':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let sign = match zone.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let zh: i64 = zone.get(1..3)?.parse().ok()?;
    let zm: i64 = zone.get(3..5)?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    Some(
        days_from_civil(y, m, day) * 86_400 + hh * 3600 + mm * 60 + ss
            - sign * (zh * 3600 + zm * 60),
    )
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (Howard Hinnant's algorithm;
/// written out because a date library for one conversion would be a heavier dependency than these lines).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Whether the read-only subvolume `replaced` differs from the read-only snapshot `source` in access
/// times only. Any failure to find out counts as "no" (the caller then keeps the subvolume aside).
pub(crate) fn only_access_times_changed(
    source: &Path,
    replaced: &Path,
) -> Result<bool, BtrfsError> {
    let send_args: [&std::ffi::OsStr; 6] = [
        "send".as_ref(),
        "-q".as_ref(),
        "--no-data".as_ref(),
        "-p".as_ref(),
        source.as_os_str(),
        replaced.as_os_str(),
    ];
    // The stream goes through an anonymous in-memory file rather than a pipe: `btrfs receive --dump`
    // stops reading at the end command, and `btrfs send` could then die of SIGPIPE on its last write,
    // which would read as a failure. Without data the stream is small (about a hundred bytes per changed
    // file).
    let fd = rustix::fs::memfd_create("hearth-btrfs-diff", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| BtrfsError::io("creating a buffer for", "btrfs send --no-data", e.into()))?;
    let mut buffer = std::fs::File::from(fd);
    let for_send = buffer
        .try_clone()
        .map_err(|e| BtrfsError::io("duplicating", "btrfs send buffer", e))?;
    let sent = tool::base_command()
        .args(send_args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(for_send))
        .output()
        .map_err(|source| BtrfsError::ToolMissing {
            program: tool::BTRFS.into(),
            source,
        })?;
    if !sent.status.success() {
        return Err(BtrfsError::Command {
            command: tool::command_line(&send_args),
            status: sent.status,
            stderr: String::from_utf8_lossy(&sent.stderr).trim().to_string(),
        });
    }
    buffer
        .seek(SeekFrom::Start(0))
        .map_err(|e| BtrfsError::io("rewinding", "btrfs send buffer", e))?;
    let dump = tool::base_command()
        .args(["receive", "--dump"])
        // A fixed zone, so the printed times are read back exactly.
        .env("TZ", "UTC0")
        .stdin(Stdio::from(buffer))
        .stderr(Stdio::null())
        .output()
        .map_err(|source| BtrfsError::ToolMissing {
            program: tool::BTRFS.into(),
            source,
        })?;
    if !dump.status.success() {
        return Ok(false);
    }
    let text = String::from_utf8_lossy(&dump.stdout);
    let Some(utimes) = utimes_only(&text) else {
        return Ok(false);
    };
    for u in utimes {
        let Ok(meta) = std::fs::symlink_metadata(source.join(&u.path)) else {
            return Ok(false);
        };
        // The subvolume's root directory is the one renamed in and out by hearth's own exchanges, and a
        // rename sets the change time of the renamed directory; so its change time is not compared. A
        // real change in it (a name added or removed, a mode) appears as its own command anyway.
        let ctime_moved = meta.ctime() != u.ctime && !u.path.as_os_str().is_empty();
        if meta.mtime() != u.mtime || ctime_moved {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ATIME_ONLY: &str = "snapshot        ./live                          uuid=e7eb39c3-4a23-4042-9a3f-b41187dc7ba0 transid=11 parent_uuid=f549f740-62e1-d64c-a4bf-f5aa3517c645 parent_transid=10
utimes          ./live/dir/a\\ b                 atime=2026-11-23T22:44:26+0000 mtime=2026-11-23T22:44:25+0000 ctime=2026-11-23T22:44:25+0000
utimes          ./live/                         atime=2026-11-23T22:44:26+0000 mtime=2026-11-23T22:44:25+0000 ctime=2026-11-23T22:44:25+0100
";

    #[test]
    fn reads_utimes_only_dumps() {
        let got = utimes_only(ATIME_ONLY).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].path, PathBuf::from("dir/a b"));
        assert_eq!(got[0].mtime, 1_795_473_865);
        assert_eq!(got[0].ctime, 1_795_473_865);
        assert_eq!(got[1].path, PathBuf::from(""));
        assert_eq!(got[1].ctime, 1_795_473_865 - 3600);
        assert_eq!(utimes_only("").unwrap(), vec![]);
    }

    #[test]
    fn anything_but_utimes_is_a_change() {
        for extra in [
            "chmod           ./live/dir/a\\ b                 mode=600",
            "update_extent   ./live/c                        offset=0 len=7",
            "mkfile          ./live/o260-13-0",
            "unlink          ./live/c",
            "set_xattr       ./live/c                        name=user.x data=y len=1",
            "utimes          ./live/c                        atime=2026-11-23T22:44:26+0000 mtime=bad ctime=2026-11-23T22:44:25+0000",
            "utimes          ./live/c\\q                      atime=x mtime=2026-11-23T22:44:25+0000 ctime=2026-11-23T22:44:25+0000",
            "snapshot        ./again                         uuid=x",
        ] {
            let dump = format!("{ATIME_ONLY}{extra}\n");
            assert_eq!(utimes_only(&dump), None, "{extra}");
        }
    }

    #[test]
    fn unescapes_like_btrfs_progs() {
        assert_eq!(
            unescape("a\\ b\\\\c\\n\\303\\251").unwrap(),
            OsString::from("a b\\c\né")
        );
        assert_eq!(unescape("plain").unwrap(), OsString::from("plain"));
        assert!(unescape("bad\\").is_none());
        assert!(unescape("bad\\9").is_none());
        assert!(unescape("short\\30").is_none());
    }

    #[test]
    fn parses_times() {
        assert_eq!(parse_time("1970-01-01T00:00:00+0000"), Some(0));
        assert_eq!(parse_time("2000-03-01T00:00:00+0000"), Some(951_868_800));
        assert_eq!(parse_time("1970-01-01T01:00:00+0100"), Some(0));
        assert_eq!(parse_time("1969-12-31T23:00:00-0100"), Some(0));
        for bad in [
            "",
            "2026-11-23",
            "2026-13-01T00:00:00+0000",
            "2026-11-23T22:44:25Z",
            "2026-11-23T22:44:25+00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
