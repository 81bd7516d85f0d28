//! Streaming writes and reads of large objects (multipart uploads to a real Garage 2.5.0, and the file
//! backend), and the once-per-bucket conditional-write probe.

// Helpers outside #[test] functions unwrap too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hearth_store::{Location, PutOptions, PutOutcome, Store, StoreError};
use hearth_testkit::Garage;

mod common;
use common::garage_location;

const MIB: usize = 1024 * 1024;

fn random_file(dir: &Path, name: &str, size: usize) -> PathBuf {
    let mut data = vec![0u8; size];
    rand::fill(&mut data[..]);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    path
}

fn stamp() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
}

fn with_stamp() -> PutOptions {
    PutOptions {
        timestamp: Some(stamp()),
        ..Default::default()
    }
}

/// How many incomplete multipart uploads Garage holds in `bucket` (its CLI prints the line only when
/// there are some).
fn unfinished_uploads(garage: &Garage, bucket: &str) -> u64 {
    let info = garage.cli(&["bucket", "info", bucket]).unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("Unfinished uploads:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn garage_round_trips_a_multipart_object_with_its_timestamp() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("multipart").unwrap();
    let store = Store::open(&garage_location(garage, &bucket, "db")).unwrap();
    assert_eq!(store.part_size(), hearth_store::DEFAULT_PART_SIZE);
    let dir = tempfile::tempdir().unwrap();

    // 40 MiB in 8 MiB parts: create, five parts, complete.
    let big = random_file(dir.path(), "big", 40 * MIB);
    let outcome = store.put_file("ltx/big", &big, with_stamp()).await.unwrap();
    assert!(
        matches!(outcome, PutOutcome::Written { etag: Some(_) }),
        "{outcome:?}"
    );
    let stats = store.stats();
    assert_eq!(stats.puts, 1 + 5 + 1, "{stats:?}");
    assert_eq!(stats.bytes_out, 40 * MIB as u64);
    assert_eq!(stats.deletes, 0);

    let head = store.head("ltx/big").await.unwrap();
    assert_eq!(head.size, 40 * MIB as u64);
    assert_eq!(
        head.timestamp,
        stamp(),
        "the litestream-timestamp metadata is set on a multipart object"
    );
    let back = dir.path().join("back");
    assert_eq!(
        store.download("ltx/big", &back).await.unwrap(),
        40 * MIB as u64
    );
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&big).unwrap());
    // A range across the first part boundary comes back from the right place.
    let original = std::fs::read(&big).unwrap();
    let range = (8 * MIB - 10) as u64..(8 * MIB + 10) as u64;
    assert_eq!(
        store.get_range("ltx/big", range.clone()).await.unwrap(),
        original[8 * MIB - 10..8 * MIB + 10]
    );
    assert_eq!(unfinished_uploads(garage, &bucket), 0);

    // Exactly one part: a single PUT, as `put` would send it. One byte more: two parts.
    let before = store.stats().puts;
    let one = random_file(dir.path(), "one", 8 * MIB);
    store.put_file("ltx/one", &one, with_stamp()).await.unwrap();
    assert_eq!(store.stats().puts, before + 1);
    let two = random_file(dir.path(), "two", 8 * MIB + 1);
    store.put_file("ltx/two", &two, with_stamp()).await.unwrap();
    assert_eq!(store.stats().puts, before + 1 + 4);
    for (key, file) in [("ltx/one", &one), ("ltx/two", &two)] {
        let got = store.get(key).await.unwrap();
        assert!(got == std::fs::read(file).unwrap(), "{key}");
        assert_eq!(store.head(key).await.unwrap().timestamp, stamp(), "{key}");
    }
    // A small file and an empty one.
    let small = dir.path().join("small");
    std::fs::write(&small, b"small").unwrap();
    store
        .put_file("ltx/small", &small, PutOptions::default())
        .await
        .unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    store
        .put_file("ltx/empty", &empty, PutOptions::default())
        .await
        .unwrap();
    assert_eq!(store.get("ltx/small").await.unwrap(), &b"small"[..]);
    assert_eq!(store.head("ltx/empty").await.unwrap().size, 0);
}

