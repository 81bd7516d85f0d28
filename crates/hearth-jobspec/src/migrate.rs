//! `migrate`: prefix replacement of host paths and renaming of volumes, as byte-range patches on
//! the original text so that comments, layout and `nomad fmt` style survive untouched.
//!
//! hcl-edit finds every string literal and template literal with its byte span; the patches are
//! applied to those spans only and the result is parsed again. Patching spans instead of editing
//! the syntax tree avoids hcl-edit re-escaping `${` in rebuilt strings (see
//! ../shared/research/nomad.md §1.3) and keeps untouched bytes identical by construction.

use std::ops::Range;

use hcl_edit::Span;
use hcl_edit::expr::Expression;
use hcl_edit::structure::{Block, Body};
use hcl_edit::template::Element;
use hcl_edit::visit::{self, Visit};

use crate::model::strip_index;
use crate::source::{LineIndex, SourceFile, templated};

/// Errors for one file. None is retryable: the input has to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MigrateError {
    /// The file is not valid HCL, so nothing in it can be rewritten safely.
    #[error("not valid HCL at {line}:{column}: {message}")]
    Parse {
        /// The parser's message.
        message: String,
        /// One-based line.
        line: usize,
        /// One-based column.
        column: usize,
    },
    /// The file is a template for another tool.
    #[error("skipped: templated ({reason}) at {line}:{column}")]
    Templated {
        /// Which templating.
        reason: String,
        /// One-based line.
        line: usize,
        /// One-based column.
        column: usize,
    },
    /// The rewritten text no longer parses; the rewrite is withheld (a bug in this crate).
    #[error("rewrite would produce invalid HCL ({0}); nothing written")]
    Verify(String),
}

/// What to rewrite.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migration {
    /// `(old, new)` host path prefixes.
    pub paths: Vec<(String, String)>,
    /// `(old, new)` volume IDs or names; a trailing `*` on both renames by prefix.
    pub volumes: Vec<(String, String)>,
}

/// One replacement made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Replacement {
    /// `path` or `volume`.
    pub kind: &'static str,
    /// One-based line in the original text.
    pub line: usize,
    /// One-based column in the original text.
    pub column: usize,
    /// Text replaced.
    pub old: String,
    /// Replacement text.
    pub new: String,
}

/// A place that might need a replacement but is computed, so it was left alone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unsafe {
    /// One-based line.
    pub line: usize,
    /// One-based column.
    pub column: usize,
    /// What was found and why it was not rewritten.
    pub message: String,
}

/// The outcome for one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    /// The new text (equal to the input when nothing changed).
    pub text: String,
    /// Replacements, in file order.
    pub replacements: Vec<Replacement>,
    /// Places left alone because they are computed.
    pub unsafe_sites: Vec<Unsafe>,
}

impl Rewrite {
    /// Whether the text changed.
    pub fn changed(&self) -> bool {
        !self.replacements.is_empty()
    }
}

/// A run of a string: literal text at a byte range, or a computed part.
#[derive(Debug, Clone)]
pub(crate) enum Piece {
    Literal(Range<usize>),
    Computed,
}

/// Collects every string and template in a body as a sequence of pieces, skipping block labels
/// and object keys (names, not paths).
#[derive(Default)]
pub(crate) struct Strings {
    pub(crate) strings: Vec<Vec<Piece>>,
}

impl Strings {
    pub(crate) fn collect(body: &Body) -> Vec<Vec<Piece>> {
        let mut s = Strings::default();
        s.visit_body(body);
        s.strings
    }

    fn elements<'a>(&mut self, elements: impl Iterator<Item = &'a Element>) {
        let mut pieces = Vec::new();
        for el in elements {
            match el {
                Element::Literal(l) => {
                    if let Some(span) = l.span() {
                        pieces.push(Piece::Literal(span));
                    }
                }
                Element::Interpolation(i) => {
                    pieces.push(Piece::Computed);
                    visit::visit_expr(self, &i.expr);
                }
                Element::Directive(d) => {
                    pieces.push(Piece::Computed);
                    visit::visit_directive(self, d);
                }
            }
        }
        self.strings.push(pieces);
    }
}

