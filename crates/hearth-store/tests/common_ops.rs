//! Every store operation, run the same way against a temporary directory and against a real Garage.

// Helpers outside #[test] functions unwrap too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use hearth_store::{Location, PutOptions, PutOutcome, Store, StoreError};
use hearth_testkit::Garage;

mod common;
use common::garage_location;

fn garage_store(hint: &str, prefix: &str) -> Store {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket(hint).unwrap();
    Store::open(&garage_location(garage, &bucket, prefix)).unwrap()
}

/// The behaviour both backends must share. `precise_list_time` is false for S3, whose listings carry the
/// store's LastModified rather than the written timestamp.
async fn exercise(store: &Store, precise_list_time: bool) {
    let before = store.stats();
    assert_eq!(
        before,
        Default::default(),
        "a fresh store has sent no request"
    );
    assert!(
        store.list("").await.unwrap().is_empty(),
        "a fresh location lists empty"
    );

    // put / get / head, with a timestamp that must come back exactly (millisecond LTX timestamps).
    let stamp = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
    let data = Bytes::from_static(b"hello, hearth");
    let written = store
        .put(
            "ltx/0/0001-0001.ltx",
            data.clone(),
            PutOptions {
                timestamp: Some(stamp),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let PutOutcome::Written {
        etag: Some(put_etag),
    } = written
    else {
        panic!("put returned {written:?}")
    };
    assert_eq!(store.get("ltx/0/0001-0001.ltx").await.unwrap(), data);
    let head = store.head("ltx/0/0001-0001.ltx").await.unwrap();
    assert_eq!(head.key, "ltx/0/0001-0001.ltx");
    assert_eq!(head.size, data.len() as u64);
    assert_eq!(
        head.timestamp, stamp,
        "the written timestamp round-trips through head"
    );
    assert_eq!(
        head.etag.as_deref(),
        Some(put_etag.as_str()),
        "head reports the etag put returned"
    );

    // Without a timestamp the store's own time applies: recent, not the epoch.
    store
        .put(
            "ltx/0/0002-0002.ltx",
            Bytes::from_static(b"second"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let head2 = store.head("ltx/0/0002-0002.ltx").await.unwrap();
    let age = SystemTime::now()
        .duration_since(head2.timestamp)
        .unwrap_or_default();
    assert!(
        age < Duration::from_secs(120),
        "timestamp {:?} should be about now",
        head2.timestamp
    );
    assert_ne!(head2.etag, head.etag);

    // Overwrite changes content and etag.
    store
        .put(
            "ltx/0/0002-0002.ltx",
            Bytes::from_static(b"second, again"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.get("ltx/0/0002-0002.ltx").await.unwrap(),
        Bytes::from_static(b"second, again")
    );
    assert_ne!(
        store.head("ltx/0/0002-0002.ltx").await.unwrap().etag,
        head2.etag
    );

    // get_range, including a range cut at the end.
    assert_eq!(
        store.get_range("ltx/0/0001-0001.ltx", 7..13).await.unwrap(),
        Bytes::from_static(b"hearth")
    );
    assert_eq!(
        store
            .get_range("ltx/0/0001-0001.ltx", 7..100)
            .await
            .unwrap(),
        Bytes::from_static(b"hearth")
    );
    assert_eq!(
        store.get_range("ltx/0/0001-0001.ltx", 3..3).await.unwrap(),
        Bytes::new()
    );

    // list: sorted, relative keys, directory-like prefixes.
    store
        .put(
            "ltx/1/0001-0002.ltx",
            Bytes::from_static(b"l1"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    store
        .put(
            "ltx/01/x",
            Bytes::from_static(b"not level 0"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    store
        .put(
            "generation",
            Bytes::from_static(b"g"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let all: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        all,
        [
            "generation",
            "ltx/0/0001-0001.ltx",
            "ltx/0/0002-0002.ltx",
            "ltx/01/x",
            "ltx/1/0001-0002.ltx"
        ]
    );
    let level0 = store.list("ltx/0").await.unwrap();
    let keys: Vec<&str> = level0.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(
        keys,
        ["ltx/0/0001-0001.ltx", "ltx/0/0002-0002.ltx"],
        "`ltx/0` must not match `ltx/01`"
    );
    assert_eq!(
        store.list("ltx/0/").await.unwrap(),
        level0,
        "a trailing slash means the same prefix"
    );
    assert_eq!(level0[0].size, data.len() as u64);
    if precise_list_time {
        assert_eq!(level0[0].timestamp, stamp);
    }
    assert!(store.list("nothing/here").await.unwrap().is_empty());

    // NotFound names the store and the key.
    let err = store.get("ltx/0/missing.ltx").await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert!(
        err.to_string().contains(store.name()) && err.to_string().contains("ltx/0/missing.ltx"),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(
        store
            .head("ltx/0/missing.ltx")
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(
        store
            .get_range("ltx/0/missing.ltx", 0..4)
            .await
            .unwrap_err()
            .is_not_found()
    );

    // delete, and deleting twice is fine.
    store.delete("ltx/0/0001-0001.ltx").await.unwrap();
    store.delete("ltx/0/0001-0001.ltx").await.unwrap();
    assert!(
        store
            .get("ltx/0/0001-0001.ltx")
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert_eq!(store.list("ltx/0").await.unwrap().len(), 1);

    // Keys that could escape the location are refused before any request.
    let requests = store.stats();
    for key in ["../escape", "/abs", "a//b", ""] {
        let err = store
            .put(key, Bytes::new(), PutOptions::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidKey { .. }),
            "{key:?}: {err:?}"
        );
    }
    assert!(matches!(
        store.list("../up").await.unwrap_err(),
        StoreError::InvalidKey { .. }
    ));
    assert_eq!(store.stats(), requests, "refused keys send no request");

    // Counters: every request above, and nothing for the refused keys or the empty range.
    let stats = store.stats();
    assert_eq!(stats.puts, 6);
    assert_eq!(
        stats.gets, 7,
        "3 whole reads + 2 ranges + 1 missing get + 1 missing range"
    );
    assert_eq!(stats.heads, 4);
    assert_eq!(stats.deletes, 2);
    assert_eq!(stats.lists, 6);
    let put_bytes: u64 = [13, 6, 13, 2, 11, 1].iter().sum();
    assert_eq!(stats.bytes_out, put_bytes);
    assert_eq!(stats.bytes_in, 13 + 13 + 6 + 6);
}

#[tokio::test]
async fn file_store_operations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Location::File {
        root: dir.path().join("replica"),
    })
    .unwrap();
    exercise(&store, true).await;
    // The file backend keeps the written timestamp as the file's mtime, as Litestream does.
    store
        .put(
            "ts",
            Bytes::from_static(b"x"),
            PutOptions {
                timestamp: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mtime = std::fs::metadata(dir.path().join("replica/ts"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        mtime,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000)
    );
    // No temporary files are left behind.
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.contains(".hearth-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn garage_store_operations() {
    let store = garage_store("ops", "some/prefix");
    exercise(&store, false).await;
}

#[tokio::test]
async fn garage_store_without_prefix() {
    let store = garage_store("noprefix", "");
    store
        .put("a/b", Bytes::from_static(b"1"), PutOptions::default())
        .await
        .unwrap();
    let keys: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["a/b"]);
}

#[tokio::test]
async fn prefixes_keep_stores_apart() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("prefixes").unwrap();
    let a = Store::open(&garage_location(garage, &bucket, "db/a")).unwrap();
    let b = Store::open(&garage_location(garage, &bucket, "db/ab")).unwrap();
    a.put("k", Bytes::from_static(b"a"), PutOptions::default())
        .await
        .unwrap();
    b.put("k", Bytes::from_static(b"b"), PutOptions::default())
        .await
        .unwrap();
    assert_eq!(
        a.list("").await.unwrap().len(),
        1,
        "db/a must not list db/ab"
    );
    assert_eq!(a.get("k").await.unwrap(), Bytes::from_static(b"a"));
    let whole = Store::open(&garage_location(garage, &bucket, "")).unwrap();
    let keys: Vec<String> = whole
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["db/a/k", "db/ab/k"]);
}

#[tokio::test]
async fn the_litestream_timestamp_metadata_is_what_garage_stores() {
    // Read the header back without hearth's parser, so a wrong metadata key or format cannot hide.
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("meta").unwrap();
    let store = Store::open(&garage_location(garage, &bucket, "p")).unwrap();
    let stamp = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_120);
    store
        .put(
            "f.ltx",
            Bytes::from_static(b"x"),
            PutOptions {
                timestamp: Some(stamp),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let raw = Store::open(&garage_location(garage, &bucket, "p")).unwrap();
    assert_eq!(raw.head("f.ltx").await.unwrap().timestamp, stamp);
    let info = garage
        .cli(&["bucket", "inspect-object", &bucket, "p/f.ltx"])
        .unwrap();
    let line = info
        .lines()
        .find(|l| l.contains("x-amz-meta-litestream-timestamp"))
        .unwrap_or_else(|| panic!("{info}"));
    assert!(line.contains("2023-11-14T22:13:20.12"), "{line}");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path.display().to_string());
    }
    out
}
