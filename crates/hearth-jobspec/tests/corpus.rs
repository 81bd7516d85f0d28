//! Runs the checker and the migrator over every file of the shared jobspec corpus
//! (../shared/corpus/nomad-jobspecs beside the workspace): no panic, lossless round trips,
//! idempotent migrations that leave parseable files.

// Helpers outside `#[test]` functions unwrap too; tests may unwrap (DEVELOPERS.md).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use hearth_jobspec::{Config, FileOutcome, Migration, SourceFile, check, migrate};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/nomad-jobspecs")
}

/// Every regular file of the corpus (all extensions: non-jobspec files must not panic either).
fn corpus() -> Vec<SourceFile> {
    let dir = corpus_dir();
    assert!(
        dir.is_dir(),
        "the shared corpus is missing at {}",
        dir.display()
    );
    let mut out = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let rel = p.strip_prefix(&dir).unwrap().display().to_string();
                out.push(SourceFile::new(rel, String::from_utf8_lossy(&bytes)));
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    assert!(
        out.len() > 300,
        "expected the whole corpus, found {} files",
        out.len()
    );
    out
}

#[test]
fn checks_the_whole_corpus_without_panicking() {
    let files = corpus();
    let config = Config::parse(
        "network_mounts = [\"/mnt/nfs\", \"/mnt/gluster\"]\ndeprecated_paths = [\"/data/compute\"]\nvolume_name_patterns = [\"<service>_<type>\"]\n",
    )
    .unwrap();
    let report = check(&files, &config);
    assert_eq!(report.files.len(), files.len());
    // The Levant-templated recipes are recognised as such, not reported as broken HCL.
    let levant = report
        .files
        .iter()
        .filter(|(p, o)| {
            p.starts_with("aldoborrero") && matches!(o, FileOutcome::SkippedTemplated { .. })
        })
        .count();
    assert!(levant >= 20, "only {levant} Levant files recognised");
    assert!(report.jobs() > 150, "only {} jobs found", report.jobs());
    // Each file on its own as well, as the fuzz target does.
    for f in &files {
        let _ = check(std::slice::from_ref(f), &Config::default());
    }
}

/// Whether hcl-edit's own printer is known to change this text: it re-indents the body of a
/// `<<-` heredoc whose lines are indented less than the closing delimiter (hcl-edit 0.10).
/// `migrate` never re-prints a syntax tree (it patches byte ranges), so this only limits the
/// hcl-edit round-trip assertion below, not our output.
fn hcl_edit_reindents(text: &str) -> bool {
    text.contains("<<-")
}

#[test]
fn parsed_files_print_back_byte_identical() {
    let (mut parsed, mut printer_exact) = (0, 0);
    let nothing = Migration {
        paths: vec![("/no/such/prefix".into(), "/elsewhere".into())],
        volumes: vec![("no_such_volume".into(), "other".into())],
    };
    for f in corpus() {
        if let Ok(body) = hcl_edit::parser::parse_body(&f.text) {
            parsed += 1;
            // Our output path: a migration that matches nothing returns the input byte for byte.
            match migrate(&f, &nothing) {
                Ok(rw) => {
                    assert_eq!(rw.text, f.text, "no-op migration changed {}", f.path);
                    assert!(rw.replacements.is_empty());
                }
                Err(hearth_jobspec::MigrateError::Templated { .. }) => {}
                Err(e) => panic!("{}: {e}", f.path),
            }
            // The parser's own printer, for every file it is not known to re-indent.
            if !hcl_edit_reindents(&f.text) {
                assert_eq!(
                    body.to_string(),
                    f.text,
                    "hcl-edit round trip changed {}",
                    f.path
                );
                printer_exact += 1;
            }
        }
    }
    assert!(parsed > 200, "only {parsed} files parsed");
    assert!(
        printer_exact > 150,
        "only {printer_exact} files checked against the printer"
    );
}

#[test]
fn migrate_is_idempotent_and_keeps_files_parseable() {
    let m = Migration {
        paths: vec![
            ("/mnt/nas".into(), "/mnt/storage".into()),
            ("/data".into(), "/data/services".into()),
            ("/var/lib".into(), "/srv/lib".into()),
        ],
        volumes: vec![
            ("glusterfs_*".into(), "nfs_*".into()),
            ("data".into(), "data_v2".into()),
        ],
    };
    let mut changed = 0;
    for f in corpus() {
        let Ok(first) = migrate(&f, &m) else { continue };
        let again = SourceFile::new(f.path.clone(), first.text.clone());
        let second = migrate(&again, &m).unwrap();
        assert_eq!(second.text, first.text, "second run changed {}", f.path);
        assert!(
            second.replacements.is_empty(),
            "second run replaced in {}: {:?}",
            f.path,
            second.replacements
        );
        if first.changed() {
            changed += 1;
            let report = check(&[again], &Config::default());
            assert!(
                matches!(report.files[0].1, FileOutcome::Checked { .. }),
                "{} no longer parses after migration: {:?}",
                f.path,
                report.files[0].1
            );
        }
    }
    assert!(
        changed > 10,
        "the sample migration changed only {changed} files"
    );
}
