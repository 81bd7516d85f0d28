//! Rule `volume-unused`: a declared volume that no job in the scanned tree uses.

use super::Rule;
use super::volume_undeclared::kind_of;
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::{Tree, strip_index};

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "volume-unused",
    default_severity: Severity::Warning,
    summary: "A volume declared in the scanned tree (Terraform resource, volume specification, client `host_volume`) that no job's `volume` block uses.",
    rationale: "An unused volume is either leftover data (which someone will eventually delete without checking) or a sign that a job points at a different, possibly empty, volume after a rename. The rule only runs when the scanned tree contains at least one job, and not for a volume type that some job names with a computed `source` (then usage cannot be decided).",
    check,
};

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    if tree.jobs().next().is_none() {
        return out;
    }
    let requests: Vec<_> = tree
        .jobs()
        .flat_map(|(_, j)| j.groups.iter().flat_map(|g| g.volumes.iter()))
        .collect();
    for (file, d) in tree.declarations() {
        if d.id.computed {
            continue;
        }
        let computed_use = requests.iter().any(|v| {
            kind_of(&v.kind) == Some(d.kind) && v.source.as_ref().is_none_or(|s| s.computed)
        });
        if computed_use {
            continue;
        }
        let used = requests.iter().any(|v| {
            kind_of(&v.kind) == Some(d.kind)
                && v.source
                    .as_ref()
                    .is_some_and(|s| strip_index(&s.value) == strip_index(&d.id.value))
        });
        if !used {
            let mut diag = file.diag(
                RULE.id,
                d.id.span.clone(),
                format!(
                    "volume `{}` ({}) is not used by any job in the scanned tree",
                    d.id.value, d.origin
                ),
                "declared but unused",
            );
            diag.help =
                Some("remove it after checking its data, or fix the job's `source`".to_string());
            out.push(diag);
        }
    }
    out
}
