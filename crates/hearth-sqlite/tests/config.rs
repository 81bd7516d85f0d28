//! Reading Litestream 0.3 and 0.5 `litestream.yml` files and replica URLs into hearth's configuration.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hearth_sqlite::config::{
    Config, ConfigError, ReplicaConfig, default_config_path, replica_from_url,
};
use hearth_store::{Location, S3Location};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k: &str| map.get(k).cloned()
}

fn parse(text: &str) -> Config {
    Config::parse(text, true, &env_of(&[])).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

fn parse_err(text: &str) -> ConfigError {
    match Config::parse(text, true, &env_of(&[])) {
        Ok(c) => panic!("expected an error, got {c:#?}\n---\n{text}"),
        Err(e) => e,
    }
}

fn s3(bucket: &str, prefix: &str) -> S3Location {
    S3Location {
        bucket: bucket.into(),
        prefix: prefix.into(),
        ..S3Location::default()
    }
}

fn only_replica(c: &Config) -> &ReplicaConfig {
    assert_eq!(c.dbs.len(), 1);
    assert_eq!(c.dbs[0].replicas.len(), 1);
    &c.dbs[0].replicas[0]
}

#[test]
fn defaults_are_litestream_05s_with_hearths_shutdown_budget() {
    let c = parse("dbs:\n  - path: /data/app.db\n    replica:\n      path: /backup/app\n");
    assert_eq!(c.snapshot_interval, Duration::from_secs(86_400));
    assert_eq!(c.snapshot_retention, Duration::from_secs(86_400));
    assert_eq!(
        c.levels,
        vec![
            Duration::from_secs(30),
            Duration::from_secs(300),
            Duration::from_secs(3600)
        ]
    );
    assert_eq!(c.l0_retention, Duration::from_secs(300));
    assert!(c.retention_enabled);
    assert_eq!(c.shutdown_sync_timeout, Duration::from_secs(4));
    assert_eq!(
        (
            c.addr.clone(),
            c.exec.clone(),
            c.log_level.clone(),
            c.log_json
        ),
        (None, None, None, false)
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let db = &c.dbs[0];
    assert_eq!(db.path, PathBuf::from("/data/app.db"));
    assert_eq!(db.monitor_interval, Duration::from_secs(1));
    assert_eq!(db.checkpoint_interval, Duration::from_secs(60));
    assert_eq!(db.busy_timeout, Duration::from_secs(1));
    assert_eq!(db.min_checkpoint_page_count, 1000);
    assert_eq!(db.truncate_page_n, 121_359);
    assert!(!db.restore_if_db_not_exists);
    let r = only_replica(&c);
    assert_eq!(r.name, "file");
    assert_eq!(
        r.location,
        Location::File {
            root: "/backup/app".into()
        }
    );
    assert_eq!(r.sync_interval, Duration::from_secs(1));
    assert_eq!(
        (r.retention, r.snapshot_interval, r.validation_interval),
        (None, None, None)
    );
}

/// The same replica written the ways Litestream's docs show, 0.3 and 0.5 style: (yaml, expected location).
#[test]
fn replica_forms_from_litestream_docs() {
    let cases: Vec<(&str, Location)> = vec![
        // 0.5: single `replica:` with a URL.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://mybkt/app\n",
            Location::S3(s3("mybkt", "app")),
        ),
        // 0.3: `replicas:` list with a URL.
        (
            "dbs:\n  - path: /data/app.db\n    replicas:\n      - url: s3://mybkt/app\n",
            Location::S3(s3("mybkt", "app")),
        ),
        // 0.3 docs: typed S3 replica with bucket and path.
        (
            "dbs:\n  - path: /data/app.db\n    replicas:\n      - type: s3\n        bucket: mybkt\n        path: /app/\n",
            Location::S3(s3("mybkt", "app")),
        ),
        // AWS virtual-host form with a region.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://mybkt.s3.us-west-2.amazonaws.com/app\n",
            Location::S3(S3Location {
                region: Some("us-west-2".into()),
                ..s3("mybkt", "app")
            }),
        ),
        // MinIO docs: bucket.host:port means plain HTTP, path style, us-east-1.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://mybkt.localhost:9000/app\n",
            Location::S3(S3Location {
                region: Some("us-east-1".into()),
                endpoint: Some("http://localhost:9000".into()),
                force_path_style: true,
                ..s3("mybkt", "app")
            }),
        ),
        // 0.5.17 query parameters: endpoint (scheme added, path style implied), region.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://mybkt/app?endpoint=localhost:3900&region=garage\n",
            Location::S3(S3Location {
                region: Some("garage".into()),
                endpoint: Some("http://localhost:3900".into()),
                force_path_style: true,
                ..s3("mybkt", "app")
            }),
        ),
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://mybkt/app?endpoint=https://s3.example.com&forcePathStyle=false&skipVerify=true\n",
            Location::S3(S3Location {
                endpoint: Some("https://s3.example.com".into()),
                skip_verify: true,
                ..s3("mybkt", "app")
            }),
        ),
        // Endpoint in config keys: path style by default (only AWS uses virtual hosts).
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      type: s3\n      bucket: b\n      path: p\n      endpoint: http://127.0.0.1:3900\n      region: garage\n",
            Location::S3(S3Location {
                region: Some("garage".into()),
                endpoint: Some("http://127.0.0.1:3900".into()),
                force_path_style: true,
                ..s3("b", "p")
            }),
        ),
        // ...unless force-path-style says otherwise.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      type: s3\n      bucket: b\n      endpoint: https://s3.example.com\n      force-path-style: false\n",
            Location::S3(S3Location {
                endpoint: Some("https://s3.example.com".into()),
                ..s3("b", "")
            }),
        ),
        // Explicit false does not stop a URL from turning it on (Litestream's `if !forcePathStyle`).
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://b.localhost:9000/p\n      force-path-style: false\n",
            Location::S3(S3Location {
                region: Some("us-east-1".into()),
                endpoint: Some("http://localhost:9000".into()),
                force_path_style: true,
                ..s3("b", "p")
            }),
        ),
        // YAML 1.1 booleans, as Go's yaml.v2 reads them.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      type: s3\n      bucket: b\n      skip-verify: yes\n",
            Location::S3(S3Location {
                skip_verify: true,
                ..s3("b", "")
            }),
        ),
        // A bucket named with digits only is still a string.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      type: s3\n      bucket: 2024\n",
            Location::S3(s3("2024", "")),
        ),
        // File replicas: URL, plain path, and a path that needs cleaning.
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      url: file:///backup/app\n",
            Location::File {
                root: "/backup/app".into(),
            },
        ),
        (
            "dbs:\n  - path: /data/app.db\n    replica:\n      type: file\n      path: /backup/./x/../app/\n",
            Location::File {
                root: "/backup/app".into(),
            },
        ),
    ];
    for (yaml, want) in cases {
        let c = parse(yaml);
        assert_eq!(only_replica(&c).location, want, "\n{yaml}");
    }
}

