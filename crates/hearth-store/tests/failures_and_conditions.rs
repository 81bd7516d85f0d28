//! How the store fails (wrong credentials, missing bucket, unreachable endpoint, bad file roots), how

// Helpers outside #[test] functions unwrap too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used)]
//! conditional writes behave on each backend, and listings longer than one S3 page.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use hearth_store::{
    Location, PutOptions, PutOutcome, RetryPolicy, S3Location, Store, StoreError, with_retry,
};
use hearth_testkit::Garage;

fn location(garage: &Garage, bucket: &str) -> S3Location {
    S3Location {
        bucket: bucket.to_string(),
        prefix: "p".to_string(),
        endpoint: Some(garage.endpoint.clone()),
        region: Some(garage.region.clone()),
        force_path_style: true,
        access_key_id: Some(garage.key_id.clone()),
        secret_access_key: Some(garage.secret.clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn wrong_credentials_are_access_denied_naming_the_store() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("creds").unwrap();
    let cases = [
        (
            "wrong secret",
            S3Location {
                secret_access_key: Some("0".repeat(64)),
                ..location(garage, &bucket)
            },
        ),
        (
            "unknown key",
            S3Location {
                access_key_id: Some("GK000000000000000000000000".into()),
                ..location(garage, &bucket)
            },
        ),
    ];
    for (what, loc) in cases {
        let store = Store::open(&Location::S3(loc)).unwrap();
        let errors = [
            store
                .put("k", Bytes::from_static(b"x"), PutOptions::default())
                .await
                .unwrap_err(),
            store.get("k").await.unwrap_err(),
            store.list("").await.unwrap_err(),
            store.head("k").await.unwrap_err(),
            store.delete("k").await.unwrap_err(),
        ];
        for err in errors {
            assert!(
                matches!(err, StoreError::AccessDenied { .. }),
                "{what}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&garage.endpoint) && text.contains(&bucket),
                "{what}: {text}"
            );
            assert!(
                !text.contains(&garage.secret),
                "{what}: the secret leaked: {text}"
            );
            assert!(!err.is_retryable());
        }
    }
}

#[tokio::test]
async fn missing_bucket_is_no_such_bucket() {
    let garage = Garage::shared().unwrap();
    let store = Store::open(&Location::S3(location(garage, "no-such-bucket-here"))).unwrap();
    let errors = [
        store
            .put("k", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap_err(),
        store.get("k").await.unwrap_err(),
        store.list("").await.unwrap_err(),
    ];
    for err in errors {
        assert!(matches!(err, StoreError::NoSuchBucket { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("s3://no-such-bucket-here/p at http://127.0.0.1:"),
            "{err}"
        );
        assert!(!err.is_retryable());
    }
    // A HEAD response has no body to name the missing bucket, so it reads as a missing key.
    assert!(store.head("k").await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn closed_port_is_unreachable_and_retryable() {
    let port = hearth_testkit::closed_port().unwrap();
    let loc = S3Location {
        bucket: "b".into(),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        access_key_id: Some("id".into()),
        secret_access_key: Some("secret-secret-secret".into()),
        force_path_style: true,
        ..Default::default()
    };
    let store = Store::open(&Location::S3(loc)).unwrap();
    let err = store.get("some/key").await.unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{port}")) && text.contains("some/key"),
        "{text}"
    );
    let others = [
        store
            .put("k", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap_err(),
        store.list("").await.unwrap_err(),
        store.head("k").await.unwrap_err(),
    ];
    for err in others {
        assert!(
            matches!(err, StoreError::Unreachable { .. }) && err.is_retryable(),
            "{err:?}"
        );
    }

    // The retry helper tries exactly max_attempts times, then gives up with the same kind of error.
    let policy = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(20),
    };
    let before = store.stats().gets;
    let err = with_retry(&policy, || store.get("some/key"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    assert_eq!(store.stats().gets - before, 3);
}

#[tokio::test]
async fn garage_ignores_conditional_writes_and_the_probe_says_so() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("cond").unwrap();
    let store = Store::open(&Location::S3(location(garage, &bucket))).unwrap();
    assert!(
        !store.probe_conditional_writes().await.unwrap(),
        "Garage 2.5.0 ignores If-None-Match"
    );
    assert!(
        store.list("").await.unwrap().is_empty(),
        "the probe object is cleaned up"
    );

    // What "ignores" means: the second create-if-absent overwrites.
    let first = store
        .put_if_absent("k", Bytes::from_static(b"1"), PutOptions::default())
        .await
        .unwrap();
    assert!(matches!(first, PutOutcome::Written { .. }));
    let second = store
        .put_if_absent("k", Bytes::from_static(b"2"), PutOptions::default())
        .await
        .unwrap();
    assert!(matches!(second, PutOutcome::Written { .. }), "{second:?}");
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"2"));
}

#[tokio::test]
async fn file_store_enforces_conditional_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&Location::File {
        root: dir.path().to_path_buf(),
    })
    .unwrap();
    assert!(store.probe_conditional_writes().await.unwrap());
    assert!(
        store.list("").await.unwrap().is_empty(),
        "the probe object is cleaned up"
    );

    let first = store
        .put_if_absent(
            "lock/owner",
            Bytes::from_static(b"a"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let PutOutcome::Written { etag: Some(etag_a) } = first else {
        panic!("{first:?}")
    };
    let second = store
        .put_if_absent(
            "lock/owner",
            Bytes::from_static(b"b"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(second, PutOutcome::PreconditionFailed);
    assert_eq!(
        store.get("lock/owner").await.unwrap(),
        Bytes::from_static(b"a")
    );

    let swapped = store
        .put_if_match(
            "lock/owner",
            &etag_a,
            Bytes::from_static(b"c"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let PutOutcome::Written { etag: Some(etag_c) } = swapped else {
        panic!("{swapped:?}")
    };
    assert_ne!(etag_c, etag_a);
    let stale = store
        .put_if_match(
            "lock/owner",
            &etag_a,
            Bytes::from_static(b"d"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(stale, PutOutcome::PreconditionFailed);
    let missing = store
        .put_if_match(
            "lock/none",
            &etag_a,
            Bytes::from_static(b"e"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(missing, PutOutcome::PreconditionFailed);
    assert_eq!(
        store.get("lock/owner").await.unwrap(),
        Bytes::from_static(b"c")
    );
    assert!(store.get("lock/none").await.unwrap_err().is_not_found());

    // Many writers racing on one etag: exactly one wins.
    let outcomes = futures::future::join_all((0..16u8).map(|i| {
        let store = store.clone();
        let etag = etag_c.clone();
        async move {
            store
                .put_if_match(
                    "lock/owner",
                    &etag,
                    Bytes::from(vec![i]),
                    PutOptions::default(),
                )
                .await
                .unwrap()
        }
    }))
    .await;
    let winners = outcomes
        .iter()
        .filter(|o| matches!(o, PutOutcome::Written { .. }))
        .count();
    assert_eq!(winners, 1, "{outcomes:?}");
    let racers = futures::future::join_all((0..16u8).map(|i| {
        let store = store.clone();
        async move {
            store
                .put_if_absent("race", Bytes::from(vec![i]), PutOptions::default())
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(
        racers
            .iter()
            .filter(|o| matches!(o, PutOutcome::Written { .. }))
            .count(),
        1,
        "{racers:?}"
    );
}

#[tokio::test]
async fn garage_listing_reads_every_page() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("pages").unwrap();
    let store = Store::open(&Location::S3(location(garage, &bucket))).unwrap();
    let results: Vec<_> = futures::stream::iter(0..1100u32)
        .map(|i| {
            let store = store.clone();
            async move {
                store
                    .put(
                        &format!("many/{i:05}"),
                        Bytes::from(i.to_be_bytes().to_vec()),
                        PutOptions::default(),
                    )
                    .await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(results.iter().all(Result::is_ok));
    store
        .put("other/x", Bytes::from_static(b"x"), PutOptions::default())
        .await
        .unwrap();
    let before = store.stats().lists;
    let listed = store.list("many").await.unwrap();
    assert_eq!(listed.len(), 1100);
    assert_eq!(listed[0].key, "many/00000");
    assert_eq!(listed[1099].key, "many/01099");
    assert!(listed.iter().all(|o| o.size == 4));
    assert_eq!(store.stats().lists - before, 2, "1100 keys take two pages");
}

#[tokio::test]
async fn file_root_problems() {
    let dir = tempfile::tempdir().unwrap();
    let missing = Store::open(&Location::File {
        root: dir.path().join("not/yet"),
    })
    .unwrap();
    assert!(
        missing.list("").await.unwrap().is_empty(),
        "a missing root is an empty store"
    );
    assert!(missing.get("k").await.unwrap_err().is_not_found());

    let file_root = dir.path().join("a-file");
    std::fs::write(&file_root, b"not a directory").unwrap();
    let store = Store::open(&Location::File {
        root: file_root.clone(),
    })
    .unwrap();
    let err = store.list("").await.unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&file_root.display().to_string()),
        "{err}"
    );
    let err = store
        .put("k", Bytes::from_static(b"x"), PutOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn open_from_a_litestream_url() {
    let garage = Garage::shared().unwrap();
    let bucket = garage.new_bucket("url").unwrap();
    let Location::S3(mut loc) = Location::parse_url(&garage.s3_url(&bucket, "db/main")).unwrap()
    else {
        panic!()
    };
    assert_eq!(loc.prefix, "db/main");
    loc.access_key_id = Some(garage.key_id.clone());
    loc.secret_access_key = Some(garage.secret.clone());
    let store = Store::open(&Location::S3(loc)).unwrap();
    assert_eq!(
        store.name(),
        format!("s3://{bucket}/db/main at {}", garage.endpoint)
    );
    store
        .put("x", Bytes::from_static(b"1"), PutOptions::default())
        .await
        .unwrap();
    let whole = Location::parse_url(&garage.s3_url(&bucket, "")).unwrap();
    let Location::S3(mut whole) = whole else {
        panic!()
    };
    whole.access_key_id = Some(garage.key_id.clone());
    whole.secret_access_key = Some(garage.secret.clone());
    let keys: Vec<String> = Store::open(&Location::S3(whole))
        .unwrap()
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, ["db/main/x"]);

    // A custom endpoint without any credentials is refused at open, with the fix in the message.
    let bare = S3Location {
        bucket: "b".into(),
        endpoint: Some(garage.endpoint.clone()),
        ..Default::default()
    };
    if std::env::var_os("LITESTREAM_ACCESS_KEY_ID").is_none()
        && std::env::var_os("AWS_ACCESS_KEY_ID").is_none()
    {
        let err = Store::open(&Location::S3(bare)).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidLocation { .. })
                && err.to_string().contains("LITESTREAM_ACCESS_KEY_ID"),
            "{err}"
        );
    }
}
