//! A bounded retry with exponential backoff for retryable store errors. Callers choose where to use it:
//! a replication loop that runs again anyway may prefer to fail fast.

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, including the first one. `1` means no retry.
    pub max_attempts: u32,
    /// The wait after the first failure; each further wait doubles.
    pub initial_backoff: Duration,
    /// The longest single wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Five attempts over about 3 seconds: long enough to ride out a store restart or a dropped
    /// connection, short enough that a replication loop notices a real outage quickly.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`, after `attempt` failures (`attempt` starts at 1), or `None`
    /// when no attempt is left. No jitter: hearth's writers are few (one per database), so synchronised
    /// retries are not a concern, and fixed waits keep the schedule testable.
    pub fn backoff(&self, attempt: u32) -> Option<Duration> {
        if attempt == 0 || attempt >= self.max_attempts {
            return None;
        }
        let factor = 2u32.checked_pow(attempt - 1).unwrap_or(u32::MAX);
        Some(
            self.initial_backoff
                .saturating_mul(factor)
                .min(self.max_backoff),
        )
    }
}

/// Runs `op` until it succeeds, fails with an error that is not retryable, or runs out of attempts; returns
/// the last result. Each retry is logged at debug level.
pub async fn with_retry<T, F, Fut>(policy: &RetryPolicy, mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(err) if err.is_retryable() => match policy.backoff(attempt) {
                Some(wait) => {
                    tracing::debug!(attempt, ?wait, error = %err, "retrying store operation");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                None => return Err(err),
            },
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stops() {
        let policy = RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let cases = [
            (0, None),
            (1, Some(100)),
            (2, Some(200)),
            (3, Some(400)),
            (4, Some(500)),
            (5, Some(500)),
            (6, None),
        ];
        for (attempt, want) in cases {
            assert_eq!(
                policy.backoff(attempt),
                want.map(Duration::from_millis),
                "attempt {attempt}"
            );
        }
        let huge = RetryPolicy {
            max_attempts: u32::MAX,
            ..policy
        };
        assert_eq!(
            huge.backoff(200),
            Some(Duration::from_millis(500)),
            "no overflow on many attempts"
        );
    }

    fn unreachable() -> StoreError {
        StoreError::Unreachable {
            store: "s".into(),
            key: "k".into(),
            detail: "down".into(),
        }
    }

    #[tokio::test]
    async fn retries_only_retryable_errors_and_gives_up() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
        };

        let calls = AtomicU32::new(0);
        let result = with_retry(&policy, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 2 { Err(unreachable()) } else { Ok(n) }
        })
        .await;
        assert_eq!(result.unwrap(), 2, "succeeds on the third attempt");

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retry(&policy, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(unreachable())
        })
        .await;
        assert!(result.unwrap_err().is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 3, "stops after max_attempts");

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retry(&policy, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::NotFound {
                store: "s".into(),
                key: "k".into(),
            })
        })
        .await;
        assert!(result.unwrap_err().is_not_found());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no retry for NotFound");
    }
}
