//! Test helpers: an independent tree checker (plain `std::fs`, `lseek` and the `xattr` crate,
//! no code from the crate under test) and a local sync that runs the crate's pipeline end to end.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use std::collections::BTreeMap as StandbyVolumes;
use std::path::PathBuf;
use std::time::Duration;

use hearth_volume::metrics::Metrics;
use hearth_volume::net::identity::Identity;
use hearth_volume::primary::Target;
use hearth_volume::standby::{ServeConfig, serve};
use hearth_volume::state::{self, StandbyState, VolumeDirs};
use tokio::net::TcpListener;

use hearth_volume::{
    ApplyReport, Capture, CaptureCache, CaptureOptions, ChunkStore, Manifest, apply, apply_whole,
    capture, missing_chunks, read_chunk,
};

/// Everything about one path that replication must preserve.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: Vec<u8>,
    /// Data regions as reported by SEEK_DATA / SEEK_HOLE.
    pub data_map: Vec<(u64, u64)>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A whole tree: nodes by relative path, plus the hard-link groups (sets of paths sharing an
/// inode, only groups of two or more).
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: BTreeMap<Vec<u8>, Node>,
    pub links: BTreeSet<Vec<Vec<u8>>>,
}

fn data_map(file: &File, size: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{SeekFrom, seek};
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Ok(start) = seek(file, SeekFrom::Data(pos)) else {
            break;
        };
        if start >= size {
            break;
        }
        let end = seek(file, SeekFrom::Hole(start)).unwrap().min(size);
        out.push((start, end));
        pos = end;
    }
    out
}

pub fn snapshot(root: &Path) -> Snapshot {
    let mut nodes = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![Vec::<u8>::new()];
    while let Some(rel) = stack.pop() {
        let abs = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(std::ffi::OsStr::from_bytes(&rel))
        };
        let md = fs::symlink_metadata(&abs).unwrap();
        let ft = md.file_type();
        let mut node = Node {
            kind: String::new(),
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            content: vec![],
            data_map: vec![],
            xattrs: vec![],
        };
        if ft.is_dir() {
            node.kind = "dir".into();
            for child in fs::read_dir(&abs).unwrap() {
                let child = child.unwrap();
                let mut p = rel.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(child.file_name().as_bytes());
                stack.push(p);
            }
        } else if ft.is_file() {
            node.kind = "file".into();
            node.content = fs::read(&abs).unwrap();
            node.data_map = data_map(&File::open(&abs).unwrap(), md.size());
            if md.nlink() > 1 {
                inodes.entry(md.ino()).or_default().push(rel.clone());
            }
        } else if ft.is_symlink() {
            node.kind = "symlink".into();
            node.mode = 0;
            node.content = fs::read_link(&abs).unwrap().as_os_str().as_bytes().to_vec();
        } else if ft.is_fifo() {
            node.kind = "fifo".into();
        } else if ft.is_char_device() {
            node.kind = format!("char {}", md.rdev());
        } else {
            node.kind = "other".into();
        }
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(&abs)
            .unwrap()
            .map(|n| {
                let v = xattr::get(&abs, &n).unwrap().unwrap_or_default();
                (n.as_bytes().to_vec(), v)
            })
            .collect();
        xattrs.sort();
        node.xattrs = xattrs;
        nodes.insert(rel, node);
    }
    let links = inodes
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Snapshot { nodes, links }
}

/// Asserts two trees are equal and says where they first differ.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let keys_a: Vec<_> = sa.nodes.keys().collect();
    let keys_b: Vec<_> = sb.nodes.keys().collect();
    assert_eq!(
        keys_a
            .iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>(),
        keys_b
            .iter()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>(),
        "paths differ"
    );
    for (path, node) in &sa.nodes {
        let other = &sb.nodes[path];
        if node != other {
            let strip = |n: &Node| {
                format!(
                    "kind={} mode={:o} uid={} gid={} mtime={:?} len={} map={:?} xattrs={:?}",
                    n.kind,
                    n.mode,
                    n.uid,
                    n.gid,
                    n.mtime,
                    n.content.len(),
                    n.data_map,
                    n.xattrs
                )
            };
            panic!(
                "{:?} differs:\n  source {}\n  target {}\n  same content: {}",
                String::from_utf8_lossy(path),
                strip(node),
                strip(other),
                node.content == other.content
            );
        }
    }
    assert_eq!(sa.links, sb.links, "hard-link groups differ");
}

/// One local sync through the whole pipeline, the manifest going through its encoding as it
/// would over the network.
pub fn sync(
    src: &Path,
    store: &ChunkStore,
    live: &Path,
    cache: Option<&CaptureCache>,
) -> (Capture, ApplyReport, u64) {
    sync_with(src, store, live, cache, apply)
}

/// [`sync`], always building the whole tree beside the live one ([`apply_whole`]).
pub fn sync_whole(
    src: &Path,
    store: &ChunkStore,
    live: &Path,
    cache: Option<&CaptureCache>,
) -> (Capture, ApplyReport, u64) {
    sync_with(src, store, live, cache, apply_whole)
}

