//! Btrfs filesystems on loop devices for tests (root only): made, mounted and cleaned up by the harness.
//!
//! [`BtrfsLoop::new`] makes a sparse image file in a temporary directory named
//! `hearth-btrfs-<pid>-<random>`, formats it with `mkfs.btrfs`, attaches it to a free loop device and
//! mounts it below the same directory. Dropping the value (also while a test panics and unwinds) unmounts
//! it (lazily when something still holds it open), detaches the loop device and removes the image. A test
//! process killed with SIGKILL cannot run its destructors, so [`BtrfsLoop::new`] first removes what dead
//! test processes left behind ([`cleanup_stale`]).
//!
//! Tests that use this should run one at a time within their test binary (a static `Mutex` in the test
//! file), so the number of loop devices in use stays bounded. Like the rest of the test kit this never
//! skips: without root or without btrfs-progs it fails with an error that says what to do.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, anyhow, bail};

/// Every temporary directory this module makes starts with this, followed by the owning process id.
const DIR_PREFIX: &str = "hearth-btrfs-";

/// The smallest image size accepted: mkfs.btrfs refuses much smaller devices.
pub const MIN_SIZE_MIB: u64 = 128;

/// A mounted btrfs filesystem on a loop device; unmounted, detached and removed when dropped.
#[derive(Debug)]
pub struct BtrfsLoop {
    /// The temporary directory holding the image and the mount point; Drop unmounts and detaches before
    /// removing it.
    dir: Option<tempfile::TempDir>,
    image: PathBuf,
    mount: PathBuf,
    /// The loop device (`/dev/loopN`) once attached.
    device: Option<String>,
    mounted: bool,
}

impl BtrfsLoop {
    /// Makes, formats and mounts a fresh btrfs filesystem of `size_mib` MiB (sparse, so it costs only
    /// what is written). Fails, never skips, when not run as root or when btrfs-progs is missing.
    pub fn new(size_mib: u64) -> Result<BtrfsLoop> {
        check_root()?;
        for tool in ["mkfs.btrfs", "btrfs", "losetup", "mount", "umount"] {
            check_tool(tool)?;
        }
        if size_mib < MIN_SIZE_MIB {
            bail!("BtrfsLoop::new needs at least {MIN_SIZE_MIB} MiB, not {size_mib}");
        }
        // Leftovers of killed test runs hold loop devices, of which there are few; a failure here must not
        // fail the test that happens to come next, so it is reported and the set-up goes on.
        if let Err(e) = cleanup_stale() {
            eprintln!("btrfs harness: could not clean up stale loop mounts: {e:#}");
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("creating the btrfs harness directory")?;
        let image = dir.path().join("image");
        let mount = dir.path().join("mnt");
        // Built up step by step so that, if a step fails, dropping the partial value undoes what was done.
        let mut fs = BtrfsLoop {
            dir: Some(dir),
            image,
            mount,
            device: None,
            mounted: false,
        };
        let file = std::fs::File::create(&fs.image).context("creating the btrfs image")?;
        file.set_len(size_mib * 1024 * 1024)
            .context("sizing the btrfs image")?;
        drop(file);
        run("mkfs.btrfs", &["-q".as_ref(), fs.image.as_os_str()])?;
        let device = run_output(
            "losetup",
            &["-f".as_ref(), "--show".as_ref(), fs.image.as_os_str()],
        )?;
        let device = device.trim().to_string();
        if !device.starts_with("/dev/loop") {
            bail!("unexpected output from `losetup -f --show`: {device:?}");
        }
        fs.device = Some(device.clone());
        std::fs::create_dir(&fs.mount).context("creating the mount point")?;
        run(
            "mount",
            &[
                "-t".as_ref(),
                "btrfs".as_ref(),
                device.as_ref(),
                fs.mount.as_os_str(),
            ],
        )?;
        fs.mounted = true;
        Ok(fs)
    }

    /// Where the filesystem is mounted.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The loop device the filesystem lives on (`/dev/loopN`).
    pub fn device(&self) -> &str {
        self.device.as_deref().unwrap_or_default()
    }

    /// Creates a btrfs subvolume at `path` (absolute, or relative to the mount point) and returns its path.
    pub fn create_subvolume(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        let path = self.mount.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        run(
            "btrfs",
            &["subvolume".as_ref(), "create".as_ref(), path.as_os_str()],
        )?;
        Ok(path)
    }

    /// Flushes the filesystem (`btrfs filesystem sync`), so generation numbers reflect every write.
    pub fn sync(&self) -> Result<()> {
        run(
            "btrfs",
            &[
                "filesystem".as_ref(),
                "sync".as_ref(),
                self.mount.as_os_str(),
            ],
        )
    }
}

impl Drop for BtrfsLoop {
    fn drop(&mut self) {
        // Errors are reported, not raised: Drop cannot fail, and a panic here during unwinding would abort.
        if self.mounted
            && let Err(e) = unmount(&self.mount)
        {
            eprintln!("btrfs harness: {e:#}");
        }
        if let Some(device) = self.device.take() {
            // On a device still in use (after a lazy unmount) the kernel turns this into "detach once the
            // last user is gone", so the device is never leaked.
            if let Err(e) = run("losetup", &["-d".as_ref(), device.as_ref()]) {
                eprintln!("btrfs harness: detaching {device}: {e:#}");
            }
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!("btrfs harness: removing the harness directory: {e}");
        }
    }
}

/// Unmounts `mount`, lazily if it is busy (a test left a file open or a process inside it).
fn unmount(mount: &Path) -> Result<()> {
    if run("umount", &[mount.as_os_str()]).is_ok() {
        return Ok(());
    }
    run("umount", &["-l".as_ref(), mount.as_os_str()])
        .with_context(|| format!("unmounting {}", mount.display()))
}

/// Removes what test processes that no longer run left behind: mounts below `/tmp/hearth-btrfs-<pid>-*`,
/// their loop devices and their directories. Only directories whose process is gone are touched, so tests
/// running in parallel in other processes are left alone.
pub fn cleanup_stale() -> Result<()> {
    let tmp = std::env::temp_dir();
    let entries = match std::fs::read_dir(&tmp) {
        Ok(entries) => entries,
        Err(e) => return Err(anyhow!(e).context(format!("listing {}", tmp.display()))),
    };
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        let mount = dir.join("mnt");
        // The mount point's path appears as the fifth field of its mountinfo line (spaces escaped as \040,
        // which our names never contain).
        let mounted = mountinfo
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*mount.to_string_lossy()));
        if mounted {
            unmount(&mount)?;
        }
        let image = dir.join("image");
        if image.exists() {
            let devices = run_output("losetup", &["-j".as_ref(), image.as_os_str()])?;
            for line in devices.lines() {
                if let Some(device) = line
                    .split(':')
                    .next()
                    .filter(|d| d.starts_with("/dev/loop"))
                {
                    run("losetup", &["-d".as_ref(), device.as_ref()])?;
                }
            }
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

fn check_root() -> Result<()> {
    if !euid_is_root()? {
        bail!(
            "btrfs on loop devices needs root: run these tests as root (as CI does), with btrfs-progs installed by scripts/install-deps"
        );
    }
    Ok(())
}

/// Reads the effective uid from `/proc/self/status`, which keeps this crate free of unsafe code and of a
/// dependency just for `geteuid`.
fn euid_is_root() -> Result<bool> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    Ok(euid == "0")
}