impl Visit for Strings {
    fn visit_expr(&mut self, e: &Expression) {
        match e {
            Expression::String(s) => {
                if let Some(span) = s.span() {
                    self.strings.push(vec![Piece::Literal(span)]);
                }
            }
            Expression::StringTemplate(t) => self.elements(t.iter()),
            Expression::HeredocTemplate(h) => self.elements(h.template.iter()),
            other => visit::visit_expr(self, other),
        }
    }

    fn visit_object_key(&mut self, _key: &hcl_edit::expr::ObjectKey) {}
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/' | '}' | '$' | '~')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Offsets in `raw` where the host path `old` starts as a whole path (not inside a longer path,
/// not continued by more name characters).
pub(crate) fn path_occurrences(raw: &str, old: &str) -> Vec<usize> {
    if old.is_empty() {
        return Vec::new();
    }
    raw.match_indices(old)
        .map(|(i, _)| i)
        .filter(|&i| {
            let before_ok = raw[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !is_path_char(c));
            let after_ok = old.ends_with('/')
                || raw[i + old.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !is_name_char(c));
            before_ok && after_ok
        })
        .collect()
}

/// Proper prefixes of `old` that end at a path separator and contain at least one component
/// (`/data/` for `/data/compute`).
fn component_prefixes(old: &str) -> Vec<&str> {
    old.match_indices('/')
        .map(|(i, _)| &old[..=i])
        .filter(|p| p.len() > 1 && p.len() < old.len())
        .collect()
}

/// Proper suffixes of `old` that start at a path separator (`/compute` for `/data/compute`).
fn component_suffixes(old: &str) -> Vec<&str> {
    old.match_indices('/')
        .map(|(i, _)| &old[i..])
        .filter(|s| s.len() > 1 && s.len() < old.len())
        .collect()
}

struct Edit {
    span: Range<usize>,
    new: String,
    kind: &'static str,
}

