//! Small, deliberately shallow readings of shell scripts embedded in tasks: which lines restore,
//! which swallow failures, which sleep. Written by hand because no maintained crate parses POSIX
//! shell into a syntax tree with byte offsets; the patterns below only look at words and
//! operators, and the rules that use them say so in their documentation.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

use crate::source::unreachable_regex;

fn re(p: &str) -> Regex {
    Regex::new(p).unwrap_or_else(|_| unreachable_regex())
}

/// A restore command: `litestream restore`, `restic restore`, `pg_restore`, `mongorestore` …
static RESTORE: LazyLock<Regex> = LazyLock::new(|| re(r"\b[\w.-]*restore\b"));
/// Failure swallowed on the same line: `|| true`, `|| :`, `|| exit 0`, `; true`.
static SWALLOW_INLINE: LazyLock<Regex> =
    LazyLock::new(|| re(r"\|\|\s*(?:true\b|:(?:\s|$|;|\)|\x22)|exit\s+0\b)|;\s*true\b"));
static SET_PLUS_E: LazyLock<Regex> = LazyLock::new(|| re(r"\bset\s+\+[a-z]*e"));
static ERREXIT: LazyLock<Regex> = LazyLock::new(|| {
    re(
        r"\bset\s+-[a-z]*e|\bset\s+-o\s+errexit\b|^#!\S*\s+-[a-z]*e|\b(?:sh|bash)\s+-[a-z]*e[a-z]*c\b",
    )
});
static EXIT0: LazyLock<Regex> = LazyLock::new(|| re(r"(?:^|;|\bthen|\bdo|\belse)\s*exit\s+0\b"));
static SLEEP: LazyLock<Regex> = LazyLock::new(|| re(r"\bsleep\s+(\d+(?:\.\d+)?[smhd]?)\b"));
static OPEN: LazyLock<Regex> = LazyLock::new(|| re(r"\b(?:then|do|case)\b|\{\s*$"));
static CLOSE: LazyLock<Regex> = LazyLock::new(|| re(r"\b(?:fi|done|esac|elif)\b|^\s*\}"));
static LOOP_OPEN: LazyLock<Regex> = LazyLock::new(|| re(r"\bdo\b"));
static LOOP_CLOSE: LazyLock<Regex> = LazyLock::new(|| re(r"\bdone\b"));

/// How a restore failure is swallowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swallow {
    /// Byte range of the swallowing construct within the script.
    pub span: Range<usize>,
    /// The construct, e.g. `|| true`.
    pub what: String,
    /// Byte range of the restore command it affects.
    pub restore: Range<usize>,
}

/// Byte offsets of each line start in `s`, with the line text. Scripts are read from source,
/// where a quoted HCL string writes a newline as the two characters `\n`; both count as line ends.
fn lines(s: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            out.push((start, &s[start..i]));
            start = i + 1;
        } else if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'n') {
            out.push((start, &s[start..i]));
            start = i + 2;
            i += 1;
        }
        i += 1;
    }
    out.push((start, &s[start..]));
    out
}

/// Whether the script has a restore command at all; returns its first location.
pub fn restore_at(script: &str) -> Option<Range<usize>> {
    RESTORE.find(script).map(|m| m.range())
}