#[test]
fn full_05_config() {
    let yaml = r#"
addr: ":9090"
exec: "/bin/app --port 8080"
logging:
  level: debug
  type: json
  stderr: true
snapshot:
  interval: 12h
  retention: 72h
levels:
  - interval: 10s
  - interval: 1m30s
l0-retention: 0
retention:
  enabled: false
shutdown-sync-timeout: 2500ms
validation:
  interval: 6h
access-key-id: GLOBALKEY
secret-access-key: GLOBALSECRET
region: garage
endpoint: http://127.0.0.1:3900
sync-interval: 250ms
dbs:
  - path: /data/a.db
    monitor-interval: 500ms
    checkpoint-interval: 5m
    busy-timeout: 0
    min-checkpoint-page-count: 500
    truncate-page-n: 0
    restore-if-db-not-exists: true
    replica:
      url: s3://bucket-a/a
  - path: /data/b.db
    replica:
      type: s3
      bucket: bucket-b
      path: b
      access-key-id: OWNKEY
      secret-access-key: OWNSECRET
      sync-interval: 10s
"#;
    let c = parse(yaml);
    assert_eq!(c.addr.as_deref(), Some(":9090"));
    assert_eq!(c.exec.as_deref(), Some("/bin/app --port 8080"));
    assert_eq!(
        (c.log_level.as_deref(), c.log_json, c.log_stderr),
        (Some("debug"), true, true)
    );
    assert_eq!(
        (c.snapshot_interval, c.snapshot_retention),
        (
            Duration::from_secs(12 * 3600),
            Duration::from_secs(72 * 3600)
        )
    );
    assert_eq!(
        c.levels,
        vec![Duration::from_secs(10), Duration::from_secs(90)]
    );
    assert_eq!(c.l0_retention, Duration::ZERO);
    assert!(!c.retention_enabled);
    assert_eq!(c.shutdown_sync_timeout, Duration::from_millis(2500));
    assert_eq!(c.validation_interval, Some(Duration::from_secs(6 * 3600)));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let a = &c.dbs[0];
    assert_eq!(a.monitor_interval, Duration::from_millis(500));
    assert_eq!(a.checkpoint_interval, Duration::from_secs(300));
    assert_eq!(a.busy_timeout, Duration::ZERO);
    assert_eq!((a.min_checkpoint_page_count, a.truncate_page_n), (500, 0));
    assert!(a.restore_if_db_not_exists);
    let ra = &a.replicas[0];
    assert_eq!(ra.sync_interval, Duration::from_millis(250));
    assert_eq!(
        ra.location,
        Location::S3(S3Location {
            region: Some("garage".into()),
            endpoint: Some("http://127.0.0.1:3900".into()),
            force_path_style: true,
            access_key_id: Some("GLOBALKEY".into()),
            secret_access_key: Some("GLOBALSECRET".into()),
            ..s3("bucket-a", "a")
        })
    );
    let rb = &c.dbs[1].replicas[0];
    assert_eq!(rb.sync_interval, Duration::from_secs(10));
    let Location::S3(b) = &rb.location else {
        panic!("{rb:?}")
    };
    assert_eq!(
        (b.access_key_id.as_deref(), b.secret_access_key.as_deref()),
        (Some("OWNKEY"), Some("OWNSECRET"))
    );
    assert_eq!(b.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
}

#[test]
fn full_03_config_with_dropped_keys() {
    let yaml = r#"
access-key-id: AKIA
secret-access-key: SECRET
dbs:
  - path: /var/lib/app/db.sqlite
    max-checkpoint-page-count: 20000
    replicas:
      - name: primary
        url: s3://bkt/app
        retention: 72h
        retention-check-interval: 1h
        snapshot-interval: 6h
        validation-interval: 12h
        sync-interval: 5s
      - type: file
        path: /mnt/backup/app
      - path: /mnt/other/app
      - url: s3://bkt2/app
"#;
    let c = parse(yaml);
    let db = &c.dbs[0];
    assert_eq!(db.truncate_page_n, 20_000);
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("dbs[0].max-checkpoint-page-count")),
        "{:?}",
        c.warnings
    );
    let names: Vec<&str> = db.replicas.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["primary", "file", "file-2", "s3"]);
    let p = &db.replicas[0];
    assert_eq!(p.retention, Some(Duration::from_secs(72 * 3600)));
    assert_eq!(p.retention_check_interval, Some(Duration::from_secs(3600)));
    assert_eq!(p.snapshot_interval, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(p.validation_interval, Some(Duration::from_secs(12 * 3600)));
    assert_eq!(p.sync_interval, Duration::from_secs(5));
    let Location::S3(loc) = &p.location else {
        panic!()
    };
    assert_eq!(loc.secret_access_key.as_deref(), Some("SECRET"));
}