/// Rewrites one file. Pure: the caller writes the result.
pub fn migrate(file: &SourceFile, m: &Migration) -> Result<Rewrite, MigrateError> {
    let text = file.text.as_str();
    let index = LineIndex::new(text);
    let parsed = hcl_edit::parser::parse_body(text);
    let error_at = parsed.as_ref().err().map(|e| e.location().offset());
    if let Some((reason, at)) = templated(&file.path, text, error_at) {
        let (line, column) = index.position(text, at);
        return Err(MigrateError::Templated {
            reason,
            line,
            column,
        });
    }
    let body = parsed.map_err(|e| MigrateError::Parse {
        message: e.message().to_string(),
        line: e.location().line(),
        column: e.location().column(),
    })?;
    let mut edits: Vec<Edit> = Vec::new();
    let mut unsafe_sites = Vec::new();
    let at = |off: usize| index.position(text, off);

    for pieces in Strings::collect(&body) {
        for (pi, piece) in pieces.iter().enumerate() {
            let Piece::Literal(span) = piece else {
                continue;
            };
            let Some(raw) = text.get(span.clone()) else {
                continue;
            };
            for (old, new) in &m.paths {
                for i in path_occurrences(raw, old) {
                    // Already migrated (the new path extends the old one): leave it, so a second run changes nothing.
                    if new.starts_with(old.as_str()) && raw[i..].starts_with(new.as_str()) {
                        continue;
                    }
                    edits.push(Edit {
                        span: span.start + i..span.start + i + old.len(),
                        new: new.clone(),
                        kind: "path",
                    });
                }
                let next_computed = matches!(pieces.get(pi + 1), Some(Piece::Computed));
                let prev_computed = pi > 0 && matches!(pieces.get(pi - 1), Some(Piece::Computed));
                if next_computed {
                    for p in component_prefixes(old) {
                        if raw.ends_with(p)
                            && path_occurrences(raw, p).contains(&(raw.len() - p.len()))
                        {
                            let (line, column) = at(span.end - p.len());
                            unsafe_sites.push(Unsafe {
                                line,
                                column,
                                message: format!(
                                    "`{p}` is followed by an interpolation; the value may be under `{old}`, not rewritten"
                                ),
                            });
                            break;
                        }
                    }
                }
                if prev_computed {
                    for suffix in component_suffixes(old) {
                        let boundary = raw[suffix.len().min(raw.len())..]
                            .chars()
                            .next()
                            .is_none_or(|c| !is_name_char(c));
                        if raw.starts_with(suffix) && boundary {
                            let (line, column) = at(span.start);
                            unsafe_sites.push(Unsafe {
                                line,
                                column,
                                message: format!(
                                    "`{suffix}` follows an interpolation; the value may be under `{old}`, not rewritten"
                                ),
                            });
                            break;
                        }
                    }
                }
            }
        }
    }

    if !m.volumes.is_empty() {
        volume_edits(&body, text, m, &mut edits, &mut unsafe_sites, &index);
    }

    edits.sort_by_key(|e| (e.span.start, e.span.end));
    edits.dedup_by(|a, b| a.span == b.span);
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut replacements = Vec::new();
    for e in &edits {
        if e.span.start < last {
            continue;
        }
        out.push_str(&text[last..e.span.start]);
        out.push_str(&e.new);
        last = e.span.end;
        let (line, column) = at(e.span.start);
        replacements.push(Replacement {
            kind: e.kind,
            line,
            column,
            old: text[e.span.clone()].to_string(),
            new: e.new.clone(),
        });
    }
    out.push_str(&text[last..]);
    if !replacements.is_empty() {
        hcl_edit::parser::parse_body(&out)
            .map_err(|e| MigrateError::Verify(e.message().to_string()))?;
    }
    unsafe_sites.sort_by_key(|u| (u.line, u.column));
    unsafe_sites.dedup();
    Ok(Rewrite {
        text: out,
        replacements,
        unsafe_sites,
    })
}

/// The new name for a volume ID, if `(old, new)` applies to it.
fn rename(id: &str, old: &str, new: &str) -> Option<String> {
    let base = strip_index(id);
    let suffix = &id[base.len()..];
    if let (Some(op), Some(np)) = (old.strip_suffix('*'), new.strip_suffix('*')) {
        let rest = base.strip_prefix(op)?;
        if base.starts_with(np) && !np.starts_with(op) {
            return None;
        }
        return Some(format!("{np}{rest}{suffix}"));
    }
    (base == old).then(|| format!("{new}{suffix}"))
}

