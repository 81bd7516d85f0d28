//! Quick measurement, not a test: how long capture, diff, chunk transfer and apply take for a tree
//! of about 20,000 small files and 1 GB in total, for a first sync, a sync after 1 % of the files
//! changed, and a sync with no change.
//!
//! Run: `cargo run --release -p hearth-volume --example measure -- [--fsync-each-chunk] [WORK_DIR]`
//! (WORK_DIR defaults to a fresh directory under /tmp and is removed at the end). The chunk store
//! uses `Durability::Batch` with one `sync()` after the transfer unless `--fsync-each-chunk`.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hearth_volume::{
    CaptureCache, CaptureOptions, ChunkStore, Durability, apply, capture, missing_chunks,
    prune_previous, read_chunk,
};
use rand::{RngCore, SeedableRng, rngs::StdRng};

const SMALL_FILES: usize = 20_000;
const LARGE_FILES: usize = 10;
const LARGE_SIZE: usize = 95 * 1024 * 1024;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let each = args.iter().any(|a| a == "--fsync-each-chunk");
    let given = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from);
    let durability = if each {
        Durability::EachChunk
    } else {
        Durability::Batch
    };
    let work = given.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("hearth-measure-{}", std::process::id()))
    });
    fs::create_dir_all(&work)?;
    let src = work.join("src");
    let live = work.join("standby/live");
    fs::create_dir_all(work.join("standby"))?;
    let store = ChunkStore::open_with(&work.join("store"), durability)?;
    println!("chunk store durability: {durability:?}");

    let mut rng = StdRng::seed_from_u64(1);
    let t = Instant::now();
    let mut total = 0u64;
    for i in 0..SMALL_FILES {
        let dir = src.join(format!("d{:03}/e{:02}", i % 200, i % 7));
        fs::create_dir_all(&dir)?;
        let mut buf = vec![0u8; 512 + (rng.next_u32() % 4096) as usize];
        rng.fill_bytes(&mut buf);
        total += buf.len() as u64;
        fs::write(dir.join(format!("f{i}.dat")), &buf)?;
    }
    for i in 0..LARGE_FILES {
        let mut buf = vec![0u8; LARGE_SIZE];
        rng.fill_bytes(&mut buf);
        total += buf.len() as u64;
        fs::write(src.join(format!("large{i}.bin")), &buf)?;
    }
    println!(
        "made {} files, {:.2} GB, in {:.1?}",
        SMALL_FILES + LARGE_FILES,
        total as f64 / 1e9,
        t.elapsed()
    );
    // Let the racy-timestamp margin pass so the capture cache can be used in later passes.
    std::thread::sleep(CaptureCacheMargin::get());

    println!(
        "pass          capture      diff  transfer     apply     total  files-read  sent-MB  reused  cloned"
    );
    let mut cache: Option<CaptureCache> = None;
    for pass in ["first", "1% changed", "no change"] {
        if pass == "1% changed" {
            for i in (0..SMALL_FILES).step_by(100) {
                let path = src.join(format!("d{:03}/e{:02}/f{i}.dat", i % 200, i % 7));
                fs::write(path, format!("changed {i}"))?;
            }
            let big = src.join("large0.bin");
            let f = fs::OpenOptions::new().write(true).open(big)?;
            std::os::unix::fs::FileExt::write_all_at(&f, b"a small edit", 50_000_000)?;
        }
        let t0 = Instant::now();
        let cap = capture(&src, &CaptureOptions::default(), cache.as_ref())?;
        let t1 = Instant::now();
        let plan = missing_chunks(&cap.manifest, &store.index()?);
        let t2 = Instant::now();
        for want in &plan.wants {
            store.put(&want.id, &read_chunk(&src, want)?)?;
        }
        store.sync()?;
        let t3 = Instant::now();
        let applied = apply(&store, &cap.manifest, &live)?;
        let t4 = Instant::now();
        println!(
            "{pass:<11} {:>9.2?} {:>9.2?} {:>9.2?} {:>9.2?} {:>9.2?} {:>11} {:>8.1} {:>7} {:>7}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t4 - t0,
            cap.report.files_read,
            plan.bytes as f64 / 1e6,
            applied.reused,
            applied.cloned
        );
        prune_previous(&live, 0)?;
        cache = Some(cap.cache);
    }
    if given.is_none() {
        fs::remove_dir_all(&work)?;
    }
    Ok(())
}

/// The capture cache's racy margin plus a little.
struct CaptureCacheMargin;

impl CaptureCacheMargin {
    fn get() -> Duration {
        Duration::from_nanos(CaptureCache::RACY_MARGIN_NS as u64) + Duration::from_millis(100)
    }
}