#[tokio::test]
async fn garage_small_parts_and_a_failed_upload_leaves_no_object_and_no_parts() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("multipart-fail").unwrap();
    let store = Store::open(&garage_location(garage, &bucket, "db"))
        .unwrap()
        .with_part_size(64 * 1024);
    let dir = tempfile::tempdir().unwrap();

    // Garage takes parts below S3's 5 MiB minimum, which lets tests use small parts.
    let file = random_file(dir.path(), "f", 300 * 1024);
    store
        .put_file("small-parts", &file, with_stamp())
        .await
        .unwrap();
    assert_eq!(store.stats().puts, 1 + 5 + 1);
    assert!(store.get("small-parts").await.unwrap() == std::fs::read(&file).unwrap());

    // The source shrinks while it is being uploaded, after some parts went out: the upload fails, is
    // aborted, and leaves neither an object nor stored parts.
    let shrinking = random_file(dir.path(), "shrinking", 20 * MIB);
    let before = store.stats();
    let upload = store.put_file("failed", &shrinking, with_stamp());
    let cut = async {
        while store.stats().puts < before.puts + 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shrinking)
            .unwrap()
            .set_len(MIB as u64)
            .unwrap();
    };
    let (result, ()) = tokio::join!(upload, cut);
    let err = result.unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("shrinking"), "{err}");
    let after = store.stats();
    assert!(
        after.puts >= before.puts + 4,
        "parts were sent before the failure: {after:?}"
    );
    assert_eq!(after.deletes, before.deletes + 1, "the upload was aborted");
    assert!(store.head("failed").await.unwrap_err().is_not_found());
    assert_eq!(unfinished_uploads(garage, &bucket), 0);

    // A source that cannot be read at all after the upload was created (a directory has a size but no
    // bytes): aborted too.
    let err = store
        .put_file("dir", dir.path(), PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(store.head("dir").await.unwrap_err().is_not_found());
    assert_eq!(unfinished_uploads(garage, &bucket), 0);
    // A missing source is an I/O error, never "no such object".
    let err = store
        .put_file("missing", &dir.path().join("nope"), PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn garage_a_multipart_upload_past_its_deadline_is_aborted_and_leaves_nothing() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("multipart-deadline").unwrap();
    let store = Store::open(&garage_location(garage, &bucket, "db"))
        .unwrap()
        .with_part_size(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    // 320 parts of 64 KiB, three in flight: far more than loopback Garage takes in 100 ms.
    let file = random_file(dir.path(), "f", 20 * MIB);
    let before = store.stats();
    let options = PutOptions {
        deadline: Some(tokio::time::Instant::now() + Duration::from_millis(100)),
        ..with_stamp()
    };
    let err = store.put_file("late", &file, options).await.unwrap_err();
    assert!(matches!(err, StoreError::DeadlineReached { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("deadline"), "{err}");
    let after = store.stats();
    assert!(after.puts > before.puts, "the upload started: {after:?}");
    assert_eq!(after.deletes, before.deletes + 1, "the upload was aborted");
    assert!(store.head("late").await.unwrap_err().is_not_found());
    assert_eq!(unfinished_uploads(garage, &bucket), 0);

    // With time enough, the same upload goes through.
    let options = PutOptions {
        deadline: Some(tokio::time::Instant::now() + Duration::from_secs(120)),
        ..with_stamp()
    };
    store.put_file("late", &file, options).await.unwrap();
    assert!(store.get("late").await.unwrap() == std::fs::read(&file).unwrap());
}

/// Two objects downloaded one after the other into one file land back to back, each at the offset where
/// the previous one ended; a missing object fails and names it.
async fn check_download_to(store: &Store, dir: &Path) {
    let first = random_file(dir, "first", 100_000);
    let second = random_file(dir, "second", 5);
    store.put_file("in/1", &first, with_stamp()).await.unwrap();
    store.put_file("in/2", &second, with_stamp()).await.unwrap();
    let joined = std::fs::File::create(dir.join("joined")).unwrap();
    assert_eq!(store.download_to("in/1", &joined).await.unwrap(), 100_000);
    assert_eq!(store.download_to("in/2", &joined).await.unwrap(), 5);
    let mut expected = std::fs::read(&first).unwrap();
    expected.extend(std::fs::read(&second).unwrap());
    assert!(std::fs::read(dir.join("joined")).unwrap() == expected);
    let err = store.download_to("in/missing", &joined).await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test]
async fn downloads_into_one_file_land_back_to_back() {
    let dir = tempfile::tempdir().unwrap();
    let files = Store::open(&Location::File {
        root: dir.path().join("store"),
    })
    .unwrap();
    check_download_to(&files, dir.path()).await;
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("download-to").unwrap();
    let s3 = Store::open(&garage_location(garage, &bucket, "db")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    check_download_to(&s3, dir.path()).await;
}

#[tokio::test]
async fn file_store_streams_files_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = Store::open(&Location::File { root: root.clone() })
        .unwrap()
        .with_part_size(64 * 1024);
    let file = random_file(dir.path(), "f", 3 * MIB + 7);
    store
        .put_file("ltx/0/a.ltx", &file, with_stamp())
        .await
        .unwrap();
    let stats = store.stats();
    assert_eq!(
        (stats.puts, stats.bytes_out),
        (1, 3 * MIB as u64 + 7),
        "a file store write is one request whatever the part size"
    );
    let head = store.head("ltx/0/a.ltx").await.unwrap();
    assert_eq!(head.timestamp, stamp());
    assert_eq!(head.size, 3 * MIB as u64 + 7);
    let back = dir.path().join("back");
    assert_eq!(
        store.download("ltx/0/a.ltx", &back).await.unwrap(),
        3 * MIB as u64 + 7
    );
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&file).unwrap());
    assert_eq!(store.stats().bytes_in, 3 * MIB as u64 + 7);

    // A missing source leaves nothing behind, not even a temporary file, and is not "no such object".
    let err = store
        .put_file(
            "ltx/0/b.ltx",
            &dir.path().join("nope"),
            PutOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(!err.is_not_found(), "{err:?}");
    let names: Vec<String> = std::fs::read_dir(root.join("ltx/0"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.ltx"]);
    assert!(
        store
            .download("ltx/0/missing", &back)
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn conditional_writes_are_probed_once_per_bucket() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("probe-once").unwrap();
    let stores: Vec<Store> = (0..20)
        .map(|i| Store::open(&garage_location(garage, &bucket, &format!("db{i}"))).unwrap())
        .collect();
    let answers = futures::future::join_all(stores.iter().map(|s| s.conditional_writes())).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    assert!(
        answers.iter().all(|a| !a.supported),
        "Garage 2.5.0 ignores If-None-Match"
    );
    assert_eq!(answers.iter().filter(|a| a.probed_now).count(), 1);
    let requests: u64 = stores
        .iter()
        .map(|s| {
            let st = s.stats();
            st.puts + st.gets + st.deletes + st.heads + st.lists
        })
        .sum();
    assert!(
        requests <= 4,
        "one probe for 20 stores: {requests} requests"
    );
    // Asked again: no request at all.
    assert!(!stores[3].conditional_writes().await.unwrap().probed_now);

    // Another bucket is probed on its own.
    let other = garage.new_bucket("probe-other").unwrap();
    let store = Store::open(&garage_location(garage, &other, "db0")).unwrap();
    assert!(store.conditional_writes().await.unwrap().probed_now);

    // A file root is a scope too, and enforces the condition.
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(&Location::File {
        root: dir.path().to_path_buf(),
    })
    .unwrap();
    let b = Store::open(&Location::File {
        root: dir.path().to_path_buf(),
    })
    .unwrap();
    let first = a.conditional_writes().await.unwrap();
    let second = b.conditional_writes().await.unwrap();
    assert!(first.supported && second.supported);
    assert!(first.probed_now && !second.probed_now);
}
