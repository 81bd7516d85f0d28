//! Large objects with bounded memory: replicas written with multipart uploads restore with hearth and with the
//! real Litestream 0.5.17, and a compaction of many inputs (streamed, sealed or plain) holds exactly the
//! pages of the database.

// Test helpers outside #[test] bodies unwrap too: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_sqlite::config::{DbConfig, ReplicaConfig, replica_from_url};
use hearth_sqlite::ltx::{
    Checksum, Decoder, Encoder, HEADER_FLAG_NO_CHECKSUM, Header, HearthChecksums, checksum_database,
};
use hearth_sqlite::plan::{CompactionPolicy, Maintenance, Target};
use hearth_sqlite::replica::Replica;
use hearth_sqlite::replicate::{ReplicateOptions, replicate_db};
use hearth_sqlite::restore::{RestoreOptions, RestoreOutcome, restore};
use hearth_sqlite::seal::Sealer;
use hearth_testkit::Garage;
use rusqlite::Connection;
use tokio::sync::watch;

mod common;
use common::{contents, open_writer};

const PAGE_SIZE: usize = 4096;

fn garage_replica(garage: &Garage, url: &str) -> ReplicaConfig {
    let key = garage.key_id.clone();
    let secret = garage.secret.clone();
    replica_from_url(url, &move |name: &str| match name {
        "LITESTREAM_ACCESS_KEY_ID" => Some(key.clone()),
        "LITESTREAM_SECRET_ACCESS_KEY" => Some(secret.clone()),
        _ => None,
    })
    .unwrap()
}

fn restore_opts(output: &Path) -> RestoreOptions {
    RestoreOptions {
        dry_run: false,
        target: Target::Latest,
        output: output.to_path_buf(),
        if_db_not_exists: false,
        if_replica_exists: false,
        parallelism: 4,
        progress: None,
    }
}

fn litestream_restore(garage: &Garage, url: &str, out: &Path) {
    let output = hearth_testkit::command(hearth_testkit::litestream_bin().unwrap())
        .args(["restore", "-o"])
        .arg(out)
        .arg(url)
        .env("LITESTREAM_ACCESS_KEY_ID", &garage.key_id)
        .env("LITESTREAM_SECRET_ACCESS_KEY", &garage.secret)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "litestream restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The whole replication path with the default part size: a 20 MiB database's first image goes up as a
/// multipart upload, and both tools restore it.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_larger_than_one_part_replicates_and_both_tools_restore_it() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("stream-big").unwrap();
    let url = garage.s3_url(&bucket, "big.db");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("big.db");
    let writer = open_writer(&db);
    for _ in 0..5 {
        writer
            .execute(
                "INSERT INTO t (v) SELECT randomblob(4000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 1000) SELECT x FROM c)",
                [],
            )
            .unwrap();
    }
    let mut cfg = DbConfig::new(db.clone(), vec![garage_replica(garage, &url)]);
    cfg.monitor_interval = Duration::from_millis(50);
    cfg.replicas[0].sync_interval = Duration::from_millis(50);
    let opts = ReplicateOptions {
        force: false,
        shutdown_budget: Duration::from_secs(10),
        policy: CompactionPolicy::default(),
        metrics: Default::default(),
    };
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(replicate_db(cfg.clone(), opts, rx));
    tokio::time::sleep(Duration::from_millis(800)).await;
    writer
        .execute("INSERT INTO t (v) VALUES (randomblob(100))", [])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    tx.send(true).unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.unflushed(), 0, "{report:?}");

    // The first image is larger than one 8 MiB part, so it went up in parts: S3 marks the etag of a
    // multipart object with `-<parts>`.
    let store = hearth_store::Store::open(&cfg.replicas[0].location).unwrap();
    let objects = store.list("").await.unwrap();
    let big = objects
        .iter()
        .find(|o| o.size > hearth_store::DEFAULT_PART_SIZE as u64)
        .unwrap_or_else(|| panic!("no object above one part: {objects:?}"));
    let head = store.head(&big.key).await.unwrap();
    assert!(
        head.etag.as_deref().is_some_and(|e| e.contains('-')),
        "{head:?}"
    );
    assert!(
        head.timestamp < SystemTime::now()
            && head.timestamp > SystemTime::now() - Duration::from_secs(120),
        "the LTX timestamp is on the multipart object: {head:?}"
    );

    let out = dir.path().join("hearth.db");
    let outcome = restore(&cfg.replicas, &restore_opts(&out)).await.unwrap();
    assert!(
        matches!(outcome, RestoreOutcome::Restored(ref r) if r.checksum_verified),
        "{outcome:?}"
    );
    let want = contents(&db);
    assert_eq!(want.len(), 5001);
    assert!(contents(&out) == want);
    let ls_out = dir.path().join("litestream.db");
    litestream_restore(garage, &url, &ls_out);
    assert!(contents(&ls_out) == want);
}

