//! Reads what Litestream is told to do in a task: the databases and replicas of an embedded
//! `litestream.yml` and of `litestream restore`/`litestream replicate` command lines.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

use crate::model::{Str, Task};
use crate::source::unreachable_regex;

/// One database as a task sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Db {
    /// Database path as written.
    pub path: String,
    /// Normalised replica locations (URLs, or `type://bucket/path`).
    pub replicas: Vec<String>,
    /// Byte range in the file where the path is written.
    pub span: Range<usize>,
}

/// What a task does with Litestream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Databases this task restores (empty when it does not restore or they are unknown).
    pub restores: Vec<Db>,
    /// Databases this task replicates.
    pub replicates: Vec<Db>,
    /// Whether the task runs `litestream restore`.
    pub runs_restore: bool,
    /// Whether the task runs `litestream replicate`.
    pub runs_replicate: bool,
    /// Whether the databases could be read (false when a config file is used but not embedded).
    pub known: bool,
}

static INVOCATION: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\blitestream\s+(restore|replicate)\b").unwrap_or_else(|_| unreachable_regex())
});
static TEMPLATE_ACTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{\{[^}]*\}\}").unwrap_or_else(|_| unreachable_regex()));

const VALUE_FLAGS: &[&str] = &[
    "config",
    "o",
    "replica",
    "generation",
    "index",
    "timestamp",
    "parallelism",
    "exec",
    "addr",
    "txid",
    "log-level",
];

fn normalise_url(u: &str) -> String {
    u.trim().trim_end_matches('/').to_string()
}

/// Reads `dbs:` from a Litestream YAML configuration. Go template actions (`{{ … }}`) are
/// replaced by a placeholder first so that Consul-templated configs still parse.
pub fn config_dbs(data: &Str, file_text: &str) -> Option<Vec<Db>> {
    if !data.value.contains("dbs:") {
        return None;
    }
    let cleaned = TEMPLATE_ACTION.replace_all(&data.value, "TEMPLATED");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&cleaned).ok()?;
    let dbs = yaml.get("dbs")?.as_sequence()?;
    let mut out = Vec::new();
    for db in dbs {
        let Some(path) = db.get("path").and_then(|p| p.as_str()) else {
            continue;
        };
        let mut replicas = Vec::new();
        let mut add = |r: &serde_yaml::Value| {
            if let Some(u) = r.get("url").and_then(|u| u.as_str()) {
                replicas.push(normalise_url(u));
            } else {
                let f = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("");
                let ty = if f("type").is_empty() {
                    "s3"
                } else {
                    f("type")
                };
                replicas.push(normalise_url(&format!(
                    "{ty}://{}/{}",
                    f("bucket"),
                    f("path").trim_start_matches('/')
                )));
            }
        };
        if let Some(rs) = db.get("replicas").and_then(|r| r.as_sequence()) {
            rs.iter().for_each(&mut add);
        }
        if let Some(r) = db.get("replica") {
            add(r);
        }
        let span = find_in(file_text, &data.span, path);
        out.push(Db {
            path: path.to_string(),
            replicas,
            span,
        });
    }
    Some(out)
}

fn find_in(text: &str, within: &Range<usize>, needle: &str) -> Range<usize> {
    text.get(within.clone())
        .and_then(|s| s.find(needle))
        .map_or(within.clone(), |i| {
            within.start + i..within.start + i + needle.len()
        })
}

struct Invocation {
    sub: String,
    config: bool,
    output: Option<String>,
    positionals: Vec<String>,
    span: Range<usize>,
}

fn parse_args(sub: &str, tokens: &[String], span: Range<usize>) -> Invocation {
    let mut inv = Invocation {
        sub: sub.to_string(),
        config: false,
        output: None,
        positionals: Vec::new(),
        span,
    };
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        if matches!(t, "&&" | "||" | ";" | "|" | "&") || t.starts_with('#') {
            break;
        }
        if let Some(flag) = t.strip_prefix("--").or_else(|| t.strip_prefix('-')) {
            let (name, inline) = flag
                .split_once('=')
                .map_or((flag, None), |(n, v)| (n, Some(v.to_string())));
            if VALUE_FLAGS.contains(&name) {
                let value = inline.or_else(|| {
                    i += 1;
                    tokens.get(i).cloned()
                });
                match name {
                    "config" => inv.config = true,
                    "o" => inv.output = value,
                    _ => {}
                }
            }
        } else {
            inv.positionals.push(t.to_string());
        }
        i += 1;
    }
    inv
}

