//! The S3 backend: `object_store`'s `AmazonS3` client, configured from an [`S3Location`].
//!
//! Settings that matter for S3-compatible stores such as Garage: path-style addressing, plain HTTP for
//! `http://` endpoints, signed payloads (the SHA-256 of the body is signed; no `aws-chunked` trailers,
//! no extra checksum headers, which some stores reject), and no retries inside the client: callers decide
//! with [`crate::with_retry`], and the request counters stay exact.

use std::borrow::Cow;
use std::ops::Range;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, MultipartUpload, ObjectStore, ObjectStoreExt,
    PutMode, PutMultipartOptions, PutPayload, RetryConfig, UpdateVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::from_object_store;
use crate::location::{Credentials, S3Location};
use crate::parts::{PARTS_IN_FLIGHT, part_size_for};
use crate::stats::Counters;
use crate::{ObjectInfo, PutOptions, PutOutcome, StoreError, TIMESTAMP_METADATA_KEY, WriteMode};

/// How long to wait for a TCP connection. Short, because an unreachable store should be reported quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one whole request may take. Generous, because LTX files and snapshots can be large.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The clients made so far, by [`client_key`].
fn clients() -> &'static std::sync::Mutex<std::collections::HashMap<String, AmazonS3>> {
    static CLIENTS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, AmazonS3>>,
    > = std::sync::OnceLock::new();
    CLIENTS.get_or_init(Default::default)
}

/// Everything a client is built from but the prefix. The secret enters only as a BLAKE3 hash, so the
/// key can be kept without keeping the secret twice.
pub(crate) fn client_key(location: &S3Location, credentials: Option<&Credentials>) -> String {
    let secret = credentials.map(|c| {
        blake3::hash(c.secret_access_key.as_bytes())
            .to_hex()
            .to_string()
    });
    format!(
        "{:?}",
        (
            &location.bucket,
            location.region_or_default(),
            &location.endpoint,
            location.force_path_style,
            location.skip_verify,
            credentials.map(|c| &c.access_key_id),
            secret,
        )
    )
}

pub(crate) struct S3Store {
    client: AmazonS3,
    /// The location's prefix, without leading or trailing `/`.
    prefix: String,
}

