//! End-to-end: replicate a live SQLite database to a file replica, then restore it with hearth and with the
//! real Litestream 0.5.17, and compare contents; plus the safety refusals around a replica's history.

// Test helpers outside #[test] bodies unwrap too: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_sqlite::config::{DbConfig, replica_from_url};
use hearth_sqlite::plan::{CompactionPolicy, Target};
use hearth_sqlite::replicate::{ReplicateOptions, replicate_db};
use hearth_sqlite::restore::{RestoreOptions, RestoreOutcome, restore};
use tokio::sync::watch;

mod common;
use common::{contents, litestream_replicate_while, open_writer};

fn no_env(_: &str) -> Option<String> {
    None
}

fn db_config(db: &Path, replica_dir: &Path) -> DbConfig {
    let replica = replica_from_url(&format!("file://{}", replica_dir.display()), &no_env).unwrap();
    let mut cfg = DbConfig::new(db.to_path_buf(), vec![replica]);
    cfg.monitor_interval = Duration::from_millis(50);
    cfg.replicas[0].sync_interval = Duration::from_millis(50);
    cfg
}

fn options() -> ReplicateOptions {
    ReplicateOptions {
        force: false,
        shutdown_budget: Duration::from_secs(4),
        policy: CompactionPolicy::default(),
        metrics: Default::default(),
    }
}