fn volume_edits(
    body: &Body,
    text: &str,
    m: &Migration,
    edits: &mut Vec<Edit>,
    unsafe_sites: &mut Vec<Unsafe>,
    index: &LineIndex,
) {
    let mut targets: Vec<&Expression> = Vec::new();
    let mut labels: Vec<Range<usize>> = Vec::new();
    fn walk<'a>(b: &'a Block, targets: &mut Vec<&'a Expression>) {
        for g in b.body.get_blocks("group") {
            for v in g.body.get_blocks("volume") {
                if let Some(a) = v.body.get_attribute("source") {
                    targets.push(&a.value);
                }
            }
        }
    }
    for b in body.blocks() {
        match b.ident.as_str() {
            "job" => walk(b, &mut targets),
            "resource" => {
                let ty = b.labels.first().map(|l| l.as_str()).unwrap_or_default();
                let keys: &[&str] = match ty {
                    "nomad_csi_volume" | "nomad_csi_volume_registration" => &["volume_id", "name"],
                    "nomad_dynamic_host_volume" | "nomad_dynamic_host_volume_registration" => {
                        &["name"]
                    }
                    _ => &[],
                };
                for k in keys {
                    if let Some(a) = b.body.get_attribute(k) {
                        targets.push(&a.value);
                    }
                }
            }
            "client" => {
                for hv in b.body.get_blocks("host_volume") {
                    if let Some(hcl_edit::structure::BlockLabel::String(s)) = hv.labels.first()
                        && let Some(span) = s.span()
                    {
                        labels.push(span);
                    }
                }
            }
            _ => {}
        }
    }
    let is_spec = body.has_attribute("type")
        && (body.has_attribute("plugin_id") || body.has_blocks("capability"));
    if is_spec {
        for k in ["id", "name"] {
            if let Some(a) = body.get_attribute(k) {
                targets.push(&a.value);
            }
        }
    }
    let mut literal_spans: Vec<Range<usize>> = labels;
    for e in targets {
        match e {
            Expression::String(s) => literal_spans.extend(s.span()),
            Expression::StringTemplate(t) => {
                // A per-allocation index such as `"x[${count.index}]"`: the first literal holds the name.
                match t.iter().next() {
                    Some(Element::Literal(l)) if l.value().ends_with('[') || t.len() == 1 => {
                        literal_spans.extend(l.span());
                    }
                    _ => {
                        let span = e.span().unwrap_or(0..0);
                        let raw = text.get(span.clone()).unwrap_or_default();
                        if m.volumes
                            .iter()
                            .any(|(old, _)| raw.contains(old.trim_end_matches('*')))
                        {
                            let (line, column) = index.position(text, span.start);
                            unsafe_sites.push(Unsafe {
                                line,
                                column,
                                message: format!("volume name {raw} is computed; not rewritten"),
                            });
                        }
                    }
                }
            }
            other => {
                let span = other.span().unwrap_or(0..0);
                let raw = text.get(span.clone()).unwrap_or_default();
                let (line, column) = index.position(text, span.start);
                unsafe_sites.push(Unsafe {
                    line,
                    column,
                    message: format!("volume name `{raw}` is computed; check it by hand"),
                });
            }
        }
    }
    for span in literal_spans {
        let Some(raw) = text.get(span.clone()) else {
            continue;
        };
        // Strip the quotes of a string literal; template literals have none.
        let (inner_start, inner) = match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(inner) => (span.start + 1, inner),
            None => (span.start, raw),
        };
        let id = inner.trim_end_matches('[');
        for (old, new) in &m.volumes {
            if let Some(renamed) = rename(id, old, new) {
                if renamed != id {
                    edits.push(Edit {
                        span: inner_start..inner_start + id.len(),
                        new: renamed,
                        kind: "volume",
                    });
                }
                break;
            }
        }
    }
}

/// A unified diff of a rewrite, with `a/` and `b/` headers as `git diff` prints them.
pub fn unified_diff(path: &str, old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a/{path}"), &format!("b/{path}"))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occurrences_respect_boundaries() {
        assert_eq!(
            path_occurrences("\"/data/compute/x:/y\"", "/data/compute"),
            vec![1]
        );
        assert!(path_occurrences("/data/computer", "/data/compute").is_empty());
        assert!(path_occurrences("/mnt/data/compute", "/data/compute").is_empty());
        assert!(path_occurrences("${NOMAD_ALLOC_DIR}/data/compute", "/data/compute").is_empty());
        assert_eq!(
            path_occurrences("path: /data/compute", "/data/compute"),
            vec![6]
        );
    }

    #[test]
    fn renames() {
        assert_eq!(
            rename("glusterfs_x_data", "glusterfs_*", "nfs_*").as_deref(),
            Some("nfs_x_data")
        );
        assert_eq!(rename("a[0]", "a", "b").as_deref(), Some("b[0]"));
        assert_eq!(rename("ab", "a", "b"), None);
    }
}
