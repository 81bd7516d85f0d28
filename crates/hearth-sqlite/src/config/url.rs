//! Replica URLs as Litestream reads them: `file:///abs/path`, `s3://bucket/prefix?endpoint=…`, and the S3 host
//! forms Litestream recognises (`bucket.s3.region.amazonaws.com`, `bucket.host:port`, DigitalOcean, Backblaze,
//! Filebase, Scaleway).
//!
//! Hand-written instead of using the `url` crate because the results must match Go's `net/url` as Litestream
//! uses it (the path is cleaned with Go's `path.Clean`, `s3://bucket` has an empty prefix, `file://host/x` means
//! `/host/x`), and the host rules are Litestream's own. This may move into hearth-store next to `Location`.

/// The parts of a replica URL that hearth uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReplicaUrl {
    /// Lower-cased scheme (`s3`, `file`, ...).
    pub scheme: String,
    pub host: String,
    /// For `file`: the absolute, cleaned path. For other schemes: the cleaned path without a leading `/`.
    pub path: String,
    /// Query parameters in order, decoded. Malformed pairs are dropped, as Go's `URL.Query` does.
    pub query: Vec<(String, String)>,
}

impl ReplicaUrl {
    /// The first value of a query parameter, if present and non-empty (Go's `Values.Get` then `!= ""`).
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// True when `s` starts like a URL (`word://`), Litestream's `IsURL`.
pub(crate) fn is_url(s: &str) -> bool {
    match s.find("://") {
        Some(i) if i > 0 => s[..i]
            .bytes()
            .all(|b| b == b'_' || b.is_ascii_alphanumeric()),
        _ => false,
    }
}

/// The replica type a URL names (`s3`, `file`, `webdav` for `webdavs`), or `None` when it is not a URL.
pub(crate) fn replica_type_from_url(s: &str) -> Option<String> {
    if !is_url(s) {
        return None;
    }
    let scheme = s[..s.find("://")?].to_ascii_lowercase();
    Some(if scheme == "webdavs" {
        "webdav".to_string()
    } else {
        scheme
    })
}

/// Hides the user-info part of a URL (`s3://KEY:SECRET@bucket` -> `s3://***@bucket`) for messages.
pub(crate) fn redact_url(s: &str) -> String {
    let Some(start) = s.find("://").map(|i| i + 3) else {
        return s.to_string();
    };
    let rest = &s[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &s[..start], &rest[at..]),
        None => s.to_string(),
    }
}

/// Parses a replica URL as Litestream's `ParseReplicaURLWithQuery` does. Errors are plain sentences.
pub(crate) fn parse_replica_url(s: &str) -> Result<ReplicaUrl, String> {
    if s.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("the URL contains a control character".to_string());
    }
    let Some(colon) = s.find(':') else {
        return Err(
            "a scheme is required, e.g. s3://bucket/path or file:///var/lib/backup".to_string(),
        );
    };
    let scheme = &s[..colon];
    let valid_scheme = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !valid_scheme {
        return Err(
            "a scheme is required, e.g. s3://bucket/path or file:///var/lib/backup".to_string(),
        );
    }
    let scheme = scheme.to_ascii_lowercase();
    let rest = &s[colon + 1..];
    // Fragment, then query, as net/url splits them.
    let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
    let (rest, raw_query) = rest.split_once('?').map_or((rest, ""), |(a, b)| (a, b));
    let Some(rest) = rest.strip_prefix("//") else {
        return Err(format!("expected {scheme}:// followed by a bucket or path"));
    };
    let (authority, raw_path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let host = match authority.rfind('@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    check_host(host)?;
    let decoded_path = percent_decode(raw_path, false)?;
    if scheme == "file" {
        // Go rebuilds the URL without its scheme (`//host/path` when a host is given) and cleans it.
        let joined = if host.is_empty() {
            decoded_path
        } else {
            format!("//{host}{decoded_path}")
        };
        return Ok(ReplicaUrl {
            scheme,
            host: String::new(),
            path: clean_slash_path(&joined),
            query: Vec::new(),
        });
    }
    let cleaned = clean_slash_path(&decoded_path);
    let path = cleaned.trim_start_matches('/');
    let path = if path == "." { "" } else { path };
    Ok(ReplicaUrl {
        scheme,
        host: host.to_string(),
        path: path.to_string(),
        query: parse_query(raw_query),
    })
}

fn check_host(host: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~:[]!$&'()*+,;=%".contains(c);
    if let Some(bad) = host.chars().find(|c| !allowed(*c)) {
        return Err(format!("invalid character {bad:?} in host name"));
    }
    // A port, when present, must be numeric (net/url refuses `host:abc`).
    if !host.starts_with('[')
        && let Some((_, port)) = host.rsplit_once(':')
        && !port.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("invalid port {port:?} after host"));
    }
    Ok(())
}

