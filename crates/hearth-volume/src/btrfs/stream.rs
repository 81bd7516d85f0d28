//! `btrfs send` and `btrfs receive` as async processes: the primary reads a send stream from
//! [`SendStream`], the standby feeds one into [`receive`], which checks that the stream is whole before it
//! lets `btrfs receive` finish, and cleans up what interrupted receives leave ([`clean_partial_receives`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::process::{Child, ChildStdout};

use super::error::BtrfsError;
use super::tool::{self, SubvolInfo};

/// The magic at the start of every send stream, including its terminating NUL.
const STREAM_MAGIC: &[u8; 13] = b"btrfs-stream\0";
/// Magic plus the little-endian `u32` stream version.
const STREAM_HEADER_LEN: usize = 17;
/// Every command starts with `u32 length, u16 command, u32 crc32c`, little-endian.
const CMD_HEADER_LEN: usize = 10;
/// `BTRFS_SEND_C_END`, the command the kernel writes last.
const CMD_END: u16 = 21;

/// A capture of a child process's standard error (or output): an anonymous in-memory file rather than a pipe, so a
/// chatty child can never block on a full pipe while we are busy with its standard output, and no
/// background task is needed to drain it.
struct OutputCapture {
    file: File,
}

impl OutputCapture {
    fn new() -> Result<OutputCapture, BtrfsError> {
        let fd = rustix::fs::memfd_create("hearth-btrfs-stderr", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| BtrfsError::io("creating a buffer for", "btrfs stderr", e.into()))?;
        Ok(OutputCapture {
            file: File::from(fd),
        })
    }

    fn stdio(&self) -> Result<Stdio, BtrfsError> {
        let clone = self
            .file
            .try_clone()
            .map_err(|e| BtrfsError::io("duplicating", "btrfs stderr buffer", e))?;
        Ok(Stdio::from(clone))
    }

    /// Everything the child wrote so far (lossy UTF-8, trimmed). Errors read as an empty text: this is only
    /// used to explain another outcome.
    fn text(&mut self) -> String {
        let mut buf = Vec::new();
        if self.file.seek(SeekFrom::Start(0)).is_ok() {
            let _ = self.file.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).trim().to_string()
    }
}

fn spawn(
    args: &[&std::ffi::OsStr],
    stdin: Stdio,
    stdout: Stdio,
) -> Result<(Child, OutputCapture), BtrfsError> {
    let stderr = OutputCapture::new()?;
    let child = tokio::process::Command::from(tool::base_command())
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr.stdio()?)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BtrfsError::ToolMissing {
            program: tool::BTRFS.into(),
            source,
        })?;
    Ok((child, stderr))
}

/// A running `btrfs send`: read the stream from it ([`AsyncRead`]) to its end, then call
/// [`SendStream::finish`] for the verdict. Dropping it kills the process.
pub struct SendStream {
    child: Child,
    stdout: Option<ChildStdout>,
    stderr: OutputCapture,
    command: String,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream")
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

/// Starts `btrfs send [-p parent] snapshot`. Both must be read-only subvolumes on the same filesystem; the
/// standby must hold `parent` (see [`super::choose_parent`]).
pub fn send(snapshot: &SubvolInfo, parent: Option<&SubvolInfo>) -> Result<SendStream, BtrfsError> {
    for s in std::iter::once(snapshot).chain(parent) {
        if !s.readonly {
            return Err(BtrfsError::NotReadOnly {
                path: s.path.clone(),
            });
        }
    }
    let mut args: Vec<&std::ffi::OsStr> = vec!["send".as_ref()];
    if let Some(p) = parent {
        args.push("-p".as_ref());
        args.push(p.path.as_os_str());
    }
    args.push(snapshot.path.as_os_str());
    let command = tool::command_line(&args);
    let (mut child, stderr) = spawn(&args, Stdio::null(), Stdio::piped())?;
    let stdout = child.stdout.take();
    if stdout.is_none() {
        return Err(BtrfsError::Parse {
            command,
            reason: "the process has no standard output".into(),
        });
    }
    Ok(SendStream {
        child,
        stdout,
        stderr,
        command,
    })
}

impl SendStream {
    /// Waits for `btrfs send` to exit and turns a failure into [`BtrfsError::Command`] with its stderr.
    /// Call it after reading the stream to its end: the stream's pipe is closed first, so a sender that
    /// still had data to write fails instead of waiting forever.
    pub async fn finish(mut self) -> Result<(), BtrfsError> {
        drop(self.stdout.take());
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| BtrfsError::io("waiting for", "btrfs send", e))?;
        if status.success() {
            Ok(())
        } else {
            Err(BtrfsError::Command {
                command: self.command.clone(),
                status,
                stderr: self.stderr.text(),
            })
        }
    }

    /// Kills `btrfs send` (a cancelled sync) and waits for it to be gone.
    pub async fn cancel(mut self) -> Result<(), BtrfsError> {
        drop(self.stdout.take());
        self.child
            .kill()
            .await
            .map_err(|e| BtrfsError::io("killing", "btrfs send", e))
    }

