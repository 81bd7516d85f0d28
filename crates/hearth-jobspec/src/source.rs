//! Input files: their text, line index, kind, template detection and inline suppressions.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

/// One input file as the caller read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// The path shown in diagnostics (as the user gave it, relative where possible).
    pub path: String,
    /// The file's text.
    pub text: String,
}

impl SourceFile {
    /// Builds a source file from a display path and its text.
    pub fn new(path: impl Into<String>, text: impl Into<String>) -> Self {
        SourceFile {
            path: path.into(),
            text: text.into(),
        }
    }
}

/// What an HCL file turned out to be, decided from its top-level blocks and attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Holds at least one `job` block.
    Jobspec,
    /// Terraform: `resource`, `module`, `provider`, `terraform`, `data` or `output` blocks.
    Terraform,
    /// A `nomad volume create/register` specification (top-level `type` and `plugin_id` or `capability`).
    VolumeSpec,
    /// A Nomad or Consul agent configuration (`client`, `server`, `plugin` blocks or `data_dir`).
    AgentConfig,
    /// Anything else that parses: variable files, pack metadata, policies.
    Other,
}

/// Maps byte offsets to one-based line and column numbers.
#[derive(Debug, Clone)]
pub struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    /// Indexes the line starts of `text`.
    pub fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    /// One-based line and column (in characters) of a byte offset.
    pub fn position(&self, text: &str, offset: usize) -> (usize, usize) {
        let offset = text.floor_char_boundary(offset);
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts[line - 1];
        let column = text.get(start..offset).map_or(1, |s| s.chars().count() + 1);
        (line, column)
    }

    /// The byte range of a one-based line, without its newline.
    pub fn line_range(&self, text: &str, line: usize) -> Range<usize> {
        let start = self
            .starts
            .get(line.saturating_sub(1))
            .copied()
            .unwrap_or(text.len());
        let end = self
            .starts
            .get(line)
            .map_or(text.len(), |e| e.saturating_sub(1));
        start..end.max(start)
    }
}

/// Levant and nomad-pack delimiters: `[[` followed by a Go template action such as `.x`, `$x`,
/// `template`, `if`, `range`, `end`, a comment or a trim marker. HCL itself never has a bare
/// identifier or dot right after `[[` in a jobspec (nested lists start with a value), so this does
/// not fire on nested arrays such as `[["a", "b"]]`.
static LEVANT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\[\[-?\s*(?:\.|\$|/\*|(?:template|if|else|end|range|with|define|block|include|env|file|toJson|timeNow|printf|quote|toUpper|toLower|var|meta|default)\b)")
        .unwrap_or_else(|_| unreachable_regex())
});

/// Returns a regex that matches nothing; used only if a built-in pattern failed to compile,
/// which the unit tests rule out.
pub(crate) fn unreachable_regex() -> Regex {
    Regex::new(r"[^\s\S]").unwrap_or_else(|_| unreachable!("the empty-class regex always compiles"))
}

/// Decides whether a file is a template for another tool rather than HCL Nomad reads directly.
///
/// Returns the reason and the byte offset of the first marker. `parse_error_at` is the offset of
/// an HCL parse error, if any: an interpolation `${` outside a string is invalid HCL and is how
/// Terraform `templatefile` placeholders such as `datacenters = ${datacenters}` show up.
pub fn templated(path: &str, text: &str, parse_error_at: Option<usize>) -> Option<(String, usize)> {
    if let Some(m) = LEVANT.find(text) {
        return Some((
            "Levant/nomad-pack `[[ ]]` delimiters".to_string(),
            m.start(),
        ));
    }
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".tpl") || lower.ends_with(".tftpl") {
        let at = first_interpolation(text).unwrap_or(0);
        return Some((
            "Terraform templatefile (`.tpl` file with `${…}` placeholders)".to_string(),
            at,
        ));
    }
    if let Some(at) = parse_error_at {
        // The parser reports the error at or just after the `${`; look back on the same line.
        // Its offset can fall inside a multi-byte character (found by the fuzz test).
        let at = text.floor_char_boundary(at);
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        if let Some(rel) = bare_interpolation(&text[line_start..line_end]) {
            return Some((
                "Terraform templatefile placeholder `${…}` outside a string".to_string(),
                line_start + rel,
            ));
        }
    }
    None
}

