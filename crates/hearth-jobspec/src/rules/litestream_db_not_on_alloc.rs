//! Rule `litestream-db-not-on-alloc`: a replicated database outside the allocation directory.

use super::{Rule, tasks};
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::litestream;
use crate::model::{MountSource, Tree};
use crate::path_under;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "litestream-db-not-on-alloc",
    default_severity: Severity::Warning,
    summary: "A database that `litestream replicate` replicates is not in the allocation directory (`/alloc`, `${NOMAD_ALLOC_DIR}`, `alloc/`, or a mount of it).",
    rationale: "The pattern that survives rescheduling is: restore into the allocation's ephemeral disk in a prestart task, run the service on it, replicate continuously. A database on a host path or volume outlives the allocation, so after a move two copies diverge and the restore is skipped or clobbers newer data; a database in a task's own `local/` cannot be seen by the other tasks. The allocation directory is shared by the restore task, the service and the sidecar.",
    check,
};

fn on_alloc(path: &str, task: &crate::model::Task) -> bool {
    if path_under(path, "/alloc")
        || path.starts_with("${NOMAD_ALLOC_DIR}")
        || path.starts_with("alloc/")
        || path.starts_with("../alloc/")
    {
        return true;
    }
    task.mounts.iter().any(|m| {
        path_under(path, &m.destination)
            && matches!(&m.source, MountSource::TaskDir(s) if s.trim_start_matches("../").starts_with("alloc"))
    })
}

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job, _group, task) in tasks(tree) {
        let usage = litestream::usage(task, &file.text);
        for db in &usage.replicates {
            if db.path.contains("TEMPLATED") || on_alloc(&db.path, task) {
                continue;
            }
            let mut d = file.diag(
                RULE.id,
                db.span.clone(),
                format!(
                    "replicated database `{}` is not in the allocation directory (task `{}` of job `{}`)",
                    db.path, task.name, job.name
                ),
                "not on ephemeral disk",
            );
            d.help = Some(
                "restore into `/alloc/…` in a prestart task and replicate from there".to_string(),
            );
            out.push(d);
        }
    }
    out
}
