//! hearth and the real Litestream 0.5.17 judge the same `litestream.yml` files: both accept or both refuse,
//! except where docs/litestream-compat.md says hearth deliberately differs (those cases are pinned here too).

use hearth_sqlite::config::Config;

/// Whether `litestream databases -config FILE` accepts the file (it builds every database and replica, without
/// touching the network), and its output for messages.
fn litestream_accepts(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let file = dir.path().join("litestream.yml");
    std::fs::write(&file, yaml).expect("writing the config file");
    let bin = hearth_testkit::litestream_bin().expect("finding litestream 0.5.17");
    let out = hearth_testkit::command(bin)
        .args(["databases", "-config"])
        .arg(&file)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("LITESTREAM_ACCESS_KEY_ID")
        .current_dir(dir.path())
        .output()
        .expect("running litestream databases");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn hearth_accepts(yaml: &str) -> (bool, String) {
    match Config::parse(yaml, true, &|_: &str| None) {
        Ok(c) => (
            true,
            format!("{} databases, warnings {:?}", c.dbs.len(), c.warnings),
        ),
        Err(e) => (false, e.to_string()),
    }
}

#[test]
fn hearth_and_litestream_agree_on_configs() {
    // (what, yaml, hearth accepts, litestream accepts)
    let cases: &[(&str, &str, bool, bool)] = &[
        (
            "0.5 replica URL",
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n",
            true,
            true,
        ),
        (
            "0.3 replicas list of one",
            "dbs:\n  - path: /a.db\n    replicas:\n      - url: s3://b/a\n",
            true,
            true,
        ),
        (
            "file path",
            "dbs:\n  - path: /a.db\n    replica:\n      path: /backup/a\n",
            true,
            true,
        ),
        (
            "query endpoint",
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a?endpoint=localhost:3900&region=garage&forcePathStyle=true\n",
            true,
            true,
        ),
        (
            "YAML 1.1 boolean",
            "dbs:\n  - path: /a.db\n    replica:\n      type: s3\n      bucket: b\n      skip-verify: yes\n",
            true,
            true,
        ),
        (
            "unknown keys",
            "colour: blue\ndbs:\n  - path: /a.db\n    foo: 1\n    replica:\n      path: /b\n      bar: 2\n",
            true,
            true,
        ),
        (
            "bucket without type",
            "dbs:\n  - path: /a.db\n    replica:\n      bucket: b\n      path: /b\n",
            true,
            true,
        ),
        (
            "numeric bucket",
            "dbs:\n  - path: /a.db\n    replica:\n      type: s3\n      bucket: 2024\n",
            true,
            true,
        ),
        (
            "merge key",
            "x: &s3\n  type: s3\n  bucket: shared\ndbs:\n  - path: /a.db\n    replica:\n      <<: *s3\n      path: a\n",
            true,
            true,
        ),
        ("empty file", "", true, true),
        (
            "l0-retention 0",
            "l0-retention: 0\ndbs:\n  - path: /a.db\n    replica: {path: /b}\n",
            true,
            true,
        ),
        (
            "bad duration",
            "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      sync-interval: fast\n",
            false,
            false,
        ),
        (
            "zero sync interval",
            "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      sync-interval: 0s\n",
            false,
            false,
        ),
        (
            "top bucket and URL",
            "bucket: top\ndbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n",
            false,
            false,
        ),
        ("no replica", "dbs:\n  - path: /a.db\n", false, false),
        (
            "replica and replicas",
            "dbs:\n  - path: /a.db\n    replica: {path: /b}\n    replicas: [{path: /c}]\n",
            false,
            false,
        ),
        (
            "URL without scheme",
            "dbs:\n  - path: /a.db\n    replica:\n      url: /b\n",
            false,
            false,
        ),
        (
            "URL in path",
            "dbs:\n  - path: /a.db\n    replica:\n      path: s3://b/a\n",
            false,
            false,
        ),
        (
            "url and path",
            "dbs:\n  - path: /a.db\n    replica:\n      url: s3://b/a\n      path: x\n",
            false,
            false,
        ),
        (
            "file without path",
            "dbs:\n  - path: /a.db\n    replica:\n      type: file\n",
            false,
            false,
        ),
        (
            "s3 without bucket",
            "dbs:\n  - path: /a.db\n    replica:\n      type: s3\n      path: x\n",
            false,
            false,
        ),
        (
            "unknown type",
            "dbs:\n  - path: /a.db\n    replica:\n      type: floppy\n      path: /b\n",
            false,
            false,
        ),
        (
            "duplicate database",
            "dbs:\n  - path: /a.db\n    replica: {path: /b}\n  - path: /a.db\n    replica: {path: /c}\n",
            false,
            false,
        ),
        ("not YAML", "dbs: [", false, false),
        // Deliberate differences (docs/litestream-compat.md, "Where hearth differs").
        (
            "several replicas",
            "dbs:\n  - path: /a.db\n    replicas:\n      - path: /b\n      - url: s3://b/a\n",
            true,
            false,
        ),
        (
            "age encryption",
            "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      age:\n        recipients: [age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p]\n",
            true,
            false,
        ),
        (
            "quoted boolean",
            "dbs:\n  - path: /a.db\n    replica:\n      type: s3\n      bucket: b\n      skip-verify: \"true\"\n",
            true,
            false,
        ),
        (
            "bare number duration",
            "dbs:\n  - path: /a.db\n    replica:\n      path: /b\n      sync-interval: 10\n",
            false,
            true,
        ),
        (
            "SSE-C key",
            "sse-customer-key: abc\ndbs:\n  - path: /a.db\n    replica: {url: s3://b/a}\n",
            false,
            true,
        ),
        (
            "directory discovery",
            "dbs:\n  - dir: /tmp\n    pattern: '*.nothing-matches'\n    watch: true\n    replica:\n      path: /b\n",
            false,
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (what, yaml, hearth_ok, litestream_ok) in cases {
        let (h, h_text) = hearth_accepts(yaml);
        let (l, l_text) = litestream_accepts(yaml);
        if (h, l) != (*hearth_ok, *litestream_ok) {
            failures.push(format!(
                "{what}: hearth {h} (want {hearth_ok}): {h_text}\n    litestream {l} (want {litestream_ok}): {l_text}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