#[test]
fn age_keys_are_stored_and_never_printed() {
    let yaml = r#"
dbs:
  - path: /data/app.db
    replica:
      path: /backup/app
      age:
        recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]
        identities: [AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ]
"#;
    let c = parse(yaml);
    let r = only_replica(&c);
    assert_eq!(r.age_recipients.len(), 1);
    assert!(r.age_identities[0].starts_with("AGE-SECRET-KEY-1"));
    let debug = format!("{c:?}");
    assert!(!debug.contains("AGE-SECRET-KEY"), "{debug}");
    assert!(debug.contains("age1ql3z7"));
}

#[test]
fn snapshot_settings_per_database_apply_globally() {
    let c = parse(
        "dbs:\n  - path: /a.db\n    snapshot:\n      interval: 1h\n    replica: {path: /b/a}\n  - path: /b.db\n    snapshot:\n      interval: 1h\n      retention: 2h\n    replica: {path: /b/b}\n",
    );
    assert_eq!(
        (c.snapshot_interval, c.snapshot_retention),
        (Duration::from_secs(3600), Duration::from_secs(7200))
    );
    // The top level wins over databases.
    let c = parse(
        "snapshot:\n  interval: 3h\ndbs:\n  - path: /a.db\n    snapshot:\n      interval: 1h\n    replica: {path: /b/a}\n",
    );
    assert_eq!(c.snapshot_interval, Duration::from_secs(3 * 3600));
}

