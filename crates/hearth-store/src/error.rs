//! The one error type of the store: each variant tells the caller what went wrong and whether retrying can help.

/// Why a store operation failed. Every message names the store (`file:///path` or `s3://bucket/prefix at
/// endpoint`) and, where there is one, the key, so that a log line alone says where to look.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{store}: no object at key `{key}`")]
    NotFound { store: String, key: String },

    /// A conditional write (`If-None-Match: *` or `If-Match`) was refused because the object changed.
    #[error(
        "{store}: the conditional write of `{key}` was refused: the object exists or changed since it was read"
    )]
    PreconditionFailed { store: String, key: String },

    /// The bucket does not exist (or the endpoint serves no such bucket).
    #[error(
        "{store}: the bucket does not exist (while accessing `{key}`); create it or fix the bucket name in the URL"
    )]
    NoSuchBucket { store: String, key: String },

    /// The store refused the credentials or the key has no permission for this operation.
    #[error(
        "{store}: access denied while accessing `{key}`: check the access key id and secret \
         (LITESTREAM_ACCESS_KEY_ID / LITESTREAM_SECRET_ACCESS_KEY) and the key's permissions on the bucket ({detail})"
    )]
    AccessDenied {
        store: String,
        key: String,
        detail: String,
    },

    /// The store could not be reached or answered with a server error (connection refused, timeout,
    /// 5xx, 429). Retrying later can help.
    #[error(
        "{store}: the store is unreachable or failing while accessing `{key}` (retryable): {detail}"
    )]
    Unreachable {
        store: String,
        key: String,
        detail: String,
    },

    /// The location (URL or settings) is wrong; the message says how to fix it.
    #[error("invalid store location `{location}`: {reason}")]
    InvalidLocation { location: String, reason: String },

    /// The key cannot name an object: empty, absolute, or with `.`/`..`/empty segments.
    #[error("{store}: invalid object key `{key}`: {reason}")]
    InvalidKey {
        store: String,
        key: String,
        reason: String,
    },

    /// A local file system error.
    #[error("{store}: I/O error on `{key}`: {source}")]
    Io {
        store: String,
        key: String,
        #[source]
        source: std::io::Error,
    },

    /// A multipart upload was still sending parts when the caller's deadline came; it was aborted, so it
    /// left no object and no stored parts. Retrying later (with more time) can help.
    #[error(
        "{store}: the upload of `{key}` did not finish before its deadline and was aborted (retryable)"
    )]
    DeadlineReached { store: String, key: String },

    /// Any other refusal from the store (an unexpected 4xx, a malformed answer).
    #[error("{store}: request for `{key}` failed: {detail}")]
    Other {
        store: String,
        key: String,
        detail: String,
    },
}

impl StoreError {
    /// Whether trying the same operation again later can succeed: true for unreachable or overloaded
    /// stores and for interrupted local I/O, false for everything that needs a change of key, config or data.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } | StoreError::DeadlineReached { .. } => true,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// Whether this is [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Turns an `object_store` error into a [`StoreError`] naming `store` and `key`.
///
/// `object_store` maps 404, 403, 401 and 412 to variants but keeps other statuses and the S3 error code
/// (`NoSuchBucket`, ...) only in its message, and its `RetryError` type is private, so the status and the
/// code are read from the error text. The tests against a real Garage pin this down.
pub(crate) fn from_object_store(store: &str, key: &str, err: object_store::Error) -> StoreError {
    let text = error_chain_text(&err);
    let store = store.to_string();
    let key = key.to_string();
    if text.contains("NoSuchBucket") {
        return StoreError::NoSuchBucket { store, key };
    }
    match &err {
        object_store::Error::NotFound { .. } => return StoreError::NotFound { store, key },
        object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. } => {
            return StoreError::PreconditionFailed { store, key };
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            return StoreError::AccessDenied {
                store,
                key,
                detail: short(&text),
            };
        }
        _ => {}
    }
    if has_transport_error(&err) {
        return StoreError::Unreachable {
            store,
            key,
            detail: short(&text),
        };
    }
    match status_in(&text) {
        Some(status) if status >= 500 || status == 429 || status == 408 => {
            StoreError::Unreachable {
                store,
                key,
                detail: short(&text),
            }
        }
        Some(401 | 403) => StoreError::AccessDenied {
            store,
            key,
            detail: short(&text),
        },
        Some(404) => StoreError::NotFound { store, key },
        Some(412) => StoreError::PreconditionFailed { store, key },
        _ => StoreError::Other {
            store,
            key,
            detail: short(&text),
        },
    }
}

/// The error's message followed by the messages of its sources, which is where `object_store` keeps the
/// HTTP status and the response body.
fn error_chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let message = inner.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = inner.source();
    }
    text
}

/// Whether a transport-level failure (refused connection, timeout, reset) is in the error's source chain.
fn has_transport_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(inner) = source {
        if inner
            .downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return true;
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut | NotConnected
            ) {
                return true;
            }
        }
        source = inner.source();
    }
    false
}

/// Finds the HTTP status in `object_store`'s "Server returned non-2xx status code: 503 ..." message.
fn status_in(text: &str) -> Option<u16> {
    let after = text.split("status code: ").nth(1)?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Keeps error details to one readable line: S3 error bodies are XML documents that can be long.
fn short(text: &str) -> String {
    const MAX: usize = 600;
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.len() <= MAX {
        return one_line;
    }
    let mut end = MAX;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &one_line[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_read_from_object_store_messages() {
        let cases = [
            (
                "Error performing GET http://x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: ",
                Some(503),
            ),
            (
                "Server returned non-2xx status code: 403 Forbidden: <Error>",
                Some(403),
            ),
            ("connection refused", None),
        ];
        for (text, want) in cases {
            assert_eq!(status_in(text), want, "{text}");
        }
    }

    #[test]
    fn generic_errors_are_classified_by_status_and_code() {
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        type Check = fn(&StoreError) -> bool;
        let cases: [(&str, Check); 5] = [
            (
                "Server returned non-2xx status code: 503 Service Unavailable",
                |e| matches!(e, StoreError::Unreachable { .. }),
            ),
            ("Server returned non-2xx status code: 403 Forbidden", |e| {
                matches!(e, StoreError::AccessDenied { .. })
            }),
            (
                "Server returned non-2xx status code: 404 Not Found: <Code>NoSuchBucket</Code>",
                |e| matches!(e, StoreError::NoSuchBucket { .. }),
            ),
            (
                "Server returned non-2xx status code: 400 Bad Request",
                |e| matches!(e, StoreError::Other { .. }),
            ),
            (
                "Server returned non-2xx status code: 429 Too Many Requests",
                |e| e.is_retryable(),
            ),
        ];
        for (msg, check) in cases {
            let err = from_object_store("s3://b at http://h", "k", generic(msg));
            assert!(check(&err), "{msg} -> {err:?}");
            assert!(err.to_string().contains("s3://b at http://h"), "{err}");
        }
    }

    #[test]
    fn long_details_are_cut() {
        let long = "x ".repeat(2000);
        assert!(short(&long).len() < 700);
        assert_eq!(short("a\n  b"), "a b");
    }
}