    /// The process id of `btrfs send`, while it runs (for logs and tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl AsyncRead for SendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut().stdout.as_mut() {
            Some(stdout) => Pin::new(stdout).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Follows the framing of a send stream as it passes, to tell a whole stream from one cut short.
///
/// Written here rather than left to `btrfs receive` because receive accepts a stream that stops exactly
/// between two commands as if it were complete (it finalises the subvolume at end of input, with or
/// without the end command), so a transfer cut at the wrong moment would be taken for a whole snapshot.
/// Only the framing is followed; the commands' checksums are checked by `btrfs receive` itself.
#[derive(Debug, Default)]
pub(crate) struct StreamCheck {
    header: Vec<u8>,
    cmd: Vec<u8>,
    payload_left: u64,
    ended: bool,
    commands: u64,
}

impl StreamCheck {
    /// Takes the next bytes of the stream; fails as soon as the framing is wrong.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            if self.header.len() < STREAM_HEADER_LEN {
                let take = (STREAM_HEADER_LEN - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.header.len() == STREAM_HEADER_LEN && &self.header[..13] != STREAM_MAGIC {
                    return Err("does not start with the btrfs-stream magic".into());
                }
                continue;
            }
            if self.payload_left > 0 {
                let take = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.payload_left -= take as u64;
                bytes = &bytes[take..];
                continue;
            }
            if self.ended {
                return Err("has data after its end command".into());
            }
            let take = (CMD_HEADER_LEN - self.cmd.len()).min(bytes.len());
            self.cmd.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.cmd.len() == CMD_HEADER_LEN {
                let len = u32::from_le_bytes([self.cmd[0], self.cmd[1], self.cmd[2], self.cmd[3]]);
                let cmd = u16::from_le_bytes([self.cmd[4], self.cmd[5]]);
                self.cmd.clear();
                self.commands += 1;
                self.payload_left = u64::from(len);
                if cmd == CMD_END {
                    self.ended = true;
                }
            }
        }
        Ok(())
    }

    /// The verdict at end of input: whole only when the last command was the end command, complete.
    pub(crate) fn finish(&self) -> Result<(), String> {
        if self.header.is_empty() {
            Err("is empty".into())
        } else if self.header.len() < STREAM_HEADER_LEN {
            Err("ended inside its header".into())
        } else if !self.cmd.is_empty() || self.payload_left > 0 {
            Err(format!(
                "was cut short inside command {}",
                self.commands + u64::from(self.cmd.is_empty())
            ))
        } else if !self.ended {
            Err(format!(
                "was cut short after {} command(s), before its end command",
                self.commands
            ))
        } else {
            Ok(())
        }
    }
}

/// Receives one send stream from `reader` into `staging_dir` (`btrfs receive -C`, confined to that folder
/// with chroot so a stream cannot write anywhere else) and returns the new snapshot, which is read-only
/// and carries a received UUID.
///
/// The stream is checked to be whole (see `StreamCheck`) before `btrfs receive` sees its end; a stream
/// that is cut short, fails to read, or that receive rejects (a corrupted command fails its checksum)
/// leaves a partial subvolume in `staging_dir`, which [`clean_partial_receives`] removes. Dropping the
/// future kills the receive.
pub async fn receive<R: AsyncRead + Unpin>(
    staging_dir: &Path,
    mut reader: R,
) -> Result<SubvolInfo, BtrfsError> {
    let meta = std::fs::metadata(staging_dir)
        .map_err(|e| BtrfsError::io("opening the staging folder", staging_dir, e))?;
    if !meta.is_dir() {
        return Err(BtrfsError::io(
            "opening the staging folder",
            staging_dir,
            std::io::Error::from(std::io::ErrorKind::NotADirectory),
        ));
    }
    // Fails early with NotBtrfs when the staging folder is on another filesystem.
    tool::is_subvolume(staging_dir)?;
    let args: [&std::ffi::OsStr; 3] = ["receive".as_ref(), "-C".as_ref(), staging_dir.as_os_str()];
    let command = tool::command_line(&args);
    // Its standard output goes to the same capture as its errors: btrfs-progs prints "At subvol" on one
    // and "At snapshot" on the other, depending on the version.
    let capture = OutputCapture::new()?;
    let (mut child, mut stderr) = spawn(&args, Stdio::piped(), capture.stdio()?)?;
    let mut stdout_capture = capture;
    let mut stdin = child.stdin.take();
    let mut check = StreamCheck::default();
    // Whether receive took the whole stream; it may only succeed if it did.
    let mut fed_all = true;
    let mut buf = vec![0u8; 256 * 1024];
    // The outcome of feeding: Ok(()) when the input ended and the stream is whole.
    let fed: Result<(), BtrfsError> = loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            Err(source) => break Err(BtrfsError::StreamRead { source }),
        };
        if n == 0 {
            break check
                .finish()
                .map_err(|reason| BtrfsError::BadStream { reason });
        }
        if let Err(reason) = check.feed(&buf[..n]) {
            break Err(BtrfsError::BadStream { reason });
        }
        let Some(pipe) = stdin.as_mut() else {
            break Ok(());
        };
        if pipe.write_all(&buf[..n]).await.is_err() {
            // receive stopped reading: it failed, and its exit status below says why.
            stdin = None;
            fed_all = false;
            break Ok(());
        }
    };
    if let Err(e) = fed {
        // Kill before closing its input, so receive never sees an end of input and never finalises what it
        // has as a complete snapshot.
        let _ = child.kill().await;
        return Err(e);
    }
    drop(stdin);
    let status = child
        .wait()
        .await
        .map_err(|e| BtrfsError::io("waiting for", "btrfs receive", e))?;
    let said = format!("{}\n{}", stderr.text(), stdout_capture.text())
        .trim()
        .to_string();
    if !status.success() {
        return Err(BtrfsError::Command {
            command,
            status,
            stderr: said,
        });
    }
    if !fed_all {
        return Err(BtrfsError::IncompleteReceive {
            path: staging_dir.into(),
            reason: format!("btrfs receive stopped reading before the end of the stream: {said}"),
        });
    }
    let name = received_name(&said).ok_or_else(|| BtrfsError::Parse {
        command: command.clone(),
        reason: format!("no \"At subvol\" or \"At snapshot\" line in {said:?}"),
    })?;
    let path = staging_dir.join(name);
    let info = tool::subvolume_info(&path)?;
    if !info.readonly || info.received_uuid.is_none() {
        return Err(BtrfsError::IncompleteReceive {
            path,
            reason: "the subvolume is not read-only or has no received UUID".into(),
        });
    }
    Ok(info)
}

