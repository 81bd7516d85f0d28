//! Where a store lives: a local directory or an S3 bucket and prefix, with the settings needed to reach it.
//!
//! URLs are read the way Litestream 0.5 reads its replica URLs (`file:///abs`, plain paths,
//! `s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true`), so one URL works for both tools.

use std::path::{Path, PathBuf};

use crate::error::StoreError;

/// The region used when none is configured. AWS needs one for signing; Garage and MinIO accept any
/// value that matches their own configuration, and `us-east-1` is what most of them default to.
pub const DEFAULT_REGION: &str = "us-east-1";

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
    /// An AWS-style shared credentials file (`[default]` section with `aws_access_key_id` and
    /// `aws_secret_access_key`), read when no keys are given explicitly. The profile is `AWS_PROFILE` or `default`.
    pub credentials_file: Option<PathBuf>,
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
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<set>"),
            )
            .field("skip_verify", &self.skip_verify)
            .field("credentials_file", &self.credentials_file)
            .finish()
    }
}

/// Query parameters Litestream accepts on `s3://` URLs that hearth reads but does not act on. They are
/// accepted so that a URL copied from a Litestream config keeps working.
const IGNORED_LITESTREAM_PARAMS: &[&str] = &[
    "signPayload",
    "sign-payload",
    "requireContentMD5",
    "require-content-md5",
    "storageClass",
    "storage-class",
    "partSize",
    "part-size",
    "concurrency",
];