type ApplyFn = fn(&ChunkStore, &Manifest, &Path) -> Result<ApplyReport, hearth_volume::VolumeError>;

fn sync_with(
    src: &Path,
    store: &ChunkStore,
    live: &Path,
    cache: Option<&CaptureCache>,
    apply: ApplyFn,
) -> (Capture, ApplyReport, u64) {
    let cap = capture(src, &CaptureOptions::default(), cache).unwrap();
    let plan = missing_chunks(&cap.manifest, &store.index().unwrap());
    for want in &plan.wants {
        let data = read_chunk(src, want).unwrap();
        store.put(&want.id, &data).unwrap();
    }
    let manifest = Manifest::decode(&cap.manifest.encode().unwrap()).unwrap();
    let report = apply(store, &manifest, live).unwrap();
    (cap, report, plan.bytes)
}

/// Whether user xattrs work in `dir`, and whether its filesystem is one that must support them.
pub fn user_xattrs(dir: &Path) -> (bool, bool) {
    let probe = dir.join(".xattr-probe");
    fs::write(&probe, b"").unwrap();
    let ok = xattr::set(&probe, "user.probe", b"1").is_ok();
    fs::remove_file(&probe).unwrap();
    let st = rustix::fs::statfs(dir).unwrap();
    const EXT4: i64 = 0xEF53;
    const TMPFS: i64 = 0x0102_1994;
    let must = matches!(st.f_type as i64, EXT4 | TMPFS);
    (ok, must)
}

/// A standby served in this process on loopback, stopped by [`Standby::stop`].
pub struct Standby {
    pub addr: String,
    pub identity: Identity,
    pub live: PathBuf,
    pub state: PathBuf,
    pub metrics: Metrics,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Standby {
    /// Serves volume `v` at `live` (its parent is created), with state in `state`, for the
    /// primaries in `allowed`, keeping `keep` replaced trees.
    pub async fn start(
        live: PathBuf,
        state: PathBuf,
        allowed: &[&Identity],
        keep: usize,
    ) -> Standby {
        Self::start_with(live, state, allowed, keep, true).await
    }

    /// [`Standby::start`], with or without copies of full btrfs streams (`serve --no-resume-copy`).
    pub async fn start_with(
        live: PathBuf,
        state: PathBuf,
        allowed: &[&Identity],
        keep: usize,
        resume_copies: bool,
    ) -> Standby {
        Self::start_config(live, state, allowed, keep, |c| {
            c.resume_copies = resume_copies
        })
        .await
    }

    /// [`Standby::start`], with the configuration changed by `tweak`.
    pub async fn start_config(
        live: PathBuf,
        state: PathBuf,
        allowed: &[&Identity],
        keep: usize,
        tweak: impl FnOnce(&mut ServeConfig),
    ) -> Standby {
        let identity = Identity::generate().unwrap();
        fs::create_dir_all(live.parent().unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut config = ServeConfig {
            identity: identity.clone(),
            allowed: allowed.iter().map(|i| i.id()).collect(),
            volumes: StandbyVolumes::from([("v".to_string(), live.clone())]),
            state_dir: state.clone(),
            keep,
            resume_copies: true,
            in_place: true,
            timeout: Duration::from_secs(20),
            hold_chunks_max: hearth_volume::standby::DEFAULT_HOLD_CHUNKS_MAX,
        };
        tweak(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics = Metrics::default();
        let served = metrics.clone();
        let task = tokio::spawn(async move {
            serve(
                listener,
                config,
                served,
                async {
                    let _ = stopped.await;
                },
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        });
        Standby {
            addr,
            identity,
            live,
            state,
            metrics,
            stop: Some(stop),
            task,
        }
    }

    pub fn target(&self) -> Target {
        Target {
            addr: self.addr.clone(),
            id: self.identity.id(),
        }
    }

    pub fn state(&self) -> StandbyState {
        state::load(&VolumeDirs::new(&self.state, "v").standby()).unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap();
    }
}

/// A TCP relay that forwards both ways and, after `cut_after` bytes from the client, either
/// drops the connection or flips one byte and goes on.
pub async fn relay(upstream: String, cut_after: usize, flip: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let mut server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut seen = 0usize;
                    let mut buf = vec![0u8; 16384];
                    loop {
                        let n = tokio::io::AsyncReadExt::read(&mut cr, &mut buf)
                            .await
                            .unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        if seen + n > cut_after {
                            if !flip {
                                break;
                            }
                            let at = cut_after.saturating_sub(seen).min(n - 1);
                            if seen <= cut_after {
                                buf[at] ^= 0x40;
                            }
                        }
                        seen += n;
                        if tokio::io::AsyncWriteExt::write_all(&mut sw, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    addr
}

/// `n` bytes from a seeded generator: incompressible data that differs between calls and seeds, so
/// transfers of it cannot be shortened by compression or deduplication, and the same on every run.
pub fn random_bytes(rng: &mut impl rand::RngCore, n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    rng.fill_bytes(&mut data);
    data
}

/// A generator for [`random_bytes`] that gives the same bytes on every run.
pub fn seeded(seed: u64) -> rand::rngs::StdRng {
    rand::SeedableRng::seed_from_u64(seed)
}
