//! The rule registry. One rule per file; each file's `RULE` carries the id, default severity,
//! summary and rationale that `docs/jobspec.md` lists (a test keeps the two in step).

use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::{File, Group, Job, Task, Tree};

pub mod database_on_network_storage;
pub mod deprecated_path;
pub mod image_latest;
pub mod litestream_config_mismatch;
pub mod litestream_db_not_on_alloc;
pub mod restore_failure_swallowed;
pub mod sleep_readiness_wait;
pub mod volume_naming;
pub mod volume_prevent_destroy;
pub mod volume_undeclared;
pub mod volume_unused;

/// A rule: metadata plus a pure check over the tree.
#[derive(Debug)]
pub struct Rule {
    /// Stable id, used in output, configuration and suppression comments.
    pub id: &'static str,
    /// Severity unless configured otherwise.
    pub default_severity: Severity,
    /// One line: what the rule finds.
    pub summary: &'static str,
    /// Why it matters and what it deliberately does not flag.
    pub rationale: &'static str,
    /// The check. Severity on returned diagnostics is overwritten by the caller.
    pub check: fn(&Tree, &Config) -> Vec<Diagnostic>,
}

/// Every rule, in documentation order.
pub static ALL: &[&Rule] = &[
    &restore_failure_swallowed::RULE,
    &sleep_readiness_wait::RULE,
    &database_on_network_storage::RULE,
    &litestream_config_mismatch::RULE,
    &litestream_db_not_on_alloc::RULE,
    &volume_prevent_destroy::RULE,
    &volume_undeclared::RULE,
    &volume_unused::RULE,
    &volume_naming::RULE,
    &deprecated_path::RULE,
    &image_latest::RULE,
];

/// Every task with its group, job and file.
pub(crate) fn tasks(tree: &Tree) -> impl Iterator<Item = (&File, &Job, &Group, &Task)> {
    tree.jobs().flat_map(|(f, j)| {
        j.groups
            .iter()
            .flat_map(move |g| g.tasks.iter().map(move |t| (f, j, g, t)))
    })
}

/// Renders the rule list as Markdown, as it appears in `docs/jobspec.md`.
pub fn markdown_list() -> String {
    let mut s = String::new();
    for r in ALL {
        s.push_str(&format!(
            "### `{}` ({})\n\n{}\n\n{}\n\n",
            r.id,
            r.default_severity.as_str(),
            r.summary,
            r.rationale
        ));
    }
    s
}