impl Location {
    /// Reads a location the way Litestream reads a replica URL: `file:///abs/path`, a plain path,
    /// or `s3://bucket/prefix?endpoint=...&region=...&forcePathStyle=true&skipVerify=true`.
    pub fn parse_url(input: &str) -> Result<Location, StoreError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(invalid(
                input,
                "the location is empty; give a directory path or an s3:// URL",
            ));
        }
        if !input.contains("://") {
            return Ok(Location::File {
                root: PathBuf::from(input),
            });
        }
        let url = url::Url::parse(input)
            .map_err(|e| invalid(input, &format!("it is not a valid URL ({e})")))?;
        match url.scheme() {
            "file" => parse_file_url(input, &url),
            "s3" => parse_s3_url(input, &url).map(Location::S3),
            other => Err(invalid(
                input,
                &format!(
                    "the scheme `{other}` is not supported; use file:///absolute/path or s3://bucket/prefix"
                ),
            )),
        }
    }

    /// A short, secret-free name for this store, used in every error message and log line:
    /// `file:///var/lib/x` or `s3://bucket/prefix at http://127.0.0.1:3900`.
    pub fn describe(&self) -> String {
        match self {
            Location::File { root } => format!("file://{}", root.display()),
            Location::S3(s3) => s3.describe(),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl S3Location {
    /// The region to sign requests for: the configured one, else [`DEFAULT_REGION`].
    pub fn region_or_default(&self) -> &str {
        self.region
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_REGION)
    }

    /// `s3://bucket/prefix at endpoint`, without credentials.
    pub fn describe(&self) -> String {
        let mut out = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            out.push('/');
            out.push_str(&self.prefix);
        }
        match &self.endpoint {
            Some(endpoint) => {
                out.push_str(" at ");
                out.push_str(endpoint);
            }
            None => {
                out.push_str(" in AWS region ");
                out.push_str(self.region_or_default());
            }
        }
        out
    }

    /// Finds the access key pair, in this order: the keys set on this location, the `credentials_file`
    /// set on this location, `LITESTREAM_ACCESS_KEY_ID`/`LITESTREAM_SECRET_ACCESS_KEY`, then
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`. `env` looks up an environment variable (tests pass
    /// a map instead of touching the process environment). `Ok(None)` means no keys were found anywhere.
    pub fn resolve_credentials(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Credentials>, StoreError> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) if !id.is_empty() && !secret.is_empty() => {
                return Ok(Some(Credentials {
                    access_key_id: id.clone(),
                    secret_access_key: secret.clone(),
                }));
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(StoreError::InvalidLocation {
                    location: self.describe(),
                    reason: "only one of access_key_id and secret_access_key is set; set both or neither".into(),
                });
            }
            _ => {}
        }
        if let Some(path) = &self.credentials_file {
            let profile = env("AWS_PROFILE")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "default".into());
            return read_credentials_file(path, &profile)
                .map(Some)
                .map_err(|reason| StoreError::InvalidLocation {
                    location: self.describe(),
                    reason,
                });
        }
        for (id_var, secret_var) in [
            ("LITESTREAM_ACCESS_KEY_ID", "LITESTREAM_SECRET_ACCESS_KEY"),
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        ] {
            let id = env(id_var).filter(|v| !v.is_empty());
            let secret = env(secret_var).filter(|v| !v.is_empty());
            match (id, secret) {
                (Some(access_key_id), Some(secret_access_key)) => {
                    return Ok(Some(Credentials {
                        access_key_id,
                        secret_access_key,
                    }));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::InvalidLocation {
                        location: self.describe(),
                        reason: format!(
                            "only one of {id_var} and {secret_var} is set; set both or neither"
                        ),
                    });
                }
            }
        }
        Ok(None)
    }
}

/// An S3 access key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    // Hand-written so that the secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<set>")
            .finish()
    }
}

fn invalid(input: &str, reason: &str) -> StoreError {
    StoreError::InvalidLocation {
        location: input.to_string(),
        reason: reason.to_string(),
    }
}

fn parse_file_url(input: &str, url: &url::Url) -> Result<Location, StoreError> {
    if url.host_str().is_some_and(|h| !h.is_empty()) {
        return Err(invalid(
            input,
            "a file:// URL cannot name a host; write an absolute path with three slashes, like file:///var/lib/hearth",
        ));
    }
    let root = url.to_file_path().map_err(|()| {
        invalid(
            input,
            "the path is not absolute; write it like file:///var/lib/hearth",
        )
    })?;
    Ok(Location::File {
        root: clean_path(&root),
    })
}

/// Drops `.` components and trailing slashes, as Litestream's `path.Clean` does, so that two spellings of
/// one directory compare equal.
fn clean_path(path: &Path) -> PathBuf {
    path.components().collect()
}

fn parse_s3_url(input: &str, url: &url::Url) -> Result<S3Location, StoreError> {
    let host = url.host_str().unwrap_or_default();
    if host.is_empty() {
        return Err(invalid(
            input,
            "the bucket is missing; write it like s3://bucket/prefix",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            input,
            "do not put credentials in the URL; set LITESTREAM_ACCESS_KEY_ID and LITESTREAM_SECRET_ACCESS_KEY instead",
        ));
    }
    let mut loc = S3Location::default();
    match url.port() {
        // MinIO-style `s3://bucket.host:port/prefix`, which Litestream also accepts.
        Some(port) => {
            let Some((bucket, endpoint_host)) = host.split_once('.') else {
                return Err(invalid(
                    input,
                    "with a port in the host, write it as s3://bucket.host:port/prefix, or use s3://bucket/prefix?endpoint=http://host:port",
                ));
            };
            loc.bucket = bucket.to_string();
            loc.endpoint = Some(format!("http://{endpoint_host}:{port}"));
            loc.force_path_style = true;
        }
        None => match aws_virtual_host(host) {
            Some((bucket, region)) => {
                loc.bucket = bucket;
                loc.region = region;
            }
            None => loc.bucket = host.to_string(),
        },
    }
    // The URL parser resolves `.` and `..` silently, so the raw text is checked: a prefix that walks
    // upwards is almost certainly a mistake.
    let raw_path = input
        .split_once("://")
        .map_or("", |(_, rest)| rest)
        .split(['?', '#'])
        .next()
        .unwrap_or("");
    if raw_path
        .split('/')
        .skip(1)
        .any(|seg| seg == ".." || seg == ".")
    {
        return Err(invalid(
            input,
            "the prefix may not contain `.` or `..` segments",
        ));
    }
    loc.prefix = url.path().trim_matches('/').to_string();

    let mut path_style: Option<bool> = None;
    for (name, value) in url.query_pairs() {
        match name.as_ref() {
            "endpoint" => {
                if value.is_empty() {
                    continue;
                }
                loc.endpoint = Some(ensure_endpoint_scheme(&value));
                // Litestream turns on path style for any custom endpoint unless told otherwise.
                loc.force_path_style = true;
            }
            "region" => loc.region = Some(value.into_owned()).filter(|v| !v.is_empty()),
            "forcePathStyle" | "force-path-style" => {
                path_style = Some(parse_bool(input, &name, &value)?)
            }
            "skipVerify" | "skip-verify" => loc.skip_verify = parse_bool(input, &name, &value)?,
            known if IGNORED_LITESTREAM_PARAMS.contains(&known) => {}
            other => {
                return Err(invalid(
                    input,
                    &format!(
                        "unknown query parameter `{other}`; hearth understands endpoint, region, forcePathStyle and skipVerify"
                    ),
                ));
            }
        }
    }
    if let Some(path_style) = path_style {
        loc.force_path_style = path_style;
    }
    if let Some(endpoint) = &loc.endpoint {
        url::Url::parse(endpoint).map_err(|e| {
            invalid(input, &format!("the endpoint `{endpoint}` is not a valid URL ({e}); write it like http://host:3900"))
        })?;
    }
    Ok(loc)
}

fn parse_bool(input: &str, name: &str, value: &str) -> Result<bool, StoreError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(
            input,
            &format!("`{name}` must be true or false, not `{value}`"),
        )),
    }
}

