//! Rule `volume-prevent-destroy`: Terraform volume resources that `terraform destroy` may delete.

use super::Rule;
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::Tree;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "volume-prevent-destroy",
    default_severity: Severity::Error,
    summary: "A Terraform `nomad_csi_volume`, `nomad_csi_volume_registration` or `nomad_dynamic_host_volume` resource without `lifecycle { prevent_destroy = true }`.",
    rationale: "Destroying `nomad_csi_volume` or `nomad_dynamic_host_volume` deletes the data at the storage provider (the provider's documentation warns of data loss), and a rename, a moved module or a changed attribute that forces replacement destroys it as part of an ordinary `terraform apply`. A registration only deregisters, but losing it still stops every job that claims the volume. `prevent_destroy` turns that plan into an error a person has to look at.",
    check,
};

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for file in &tree.files {
        for r in file.tf_volumes.iter().filter(|r| !r.prevent_destroy) {
            let mut d = file.diag(
                RULE.id,
                r.span.clone(),
                format!(
                    "`{}.{}` can be destroyed by Terraform",
                    r.resource_type, r.name
                ),
                "no `lifecycle { prevent_destroy = true }`",
            );
            d.help = Some("add `lifecycle { prevent_destroy = true }` to the resource".to_string());
            out.push(d);
        }
    }
    out
}
