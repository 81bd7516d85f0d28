//! Replication against a real S3 store (Garage 2.5.0), both ways with the real Litestream 0.5.17.

// Test helpers outside #[test] bodies unwrap too: a failed step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use hearth_sqlite::config::{DbConfig, ReplicaConfig, replica_from_url};
use hearth_sqlite::plan::{CompactionPolicy, Target};
use hearth_sqlite::replicate::{ReplicateOptions, replicate_db};
use hearth_sqlite::restore::{RestoreOptions, RestoreOutcome, restore};
use hearth_testkit::Garage;
use tokio::sync::watch;

mod common;
use common::{contents, litestream_replicate_while, open_writer};

fn replica(garage: &Garage, url: &str, secret: &str) -> ReplicaConfig {
    let key = garage.key_id.clone();
    let secret = secret.to_string();
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

#[tokio::test(flavor = "multi_thread")]
async fn hearth_writes_garage_and_both_tools_restore() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("hearth-s3").unwrap();
    let url = garage.s3_url(&bucket, "apps/app.db");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let writer = open_writer(&db);
    writer
        .execute("INSERT INTO t (v) VALUES (randomblob(20000))", [])
        .unwrap();

    let mut cfg = DbConfig::new(db.clone(), vec![replica(garage, &url, &garage.secret)]);
    cfg.monitor_interval = Duration::from_millis(50);
    cfg.replicas[0].sync_interval = Duration::from_millis(50);
    let opts = ReplicateOptions {
        force: false,
        shutdown_budget: Duration::from_secs(4),
        policy: CompactionPolicy::default(),
        metrics: Default::default(),
    };
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(replicate_db(cfg.clone(), opts, rx));
    for i in 0..100 {
        writer
            .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [i * 10])
            .unwrap();
        if i % 25 == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.send(true).unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.unflushed(), 0, "{report:?}");

    let out = dir.path().join("hearth.db");
    let outcome = restore(&cfg.replicas, &restore_opts(&out)).await.unwrap();
    assert!(
        matches!(outcome, RestoreOutcome::Restored(ref r) if r.checksum_verified),
        "{outcome:?}"
    );
    assert_eq!(contents(&out), contents(&db));

    let ls_out = dir.path().join("litestream.db");
    let output = hearth_testkit::command(hearth_testkit::litestream_bin().unwrap())
        .args(["restore", "-o"])
        .arg(&ls_out)
        .arg(&url)
        .env("LITESTREAM_ACCESS_KEY_ID", &garage.key_id)
        .env("LITESTREAM_SECRET_ACCESS_KEY", &garage.secret)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "litestream restore failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(contents(&ls_out), contents(&db));
}

#[tokio::test(flavor = "multi_thread")]
async fn hearth_restores_what_litestream_wrote_to_garage() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("litestream-s3").unwrap();
    let url = garage.s3_url(&bucket, "app.db");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    let writer = open_writer(&db);
    writer
        .execute("INSERT INTO t (v) VALUES (randomblob(20000))", [])
        .unwrap();
    let config = dir.path().join("litestream.yml");
    std::fs::write(
        &config,
        format!(
            "dbs:\n  - path: {}\n    replica:\n      type: s3\n      bucket: {bucket}\n      path: app.db\n      endpoint: {}\n      region: {}\n      force-path-style: true\n      sync-interval: 100ms\n",
            db.display(),
            garage.endpoint,
            garage.region
        ),
    )
    .unwrap();
    let envs = [
        ("LITESTREAM_ACCESS_KEY_ID", garage.key_id.as_str()),
        ("LITESTREAM_SECRET_ACCESS_KEY", garage.secret.as_str()),
    ];
    litestream_replicate_while(&config, &envs, || {
        for i in 0..50 {
            writer
                .execute("INSERT INTO t (v) VALUES (randomblob(?1))", [i])
                .unwrap();
        }
    })
    .await;

    let out = dir.path().join("restored.db");
    let outcome = restore(
        &[replica(garage, &url, &garage.secret)],
        &restore_opts(&out),
    )
    .await
    .unwrap();
    assert!(
        matches!(outcome, RestoreOutcome::Restored(ref r) if !r.checksum_verified),
        "{outcome:?}"
    );
    assert_eq!(contents(&out), contents(&db));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_and_missing_buckets_are_errors_not_empty_replicas() {
    let garage = Garage::shared().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.db");
    let mut opts = restore_opts(&out);
    opts.if_replica_exists = true;

    let bucket = garage.new_bucket("creds").unwrap();
    let wrong = replica(garage, &garage.s3_url(&bucket, "db"), "not-the-secret");
    let err = restore(&[wrong], &opts).await.unwrap_err().to_string();
    assert!(err.contains("access denied"), "{err}");

    let missing = replica(
        garage,
        &garage.s3_url("no-such-bucket-here", "db"),
        &garage.secret,
    );
    let err = restore(&[missing], &opts).await.unwrap_err().to_string();
    assert!(err.contains("bucket does not exist"), "{err}");
    assert!(!out.exists());

    // A reachable, truly empty replica is the one case -if-replica-exists accepts quietly.
    let empty = replica(garage, &garage.s3_url(&bucket, "db"), &garage.secret);
    assert_eq!(
        restore(&[empty], &opts).await.unwrap(),
        RestoreOutcome::NoReplica
    );
}
