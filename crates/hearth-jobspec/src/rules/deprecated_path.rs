//! Rule `deprecated-path`: paths under configured deprecated prefixes.

use super::Rule;
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::migrate::{Piece, Strings, path_occurrences};
use crate::model::Tree;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "deprecated-path",
    default_severity: Severity::Warning,
    summary: "A string, template or heredoc (for example an embedded `litestream.yml`) mentions a path under one of `deprecated_paths`.",
    rationale: "During a storage migration (say `/data/compute` to `/data/services`) every leftover reference either writes to the old disk, which is about to be retired, or reads stale data. The rule finds whole-path mentions only (`/data/computer` and `/mnt/data/compute` are not under `/data/compute`); `hearth jobspec migrate --path OLD=NEW` rewrites them. Off unless prefixes are configured.",
    check,
};

fn check(tree: &Tree, config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if config.deprecated_paths.is_empty() {
        return out;
    }
    for file in &tree.files {
        let Some(body) = &file.body else { continue };
        for pieces in Strings::collect(body) {
            for piece in &pieces {
                let Piece::Literal(span) = piece else {
                    continue;
                };
                let Some(raw) = file.text.get(span.clone()) else {
                    continue;
                };
                for prefix in &config.deprecated_paths {
                    for i in path_occurrences(raw, prefix) {
                        let start = span.start + i;
                        let mut d = file.diag(
                            RULE.id,
                            start..start + prefix.len(),
                            format!("path under deprecated prefix `{prefix}`"),
                            "deprecated location",
                        );
                        d.help = Some(format!(
                            "move it with `hearth jobspec migrate --path {prefix}=NEW`"
                        ));
                        out.push(d);
                    }
                }
            }
        }
    }
    out
}
