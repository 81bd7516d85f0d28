//! Output formats for a [`Report`]: human (rustc style, optionally coloured), JSON and SARIF 2.1.0.

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use serde_json::json;

use crate::diag::{Diagnostic, Severity};
use crate::rules;
use crate::{FileKind, FileOutcome, Report, SourceFile};

fn level(s: Severity) -> Level<'static> {
    match s {
        Severity::Error => Level::ERROR,
        Severity::Warning => Level::WARNING,
        Severity::Note => Level::NOTE,
    }
}

fn text_of<'a>(files: &'a [SourceFile], path: &str) -> &'a str {
    files
        .iter()
        .find(|f| f.path == path)
        .map_or("", |f| f.text.as_str())
}

/// One diagnostic in rustc style.
pub fn human_diagnostic(d: &Diagnostic, files: &[SourceFile], color: bool) -> String {
    let text = text_of(files, &d.file);
    let mut snippet = Snippet::source(text).path(d.file.as_str()).annotation(
        AnnotationKind::Primary
            .span(d.span.clone())
            .label(d.label.as_str()),
    );
    let mut others: Vec<Snippet<'_, annotate_snippets::Annotation<'_>>> = Vec::new();
    for n in &d.notes {
        if n.file == d.file {
            snippet = snippet.annotation(
                AnnotationKind::Context
                    .span(n.span.clone())
                    .label(n.message.as_str()),
            );
        } else {
            others.push(
                Snippet::source(text_of(files, &n.file))
                    .path(n.file.as_str())
                    .annotation(
                        AnnotationKind::Context
                            .span(n.span.clone())
                            .label(n.message.as_str()),
                    ),
            );
        }
    }
    let mut group = level(d.severity)
        .primary_title(d.message.as_str())
        .id(d.rule)
        .element(snippet);
    for o in others {
        group = group.element(o);
    }
    let mut report = vec![group];
    if let Some(h) = &d.help {
        report.push(Group::with_title(Level::HELP.secondary_title(h.as_str())));
    }
    let renderer = if color {
        Renderer::styled()
    } else {
        Renderer::plain()
    };
    renderer.render(&report)
}

/// The "skipped" and "parse error" lines for files that were not checked.
pub fn file_notes(report: &Report) -> Vec<String> {
    report
        .files
        .iter()
        .filter_map(|(path, o)| match o {
            FileOutcome::SkippedTemplated {
                reason,
                line,
                column,
            } => Some(format!(
                "{path}:{line}:{column}: skipped: templated ({reason})"
            )),
            FileOutcome::ParseError {
                message,
                line,
                column,
            } => Some(format!(
                "{path}:{line}:{column}: skipped: not valid HCL ({message})"
            )),
            FileOutcome::Checked { .. } => None,
        })
        .collect()
}

/// The closing summary line.
pub fn summary(report: &Report) -> String {
    let count = |s: Severity| {
        report
            .diagnostics
            .iter()
            .filter(|d| d.severity == s)
            .count()
    };
    // Say what the checked files turned out to be, so that a client configuration or a volume
    // specification visibly counts as such rather than as a jobspec without jobs.
    let kinds: Vec<String> = [
        (FileKind::Jobspec, "jobspec"),
        (FileKind::Terraform, "Terraform"),
        (FileKind::VolumeSpec, "volume spec"),
        (FileKind::AgentConfig, "agent config"),
        (FileKind::Other, "other HCL"),
    ]
    .iter()
    .filter_map(|(k, name)| {
        let n = report
            .files
            .iter()
            .filter(|(_, o)| matches!(o, FileOutcome::Checked { kind, .. } if kind == k))
            .count();
        (n > 0).then(|| format!("{n} {name}"))
    })
    .collect();
    let kinds = if kinds.is_empty() {
        String::new()
    } else {
        format!(" ({})", kinds.join(", "))
    };
    format!(
        "checked {} files{kinds}, {} jobs: {} findings ({} errors, {} warnings, {} notes), {} skipped (templated), {} not valid HCL",
        report.files.len(),
        report.jobs(),
        report.diagnostics.len(),
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Note),
        report.skipped(),
        report.parse_errors()
    )
}

/// The whole report for a terminal or a log.
pub fn human(report: &Report, files: &[SourceFile], color: bool) -> String {
    let mut out = String::new();
    for d in &report.diagnostics {
        out.push_str(&human_diagnostic(d, files, color));
        out.push_str("\n\n");
    }
    for n in file_notes(report) {
        out.push_str(&n);
        out.push('\n');
    }
    out.push_str(&summary(report));
    out.push('\n');
    out
}

/// JSON: `{"files": […], "diagnostics": […], "summary": {…}}`.
pub fn json(report: &Report) -> String {
    let v = json!({
        "files": report.files.iter().map(|(p, o)| json!({"path": p, "outcome": o})).collect::<Vec<_>>(),
        "diagnostics": report.diagnostics,
        "summary": {
            "files": report.files.len(),
            "jobs": report.jobs(),
            "findings": report.diagnostics.len(),
            "skipped": report.skipped(),
            "parse_errors": report.parse_errors(),
        }
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// SARIF 2.1.0 for code-scanning tools. Skipped and unparsable files become tool notifications.
pub fn sarif(report: &Report) -> String {
    let sarif_level = |s: Severity| match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Note => "note",
    };
    let rules: Vec<_> = rules::ALL
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "shortDescription": {"text": r.summary},
                "fullDescription": {"text": r.rationale},
                "defaultConfiguration": {"level": sarif_level(r.default_severity)},
            })
        })
        .collect();
    let location = |file: &str, line: usize, column: usize| {
        json!({"physicalLocation": {
            "artifactLocation": {"uri": file},
            "region": {"startLine": line, "startColumn": column}
        }})
    };
    let results: Vec<_> = report
        .diagnostics
        .iter()
        .map(|d| {
            let mut msg = d.message.clone();
            if let Some(h) = &d.help {
                msg.push_str(&format!(" (help: {h})"));
            }
            json!({
                "ruleId": d.rule,
                "level": sarif_level(d.severity),
                "message": {"text": msg},
                "locations": [location(&d.file, d.line, d.column)],
                "relatedLocations": d.notes.iter().enumerate().map(|(i, n)| {
                    let mut l = location(&n.file, n.line, n.column);
                    l["id"] = json!(i);
                    l["message"] = json!({"text": n.message});
                    l
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    let notifications: Vec<_> = file_notes(report)
        .into_iter()
        .map(|n| json!({"level": "note", "message": {"text": n}}))
        .collect();
    let v = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "hearth-jobspec", "rules": rules}},
            "results": results,
            "invocations": [{"executionSuccessful": true, "toolExecutionNotifications": notifications}],
        }]
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}
