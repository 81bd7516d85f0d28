//! Where a store lives: a local directory or an S3 bucket and prefix, with the settings needed to reach it.

use std::path::PathBuf;

/// A place to store objects. Object keys are `/`-separated and relative to this location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local directory (`file:///abs/path` or a plain path). The embedded default: needs no outside service.
    File { root: PathBuf },
    /// An S3-compatible bucket (`s3://bucket/prefix`).
    S3(S3Location),
}

/// Settings for an S3-compatible store (AWS, MinIO, Garage, ...).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    /// `http://host:port` or `https://host:port`; `None` means AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which MinIO and Garage want.
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Accept any TLS certificate (self-signed stores). Off by default.
    pub skip_verify: bool,
}

impl std::fmt::Debug for S3Location {
    // Hand-written so that secrets never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Location")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id.as_ref().map(|_| "<set>"))
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<set>"))
            .field("skip_verify", &self.skip_verify)
            .finish()
    }
}
