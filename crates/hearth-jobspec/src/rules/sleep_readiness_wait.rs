//! Rule `sleep-readiness-wait`: `sleep N` used to wait for something to become ready.

use super::{Rule, tasks};
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::model::Tree;
use crate::shell;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "sleep-readiness-wait",
    default_severity: Severity::Warning,
    summary: "A fixed `sleep N` before the next command of a task (for example waiting for a service-mesh proxy or a database), or a prestart task that only sleeps.",
    rationale: "A fixed delay is too long on a good day and too short on a bad one: when the dependency is slower than N seconds the task starts anyway and fails or, worse, initialises fresh state. Poll for the condition instead (`until nc -z …; do sleep 1; done`, a Consul check, or Nomad's `lifecycle` ordering). Sleeps inside loops (polling) and a trailing `sleep` that keeps a task alive are not flagged. The task's `command`, `args` and script templates (a `#!` line, a `.sh` destination, or a destination the command names) are read; other templates are configuration files and are not.",
    check,
};

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job, _g, task) in tasks(tree) {
        let first = task.command.first().map(|c| c.value.trim());
        if task.hook.as_deref() == Some("prestart") && !task.sidecar && first == Some("sleep") {
            if let Some(c) = task.command.first() {
                let mut d = file.diag(
                    RULE.id,
                    c.span.clone(),
                    format!(
                        "prestart task `{}` of job `{}` only sleeps",
                        task.name, job.name
                    ),
                    "a fixed delay before the main task starts",
                );
                d.help = Some(
                    "wait for the actual condition (a port, a health check) instead".to_string(),
                );
                out.push(d);
            }
            continue;
        }
        for part in task.script_parts() {
            let raw = file.text.get(part.span.clone()).unwrap_or_default();
            for s in shell::readiness_sleeps(raw) {
                let span = part.span.start + s.span.start..part.span.start + s.span.end;
                let mut d = file.diag(
                    RULE.id,
                    span,
                    format!(
                        "`sleep {}` used as a readiness wait in task `{}` of job `{}`",
                        s.duration, task.name, job.name
                    ),
                    "fixed delay before the next command",
                );
                d.help = Some(
                    "poll for readiness instead, e.g. `until nc -z host port; do sleep 1; done`"
                        .to_string(),
                );
                out.push(d);
            }
        }
    }
    out
}