#[test]
fn env_expansion() {
    let yaml = "dbs:\n  - path: ${DATA}/app.db\n    replica:\n      url: s3://$BUCKET/app-${NOMAD_ALLOC_INDEX}${MISSING}\n      secret-access-key: pa$$word\n";
    let env = env_of(&[
        ("DATA", "/srv"),
        ("BUCKET", "bkt"),
        ("NOMAD_ALLOC_INDEX", "0"),
    ]);
    let c = Config::parse(yaml, true, &env).unwrap();
    assert_eq!(c.dbs[0].path, PathBuf::from("/srv/app.db"));
    let Location::S3(loc) = &only_replica(&c).location else {
        panic!()
    };
    assert_eq!((loc.bucket.as_str(), loc.prefix.as_str()), ("bkt", "app-0"));
    // Go's os.Expand turns `$$` into the (unset) variable `$`.
    assert_eq!(loc.secret_access_key.as_deref(), Some("paword"));

    // -no-expand-env keeps the text as written.
    let yaml = "dbs:\n  - path: /data/app.db\n    replica:\n      type: s3\n      bucket: bkt\n      secret-access-key: pa$$word${X}\n";
    let c = Config::parse(yaml, false, &env_of(&[("X", "y")])).unwrap();
    let Location::S3(loc) = &only_replica(&c).location else {
        panic!()
    };
    assert_eq!(loc.secret_access_key.as_deref(), Some("pa$$word${X}"));

    // LOG_LEVEL overrides logging.level, as in Litestream 0.5.
    let c = Config::parse(
        "logging:\n  level: info\n",
        true,
        &env_of(&[("LOG_LEVEL", "debug")]),
    )
    .unwrap();
    assert_eq!(c.log_level.as_deref(), Some("debug"));
}

/// (yaml, environment, expected access key id, expected secret).
type CredentialCase<'a> = (
    &'a str,
    &'a [(&'a str, &'a str)],
    Option<&'a str>,
    Option<&'a str>,
);