fn parse_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|pair| !pair.is_empty() && !pair.contains(';'))
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true).ok()?, percent_decode(v, true).ok()?))
        })
        .collect()
}

fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
                let Some(value) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return Err(format!(
                        "invalid URL escape {:?}",
                        s.get(i..(i + 3).min(s.len())).unwrap_or("%")
                    ));
                };
                out.push(value);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "the URL decodes to invalid UTF-8".to_string())
}

/// Go's `path.Clean` for `/`-separated paths: removes `.`, resolves `..` lexically, collapses `//`.
pub(crate) fn clean_slash_path(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let body = parts.join("/");
    match (rooted, body.is_empty()) {
        (true, _) => format!("/{body}"),
        (false, true) => ".".to_string(),
        (false, false) => body,
    }
}

/// What an S3 URL's host says: bucket, region, endpoint and whether path-style addressing is implied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct S3Host {
    pub bucket: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub force_path_style: bool,
}

/// Litestream's `s3.ParseHost`: recognises provider host names; otherwise the host is the bucket.
pub(crate) fn parse_s3_host(host: &str) -> S3Host {
    // MinIO-style `bucket.host:port` (a port and no `.com`): plain HTTP, path style, region us-east-1.
    if host.contains(':') && !host.contains(".com") {
        return match host.split_once('.') {
            Some((bucket, endpoint)) => S3Host {
                bucket: bucket.to_string(),
                region: Some("us-east-1".to_string()),
                endpoint: Some(format!("http://{endpoint}")),
                force_path_style: true,
            },
            None => S3Host {
                endpoint: Some(format!("http://{host}")),
                force_path_style: true,
                ..S3Host::default()
            },
        };
    }
    let labels: Vec<&str> = host.split('.').collect();
    let n = labels.len();
    // `bucket.s3.amazonaws.com` or `bucket.s3.REGION.amazonaws.com`.
    if host.ends_with(".amazonaws.com") {
        if n >= 4 && labels[n - 3] == "s3" && !labels[..n - 3].join(".").is_empty() {
            return S3Host {
                bucket: labels[..n - 3].join("."),
                ..S3Host::default()
            };
        }
        if n >= 5 && labels[n - 4] == "s3" && !labels[..n - 4].join(".").is_empty() {
            return S3Host {
                bucket: labels[..n - 4].join("."),
                region: Some(labels[n - 3].to_string()),
                ..S3Host::default()
            };
        }
    }
    // `bucket.REGION.digitaloceanspaces.com`.
    if host.ends_with(".digitaloceanspaces.com") && n >= 3 {
        let region = labels[n - 3];
        return S3Host {
            bucket: labels[..n - 3].join("."),
            region: Some(region.to_string()),
            endpoint: Some(format!("https://{region}.digitaloceanspaces.com")),
            force_path_style: false,
        };
    }
    // `bucket.s3.REGION.backblazeb2.com`: path style.
    if host.ends_with(".backblazeb2.com") && n >= 4 && labels[n - 4] == "s3" {
        let region = labels[n - 3];
        return S3Host {
            bucket: labels[..n - 4].join("."),
            region: Some(region.to_string()),
            endpoint: Some(format!("https://s3.{region}.backblazeb2.com")),
            force_path_style: true,
        };
    }
    // `bucket.s3.filebase.com`.
    if host.ends_with("s3.filebase.com")
        && (host == "s3.filebase.com" || host.ends_with(".s3.filebase.com"))
    {
        return S3Host {
            bucket: host
                .strip_suffix(".s3.filebase.com")
                .unwrap_or("")
                .to_string(),
            endpoint: Some("https://s3.filebase.com".to_string()),
            ..S3Host::default()
        };
    }
    // `bucket.s3.REGION.scw.cloud`.
    if host.ends_with(".scw.cloud") && n >= 4 && labels[n - 4] == "s3" {
        let region = labels[n - 3];
        return S3Host {
            bucket: labels[..n - 4].join("."),
            region: Some(region.to_string()),
            endpoint: Some(format!("https://s3.{region}.scw.cloud")),
            force_path_style: false,
        };
    }
    S3Host {
        bucket: host.to_string(),
        ..S3Host::default()
    }
}