/// The pages of a database file, indexed from page 1.
fn pages(db: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(db).unwrap();
    assert_eq!(bytes.len() % PAGE_SIZE, 0);
    bytes.chunks(PAGE_SIZE).map(<[u8]>::to_vec).collect()
}

fn db_checksum(db: &Path) -> Checksum {
    checksum_database(std::fs::File::open(db).unwrap(), PAGE_SIZE as u32).unwrap()
}

/// Writes a level-0 file as capture does (no-checksum flag, hearth's checksums in the header): every page
/// of `now` for TXID 1, else the pages that differ from `before`.
fn write_level0(
    path: &Path,
    txid: u64,
    before: Option<(&[Vec<u8>], Checksum)>,
    now: &[Vec<u8>],
    post: Checksum,
) {
    let header = Header {
        flags: HEADER_FLAG_NO_CHECKSUM,
        page_size: PAGE_SIZE as u32,
        commit: now.len() as u32,
        min_txid: txid,
        max_txid: txid,
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
        pre_apply_checksum: Checksum::ZERO,
        wal_offset: 0,
        wal_size: 0,
        wal_salt1: 0,
        wal_salt2: 0,
        node_id: 0,
        hearth: Some(HearthChecksums {
            pre_apply: before.map_or(Checksum(0), |(_, c)| c),
            post_apply: post,
        }),
    };
    let file = std::fs::File::create(path).unwrap();
    let mut enc = Encoder::new(file, header).unwrap();
    for (i, page) in now.iter().enumerate() {
        let changed = match before {
            None => true,
            Some((old, _)) => old.get(i) != Some(page),
        };
        if changed {
            enc.write_page(i as u32 + 1, page).unwrap();
        }
    }
    enc.finish(Checksum::ZERO).unwrap();
}

/// Builds a database through `changes` transactions and writes one level-0 file per state (TXID 1 the full
/// image). Returns the level-0 files and the final database.
fn history(dir: &Path, changes: u64) -> (Vec<(u64, PathBuf)>, PathBuf) {
    let db = dir.join("src.db");
    let conn = Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA page_size = 4096; PRAGMA journal_mode = DELETE;
         CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);
         INSERT INTO t (v) SELECT randomblob(3000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 300) SELECT x FROM c);",
    )
    .unwrap();
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    let mut files = Vec::new();
    let mut prev = pages(&db);
    let mut prev_sum = db_checksum(&db);
    let first = local.join("1.ltx");
    write_level0(&first, 1, None, &prev, prev_sum);
    files.push((1, first));
    for txid in 2..=changes + 1 {
        // Some new rows at the end, and rewritten rows spread over the file, so inputs overlap.
        conn.execute_batch(&format!(
            "INSERT INTO t (v) SELECT randomblob(2000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 20) SELECT x FROM c);
             UPDATE t SET v = randomblob(3000) WHERE id % 17 = {};",
            txid % 17
        ))
        .unwrap();
        let now = pages(&db);
        let sum = db_checksum(&db);
        let path = local.join(format!("{txid}.ltx"));
        write_level0(&path, txid, Some((&prev, prev_sum)), &now, sum);
        files.push((txid, path));
        prev = now;
        prev_sum = sum;
    }
    (files, db)
}