fn tokens(s: &str) -> Vec<String> {
    s.split_whitespace()
        .map(|t| t.trim_matches(|c| c == '"' || c == '\'').to_string())
        .map(|t| t.trim_end_matches(';').to_string())
        .collect()
}

fn invocations(task: &Task) -> Vec<Invocation> {
    let mut out = Vec::new();
    // Array form: `command = "litestream"` (or the litestream image) with `args = ["restore", …]`.
    let words: Vec<String> = task
        .command
        .iter()
        .map(|s| s.value.trim().to_string())
        .collect();
    let is_litestream_image = task
        .image
        .as_ref()
        .is_some_and(|i| i.value.contains("litestream"));
    if let Some(pos) = words
        .iter()
        .position(|w| w == "restore" || w == "replicate")
    {
        let before_ok =
            pos == 0 && is_litestream_image || pos > 0 && words[pos - 1].ends_with("litestream");
        if before_ok {
            let end = task
                .command
                .last()
                .map_or(task.command[pos].span.end, |c| c.span.end);
            out.push(parse_args(
                &words[pos],
                &words[pos + 1..],
                task.command[pos].span.start..end,
            ));
        }
    }
    // Script form: `litestream restore …` inside a shell string or script template.
    for part in task.script_parts() {
        for m in INVOCATION.captures_iter(&part.value) {
            let (Some(all), Some(sub)) = (m.get(0), m.get(1)) else {
                continue;
            };
            let rest = &part.value[all.end()..];
            let line = rest.split(['\n', ';']).next().unwrap_or("");
            let line = line
                .split("&&")
                .next()
                .unwrap_or("")
                .split("||")
                .next()
                .unwrap_or("");
            let toks = tokens(line.trim_end_matches('\\'));
            out.push(parse_args(sub.as_str(), &toks, part.span.clone()));
        }
    }
    out
}

/// Reads a task's Litestream usage. `file_text` is the file the task is in (for spans).
pub fn usage(task: &Task, file_text: &str) -> Usage {
    let invs = invocations(task);
    let mut u = Usage::default();
    if invs.is_empty() {
        return u;
    }
    let config: Option<Vec<Db>> = task
        .templates
        .iter()
        .filter_map(|t| t.data.as_ref())
        .find_map(|d| config_dbs(d, file_text));
    u.known = true;
    for inv in &invs {
        let urls: Vec<String> = inv
            .positionals
            .iter()
            .filter(|p| p.contains("://"))
            .map(|p| normalise_url(p))
            .collect();
        let paths: Vec<&String> = inv
            .positionals
            .iter()
            .filter(|p| !p.contains("://"))
            .collect();
        let from_config = |path: &str| -> Vec<String> {
            config
                .as_ref()
                .and_then(|c| c.iter().find(|d| d.path == path))
                .map(|d| d.replicas.clone())
                .unwrap_or_default()
        };
        let mut dbs = Vec::new();
        if let Some(out) = &inv.output {
            dbs.push(Db {
                path: out.clone(),
                replicas: urls.clone(),
                span: inv.span.clone(),
            });
        } else if let Some(p) = paths.first() {
            let replicas = if urls.is_empty() {
                from_config(p)
            } else {
                urls.clone()
            };
            dbs.push(Db {
                path: (*p).clone(),
                replicas,
                span: find_in(file_text, &inv.span, p),
            });
        } else if let Some(c) = &config {
            dbs.extend(c.iter().cloned());
        } else {
            // A config file that is not embedded in this task: the databases are unknown.
            if inv.config || urls.is_empty() {
                u.known = false;
            }
        }
        if inv.sub == "restore" {
            u.runs_restore = true;
            u.restores.extend(dbs);
        } else {
            u.runs_replicate = true;
            u.replicates.extend(dbs);
        }
    }
    u
}
