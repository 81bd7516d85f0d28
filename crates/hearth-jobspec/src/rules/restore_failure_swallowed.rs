//! Rule `restore-failure-swallowed`: a prestart restore whose failure is ignored.

use super::{Rule, tasks};
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::Tree;
use crate::shell;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "restore-failure-swallowed",
    default_severity: Severity::Error,
    summary: "A restore command (`litestream restore`, `restic restore`, `pg_restore`, …) in a prestart task whose failure is swallowed by `|| true`, `|| :`, `; true`, `set +e` or an unconditional `exit 0`.",
    rationale: "When the restore fails (network, credentials, a wrong path) the prestart task still succeeds, the main task starts on an empty database, and the replicate sidecar then uploads that empty database over the real backup. Let the prestart task fail so Nomad retries it and nothing starts; to allow a first start without a backup use `litestream restore -if-replica-exists` instead of ignoring every error. `exit 0` is only flagged when the script does not run with `set -e` and the `exit` is not inside an `if`, `case` or loop; the shell reading is word-based, not a full shell parser. Like `sleep-readiness-wait`, it reads `command`, `args` and script templates.",
    check,
};

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job, _g, task) in tasks(tree) {
        if task.hook.as_deref() != Some("prestart") {
            continue;
        }
        for part in task.script_parts() {
            let raw = file.text.get(part.span.clone()).unwrap_or_default();
            for s in shell::swallowed_restores(raw) {
                let span = part.span.start + s.span.start..part.span.start + s.span.end;
                let restore_span =
                    part.span.start + s.restore.start..part.span.start + s.restore.end;
                let mut d = file.diag(
                    RULE.id,
                    span,
                    format!(
                        "restore failure is swallowed by `{}` in prestart task `{}` of job `{}`",
                        s.what, task.name, job.name
                    ),
                    "this makes a failed restore look like success",
                );
                d.notes
                    .push(file.label(restore_span, "the restore whose failure is ignored"));
                d.help = Some("let the task fail; use `-if-replica-exists` to allow a first start without a backup".to_string());
                out.push(d);
            }
        }
    }
    out
}
