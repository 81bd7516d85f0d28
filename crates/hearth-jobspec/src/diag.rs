//! Diagnostics: one finding of one rule, located in a file, with optional secondary labels and a hint.

use std::ops::Range;

/// How serious a finding is. Ordered so that `Error > Warning > Note`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing; never a likely data loss.
    Note,
    /// A likely problem that a person should review.
    Warning,
    /// A pattern that loses or corrupts data when it goes wrong.
    Error,
}

impl Severity {
    /// Parses `error`, `warning` or `note` (and `warn`, `info` as aliases).
    pub fn parse(s: &str) -> Option<Severity> {
        match s.to_ascii_lowercase().as_str() {
            "error" | "deny" => Some(Severity::Error),
            "warning" | "warn" => Some(Severity::Warning),
            "note" | "info" => Some(Severity::Note),
            _ => None,
        }
    }

    /// The lower-case name used in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// A secondary location that explains a finding (e.g. where the network volume is declared).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Label {
    /// File of the label; may differ from the diagnostic's file.
    pub file: String,
    /// Byte range in that file.
    #[serde(skip)]
    pub span: Range<usize>,
    /// One-based line.
    pub line: usize,
    /// One-based column.
    pub column: usize,
    /// What this location contributes.
    pub message: String,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The rule's stable id, e.g. `image-latest`.
    pub rule: &'static str,
    /// Severity after configuration.
    pub severity: Severity,
    /// File the finding is in.
    pub file: String,
    /// Byte range of the primary location.
    #[serde(skip)]
    pub span: Range<usize>,
    /// One-based line of the primary location.
    pub line: usize,
    /// One-based column of the primary location.
    pub column: usize,
    /// One-line description of the problem.
    pub message: String,
    /// Short text under the primary location.
    pub label: String,
    /// Related locations.
    pub notes: Vec<Label>,
    /// How to fix it.
    pub help: Option<String>,
}
