//! Rule `volume-naming`: volume names that break the configured naming patterns.

use regex::Regex;

use super::Rule;
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::{Tree, VolumeKind};

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "volume-naming",
    default_severity: Severity::Warning,
    summary: "A CSI volume `source` in a job, or a volume declared by Terraform or a volume specification, matches none of `volume_name_patterns` (`<service>` stands for the job name, or the Terraform module or folder name; any other `<word>` matches one name part without `_`).",
    rationale: "Naming conventions such as `glusterfs_<service>_<type>` are how people find the data of a service during a migration or an incident; a volume outside the convention is one that gets missed or deleted. Off unless patterns are configured. Static host volumes are node-level names and are not checked.",
    check,
};

/// Compiles a pattern for one service name; `None` service lets `<service>` match any name.
fn compile(pattern: &str, service: Option<&str>) -> Option<Regex> {
    let mut re = String::from("^(?i:");
    let mut rest = pattern;
    while let Some(open) = rest.find('<') {
        re.push_str(&regex::escape(&rest[..open]));
        let Some(close) = rest[open..].find('>') else {
            re.push_str(&regex::escape(&rest[open..]));
            rest = "";
            break;
        };
        let name = &rest[open + 1..open + close];
        match (name, service) {
            ("service", Some(s)) => re.push_str(&regex::escape(s)),
            ("service", None) => re.push_str("[A-Za-z0-9-]+(?:_[A-Za-z0-9-]+)*?"),
            _ => re.push_str("[A-Za-z0-9-]+"),
        }
        rest = &rest[open + close + 1..];
    }
    re.push_str(&regex::escape(rest));
    re.push_str(")$");
    Regex::new(&re).ok()
}

fn matches(config: &Config, name: &str, service: Option<&str>) -> bool {
    config
        .volume_name_patterns
        .iter()
        .filter_map(|p| compile(p, service))
        .any(|re| re.is_match(crate::model::strip_index(name)))
}

fn check(tree: &Tree, config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if config.volume_name_patterns.is_empty() {
        return out;
    }
    let patterns = config.volume_name_patterns.join("`, `");
    for (file, job) in tree.jobs() {
        for g in &job.groups {
            for v in g.volumes.iter().filter(|v| v.kind == "csi") {
                let Some(src) = v.source.as_ref().filter(|s| !s.computed) else {
                    continue;
                };
                if !matches(config, &src.value, Some(&job.name)) {
                    let mut d = file.diag(
                        RULE.id,
                        src.span.clone(),
                        format!(
                            "volume `{}` of job `{}` does not follow `{patterns}`",
                            src.value, job.name
                        ),
                        "name outside the convention",
                    );
                    d.help = Some(format!(
                        "rename it, e.g. with `hearth jobspec migrate --volume {}=NEW`",
                        src.value
                    ));
                    out.push(d);
                }
            }
        }
    }
    for (file, d) in tree.declarations() {
        if d.id.computed || (d.kind == VolumeKind::Host && d.origin == "client host_volume") {
            continue;
        }
        if !matches(config, &d.id.value, file.module.as_deref()) {
            let mut diag = file.diag(
                RULE.id,
                d.id.span.clone(),
                format!(
                    "volume `{}` ({}) does not follow `{patterns}`",
                    d.id.value, d.origin
                ),
                "name outside the convention",
            );
            diag.help = Some(format!(
                "rename it, e.g. with `hearth jobspec migrate --volume {}=NEW`",
                d.id.value
            ));
            out.push(diag);
        }
    }
    out
}
