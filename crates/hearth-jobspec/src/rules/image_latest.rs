//! Rule `image-latest`: container images pinned to `:latest` or not pinned at all.

use super::{Rule, tasks};
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::Tree;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "image-latest",
    default_severity: Severity::Warning,
    summary: "A task's `image` uses the `:latest` tag, or no tag (which means `latest`).",
    rationale: "`latest` changes under you: a reschedule onto another node, or a restart after the cache was pruned, silently runs a newer version, and a new version may migrate a database schema that the old one and your backups cannot read. Pin a version tag or a digest. Images whose tag is computed (`${…}`) are not flagged.",
    check,
};

/// The tag of an image reference, `None` if there is none; digests count as pinned.
fn tag(image: &str) -> Option<&str> {
    if image.contains('@') {
        return Some("digest");
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split_once(':').map(|(_, t)| t)
}

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job, _g, task) in tasks(tree) {
        let Some(image) = &task.image else { continue };
        let value = image.value.trim();
        if value.is_empty() || (image.computed && !value.ends_with(":latest")) {
            continue;
        }
        let msg = match tag(value) {
            Some("latest") => format!("image `{value}` is pinned to `:latest`"),
            None => format!("image `{value}` has no tag, so it runs `latest`"),
            Some(_) => continue,
        };
        let mut d = file.diag(
            RULE.id,
            image.span.clone(),
            format!("{msg} (task `{}` of job `{}`)", task.name, job.name),
            "not a fixed version",
        );
        d.help = Some("pin a version tag or a digest (`image@sha256:…`)".to_string());
        out.push(d);
    }
    out
}
