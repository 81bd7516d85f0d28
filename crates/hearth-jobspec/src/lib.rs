//! Nomad jobspec checks and storage migrations, sans-IO: text in, diagnostics or rewritten text out.
//!
//! The command-line front end (`hearth jobspec`) reads files and hands their text to [`check`] and
//! [`migrate`]; nothing in this crate touches the file system, so every rule is a pure function of
//! the scanned tree and is tested with literal strings.

pub mod config;
pub mod diag;
pub mod litestream;
pub mod migrate;
pub mod model;
pub mod render;
pub mod rules;
pub mod shell;
pub mod source;

pub use config::{Config, ConfigError};
pub use diag::{Diagnostic, Label, Severity};
pub use migrate::{MigrateError, Migration, Replacement, Rewrite, Unsafe, migrate};
pub use source::{FileKind, SourceFile};

use model::Tree;

/// What happened to one input file during a check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FileOutcome {
    /// The file parsed and was checked.
    Checked {
        /// What the file turned out to be.
        kind: FileKind,
        /// How many `job` blocks it holds.
        jobs: usize,
    },
    /// The file uses a templating language that must be rendered before HCL tools can read it.
    SkippedTemplated {
        /// Which templating was recognised, e.g. "Levant `[[ ]]`".
        reason: String,
        /// One-based line of the first template marker.
        line: usize,
        /// One-based column of the first template marker.
        column: usize,
    },
    /// The file is not valid HCL.
    ParseError {
        /// The parser's message.
        message: String,
        /// One-based line.
        line: usize,
        /// One-based column.
        column: usize,
    },
}

/// The result of [`check`] for a whole tree.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// One entry per input file, in input order.
    pub files: Vec<(String, FileOutcome)>,
    /// Findings, sorted by file, position and rule, with suppressed and disabled ones removed.
    pub diagnostics: Vec<Diagnostic>,
}

impl Report {
    /// Number of `job` blocks over all checked files.
    pub fn jobs(&self) -> usize {
        self.files
            .iter()
            .map(|(_, o)| match o {
                FileOutcome::Checked { jobs, .. } => *jobs,
                _ => 0,
            })
            .sum()
    }

    /// Number of files skipped because of templating.
    pub fn skipped(&self) -> usize {
        self.files
            .iter()
            .filter(|(_, o)| matches!(o, FileOutcome::SkippedTemplated { .. }))
            .count()
    }

    /// Number of files that failed to parse.
    pub fn parse_errors(&self) -> usize {
        self.files
            .iter()
            .filter(|(_, o)| matches!(o, FileOutcome::ParseError { .. }))
            .count()
    }
}

/// Parses and checks a set of files as one tree.
///
/// Cross-file rules (declared and used volumes) see every file at once, which is why this takes the
/// whole tree rather than one file. Files that do not parse or are templated are reported in
/// [`Report::files`] and otherwise ignored.
pub fn check(files: &[SourceFile], config: &Config) -> Report {
    let tree = Tree::build(files);
    let mut diagnostics = Vec::new();
    for rule in rules::ALL {
        let severity = config.severity_for(rule.id, rule.default_severity);
        let Some(severity) = severity else { continue };
        let mut found = (rule.check)(&tree, config);
        for d in &mut found {
            d.severity = severity;
        }
        diagnostics.extend(found);
    }
    diagnostics.retain(|d| {
        !config.is_ignored(d.rule, &d.file)
            && !tree
                .file(&d.file)
                .is_some_and(|f| f.suppressions.suppresses(d.rule, d.line))
    });
    diagnostics.sort_by(|a, b| {
        (a.file.as_str(), a.line, a.column, a.rule).cmp(&(
            b.file.as_str(),
            b.line,
            b.column,
            b.rule,
        ))
    });
    diagnostics.dedup_by(|a, b| {
        a.file == b.file && a.span == b.span && a.rule == b.rule && a.message == b.message
    });
    Report {
        files: tree.outcomes(),
        diagnostics,
    }
}

/// Whether `path` is `prefix` or lies below it, comparing whole path components
/// (`/data/compute/x` is under `/data/compute`, `/data/computer` is not).
pub fn path_under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return path.starts_with('/');
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}