/// `bucket.s3.region.amazonaws.com` or `bucket.s3.amazonaws.com` -> bucket and region.
fn aws_virtual_host(host: &str) -> Option<(String, Option<String>)> {
    let rest = host.strip_suffix(".amazonaws.com")?;
    if let Some((bucket, region)) = rest.rsplit_once(".s3.") {
        return Some((bucket.to_string(), Some(region.to_string())));
    }
    rest.strip_suffix(".s3")
        .map(|bucket| (bucket.to_string(), None))
}

/// Adds a scheme to a bare `host:port` endpoint like Litestream does: plain HTTP for local and private
/// addresses (development stores), HTTPS for everything else.
fn ensure_endpoint_scheme(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        return endpoint.trim_end_matches('/').to_string();
    }
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    let private_172 = host
        .strip_prefix("172.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|octet| octet.parse::<u8>().ok())
        .is_some_and(|octet| (16..=31).contains(&octet));
    let local = host == "localhost"
        || host.starts_with("127.")
        || host == "[::1]"
        || host.starts_with("192.168.")
        || host.starts_with("10.")
        || private_172
        || host.ends_with(".local")
        || host.ends_with(".localhost");
    let scheme = if local { "http" } else { "https" };
    format!("{scheme}://{}", endpoint.trim_end_matches('/'))
}

/// Reads one profile from an AWS shared credentials file. Hand-written rather than pulling in an INI crate:
/// the format hearth needs is `[profile]` headers and `key = value` lines, nothing more.
fn read_credentials_file(path: &Path, profile: &str) -> Result<Credentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the credentials file {}: {e}", path.display()))?;
    parse_credentials_file(&text, profile).ok_or_else(|| {
        format!(
            "the credentials file {} has no [{profile}] section with both aws_access_key_id and aws_secret_access_key",
            path.display()
        )
    })
}

