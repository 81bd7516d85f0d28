//! Request counters per operation kind and bytes moved, for cost estimates and Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// A point-in-time copy of a store's counters. Counts are requests sent to the store (for S3, requests
/// billed by the provider); failed requests count too, because providers bill them as well.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// PUT requests (plain and conditional). A multipart upload counts each of its requests: the create, every
    /// part and the complete, which S3 providers bill as PUT-class requests too.
    pub puts: u64,
    /// GET requests, whole or ranged.
    pub gets: u64,
    /// LIST requests. For S3 this is the number of pages: one per 1,000 keys, at least one per listing.
    pub lists: u64,
    /// HEAD requests.
    pub heads: u64,
    /// DELETE requests, including the abort of a failed multipart upload.
    pub deletes: u64,
    /// Payload bytes uploaded by PUTs (for a multipart upload, the bytes of its parts).
    pub bytes_out: u64,
    /// Payload bytes downloaded by GETs.
    pub bytes_in: u64,
}

/// The live counters behind [`StoreStats`]. Relaxed atomics: the numbers are for metrics, not for ordering.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    lists: AtomicU64,
    heads: AtomicU64,
    deletes: AtomicU64,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
}

impl Counters {
    pub(crate) fn put(&self, bytes: u64) {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) {
        self.gets.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn got_bytes(&self, bytes: u64) {
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn lists(&self, pages: u64) {
        self.lists.fetch_add(pages, Ordering::Relaxed);
    }

    pub(crate) fn head(&self) {
        self.heads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn delete(&self) {
        self.deletes.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreStats {
        StoreStats {
            puts: self.puts.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            lists: self.lists.load(Ordering::Relaxed),
            heads: self.heads.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
        }
    }
}

/// How many LIST requests a listing of `keys` keys took: S3 returns at most 1,000 keys per page, and an
/// empty listing still costs one request.
pub(crate) fn list_pages(keys: usize) -> u64 {
    keys.div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_pages_follow_the_s3_page_size() {
        for (keys, pages) in [(0, 1), (1, 1), (1000, 1), (1001, 2), (2500, 3)] {
            assert_eq!(list_pages(keys), pages, "{keys} keys");
        }
    }
}
