//! Fuzz target for the parse-and-check entry point, runnable on stable as a proptest in the
//! normal test suite: random text, HCL-ish token soup and mutated corpus files go through
//! `check`, `migrate` and every renderer, which must not panic. Set `PROPTEST_CASES` to run
//! longer by hand (see docs/jobspec.md).

// Helpers outside `#[test]` functions unwrap too; tests may unwrap (DEVELOPERS.md).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::LazyLock;

use hearth_jobspec::{Config, Migration, SourceFile, check, migrate, render};
use proptest::prelude::*;

static SEEDS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/nomad-jobspecs");
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
    }
    out.sort();
    out.push(
        "job \"x\" { group \"g\" { task \"t\" { config { image = \"a:latest\" } } } }\n"
            .to_string(),
    );
    out
});

fn config() -> Config {
    Config::parse("network_mounts = [\"/mnt\"]\ndeprecated_paths = [\"/data\"]\nvolume_name_patterns = [\"<service>_<x>\"]\n").unwrap()
}

/// The entry point under test: check one file as a tree, render it three ways, migrate it.
fn exercise(path: &str, text: &str) {
    let files = [SourceFile::new(path, text)];
    let report = check(&files, &config());
    let _ = render::human(&report, &files, true);
    let _ = render::json(&report);
    let _ = render::sarif(&report);
    let m = Migration {
        paths: vec![("/data".into(), "/srv/data".into())],
        volumes: vec![("data".into(), "data2".into())],
    };
    if let Ok(rw) = migrate(&files[0], &m) {
        let again = migrate(&SourceFile::new(path, rw.text.clone()), &m).unwrap();
        assert_eq!(again.text, rw.text, "migration not idempotent");
    }
}

const TOKENS: &[&str] = &[
    "job",
    "group",
    "task",
    "\"x\"",
    "{",
    "}",
    "[",
    "]",
    "=",
    "\n",
    " ",
    "<<EOF\n",
    "<<-EOF\n",
    "EOF\n",
    "${",
    "%{",
    "\"",
    "volume",
    "source",
    "/data/x.db",
    "litestream restore",
    "|| true",
    "sleep 5;",
    "image",
    "\"a:latest\"",
    "#",
    "//",
    "[[ .x ]]",
    "resource",
    "\"nomad_csi_volume\"",
    "lifecycle",
    "hook",
    "\"prestart\"",
    "dbs:\n  - path: /a\n",
    "\\",
    "é",
    "\u{0}",
    "\r\n",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_text(text in "\\PC{0,400}") {
        exercise("random.hcl", &text);
    }

    #[test]
    fn token_soup(tokens in proptest::collection::vec(proptest::sample::select(TOKENS), 0..80)) {
        exercise("soup.nomad", &tokens.concat());
    }

    #[test]
    fn mutated_corpus(seed in any::<proptest::sample::Index>(), cuts in proptest::collection::vec((any::<proptest::sample::Index>(), any::<proptest::sample::Index>(), proptest::sample::select(TOKENS)), 1..6)) {
        let mut text = seed.get(&SEEDS).clone();
        for (at, len, insert) in cuts {
            if text.is_empty() { break; }
            let mut start = at.index(text.len());
            while !text.is_char_boundary(start) { start -= 1; }
            let mut end = (start + len.index(16)).min(text.len());
            while !text.is_char_boundary(end) { end -= 1; }
            text.replace_range(start..end.max(start), insert);
        }
        exercise("mutated.nomad.hcl", &text);
    }
}