fn check_tool(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!(
            "{tool} not found: run scripts/install-deps as root (it installs btrfs-progs and mount)"
        );
    }
    Ok(())
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
    run_output(program, args).map(|_| ())
}

fn run_output(program: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let shown = || {
        let args: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
        format!("{program} {}", args.join(" "))
    };
    let output = crate::command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow!("{program} not found: run scripts/install-deps as root")
            } else {
                anyhow!(e).context(format!("running {}", shown()))
            }
        })?;
    if !output.status.success() {
        bail!(
            "`{}` failed with {}: {}",
            shown(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Loop devices are few; tests in this binary that use them take turns.
    static LOOPS: Mutex<()> = Mutex::new(());

    fn is_mounted(path: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        info.lines()
            .any(|l| l.split(' ').nth(4) == Some(&*path.to_string_lossy()))
    }

    fn attached(device: &str) -> bool {
        let out = run_output("losetup", &["-a".as_ref()]).unwrap();
        out.lines().any(|l| l.starts_with(&format!("{device}:")))
    }

    #[test]
    fn makes_a_usable_btrfs_and_removes_it_on_drop() {
        let _guard = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
        let fs = BtrfsLoop::new(256).unwrap();
        let mount = fs.mount().to_path_buf();
        let device = fs.device().to_string();
        assert!(is_mounted(&mount));
        assert!(attached(&device));
        let statfs = run_output(
            "stat",
            &[
                "-f".as_ref(),
                "-c".as_ref(),
                "%T".as_ref(),
                mount.as_os_str(),
            ],
        )
        .unwrap();
        assert_eq!(statfs.trim(), "btrfs");
        let sub = fs.create_subvolume("a/vol").unwrap();
        std::fs::write(sub.join("f"), b"x").unwrap();
        run(
            "btrfs",
            &["subvolume".as_ref(), "show".as_ref(), sub.as_os_str()],
        )
        .unwrap();
        fs.sync().unwrap();
        drop(fs);
        assert!(!is_mounted(&mount));
        assert!(!attached(&device));
        assert!(!mount.exists());
    }

    #[test]
    fn busy_mount_is_unmounted_lazily_and_the_device_freed() {
        let _guard = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
        let fs = BtrfsLoop::new(256).unwrap();
        let mount = fs.mount().to_path_buf();
        let device = fs.device().to_string();
        let open = std::fs::File::create(mount.join("held")).unwrap();
        drop(fs);
        assert!(!is_mounted(&mount));
        drop(open);
        // The kernel releases the filesystem, and autoclear then detaches the device, once the last file
        // is closed; give it a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while attached(&device) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(!attached(&device), "{device} is still attached");
    }

    #[test]
    fn panicking_test_does_not_leak_the_device() {
        let _guard = LOOPS.lock().unwrap_or_else(|e| e.into_inner());
        let result = std::panic::catch_unwind(|| {
            let fs = BtrfsLoop::new(256).unwrap();
            let device = fs.device().to_string();
            std::panic::panic_any(device);
        });
        let device = *result.unwrap_err().downcast::<String>().unwrap();
        assert!(!attached(&device), "{device} leaked after a panic");
    }

    #[test]
    fn refuses_tiny_images() {
        let err = BtrfsLoop::new(1).unwrap_err();
        assert!(format!("{err:#}").contains("at least"), "{err:#}");
    }
}