/// Finds the ways a script swallows the failure of a restore command in it.
pub fn swallowed_restores(script: &str) -> Vec<Swallow> {
    let Some(first) = restore_at(script) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (start, line) in lines(script) {
        if let Some(r) = RESTORE.find(line) {
            for m in SWALLOW_INLINE.find_iter(line) {
                if m.start() > r.start() {
                    out.push(Swallow {
                        span: start + m.start()..start + m.end(),
                        what: m
                            .as_str()
                            .trim_end_matches(['"', ')', ';'])
                            .trim()
                            .to_string(),
                        restore: start + r.start()..start + r.end(),
                    });
                }
            }
        }
    }
    if let Some(m) = SET_PLUS_E.find(script) {
        out.push(Swallow {
            span: m.range(),
            what: "set +e".to_string(),
            restore: first.clone(),
        });
    }
    if !ERREXIT.is_match(script) || SET_PLUS_E.is_match(script) {
        let mut depth: i64 = 0;
        for (start, line) in lines(script) {
            let code = line.split(" #").next().unwrap_or(line);
            if start > first.start
                && depth <= 0
                && let Some(m) = EXIT0.find(code)
            {
                {
                    let at = m.start() + m.as_str().find("exit").unwrap_or(0);
                    let opens_before = OPEN.find_iter(&code[..at]).count();
                    if opens_before == 0 {
                        out.push(Swallow {
                            span: start + at..start + m.end(),
                            what: "exit 0".to_string(),
                            restore: first.clone(),
                        });
                    }
                }
            }
            depth += OPEN.find_iter(code).count() as i64;
            depth -= CLOSE.find_iter(code).count() as i64;
        }
    }
    out
}

/// A `sleep N` that delays the commands after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sleep {
    /// Byte range of `sleep N`.
    pub span: Range<usize>,
    /// The duration argument.
    pub duration: String,
}

/// Finds `sleep N` commands that are followed by more commands and are not inside a loop
/// (a loop that sleeps between polls is a proper readiness wait).
pub fn readiness_sleeps(script: &str) -> Vec<Sleep> {
    let mut out = Vec::new();
    for c in SLEEP.captures_iter(script) {
        let Some(m) = c.get(0) else { continue };
        let before = &script[..m.start()];
        let loops = LOOP_OPEN.find_iter(before).count() as i64
            - LOOP_CLOSE.find_iter(before).count() as i64;
        if loops > 0 {
            continue;
        }
        let after = script[m.end()..].trim_start_matches([' ', '\t']);
        let after = after
            .strip_prefix("&&")
            .or_else(|| after.strip_prefix(';'))
            .or_else(|| after.strip_prefix('\n'))
            // Scripts are read from source, where a quoted string writes a newline as `\n`.
            .or_else(|| after.strip_prefix("\\n"))
            .unwrap_or("");
        let rest_has_command = lines(after).into_iter().map(|(_, l)| l.trim()).any(|l| {
            !l.is_empty()
                && !l.starts_with('#')
                && !matches!(l, "fi" | "done" | "esac" | "}" | "EOF" | "EOH")
        });
        if rest_has_command {
            out.push(Sleep {
                span: m.range(),
                duration: c[1].to_string(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_swallow() {
        let s = swallowed_restores("litestream restore -if-replica-exists /alloc/db || true\n");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].what, "|| true");
    }

    #[test]
    fn errexit_makes_exit_zero_harmless() {
        assert!(swallowed_restores("set -e\nlitestream restore /alloc/db\nexit 0\n").is_empty());
        let s = swallowed_restores("litestream restore /alloc/db\nexit 0\n");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].what, "exit 0");
    }

    #[test]
    fn conditional_exit_is_fine() {
        let script = "if [ -f /alloc/db ]; then\n  exit 0\nfi\nlitestream restore /alloc/db\nif [ $? -ne 0 ]; then\n  exit 0\nfi\n";
        assert!(swallowed_restores(script).is_empty());
    }

    #[test]
    fn escaped_newlines_count_as_line_ends() {
        assert_eq!(
            swallowed_restores("litestream restore /alloc/db\\nexit 0").len(),
            1
        );
        assert_eq!(readiness_sleeps("sleep 5\\nexec app").len(), 1);
    }

    #[test]
    fn sleeps() {
        assert_eq!(readiness_sleeps("sleep 60 && exec app").len(), 1);
        assert_eq!(readiness_sleeps("sleep 10\nexec app\n").len(), 1);
        assert!(readiness_sleeps("while true; do backup; sleep 3600; done").is_empty());
        assert!(readiness_sleeps("until nc -z db 5432; do sleep 1; done\nexec app").is_empty());
        assert!(readiness_sleeps("exec app; sleep 5").is_empty());
        assert!(readiness_sleeps("sleep infinity").is_empty());
    }
}