fn first_interpolation(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(1))
        .find(|&i| bytes[i] == b'$' && bytes[i + 1] == b'{' && (i == 0 || bytes[i - 1] != b'$'))
}

/// Finds `${` that is not inside a double-quoted string on this line.
fn bare_interpolation(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'#' if !in_string => return None,
            b'$' if !in_string && bytes.get(i + 1) == Some(&b'{') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Inline suppressions: `# hearth:ignore rule-a, rule-b` silences those rules on the comment's own
/// line and on the next line; `# hearth:ignore-file rule-a` silences the rule in the whole file.
/// `//` comments work the same way.
#[derive(Debug, Clone, Default)]
pub struct Suppressions {
    lines: Vec<(usize, Vec<String>)>,
    file: Vec<String>,
}

static SUPPRESS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:#|//)\s*hearth:ignore(-file)?\s+([a-z0-9_,\s-]+)")
        .unwrap_or_else(|_| unreachable_regex())
});

impl Suppressions {
    /// Collects suppression comments from a file's text.
    pub fn parse(text: &str) -> Self {
        let mut s = Suppressions::default();
        for (n, line) in text.lines().enumerate() {
            for c in SUPPRESS.captures_iter(line) {
                let rules: Vec<String> = c[2]
                    .split([',', ' ', '\t'])
                    .map(str::trim)
                    .filter(|r| !r.is_empty())
                    .map(str::to_string)
                    .collect();
                if c.get(1).is_some() {
                    s.file.extend(rules);
                } else {
                    s.lines.push((n + 1, rules));
                }
            }
        }
        s
    }

    /// Whether `rule` is silenced at one-based `line`.
    pub fn suppresses(&self, rule: &str, line: usize) -> bool {
        self.file.iter().any(|r| r == rule)
            || self
                .lines
                .iter()
                .any(|(l, rules)| (*l == line || *l + 1 == line) && rules.iter().any(|r| r == rule))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_index_positions() {
        let text = "ab\ncd\n\nef";
        let idx = LineIndex::new(text);
        assert_eq!(idx.position(text, 0), (1, 1));
        assert_eq!(idx.position(text, 4), (2, 2));
        assert_eq!(idx.position(text, 7), (4, 1));
        assert_eq!(&text[idx.line_range(text, 2)], "cd");
    }

    #[test]
    fn detects_levant_but_not_nested_lists() {
        assert!(templated("a.nomad", "x = \"[[ .nomad.region ]]\"", None).is_some());
        assert!(templated("a.nomad", "x = [[\"a\"], [\"b\"]]", None).is_none());
        assert!(templated("a.nomad", "x = [[1, 2]]", None).is_none());
    }

    #[test]
    fn detects_bare_placeholder_from_parse_error() {
        let text = "job \"x\" {\n  datacenters = ${dcs}\n}\n";
        let at = text.find("${").unwrap();
        let (_, off) = templated("x.hcl", text, Some(at + 2)).unwrap();
        assert_eq!(off, at);
        assert!(templated("x.hcl", "a = \"${x}\"\n", Some(3)).is_none());
    }

    #[test]
    fn error_offset_inside_a_character() {
        // Regression from the fuzz test: an error offset in the middle of `é`.
        let text = "élitestream restoreé";
        let _ = templated("x.hcl", text, Some(19));
        let _ = templated("x.hcl", text, Some(21));
    }

    #[test]
    fn suppression_comments() {
        let s = Suppressions::parse(
            "# hearth:ignore image-latest\nimage = \"a:latest\"\n// hearth:ignore-file sleep-readiness-wait\n",
        );
        assert!(s.suppresses("image-latest", 2));
        assert!(!s.suppresses("image-latest", 3));
        assert!(s.suppresses("sleep-readiness-wait", 40));
    }
}