/// The host of an endpoint written with or without a scheme, lower-cased.
fn endpoint_host(endpoint: &str) -> String {
    let e = endpoint.trim().to_ascii_lowercase();
    let e = e
        .strip_prefix("https://")
        .or_else(|| e.strip_prefix("http://"))
        .unwrap_or(&e)
        .to_string();
    e.split('/').next().unwrap_or("").to_string()
}

/// Litestream's `IsLocalEndpoint`: loopback, private networks and `.local` names default to plain HTTP.
fn is_local_endpoint(endpoint: &str) -> bool {
    let host = endpoint_host(endpoint);
    let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    host == "localhost"
        || host == "127.0.0.1"
        || host.starts_with("192.168.")
        || host.starts_with("10.")
        || (16..=31).any(|n| host.starts_with(&format!("172.{n}.")))
        || host.ends_with(".local")
        || host.ends_with(".localhost")
}

/// Adds `http://` (local endpoints) or `https://` (everything else) when an endpoint has no scheme.
pub(crate) fn ensure_endpoint_scheme(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else if is_local_endpoint(endpoint) {
        format!("http://{endpoint}")
    } else {
        format!("https://{endpoint}")
    }
}

/// Providers for which Litestream turns on path-style addressing unless the config says otherwise:
/// Filebase, Backblaze B2, Supabase, and "MinIO" (any `host:port` that is not a known cloud).
pub(crate) fn provider_wants_path_style(endpoint: &str) -> bool {
    let host = endpoint_host(endpoint);
    if host.is_empty() {
        return false;
    }
    let known_cloud = [
        ".amazonaws.com",
        ".digitaloceanspaces.com",
        ".backblazeb2.com",
        ".filebase.com",
        ".scw.cloud",
        ".r2.cloudflarestorage.com",
        "tigris.dev",
        "t3.storage.dev",
        ".supabase.co",
    ];
    let minio = host.contains(':') && !known_cloud.iter().any(|k| host.contains(k));
    minio
        || host == "s3.filebase.com"
        || host.ends_with(".backblazeb2.com")
        || host.ends_with(".supabase.co")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_urls() {
        for (s, want) in [
            ("s3://b/p", true),
            ("file:///x", true),
            ("S3://b", true),
            ("/var/lib/x", false),
            ("s3:/b", false),
            ("://x", false),
            ("my-scheme://x", false),
        ] {
            assert_eq!(is_url(s), want, "{s}");
        }
    }

    #[test]
    fn parses_replica_urls() {
        let cases: &[(&str, &str, &str, &str)] = &[
            ("s3://bucket/db", "s3", "bucket", "db"),
            ("s3://bucket", "s3", "bucket", ""),
            ("s3://bucket/", "s3", "bucket", ""),
            ("s3://bucket//a/./b/../c/", "s3", "bucket", "a/c"),
            ("S3://bucket/a%20b", "s3", "bucket", "a b"),
            ("s3://KEY:SECRET@bucket/p", "s3", "bucket", "p"),
            ("s3://bucket/p?region=x#frag", "s3", "bucket", "p"),
            ("file:///var/lib/backup", "file", "", "/var/lib/backup"),
            ("file:///var/lib/../backup/", "file", "", "/var/backup"),
            ("file://host/dir", "file", "", "/host/dir"),
            ("file:///tmp/x?ignored=1", "file", "", "/tmp/x"),
        ];
        for (input, scheme, host, path) in cases {
            let u = parse_replica_url(input).unwrap();
            assert_eq!(
                (u.scheme.as_str(), u.host.as_str(), u.path.as_str()),
                (*scheme, *host, *path),
                "{input}"
            );
        }
    }

    #[test]
    fn parses_query_parameters() {
        let u = parse_replica_url(
            "s3://b/p?endpoint=http%3A%2F%2Flocalhost%3A3900&region=garage&x&a=1&a=2&bad=%zz",
        )
        .unwrap();
        assert_eq!(u.query("endpoint"), Some("http://localhost:3900"));
        assert_eq!(u.query("region"), Some("garage"));
        assert_eq!(u.query("x"), None);
        assert_eq!(u.query("a"), Some("1"));
        assert_eq!(u.query("bad"), None);
    }

    #[test]
    fn refuses_bad_urls() {
        for input in [
            "/no/scheme",
            "bucket/path",
            "s3:bucket/path",
            "s3://bu cket/p",
            "s3://host:abc/p",
            "s3://b/%zz",
            "s3://b/p\n",
            "1s3://b",
        ] {
            assert!(parse_replica_url(input).is_err(), "{input}");
        }
    }

    #[test]
    fn parses_s3_hosts_as_litestream() {
        let h = |bucket: &str, region: Option<&str>, endpoint: Option<&str>, fps: bool| S3Host {
            bucket: bucket.into(),
            region: region.map(Into::into),
            endpoint: endpoint.map(Into::into),
            force_path_style: fps,
        };
        let cases = [
            ("mybucket", h("mybucket", None, None, false)),
            ("my.bucket", h("my.bucket", None, None, false)),
            (
                "mybucket.s3.amazonaws.com",
                h("mybucket", None, None, false),
            ),
            (
                "mybucket.s3.eu-west-1.amazonaws.com",
                h("mybucket", Some("eu-west-1"), None, false),
            ),
            (
                "my.dotted.bucket.s3.us-east-2.amazonaws.com",
                h("my.dotted.bucket", Some("us-east-2"), None, false),
            ),
            (
                "bkt.localhost:9000",
                h(
                    "bkt",
                    Some("us-east-1"),
                    Some("http://localhost:9000"),
                    true,
                ),
            ),
            (
                "localhost:9000",
                h("", None, Some("http://localhost:9000"), true),
            ),
            (
                "bkt.nyc3.digitaloceanspaces.com",
                h(
                    "bkt",
                    Some("nyc3"),
                    Some("https://nyc3.digitaloceanspaces.com"),
                    false,
                ),
            ),
            (
                "bkt.s3.us-west-002.backblazeb2.com",
                h(
                    "bkt",
                    Some("us-west-002"),
                    Some("https://s3.us-west-002.backblazeb2.com"),
                    true,
                ),
            ),
            (
                "bkt.s3.filebase.com",
                h("bkt", None, Some("https://s3.filebase.com"), false),
            ),
            (
                "bkt.s3.fr-par.scw.cloud",
                h(
                    "bkt",
                    Some("fr-par"),
                    Some("https://s3.fr-par.scw.cloud"),
                    false,
                ),
            ),
        ];
        for (host, want) in cases {
            assert_eq!(parse_s3_host(host), want, "{host}");
        }
    }

    #[test]
    fn adds_endpoint_schemes() {
        for (e, want) in [
            ("localhost:3900", "http://localhost:3900"),
            ("127.0.0.1:9000", "http://127.0.0.1:9000"),
            ("10.0.0.5:3900", "http://10.0.0.5:3900"),
            ("172.20.1.1:9000", "http://172.20.1.1:9000"),
            ("garage.local:3900", "http://garage.local:3900"),
            ("s3.example.com", "https://s3.example.com"),
            ("http://s3.example.com", "http://s3.example.com"),
        ] {
            assert_eq!(ensure_endpoint_scheme(e), want, "{e}");
        }
    }

    #[test]
    fn redacts_userinfo() {
        assert_eq!(redact_url("s3://AK:SK@bucket/p"), "s3://***@bucket/p");
        assert_eq!(redact_url("s3://bucket/p@x"), "s3://bucket/p@x");
        assert_eq!(redact_url("plain"), "plain");
    }

    #[test]
    fn cleans_paths_like_go() {
        for (p, want) in [
            ("", "."),
            ("/", "/"),
            ("a/b/../c", "a/c"),
            ("/../a", "/a"),
            ("../a", "../a"),
            ("//a//b/", "/a/b"),
            ("./", "."),
        ] {
            assert_eq!(clean_slash_path(p), want, "{p}");
        }
    }
}