fn parse_credentials_file(text: &str, profile: &str) -> Option<Credentials> {
    let mut in_profile = false;
    let (mut id, mut secret) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let section = section.trim();
            in_profile = section == profile
                || section.strip_prefix("profile ").map(str::trim) == Some(profile);
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().to_string();
            match key.trim() {
                "aws_access_key_id" => id = Some(value),
                "aws_secret_access_key" => secret = Some(value),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn s3(url: &str) -> S3Location {
        match Location::parse_url(url).unwrap() {
            Location::S3(s3) => s3,
            other => panic!("{url} parsed as {other:?}"),
        }
    }

    #[test]
    fn file_locations() {
        let cases = [
            ("/var/lib/x", "/var/lib/x"),
            ("relative/dir", "relative/dir"),
            ("file:///var/lib/x", "/var/lib/x"),
            ("file:///var/lib/x/", "/var/lib/x"),
            ("file:///var/./lib/x", "/var/lib/x"),
            ("file:///with%20space", "/with space"),
        ];
        for (input, root) in cases {
            assert_eq!(
                Location::parse_url(input).unwrap(),
                Location::File { root: root.into() },
                "{input}"
            );
        }
    }

    #[test]
    fn s3_locations() {
        let loc = s3("s3://bkt/some/prefix/?endpoint=http://127.0.0.1:3900&region=garage");
        assert_eq!(loc.bucket, "bkt");
        assert_eq!(loc.prefix, "some/prefix");
        assert_eq!(loc.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(loc.region.as_deref(), Some("garage"));
        assert!(
            loc.force_path_style,
            "a custom endpoint turns on path style"
        );

        let loc =
            s3("s3://bkt?endpoint=https://s3.example.com&forcePathStyle=false&skipVerify=true");
        assert_eq!(loc.prefix, "");
        assert!(!loc.force_path_style);
        assert!(loc.skip_verify);

        let loc = s3("s3://bkt/p?endpoint=localhost:9000");
        assert_eq!(loc.endpoint.as_deref(), Some("http://localhost:9000"));
        let loc = s3("s3://bkt/p?endpoint=s3.example.com");
        assert_eq!(loc.endpoint.as_deref(), Some("https://s3.example.com"));
        let loc = s3("s3://bkt/p?endpoint=172.20.0.1:3900");
        assert_eq!(loc.endpoint.as_deref(), Some("http://172.20.0.1:3900"));

        let loc = s3("s3://bkt.localhost:9000/db");
        assert_eq!((loc.bucket.as_str(), loc.prefix.as_str()), ("bkt", "db"));
        assert_eq!(loc.endpoint.as_deref(), Some("http://localhost:9000"));
        assert!(loc.force_path_style);

        let loc = s3("s3://bkt.s3.eu-west-1.amazonaws.com/db");
        assert_eq!(
            (loc.bucket.as_str(), loc.region.as_deref()),
            ("bkt", Some("eu-west-1"))
        );
        assert_eq!(loc.endpoint, None);
        assert!(!loc.force_path_style);
        assert_eq!(loc.describe(), "s3://bkt/db in AWS region eu-west-1");

        let loc = s3("s3://bkt/db?signPayload=true&storageClass=STANDARD");
        assert_eq!(loc.bucket, "bkt");
        assert_eq!(loc.region_or_default(), "us-east-1");
    }

    #[test]
    fn bad_locations_explain_the_fix() {
        let cases = [
            ("", "empty"),
            ("file://host/x", "three slashes"),
            ("gs://bucket/x", "not supported"),
            ("s3:///x", "bucket is missing"),
            (
                "s3://bkt/x?endpont=http://a",
                "unknown query parameter `endpont`",
            ),
            ("s3://bkt/x?forcePathStyle=yes", "true or false"),
            ("s3://key:secret@bkt/x", "LITESTREAM_ACCESS_KEY_ID"),
            ("s3://bkt/a/../b", "`..`"),
        ];
        for (input, needle) in cases {
            let err = Location::parse_url(input).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidLocation { .. }),
                "{input}: {err:?}"
            );
            assert!(
                err.to_string().contains(needle),
                "{input}: `{err}` should mention `{needle}`"
            );
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn credentials_come_from_config_then_litestream_then_aws_env() {
        let env_of = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |name: &str| map.get(name).cloned()
        };
        let both = env_of(&[
            ("LITESTREAM_ACCESS_KEY_ID", "ls-id"),
            ("LITESTREAM_SECRET_ACCESS_KEY", "ls-secret"),
            ("AWS_ACCESS_KEY_ID", "aws-id"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ]);
        let aws_only = env_of(&[
            ("AWS_ACCESS_KEY_ID", "aws-id"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        ]);
        let half = env_of(&[("LITESTREAM_ACCESS_KEY_ID", "ls-id")]);
        let none = env_of(&[]);

        let mut loc = S3Location {
            bucket: "b".into(),
            ..Default::default()
        };
        assert_eq!(
            loc.resolve_credentials(&both)
                .unwrap()
                .unwrap()
                .access_key_id,
            "ls-id"
        );
        assert_eq!(
            loc.resolve_credentials(&aws_only)
                .unwrap()
                .unwrap()
                .access_key_id,
            "aws-id"
        );
        assert_eq!(loc.resolve_credentials(&none).unwrap(), None);
        let err = loc.resolve_credentials(&half).unwrap_err();
        assert!(
            err.to_string().contains("LITESTREAM_SECRET_ACCESS_KEY"),
            "{err}"
        );

        loc.access_key_id = Some("cfg-id".into());
        loc.secret_access_key = Some("cfg-secret".into());
        let creds = loc.resolve_credentials(&both).unwrap().unwrap();
        assert_eq!(
            (
                creds.access_key_id.as_str(),
                creds.secret_access_key.as_str()
            ),
            ("cfg-id", "cfg-secret")
        );
        assert!(
            !format!("{creds:?}").contains("cfg-secret"),
            "Debug must hide the secret"
        );
    }

    #[test]
    fn credentials_file_profiles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials");
        std::fs::write(
            &path,
            "# comment\n[default]\naws_access_key_id = d-id\naws_secret_access_key=d-secret\n\n[profile other]\naws_access_key_id = o-id\naws_secret_access_key = o-secret\n",
        )
        .unwrap();
        let loc = S3Location {
            bucket: "b".into(),
            credentials_file: Some(path.clone()),
            ..Default::default()
        };
        let env_with_aws = |name: &str| {
            (name == "AWS_ACCESS_KEY_ID" || name == "AWS_SECRET_ACCESS_KEY")
                .then(|| "env".to_string())
        };
        let creds = loc.resolve_credentials(&env_with_aws).unwrap().unwrap();
        assert_eq!(
            (
                creds.access_key_id.as_str(),
                creds.secret_access_key.as_str()
            ),
            ("d-id", "d-secret")
        );
        let other = |name: &str| (name == "AWS_PROFILE").then(|| "other".to_string());
        assert_eq!(
            loc.resolve_credentials(&other)
                .unwrap()
                .unwrap()
                .access_key_id,
            "o-id"
        );
        let missing = |name: &str| (name == "AWS_PROFILE").then(|| "missing".to_string());
        let err = loc.resolve_credentials(&missing).unwrap_err();
        assert!(err.to_string().contains("[missing]"), "{err}");

        let absent = S3Location {
            credentials_file: Some(dir.path().join("nope")),
            ..loc
        };
        let err = absent.resolve_credentials(&|_: &str| None).unwrap_err();
        assert!(
            err.to_string().contains("cannot read the credentials file"),
            "{err}"
        );
    }
}