impl S3Store {
    pub(crate) fn new(
        location: &S3Location,
        credentials: Option<Credentials>,
    ) -> Result<S3Store, StoreError> {
        let invalid = |reason: String| StoreError::InvalidLocation {
            location: location.describe(),
            reason,
        };
        if location.bucket.is_empty() {
            return Err(invalid("the bucket name is empty".into()));
        }
        let prefix = location.prefix.trim_matches('/').to_string();
        // One client per bucket, endpoint and key, shared by every store opened on them: each client
        // has its own connection pool and TLS roots (hundreds of KiB), and a replicator of 100 databases
        // in one bucket would otherwise hold 100 of them. Clients are cheap handles to the shared part.
        let key = client_key(location, credentials.as_ref());
        let cached = clients().lock().ok().and_then(|c| c.get(&key).cloned());
        if let Some(client) = cached {
            return Ok(S3Store { client, prefix });
        }
        // Built from scratch rather than `from_env` so that only the settings hearth resolved apply; the
        // TLS-related variables of the environment (AWS_CA_BUNDLE, SSL_CERT_FILE) are not read at all.
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(location.region_or_default())
            .with_virtual_hosted_style_request(!location.force_path_style)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(CONNECT_TIMEOUT)
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_allow_invalid_certificates(location.skip_verify),
            );
        if let Some(endpoint) = &location.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        match credentials {
            Some(creds) => {
                builder = builder
                    .with_access_key_id(creds.access_key_id)
                    .with_secret_access_key(creds.secret_access_key);
            }
            // Without keys, object_store falls back to AWS instance and container credentials. Outside AWS
            // that would only time out, so a custom endpoint needs keys.
            None if location.endpoint.is_some() => {
                return Err(invalid(
                    "no credentials: set LITESTREAM_ACCESS_KEY_ID and LITESTREAM_SECRET_ACCESS_KEY (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or a credentials file".into(),
                ));
            }
            None => {}
        }
        let client = builder.build().map_err(|e| invalid(e.to_string()))?;
        if let Ok(mut c) = clients().lock() {
            c.insert(key, client.clone());
        }
        Ok(S3Store { client, prefix })
    }

    fn path(&self, store: &str, key: &str) -> Result<Path, StoreError> {
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        Path::parse(&full).map_err(|e| StoreError::InvalidKey {
            store: store.to_string(),
            key: key.to_string(),
            reason: e.to_string(),
        })
    }

    pub(crate) async fn put(
        &self,
        store: &str,
        key: &str,
        data: Bytes,
        timestamp: Option<SystemTime>,
        mode: WriteMode,
    ) -> Result<PutOutcome, StoreError> {
        let path = self.path(store, key)?;
        let attributes = attributes(timestamp);
        let conditional = !matches!(mode, WriteMode::Overwrite);
        let mode = match mode {
            WriteMode::Overwrite => PutMode::Overwrite,
            WriteMode::Create => PutMode::Create,
            WriteMode::Update(etag) => PutMode::Update(UpdateVersion {
                e_tag: Some(etag),
                version: None,
            }),
        };
        let options = object_store::PutOptions {
            mode,
            attributes,
            ..Default::default()
        };
        match self
            .client
            .put_opts(&path, PutPayload::from(data), options)
            .await
        {
            Ok(result) => Ok(PutOutcome::Written { etag: result.e_tag }),
            Err(err) => match from_object_store(store, key, err) {
                StoreError::PreconditionFailed { .. } if conditional => {
                    Ok(PutOutcome::PreconditionFailed)
                }
                // If-Match on a missing object is a failed precondition, not a missing object.
                StoreError::NotFound { .. } if conditional => Ok(PutOutcome::PreconditionFailed),
                other => Err(other),
            },
        }
    }

    /// Uploads the local file `source` to `key`: one PUT when it fits in one part, else a multipart upload
    /// that is aborted if any step fails. Counts every request it sends.
    pub(crate) async fn put_file(
        &self,
        store: &str,
        key: &str,
        source: &std::path::Path,
        options: &PutOptions,
        part_size: usize,
        counters: &Counters,
    ) -> Result<PutOutcome, StoreError> {
        let timestamp = options.timestamp;
        let local = |err: std::io::Error| StoreError::Io {
            store: store.to_string(),
            key: key.to_string(),
            source: std::io::Error::new(
                err.kind(),
                format!("read the local file {}: {err}", source.display()),
            ),
        };
        let mut file = tokio::fs::File::open(source).await.map_err(local)?;
        let size = file.metadata().await.map_err(local)?.len();
        let Some(part) = part_size_for(size, part_size) else {
            // Small enough for one part: one PUT, exactly as `put` sends it.
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut data).await.map_err(local)?;
            counters.put(data.len() as u64);
            return self
                .put(
                    store,
                    key,
                    Bytes::from(data),
                    timestamp,
                    WriteMode::Overwrite,
                )
                .await;
        };
        let path = self.path(store, key)?;
        let multipart = PutMultipartOptions {
            attributes: attributes(timestamp),
            ..Default::default()
        };
        counters.put(0);
        let mut upload = self
            .client
            .put_multipart_opts(&path, multipart)
            .await
            .map_err(|e| from_object_store(store, key, e))?;
        let sending = send_parts(
            &mut *upload,
            &mut file,
            size,
            part,
            counters,
            (store, key),
            &local,
        );
        let sent = match options.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, sending)
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::DeadlineReached {
                        store: store.to_string(),
                        key: key.to_string(),
                    })
                }),
            None => sending.await,
        };
        let result = match sent {
            Ok(()) => {
                counters.put(0);
                upload
                    .complete()
                    .await
                    .map_err(|e| from_object_store(store, key, e))
            }
            Err(err) => Err(err),
        };
        match result {
            Ok(done) => Ok(PutOutcome::Written { etag: done.e_tag }),
            Err(err) => {
                // S3 keeps the parts of an upload that is neither completed nor aborted (and bills their
                // storage) until a lifecycle rule removes them, so a failed upload is aborted right away.
                counters.delete();
                if let Err(abort) = upload.abort().await {
                    tracing::warn!(
                        store,
                        key,
                        error = %abort,
                        "cannot abort a failed multipart upload; its parts stay in the bucket until a lifecycle rule removes them"
                    );
                }
                Err(err)
            }
        }
    }

    /// Copies the object at `key` into the local file `dest`, chunk by chunk as the body arrives.
    pub(crate) async fn download_to(
        &self,
        store: &str,
        key: &str,
        dest: std::fs::File,
    ) -> Result<u64, StoreError> {
        let path = self.path(store, key)?;
        let local = |err: std::io::Error| StoreError::Io {
            store: store.to_string(),
            key: key.to_string(),
            source: std::io::Error::new(err.kind(), format!("write the local file: {err}")),
        };
        let result = self
            .client
            .get(&path)
            .await
            .map_err(|e| from_object_store(store, key, e))?;
        let mut file = tokio::fs::File::from_std(dest);
        let mut body = result.into_stream();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| from_object_store(store, key, e))?;
            file.write_all(&chunk).await.map_err(local)?;
            size += chunk.len() as u64;
        }
        file.flush().await.map_err(local)?;
        Ok(size)
    }

    pub(crate) async fn get(&self, store: &str, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(store, key)?;
        let result = self
            .client
            .get(&path)
            .await
            .map_err(|e| from_object_store(store, key, e))?;
        result
            .bytes()
            .await
            .map_err(|e| from_object_store(store, key, e))
    }

    pub(crate) async fn get_range(
        &self,
        store: &str,
        key: &str,
        range: Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let path = self.path(store, key)?;
        self.client
            .get_range(&path, range)
            .await
            .map_err(|e| from_object_store(store, key, e))
    }

    pub(crate) async fn head(&self, store: &str, key: &str) -> Result<ObjectInfo, StoreError> {
        let path = self.path(store, key)?;
        // A HEAD through get_opts, because plain `head` drops the user metadata that holds the timestamp.
        let options = GetOptions {
            head: true,
            ..Default::default()
        };
        let result = self
            .client
            .get_opts(&path, options)
            .await
            .map_err(|e| from_object_store(store, key, e))?;
        let written = result
            .attributes
            .get(&Attribute::Metadata(Cow::Borrowed(TIMESTAMP_METADATA_KEY)))
            .and_then(|value| parse_timestamp(value));
        Ok(ObjectInfo {
            key: key.to_string(),
            size: result.meta.size,
            timestamp: written.unwrap_or_else(|| result.meta.last_modified.into()),
            etag: result.meta.e_tag,
        })
    }

    pub(crate) async fn list(
        &self,
        store: &str,
        prefix: &str,
    ) -> Result<Vec<ObjectInfo>, StoreError> {
        let full = match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => None,
            (true, false) => Some(prefix.to_string()),
            (false, true) => Some(self.prefix.clone()),
            (false, false) => Some(format!("{}/{prefix}", self.prefix)),
        };
        let full =
            full.map(|p| Path::parse(&p))
                .transpose()
                .map_err(|e| StoreError::InvalidKey {
                    store: store.to_string(),
                    key: prefix.to_string(),
                    reason: e.to_string(),
                })?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let listing: Vec<object_store::ObjectMeta> = self
            .client
            .list(full.as_ref())
            .try_collect()
            .await
            .map_err(|e| from_object_store(store, prefix, e))?;
        Ok(listing
            .into_iter()
            .map(|meta| {
                let location = meta.location.as_ref();
                let key = location
                    .strip_prefix(strip.as_str())
                    .unwrap_or(location)
                    .to_string();
                ObjectInfo {
                    key,
                    size: meta.size,
                    timestamp: meta.last_modified.into(),
                    etag: meta.e_tag,
                }
            })
            .collect())
    }

    pub(crate) async fn delete(&self, store: &str, key: &str) -> Result<(), StoreError> {
        let path = self.path(store, key)?;
        match self.client.delete(&path).await {
            Ok(()) => Ok(()),
            Err(err) => match from_object_store(store, key, err) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// Reads `size` bytes of `file` in parts of `part` bytes and sends them, at most [`PARTS_IN_FLIGHT`] at once.
/// Stops at the first failure; the caller aborts the upload.
async fn send_parts(
    upload: &mut dyn MultipartUpload,
    file: &mut tokio::fs::File,
    size: u64,
    part: u64,
    counters: &Counters,
    (store, key): (&str, &str),
    local: &(dyn Fn(std::io::Error) -> StoreError + Sync),
) -> Result<(), StoreError> {
    let store_error = |e: object_store::Error| from_object_store(store, key, e);
    let mut in_flight = FuturesUnordered::new();
    let mut offset = 0u64;
    while offset < size {
        let len = part.min(size - offset);
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        file.read_exact(&mut buf).await.map_err(local)?;
        counters.put(len);
        in_flight.push(upload.put_part(PutPayload::from(buf)));
        offset += len;
        while in_flight.len() >= PARTS_IN_FLIGHT {
            if let Some(done) = in_flight.next().await {
                done.map_err(store_error)?;
            }
        }
    }
    while let Some(done) = in_flight.next().await {
        done.map_err(store_error)?;
    }
    Ok(())
}

/// The user metadata of a write: the timestamp, when there is one.
fn attributes(timestamp: Option<SystemTime>) -> Attributes {
    let mut attributes = Attributes::new();
    if let Some(timestamp) = timestamp {
        attributes.insert(
            Attribute::Metadata(Cow::Borrowed(TIMESTAMP_METADATA_KEY)),
            format_timestamp(timestamp).into(),
        );
    }
    attributes
}

/// RFC 3339 in UTC with as many fractional digits as needed, which Go's `time.RFC3339Nano` (what
/// Litestream reads and writes) accepts.
fn format_timestamp(timestamp: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(timestamp)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn parse_timestamp(value: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(value)
        .ok()
        .map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_in_litestream_format() {
        let cases = [
            (
                Duration::from_millis(1_700_000_000_123),
                "2023-11-14T22:13:20.123Z",
            ),
            (Duration::from_secs(1_700_000_000), "2023-11-14T22:13:20Z"),
        ];
        for (since_epoch, text) in cases {
            let t = SystemTime::UNIX_EPOCH + since_epoch;
            assert_eq!(format_timestamp(t), text);
            assert_eq!(parse_timestamp(text), Some(t));
        }
        // Go writes RFC3339Nano with trailing zeros trimmed, so any number of digits must parse.
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20.12Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_120))
        );
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn stores_on_one_bucket_share_a_client() {
        let loc = |bucket: &str, prefix: &str| S3Location {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            region: Some("garage".into()),
            force_path_style: true,
            access_key_id: None,
            secret_access_key: None,
            skip_verify: false,
            credentials_file: None,
        };
        let creds = |k: &str| Credentials {
            access_key_id: k.into(),
            secret_access_key: "s".into(),
        };
        let count = || clients().lock().unwrap().len();
        let before = count();
        let a = S3Store::new(&loc("share-test", "db1"), Some(creds("k"))).unwrap();
        let b = S3Store::new(&loc("share-test", "db2"), Some(creds("k"))).unwrap();
        assert_eq!(count(), before + 1, "same bucket and key: one client");
        // Each keeps its own prefix.
        assert_eq!(a.prefix, "db1");
        assert_eq!(b.prefix, "db2");
        // Another key or bucket is another client.
        S3Store::new(&loc("share-test", "db1"), Some(creds("other"))).unwrap();
        S3Store::new(&loc("share-test-2", "db1"), Some(creds("k"))).unwrap();
        assert_eq!(count(), before + 3);
    }
}