async fn replicate_while<F: FnOnce()>(
    cfg: DbConfig,
    opts: ReplicateOptions,
    work: F,
) -> hearth_sqlite::replicate::FlushReport {
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(replicate_db(cfg, opts, rx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    work();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.send(true).unwrap();
    task.await.unwrap().unwrap()
}

/// Restores the latest state of `replica_dir` beside `db` and checks it equals `db` by content.
async fn assert_latest_restore_equals(db: &Path, replica_dir: &Path) {
    let out = db.with_file_name("latest-restore.db");
    let _ = std::fs::remove_file(&out);
    restore(
        &db_config(db, replica_dir).replicas,
        &restore_opts(out.clone(), Target::Latest),
    )
    .await
    .unwrap();
    assert_eq!(contents(&out), contents(db));
}

fn restore_opts(output: PathBuf, target: Target) -> RestoreOptions {
    RestoreOptions {
        dry_run: false,
        target,
        output,
        if_db_not_exists: false,
        if_replica_exists: false,
        parallelism: 4,
        progress: None,
    }
}

fn litestream() -> PathBuf {
    let path = std::env::var_os("HEARTH_LITESTREAM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/hearth/litestream-venv/bin/litestream")
        });
    assert!(
        path.exists(),
        "Litestream 0.5.17 not found at {}: run scripts/install-deps",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn replicated_database_restores_with_hearth_and_litestream() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    writer
        .execute("INSERT INTO t (v) VALUES (randomblob(3000))", [])
        .unwrap();

    let report = replicate_while(db_config(&db, &replica_dir), options(), || {
        for _ in 0..200 {
            writer
                .execute("INSERT INTO t (v) VALUES (randomblob(500))", [])
                .unwrap();
        }
        writer
            .execute("DELETE FROM t WHERE id % 7 = 0", [])
            .unwrap();
    })
    .await;
    assert_eq!(report.unflushed(), 0, "{report:?}");
    assert!(report.captured >= 2, "{report:?}");
    let want = contents(&db);

    let out = dir.path().join("restored.db");
    let outcome = restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(out.clone(), Target::Latest),
    )
    .await
    .unwrap();
    let RestoreOutcome::Restored(restored) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(restored.checksum_verified);
    assert_eq!(restored.txid, report.captured);
    assert_eq!(contents(&out), want);

    // The real Litestream restores what hearth wrote.
    let ls_out = dir.path().join("litestream.db");
    let status = std::process::Command::new(litestream())
        .args(["restore", "-o"])
        .arg(&ls_out)
        .arg(format!("file://{}", replica_dir.display()))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(contents(&ls_out), want);

    // A point in time: TXID 1 holds only the first row.
    let first = dir.path().join("first.db");
    restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(first.clone(), Target::Txid(1)),
    )
    .await
    .unwrap();
    assert_eq!(contents(&first).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_continues_and_app_checkpoint_while_stopped_is_rebased() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    let first = replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'01')", [])
            .unwrap();
    })
    .await;

    // While hearth is stopped, the app writes and truncates the WAL into the database.
    writer
        .execute("INSERT INTO t (v) VALUES (x'02')", [])
        .unwrap();
    writer
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    writer
        .execute("INSERT INTO t (v) VALUES (x'03')", [])
        .unwrap();

    let second = replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'04')", [])
            .unwrap();
    })
    .await;
    assert!(second.captured > first.captured);
    assert_eq!(second.unflushed(), 0);

    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_database_is_refused_over_a_non_empty_replica() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let db = dir.path().join("app.db");
    let writer = open_writer(&db);
    replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'01')", [])
            .unwrap();
    })
    .await;

    // Another, empty database on the same replica path: refused, and the replica keeps its files.
    let other = dir.path().join("other.db");
    open_writer(&other);
    let (_tx, rx) = watch::channel(false);
    let err = replicate_db(db_config(&other, &replica_dir), options(), rx)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("no history"), "{msg}");
    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_tells_an_empty_replica_from_an_unreachable_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let empty = dir.path().join("empty-replica");
    let cfg = db_config(&db, &empty);
    let mut opts = restore_opts(db.clone(), Target::Latest);
    let err = restore(&cfg.replicas, &opts).await.unwrap_err();
    assert!(err.to_string().contains("no backup found"), "{err}");
    opts.if_replica_exists = true;
    assert_eq!(
        restore(&cfg.replicas, &opts).await.unwrap(),
        RestoreOutcome::NoReplica
    );
    assert!(
        !db.exists(),
        "nothing is written when there is nothing to restore"
    );

    // An unreachable S3 store is an error even with -if-replica-exists.
    let s3 = replica_from_url(
        "s3://bucket/db?endpoint=http://127.0.0.1:9&region=us-east-1",
        &|k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("x".into()),
            "AWS_SECRET_ACCESS_KEY" => Some("y".into()),
            _ => None,
        },
    )
    .unwrap();
    let err = restore(&[s3], &opts).await.unwrap_err();
    assert!(
        err.to_string().contains("no replica could be read"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_replicator_on_the_same_replica_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let db = dir.path().join("app.db");
    let writer = open_writer(&db);
    writer
        .execute("INSERT INTO t (v) VALUES (x'01')", [])
        .unwrap();

    let (stop_a, rx_a) = watch::channel(false);
    let a = tokio::spawn(replicate_db(db_config(&db, &replica_dir), options(), rx_a));
    tokio::time::sleep(Duration::from_millis(400)).await;

    // A rolling deploy: the new allocation restores the replica and starts replicating its copy.
    let copy = dir.path().join("copy.db");
    restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(copy.clone(), Target::Latest),
    )
    .await
    .unwrap();
    let (_stop_b, rx_b) = watch::channel(false);
    let err = replicate_db(db_config(&copy, &replica_dir), options(), rx_b)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another replicator"), "{err}");

    writer
        .execute("INSERT INTO t (v) VALUES (x'02')", [])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_a.send(true).unwrap();
    let report = a.await.unwrap().unwrap();
    assert_eq!(report.unflushed(), 0);
    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_database_continues_the_replica_history() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let db = dir.path().join("app.db");
    let writer = open_writer(&db);
    let first = replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'01')", [])
            .unwrap();
    })
    .await;

    // A new node: restore, then replicate the restored copy and write to it.
    let node2 = dir.path().join("node2.db");
    restore(
        &db_config(&node2, &replica_dir).replicas,
        &restore_opts(node2.clone(), Target::Latest),
    )
    .await
    .unwrap();
    let writer2 = open_writer(&node2);
    let second = replicate_while(db_config(&node2, &replica_dir), options(), || {
        writer2
            .execute("INSERT INTO t (v) VALUES (x'02')", [])
            .unwrap();
    })
    .await;
    assert!(second.captured > first.captured, "{first:?} {second:?}");
    let files = std::fs::read_dir(replica_dir.join("ltx/0"))
        .unwrap()
        .count();
    // Continuing the history adds small level-0 files; it does not upload the whole database again from TXID 1.
    assert!(files >= 3, "{files}");
    let out = dir.path().join("restored.db");
    restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(out.clone(), Target::Latest),
    )
    .await
    .unwrap();
    assert_eq!(contents(&out), contents(&node2));
    // The old point in time is still there.
    let old = dir.path().join("old.db");
    restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(old.clone(), Target::Txid(first.captured)),
    )
    .await
    .unwrap();
    assert_eq!(contents(&old).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn damaged_or_missing_replica_objects_fail_the_restore_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let replica_dir = dir.path().join("replica");
    let db = dir.path().join("app.db");
    let writer = open_writer(&db);
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(replicate_db(db_config(&db, &replica_dir), options(), rx));
    for i in 0..6 {
        writer
            .execute("INSERT INTO t (v) VALUES (zeroblob(?1))", [i])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let l0 = replica_dir.join("ltx/0");
    let mut names: Vec<String> = std::fs::read_dir(&l0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 3, "{names:?}");
    // The second-newest level-0 file: no compacted file covers it yet, so every restore needs it.
    let name = &names[names.len() - 2];

    // A flipped byte in the middle of a file.
    let victim = l0.join(name);
    let original = std::fs::read(&victim).unwrap();
    let mut damaged = original.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0xff;
    std::fs::write(&victim, &damaged).unwrap();
    let out = dir.path().join("out.db");
    let err = restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(out.clone(), Target::Latest),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains(name.as_str()), "{err}");
    assert!(
        !out.exists(),
        "a failed restore leaves nothing at the output path"
    );

    // The same file missing: a gap, named by TXID.
    std::fs::remove_file(&victim).unwrap();
    let err = restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(out.clone(), Target::Latest),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not contiguous"), "{err}");
    assert!(!out.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn hearth_restores_a_replica_written_by_litestream() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    writer
        .execute("INSERT INTO t (v) VALUES (randomblob(5000))", [])
        .unwrap();
    let config = dir.path().join("litestream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    replica:\n      url: file://{}\n      sync-interval: 100ms\n",
            db.display(),
            replica_dir.display()
        ),
    )
    .unwrap();
    litestream_replicate_while(&config, &[], || {
        for i in 0..50 {
            writer
                .execute("INSERT INTO t (v) VALUES (zeroblob(?1))", [i])
                .unwrap();
        }
    })
    .await;

    let out = dir.path().join("restored.db");
    let outcome = restore(
        &db_config(&db, &replica_dir).replicas,
        &restore_opts(out.clone(), Target::Latest),
    )
    .await
    .unwrap();
    let RestoreOutcome::Restored(r) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        !r.checksum_verified,
        "Litestream records no checksum; hearth must not claim a verified end state"
    );
    assert_eq!(contents(&out), contents(&db));
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_continuity_is_detected_with_its_reason_and_rebased() {
    type Disturb = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Disturb, &str)> = vec![
        (
            "the app checkpoints with TRUNCATE while hearth is stopped",
            Box::new(|db: &Path| {
                let c = open_writer(db);
                c.execute("INSERT INTO t (v) VALUES (x'aa')", []).unwrap();
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap();
            }),
            "WAL was checkpointed",
        ),
        (
            "the WAL is deleted while hearth is stopped",
            Box::new(|db: &Path| {
                let c = open_writer(db);
                c.execute("INSERT INTO t (v) VALUES (x'bb')", []).unwrap();
                // Closing the last connection checkpoints and deletes the WAL, as an app shutting down does.
                drop(c);
                assert!(!hearth_sqlite::capture::wal_path(db).exists());
            }),
            "WAL was checkpointed",
        ),
        (
            "the database file is replaced",
            Box::new(|db: &Path| {
                let other = db.with_file_name("other.db");
                let c = open_writer(&other);
                c.execute("INSERT INTO t (v) VALUES (x'cc')", []).unwrap();
                c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap();
                drop(c);
                std::fs::rename(&other, db).unwrap();
                let _ = std::fs::remove_file(hearth_sqlite::capture::wal_path(db));
            }),
            "database file was replaced",
        ),
    ];
    for (name, disturb, reason) in cases {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("app.db");
        let replica_dir = dir.path().join("replica");
        let writer = open_writer(&db);
        let first = replicate_while(db_config(&db, &replica_dir), options(), || {
            writer
                .execute("INSERT INTO t (v) VALUES (x'01')", [])
                .unwrap();
        })
        .await;
        drop(writer);
        disturb(&db);
        let second = replicate_while(db_config(&db, &replica_dir), options(), || {}).await;
        assert!(
            second.rebases.iter().any(|r| r.contains(reason)),
            "{name}: expected a rebase because {reason}, got {:?}",
            second.rebases
        );
        assert!(second.captured > first.captured, "{name}");
        let out = dir.path().join("restored.db");
        restore(
            &db_config(&db, &replica_dir).replicas,
            &restore_opts(out.clone(), Target::Latest),
        )
        .await
        .unwrap();
        assert_eq!(contents(&out), contents(&db), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_under_load_keep_every_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    let mut cfg = db_config(&db, &replica_dir);
    cfg.min_checkpoint_page_count = 20;
    let report = replicate_while(cfg, options(), || {
        for i in 0..400 {
            writer
                .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [200 + i])
                .unwrap();
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(120));
            }
        }
    })
    .await;
    assert!(
        report
            .rebases
            .iter()
            .all(|r| r.contains("no local history")),
        "{:?}",
        report.rebases
    );
    // hearth's checkpoints moved pages into the database file, so the WAL was restarted at least once.
    let db_size = std::fs::metadata(&db).unwrap().len();
    assert!(
        db_size > 100 * 1024,
        "database file is only {db_size} bytes: no checkpoint ran"
    );
    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_replicas_hide_the_data_and_need_the_identity_to_restore() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let key = age::x25519::Identity::generate();
    let recipient = key.to_public().to_string();
    let identity = age::secrecy::ExposeSecret::expose_secret(&key.to_string()).to_string();
    let mut cfg = db_config(&db, &replica_dir);
    cfg.replicas[0].age_recipients = vec![recipient.clone()];
    cfg.replicas[0].age_identities = vec![identity];

    let writer = open_writer(&db);
    writer
        .execute(
            "INSERT INTO t (v) VALUES (CAST('a secret row' AS BLOB))",
            [],
        )
        .unwrap();
    let report = replicate_while(cfg.clone(), options(), || {
        writer
            .execute(
                "INSERT INTO t (v) VALUES (CAST('another secret' AS BLOB))",
                [],
            )
            .unwrap();
    })
    .await;
    assert_eq!(report.unflushed(), 0);

    // No stored object shows LTX or the rows.
    let mut stack = vec![replica_dir.clone()];
    let mut objects = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "ltx") {
                let bytes = std::fs::read(&p).unwrap();
                assert!(
                    bytes.starts_with(b"age-encryption.org/v1"),
                    "{}",
                    p.display()
                );
                assert!(!bytes.windows(6).any(|w| w == b"secret"), "{}", p.display());
                objects += 1;
            }
        }
    }
    assert!(objects >= 2);

    let out = dir.path().join("restored.db");
    restore(&cfg.replicas, &restore_opts(out.clone(), Target::Latest))
        .await
        .unwrap();
    assert_eq!(contents(&out), contents(&db));

    // Without the identity the restore fails and says why.
    let mut no_key = cfg.replicas.clone();
    no_key[0].age_identities.clear();
    let out2 = dir.path().join("restored2.db");
    let err = restore(&no_key, &restore_opts(out2.clone(), Target::Latest))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no age identity"), "{err}");
    assert!(!out2.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn truncate_checkpoints_shrink_the_wal_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    let mut cfg = db_config(&db, &replica_dir);
    cfg.min_checkpoint_page_count = 20;
    cfg.truncate_page_n = 40;
    let mut smallest_wal = u64::MAX;
    let report = replicate_while(cfg, options(), || {
        for i in 0..300 {
            writer
                .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [1000 + i])
                .unwrap();
            if i % 30 == 0 {
                std::thread::sleep(Duration::from_millis(150));
                // Only after the WAL has grown past the TRUNCATE threshold once does a small WAL prove anything.
                if i >= 90 {
                    let wal = std::fs::metadata(hearth_sqlite::capture::wal_path(&db))
                        .map_or(0, |m| m.len());
                    smallest_wal = smallest_wal.min(wal);
                }
            }
        }
    })
    .await;
    // Any rebase must name its reason; a TRUNCATE race is allowed (the writer never pauses), silence is not.
    for r in &report.rebases {
        assert!(
            r.contains("no local history") || r.contains("truncated the WAL"),
            "{r}"
        );
    }
    assert!(
        smallest_wal < 40 * 4096,
        "the WAL was never truncated: smallest size seen {smallest_wal}"
    );
    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_database_costs_no_store_request() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = hearth_sqlite::metrics::Metrics::register(&mut registry);
    let mut opts = options();
    opts.metrics = metrics.clone();
    // Fast compaction so that maintenance work, if any were left, would show within the test.
    opts.policy.levels = vec![Duration::from_millis(100)];
    opts.policy.l0_retention = Duration::from_millis(100);
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(replicate_db(db_config(&db, &replica_dir), opts, rx));
    for i in 0..5 {
        writer
            .execute("INSERT INTO t (v) VALUES (zeroblob(?1))", [i])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let total = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with("hearth_sqlite_store_requests_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    let busy = total();
    assert!(busy > 0.0, "the writes must have cost requests");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        total(),
        busy,
        "requests were made while the database was idle"
    );
    tx.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_database_is_restored_from_parts_and_leaves_no_spool() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    // About 40 MB of incompressible rows: the first image is one LTX file well above the part size.
    writer.execute_batch("BEGIN").unwrap();
    for _ in 0..400 {
        writer
            .execute("INSERT INTO t (v) VALUES (randomblob(100000))", [])
            .unwrap();
    }
    writer.execute_batch("COMMIT").unwrap();
    let report = replicate_while(db_config(&db, &replica_dir), options(), || {}).await;
    assert_eq!(report.unflushed(), 0);
    let biggest = std::fs::read_dir(replica_dir.join("ltx/0"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(
        biggest > 32 << 20,
        "the test needs a file of several parts, got {biggest} bytes"
    );
    assert_latest_restore_equals(&db, &replica_dir).await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("hearth-restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_added_later_is_seeded_with_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let first_dir = dir.path().join("first");
    let second_dir = dir.path().join("second");
    let writer = open_writer(&db);
    replicate_while(db_config(&db, &first_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'01')", [])
            .unwrap();
    })
    .await;

    // The user adds a second replica to the configuration.
    let mut both = db_config(&db, &first_dir);
    both.replicas
        .push(db_config(&db, &second_dir).replicas.remove(0));
    both.replicas[1].name = "second".into();
    let report = replicate_while(both, options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'02')", [])
            .unwrap();
    })
    .await;
    assert_eq!(report.unflushed(), 0, "{report:?}");
    assert!(
        second_dir.join("ltx/9").exists(),
        "the new replica starts with a snapshot"
    );

    // Each replica alone restores the whole database, with hearth and with Litestream.
    for replica in [&first_dir, &second_dir] {
        assert_latest_restore_equals(&db, replica).await;
    }
    let ls_out = dir.path().join("litestream.db");
    let status = std::process::Command::new(litestream())
        .args(["restore", "-o"])
        .arg(&ls_out)
        .arg(format!("file://{}", second_dir.display()))
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(contents(&ls_out), contents(&db));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_restart_of_app_and_replicator_continues_without_a_full_image() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'01')", [])
            .unwrap();
    })
    .await;
    // The app shuts down too: its last connection checkpoints into the database file and removes the WAL.
    drop(writer);
    let writer = open_writer(&db);
    let second = replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'02')", [])
            .unwrap();
    })
    .await;
    assert!(second.rebases.is_empty(), "{:?}", second.rebases);
    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_continues_from_the_newest_level_0_file_past_the_saved_state() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    // The app keeps running across the replicator's restart, so its WAL (and hearth's place in it) stays.
    let writer = open_writer(&db);
    let first = replicate_while(db_config(&db, &replica_dir), options(), || {
        for v in 0..3 {
            writer
                .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [100 + v])
                .unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    })
    .await;
    // `state.json` was written with the first full image only; the captures after it are recorded by their
    // level-0 files alone.
    let meta = hearth_sqlite::capture::meta_dir(&db);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(meta.join("state.json")).unwrap()).unwrap();
    let saved_txid = saved["txid"].as_u64().unwrap();
    assert!(
        saved_txid < first.captured,
        "state.json at TXID {saved_txid}, captures reached {}",
        first.captured
    );
    let (state, newer) = hearth_sqlite::capture::read_state(&meta).unwrap().unwrap();
    assert_eq!(state.txid, first.captured);
    assert!(newer.is_some());

    let second = replicate_while(db_config(&db, &replica_dir), options(), || {
        writer
            .execute("INSERT INTO t (v) VALUES (x'42')", [])
            .unwrap();
    })
    .await;
    assert!(second.rebases.is_empty(), "{:?}", second.rebases);
    assert!(second.captured > first.captured);
    assert_latest_restore_equals(&db, &replica_dir).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uploaded_level_0_files_are_written_over_by_later_captures_and_cut_to_size() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let replica_dir = dir.path().join("replica");
    let writer = open_writer(&db);
    replicate_while(db_config(&db, &replica_dir), options(), || {
        // Large captures first, so that the spares the small ones are written into are longer than them.
        for size in [40_000, 40_000, 40_000, 10, 10, 10, 10] {
            writer
                .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [size])
                .unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    })
    .await;
    let names: Vec<String> = std::fs::read_dir(hearth_sqlite::capture::meta_dir(&db).join("ltx/0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with(".spare-")),
        "uploaded files are kept as spares: {names:?}"
    );
    assert!(
        names.len() <= 2 + 2,
        "at most two spares and the newest files: {names:?}"
    );
    // Every file on the replica passed through a recycled file; a byte left over from a longer one would
    // break its checksum and the restore.
    assert_latest_restore_equals(&db, &replica_dir).await;
}