#[test]
fn credentials_precedence() {
    let yaml_own = "access-key-id: TOP\nsecret-access-key: TOPS\ndbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n      access-key-id: OWN\n      secret-access-key: OWNS\n";
    let yaml_top = "access-key-id: TOP\nsecret-access-key: TOPS\ndbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n";
    let yaml_none = "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n";
    let all_env: &[(&str, &str)] = &[
        ("AWS_ACCESS_KEY_ID", "AWS"),
        ("AWS_SECRET_ACCESS_KEY", "AWSS"),
        ("LITESTREAM_ACCESS_KEY_ID", "LS"),
        ("LITESTREAM_SECRET_ACCESS_KEY", "LSS"),
    ];
    let cases: Vec<CredentialCase> = vec![
        (yaml_own, all_env, Some("OWN"), Some("OWNS")),
        (yaml_top, all_env, Some("TOP"), Some("TOPS")),
        // Litestream copies LITESTREAM_* into AWS_* only when AWS_* is unset, so AWS_* wins.
        (yaml_none, all_env, Some("AWS"), Some("AWSS")),
        (
            yaml_none,
            &[
                ("LITESTREAM_ACCESS_KEY_ID", "LS"),
                ("LITESTREAM_SECRET_ACCESS_KEY", "LSS"),
            ],
            Some("LS"),
            Some("LSS"),
        ),
        (
            yaml_none,
            &[
                ("AWS_ACCESS_KEY_ID", ""),
                ("LITESTREAM_ACCESS_KEY_ID", "LS"),
            ],
            Some("LS"),
            None,
        ),
        (yaml_none, &[], None, None),
    ];
    for (yaml, env, id, secret) in cases {
        let c = Config::parse(yaml, true, &env_of(env)).unwrap();
        let Location::S3(loc) = &only_replica(&c).location else {
            panic!()
        };
        assert_eq!(
            (
                loc.access_key_id.as_deref(),
                loc.secret_access_key.as_deref()
            ),
            (id, secret),
            "{env:?}\n{yaml}"
        );
    }
    // File replicas never pick up credentials.
    let c = Config::parse(
        "dbs:\n  - path: /a.db\n    replica: {path: /b}\n",
        true,
        &env_of(all_env),
    )
    .unwrap();
    assert_eq!(
        only_replica(&c).location,
        Location::File { root: "/b".into() }
    );
}

#[test]
fn unknown_and_ignored_keys_are_warnings() {
    let yaml = r#"
socket:
  enabled: true
mcp-addr: ":3001"
colour: blue
dbs:
  - path: /a.db
    meta-path: /var/lib/litestream/a
    replica:
      url: s3://b/a
      storage-class: GLACIER
      sync-intervall: 1s
"#;
    let c = parse(yaml);
    let expect = [
        "socket: accepted but ignored",
        "mcp-addr: accepted but ignored",
        "colour: unknown key",
        "dbs[0].meta-path: accepted but ignored",
        "dbs[0].replica.storage-class: accepted but ignored",
        "dbs[0].replica.sync-intervall: unknown key",
    ];
    assert_eq!(c.warnings.len(), expect.len(), "{:#?}", c.warnings);
    for e in expect {
        assert!(
            c.warnings.iter().any(|w| w.starts_with(e)),
            "missing {e:?} in {:#?}",
            c.warnings
        );
    }
}

#[test]
fn bucket_without_type_is_a_file_replica_with_a_warning() {
    let c = parse("dbs:\n  - path: /a.db\n    replica:\n      bucket: b\n      path: /backup/a\n");
    assert_eq!(
        only_replica(&c).location,
        Location::File {
            root: "/backup/a".into()
        }
    );
    assert!(
        c.warnings.iter().any(|w| w.contains("type: s3")),
        "{:?}",
        c.warnings
    );
}

