//! Rule `volume-undeclared`: a job uses a volume that nothing in the scanned tree declares.

use super::Rule;
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::{Tree, VolumeKind};

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "volume-undeclared",
    default_severity: Severity::Warning,
    summary: "A group's `volume` block names a `source` that no Terraform resource, volume specification or client `host_volume` in the scanned tree declares.",
    rationale: "A volume created by hand is a volume nobody can recreate, and a typo in `source` only shows up as a placement failure at deploy time. The rule runs per volume type (CSI, host) only when the scanned tree declares at least one volume of that type, so that checking a folder of jobspecs alone does not flag every volume; computed sources are not checked.",
    check,
};

pub(crate) fn kind_of(kind: &str) -> Option<VolumeKind> {
    match kind {
        "csi" => Some(VolumeKind::Csi),
        "host" => Some(VolumeKind::Host),
        _ => None,
    }
}

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job) in tree.jobs() {
        for g in &job.groups {
            for v in &g.volumes {
                let Some(kind) = kind_of(&v.kind) else {
                    continue;
                };
                let Some(src) = v.source.as_ref().filter(|s| !s.computed) else {
                    continue;
                };
                if !tree.declarations().any(|(_, d)| d.kind == kind) {
                    continue;
                }
                if tree.declaration(kind, &src.value).is_none() {
                    let mut d = file.diag(
                        RULE.id,
                        src.span.clone(),
                        format!(
                            "{} volume `{}` used by job `{}` is not declared in the scanned tree",
                            v.kind, src.value, job.name
                        ),
                        "no declaration found",
                    );
                    d.help = Some("declare it (Terraform resource, volume specification or client `host_volume`) or fix the name".to_string());
                    out.push(d);
                }
            }
        }
    }
    out
}