/// The name `btrfs receive` reports for the subvolume it made: its last `At subvol NAME` (full stream)
/// or `At snapshot NAME` (incremental) line.
pub(crate) fn received_name(stderr: &str) -> Option<&str> {
    stderr
        .lines()
        .filter_map(|l| {
            l.strip_prefix("At subvol ")
                .or_else(|| l.strip_prefix("At snapshot "))
        })
        .map(str::trim)
        .rfind(|n| tool::check_name(n).is_ok())
}

/// Deletes the subvolumes in `staging_dir` that an interrupted or failed receive left: writable ones, or
/// ones without a received UUID. The staging folder belongs to hearth and holds only what it receives, so
/// these are hearth's own partial incoming data, never user data. Returns the deleted paths.
pub fn clean_partial_receives(staging_dir: &Path) -> Result<Vec<PathBuf>, BtrfsError> {
    let mut deleted = Vec::new();
    for s in tool::list_snapshots(staging_dir)? {
        if !s.readonly || s.received_uuid.is_none() {
            tool::delete_subvolume(&s.path)?;
            deleted.push(s.path);
        }
    }
    Ok(deleted)
}

/// The received UUIDs of the whole snapshots in `staging_dir`: what the standby reports to the primary so
/// that it can choose a parent. Oldest first.
pub fn received_uuids(staging_dir: &Path) -> Result<Vec<String>, BtrfsError> {
    Ok(tool::list_snapshots(staging_dir)?
        .into_iter()
        .filter(|s| s.readonly)
        .filter_map(|s| s.received_uuid)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0, 0]);
        v.extend_from_slice(payload);
        v
    }

    fn stream() -> Vec<u8> {
        let mut s = STREAM_MAGIC.to_vec();
        s.extend_from_slice(&1u32.to_le_bytes());
        s.extend(cmd(1, b"subvol-attrs"));
        s.extend(cmd(15, &[7u8; 300]));
        s.extend(cmd(CMD_END, b""));
        s
    }

    fn check_in_pieces(bytes: &[u8], piece: usize) -> Result<(), String> {
        let mut c = StreamCheck::default();
        for chunk in bytes.chunks(piece.max(1)) {
            c.feed(chunk)?;
        }
        c.finish()
    }

    #[test]
    fn whole_stream_passes_in_any_pieces() {
        let s = stream();
        for piece in [1, 3, 10, 17, 64, 4096] {
            check_in_pieces(&s, piece).unwrap();
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let s = stream();
        for cut in 0..s.len() {
            assert!(
                check_in_pieces(&s[..cut], 7).is_err(),
                "cut at {cut} passed"
            );
        }
    }

    #[test]
    fn framing_errors() {
        let mut s = stream();
        s[0] = b'X';
        assert!(check_in_pieces(&s, 5).unwrap_err().contains("magic"));
        let mut s = stream();
        s.extend(cmd(1, b"x"));
        assert!(
            check_in_pieces(&s, 5)
                .unwrap_err()
                .contains("after its end")
        );
        // A stream cut exactly between commands: what `btrfs receive` alone would accept.
        let s = stream();
        let cut = s.len() - CMD_HEADER_LEN;
        assert!(
            check_in_pieces(&s[..cut], 5)
                .unwrap_err()
                .contains("before its end command")
        );
    }

    #[test]
    fn received_name_cases() {
        let cases = [
            ("Chroot to /s\nAt subvol s1\n", Some("s1")),
            ("At snapshot s2", Some("s2")),
            ("At subvol a\nAt snapshot b\n", Some("b")),
            ("ERROR: x", None),
            ("At subvol ../evil", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(received_name(text), want, "{text:?}");
        }
    }
}