/// Every error path: (yaml, key path the error names, words the message must contain).
#[test]
fn errors_name_the_key_and_the_fix() {
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        ("dbs: [", None, &["invalid YAML"]),
        ("- a\n- b\n", Some("(top level)"), &["expected a mapping"]),
        ("dbs:\n  path: /a.db\n", Some("dbs"), &["expected a list"]),
        ("dbs:\n  - /a.db\n", Some("dbs[0]"), &["expected a mapping"]),
        (
            "dbs:\n  - replica: {path: /b}\n",
            Some("dbs[0]"),
            &["must specify 'path'"],
        ),
        (
            "dbs:\n  - path: /a.db\n",
            Some("dbs[0]"),
            &["must specify replica"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replicas: []\n",
            Some("dbs[0]"),
            &["must specify replica"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica: {path: /b}\n    replicas: [{path: /c}]\n",
            Some("dbs[0]"),
            &["'replica' and 'replicas'"],
        ),
        (
            "dbs:\n  - dir: /data\n    pattern: '*.db'\n    replica: {path: /b}\n",
            Some("dbs[0].dir"),
            &["directory discovery", "not supported by hearth yet"],
        ),
        (
            "dbs:\n  - path: /a.db\n    dir: /data\n    replica: {path: /b}\n",
            Some("dbs[0]"),
            &["both 'path' and 'dir'"],
        ),
        (
            "dbs:\n  - path: /a.db\n    watch: true\n    replica: {path: /b}\n",
            Some("dbs[0].watch"),
            &["only be used with 'dir'"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica: {path: /b}\n  - path: /a.db\n    replica: {path: /c}\n",
            Some("dbs[1].path"),
            &["already configured as dbs[0]"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      sync-interval: fast\n      path: /b\n",
            Some("dbs[0].replica.sync-interval"),
            &["\"fast\"", "Go duration"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      sync-interval: 10\n      path: /b\n",
            Some("dbs[0].replica.sync-interval"),
            &["nanoseconds", "10s"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      sync-interval: 0s\n      path: /b\n",
            Some("dbs[0].replica.sync-interval"),
            &["greater than 0"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      sync-interval: -1s\n      path: /b\n",
            Some("dbs[0].replica.sync-interval"),
            &["greater than 0"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      sync-interval: [1s]\n      path: /b\n",
            Some("dbs[0].replica.sync-interval"),
            &["found a list"],
        ),
        (
            "dbs:\n  - path: /a.db\n    busy-timeout: -1s\n    replica: {path: /b}\n",
            Some("dbs[0].busy-timeout"),
            &["must not be negative"],
        ),
        (
            "dbs:\n  - path: /a.db\n    min-checkpoint-page-count: lots\n    replica: {path: /b}\n",
            Some("dbs[0].min-checkpoint-page-count"),
            &["expected a number"],
        ),
        (
            "dbs:\n  - path: /a.db\n    min-checkpoint-page-count: -5\n    replica: {path: /b}\n",
            Some("dbs[0].min-checkpoint-page-count"),
            &["whole number"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      type: s3\n      skip-verify: maybe\n      bucket: b\n",
            Some("dbs[0].replica.skip-verify"),
            &["true or false"],
        ),
        (
            "snapshot:\n  interval: 0s\n",
            Some("snapshot.interval"),
            &["greater than 0"],
        ),
        (
            "snapshot: daily\n",
            Some("snapshot"),
            &["expected a mapping"],
        ),
        (
            "levels:\n  - interval: 0s\n",
            Some("levels[0].interval"),
            &["greater than 0"],
        ),
        (
            "levels:\n  - {}\n",
            Some("levels[0].interval"),
            &["greater than 0"],
        ),
        (
            "l0-retention: -5m\n",
            Some("l0-retention"),
            &["must not be negative"],
        ),
        (
            "shutdown-sync-timeout: soon\n",
            Some("shutdown-sync-timeout"),
            &["not a duration"],
        ),
        (
            "addr: localhost\n",
            Some("addr"),
            &["needs a port", ":9090"],
        ),
        (
            "retention:\n  enabled: maybe\n",
            Some("retention.enabled"),
            &["true or false"],
        ),
        (
            "dbs:\n  - path: /a.db\n    snapshot: {interval: 1h}\n    replica: {path: /b}\n  - path: /c.db\n    snapshot: {interval: 2h}\n    replica: {path: /d}\n",
            Some("dbs[1].snapshot.interval"),
            &["conflicts with dbs[0].snapshot.interval"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      path: s3://b/a\n",
            Some("dbs[0].replica.path"),
            &["cannot be a url", "url:"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: file:///b\n      path: /c\n",
            Some("dbs[0].replica"),
            &["url & path"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      type: file\n",
            Some("dbs[0].replica"),
            &["file replica path required"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: /backup/a\n",
            Some("dbs[0].replica.url"),
            &["scheme is required"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n      path: x\n",
            Some("dbs[0].replica"),
            &["url & path"],
        ),
        (
            "bucket: top\ndbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n",
            Some("dbs[0].replica"),
            &["url & bucket", "top-level"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      type: s3\n      path: x\n",
            Some("dbs[0].replica.bucket"),
            &["bucket required"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3:///x\n",
            Some("dbs[0].replica.url"),
            &["bucket required"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://bu cket/x\n",
            Some("dbs[0].replica.url"),
            &["invalid replica URL", "host name"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/x?partSize=big\n",
            Some("dbs[0].replica.url"),
            &["partSize", "positive integer"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://arn:aws:s3:us-east-1:123:accesspoint/ap/x\n",
            Some("dbs[0].replica.url"),
            &["access point", "not supported"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: gs://b/x\n",
            Some("dbs[0].replica.url"),
            &["\"gs\" replica type", "not supported"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      type: sftp\n      host: h\n",
            Some("dbs[0].replica.type"),
            &["\"sftp\" replica type"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      type: floppy\n      path: /b\n",
            Some("dbs[0].replica.type"),
            &["unknown replica type \"floppy\""],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: floppy://b/x\n",
            Some("dbs[0].replica.url"),
            &["unknown replica type"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replicas:\n      - {name: x, path: /b}\n      - {name: x, path: /c}\n",
            Some("dbs[0].replicas[1].name"),
            &["same name"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      age:\n        recipients: age1abc\n",
            Some("dbs[0].replica.age.recipients"),
            &["expected a list"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      age:\n        recipients: ['']\n",
            Some("dbs[0].replica.age"),
            &["age key is empty"],
        ),
        (
            "sse-customer-key: abc\n",
            Some("sse-customer-key"),
            &["server-side encryption", "age"],
        ),
        (
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/x\n      sse-kms-key-id: k\n",
            Some("dbs[0].replica.sse-kms-key-id"),
            &["server-side encryption"],
        ),
    ];
    for (yaml, key, words) in cases {
        let e = parse_err(yaml);
        assert_eq!(e.key(), *key, "{e}\n---\n{yaml}");
        let text = e.to_string();
        for w in *words {
            assert!(text.contains(w), "{text:?} lacks {w:?}\n---\n{yaml}");
        }
        assert!(!e.is_retryable());
    }
}

#[test]
fn errors_never_print_secrets() {
    let cases = [
        "dbs:\n  - path: /a.db\n    replica:\n      url: s3://AKIAXXXX:TOPSECRET@b/x?partSize=big\n",
        "dbs:\n  - path: /a.db\n    replica:\n      url: s3://AKIAXXXX:TOPSECRET@bu cket/x\n",
        "secret-access-key: [TOPSECRET]\n",
        "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      age:\n        identities: [1, TOPSECRET]\n",
    ];
    for yaml in cases {
        let e = parse_err(yaml);
        assert!(!format!("{e} {e:?}").contains("TOPSECRET"), "{e}");
    }
}

#[test]
fn load_reads_files_and_names_them_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("litestream.yml");
    std::fs::write(
        &good,
        "dbs:\n  - path: /data/app.db\n    replica:\n      url: file:///backup/app\n",
    )
    .unwrap();
    let c = Config::load(&good, true).unwrap();
    assert_eq!(
        c.db(Path::new("/data/./app.db")).map(|d| d.path.clone()),
        Some(PathBuf::from("/data/app.db"))
    );
    assert!(c.db(Path::new("/data/other.db")).is_none());

    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "dbs:\n  - path: /a.db\n    replica:\n      sync-interval: fast\n      path: /b\n",
    )
    .unwrap();
    let e = Config::load(&bad, true).unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("{}: dbs[0].replica.sync-interval:", bad.display())),
        "{text}"
    );

    let missing = dir.path().join("missing.yml");
    let e = Config::load(&missing, true).unwrap_err();
    assert!(matches!(e, ConfigError::NotFound { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with(&format!("config file not found: {}", missing.display()))
    );
    assert!(!e.is_retryable());

    // A directory cannot be read as a file.
    let e = Config::load(dir.path(), true).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");

    // An empty file is a valid config with no databases, as in Litestream.
    let empty = dir.path().join("empty.yml");
    std::fs::write(&empty, "").unwrap();
    assert!(Config::load(&empty, true).unwrap().dbs.is_empty());
}

#[test]
fn database_paths_are_normalised() {
    let env = env_of(&[("HOME", "/home/app")]);
    let c = Config::parse("dbs:\n  - path: ~/app.db\n    replica: {path: ~/backup}\n  - path: sqlite3:///data/x/../b.db\n    replica: {path: /b}\n", true, &env).unwrap();
    assert_eq!(c.dbs[0].path, PathBuf::from("/home/app/app.db"));
    assert_eq!(
        c.dbs[0].replicas[0].location,
        Location::File {
            root: "/home/app/backup".into()
        }
    );
    assert_eq!(c.dbs[1].path, PathBuf::from("/data/b.db"));
    let c = parse("dbs:\n  - path: rel/app.db\n    replica: {path: /b}\n");
    assert_eq!(
        c.dbs[0].path,
        std::env::current_dir().unwrap().join("rel/app.db")
    );
    assert!(c.db(Path::new("rel/app.db")).is_some());
}

#[test]
fn replicas_from_urls() {
    let env = env_of(&[
        ("LITESTREAM_ACCESS_KEY_ID", "LS"),
        ("LITESTREAM_SECRET_ACCESS_KEY", "LSS"),
    ]);
    let r = replica_from_url(
        "s3://bkt/db?endpoint=http://localhost:3900&region=garage",
        &env,
    )
    .unwrap();
    assert_eq!(r.name, "s3");
    assert_eq!(r.sync_interval, Duration::from_secs(1));
    assert_eq!(
        r.location,
        Location::S3(S3Location {
            endpoint: Some("http://localhost:3900".into()),
            region: Some("garage".into()),
            force_path_style: true,
            access_key_id: Some("LS".into()),
            secret_access_key: Some("LSS".into()),
            ..s3("bkt", "db")
        })
    );
    let r = replica_from_url("file:///backup/db", &env).unwrap();
    assert_eq!(
        (r.name.as_str(), r.location),
        (
            "file",
            Location::File {
                root: "/backup/db".into()
            }
        )
    );
    for (url, words) in [
        ("/backup/db", "scheme is required"),
        ("s3://", "bucket required"),
        ("webdav://h/x", "not supported"),
        ("s3://b/%zz", "invalid URL escape"),
    ] {
        let e = replica_from_url(url, &env).unwrap_err();
        assert_eq!(e.key(), Some("replica URL"));
        assert!(e.to_string().contains(words), "{url}: {e}");
    }

    let c = Config::from_command_line(
        "/data/app.db",
        &["file:///b1".into(), "file:///b2".into(), "s3://x/y".into()],
        &env,
    )
    .unwrap();
    let names: Vec<&str> = c.dbs[0].replicas.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["file", "file-1", "s3"]);
    assert!(Config::from_command_line("/data/app.db", &[], &env).is_err());
}

#[test]
fn default_config_path_follows_litestream() {
    assert_eq!(
        default_config_path(&env_of(&[])),
        PathBuf::from("/etc/litestream.yml")
    );
    assert_eq!(
        default_config_path(&env_of(&[("LITESTREAM_CONFIG", "")])),
        PathBuf::from("/etc/litestream.yml")
    );
    assert_eq!(
        default_config_path(&env_of(&[("LITESTREAM_CONFIG", "/local/l.yml")])),
        PathBuf::from("/local/l.yml")
    );
}

#[test]
fn yaml_anchors_and_merge_keys_work() {
    let yaml = "x-s3: &s3\n  type: s3\n  bucket: shared\n  endpoint: http://127.0.0.1:3900\ndbs:\n  - path: /a.db\n    replica:\n      <<: *s3\n      path: a\n  - path: /b.db\n    replica:\n      <<: *s3\n      path: b\n";
    let c = parse(yaml);
    for (db, prefix) in c.dbs.iter().zip(["a", "b"]) {
        let Location::S3(loc) = &db.replicas[0].location else {
            panic!()
        };
        assert_eq!(
            (loc.bucket.as_str(), loc.prefix.as_str()),
            ("shared", prefix)
        );
    }
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("x-s3: unknown key"))
    );
}