/// Uploads a 13-file history with small parts, compacts it into level 1, checks the output page by page
/// against the database, then restores it.
async fn compact_many(replica_cfg: ReplicaConfig, sealer: Sealer, dir: &Path) -> Replica {
    let (local, db) = history(dir, 12);
    let meta = dir.join("meta");
    let policy = CompactionPolicy {
        levels: vec![Duration::from_millis(1)],
        ..CompactionPolicy::default()
    };
    let mut replica = Replica::open("r", &replica_cfg.location, &meta, policy, sealer)
        .await
        .unwrap();
    replica.set_part_size(256 * 1024);
    assert_eq!(replica.upload(&local, 13).await.unwrap(), 13);

    let done = replica
        .maintain(SystemTime::now() + Duration::from_secs(2))
        .await
        .unwrap();
    let compactions: Vec<(u8, usize, u64, u64)> = done
        .iter()
        .filter_map(|m| match m {
            Maintenance::Compact {
                level,
                inputs,
                min_txid,
                max_txid,
            } => Some((*level, inputs.len(), *min_txid, *max_txid)),
            Maintenance::Delete { .. } => None,
        })
        .collect();
    assert_eq!(compactions, [(1, 13, 1, 13)], "{done:?}");

    let want = pages(&db);
    let want_sum = db_checksum(&db);
    {
        let level = 1;
        let f = replica
            .files()
            .iter()
            .find(|f| f.level == level)
            .unwrap()
            .clone();
        let plain = replica.read_file(&f).await.unwrap();
        let mut dec = Decoder::new(&plain[..]).unwrap();
        let header = *dec.header();
        assert_eq!(
            replica.read_header(&f).await.unwrap(),
            header,
            "level {level}"
        );
        assert_eq!((header.min_txid, header.max_txid), (1, 13));
        assert_eq!(header.commit as usize, want.len());
        assert_eq!(header.hearth.map(|h| h.post_apply), Some(want_sum));
        let mut page = vec![0u8; PAGE_SIZE];
        let mut seen = 0;
        while let Some(pgno) = dec.next_page(&mut page).unwrap() {
            seen += 1;
            assert_eq!(pgno as usize, seen, "level {level}: every page, in order");
            assert!(
                page == want[pgno as usize - 1],
                "level {level}: page {pgno} differs from the database"
            );
        }
        assert_eq!(seen, want.len(), "level {level}");
        dec.finish().unwrap();
    }
    // Temporary files are gone.
    let left: Vec<_> = std::fs::read_dir(meta.join("replicas"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    let out = dir.join("restored.db");
    let outcome = restore(&[replica_cfg], &restore_opts(&out)).await.unwrap();
    assert!(
        matches!(outcome, RestoreOutcome::Restored(ref r) if r.checksum_verified),
        "{outcome:?}"
    );
    assert!(contents(&out) == contents(&db));
    replica
}

#[tokio::test(flavor = "multi_thread")]
async fn garage_multipart_compaction_of_many_inputs_restores_with_both_tools() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("stream-compact").unwrap();
    let url = garage.s3_url(&bucket, "app.db");
    let dir = tempfile::tempdir().unwrap();
    let cfg = garage_replica(garage, &url);
    let replica = compact_many(cfg, Sealer::default(), dir.path()).await;

    // The level-1 file and the full image at TXID 1 (each ~1 MiB) went up in 256 KiB parts.
    for f in replica.files().iter().filter(|f| f.min_txid == 1) {
        let key = replica.layout().ltx_key(f.level, f.min_txid, f.max_txid);
        let head = replica.store().head(&key).await.unwrap();
        assert!(f.size > 256 * 1024, "{f:?}");
        assert!(
            head.etag.as_deref().is_some_and(|e| e.contains('-')),
            "{key}: {head:?}"
        );
        assert_eq!(head.timestamp, f.timestamp, "{key}");
    }
    let ls_out = dir.path().join("litestream.db");
    litestream_restore(garage, &url, &ls_out);
    assert!(contents(&ls_out) == contents(&dir.path().join("src.db")));
}

#[tokio::test(flavor = "multi_thread")]
async fn sealed_compaction_of_many_inputs_streams_and_restores() {
    let dir = tempfile::tempdir().unwrap();
    let key = age::x25519::Identity::generate();
    let recipient = key.to_public().to_string();
    let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_string();
    let root = dir.path().join("replica");
    let mut cfg = replica_from_url(&format!("file://{}", root.display()), &|_| None).unwrap();
    cfg.age_recipients = vec![recipient.clone()];
    cfg.age_identities = vec![identity.clone()];
    let sealer = Sealer::new(&[recipient], &[identity]).unwrap();
    let replica = compact_many(cfg, sealer, dir.path()).await;
    // Every object is sealed: nothing readable as LTX in the store.
    for f in replica.files() {
        let key = replica.layout().ltx_key(f.level, f.min_txid, f.max_txid);
        let stored = replica.store().get(&key).await.unwrap();
        assert!(stored.starts_with(b"age-encryption.org/v1"), "{key}");
    }
}
