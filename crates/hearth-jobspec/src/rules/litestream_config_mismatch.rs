//! Rule `litestream-config-mismatch`: the restore task and the replicate sidecar disagree.

use super::Rule;
use crate::config::Config;
use crate::diag::{Diagnostic, Severity};
use crate::litestream::{self, Db};
use crate::model::Tree;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "litestream-config-mismatch",
    default_severity: Severity::Error,
    summary: "In one group, the databases or replicas that the Litestream restore task restores differ from those the `litestream replicate` sidecar replicates.",
    rationale: "The restore and the sidecar are usually configured twice (two templates, or a command line and a template) and drift apart in migrations. If the restore writes `/alloc/a.db` but the sidecar replicates `/alloc/data/a.db`, or they point at different buckets or paths, every restart starts from an empty database and the sidecar overwrites the backup with it. A database that is replicated but never restored has the same effect. Only groups where both sides' databases can be read from the jobspec (inline templates or command lines) are checked.",
    check,
};

fn same_path(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

fn check(tree: &Tree, _config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job) in tree.jobs() {
        for group in &job.groups {
            let usages: Vec<_> = group
                .tasks
                .iter()
                .map(|t| litestream::usage(t, &file.text))
                .collect();
            if usages
                .iter()
                .any(|u| (u.runs_restore || u.runs_replicate) && !u.known)
            {
                continue;
            }
            let restores: Vec<&Db> = usages.iter().flat_map(|u| u.restores.iter()).collect();
            let replicates: Vec<&Db> = usages.iter().flat_map(|u| u.replicates.iter()).collect();
            if restores.is_empty() || replicates.is_empty() {
                continue;
            }
            let list = |dbs: &[&Db]| {
                dbs.iter()
                    .map(|d| format!("`{}`", d.path))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for r in &restores {
                match replicates.iter().find(|p| same_path(&p.path, &r.path)) {
                    None => {
                        let mut d = file.diag(
                            RULE.id,
                            r.span.clone(),
                            format!(
                                "group `{}` of job `{}` restores `{}` but the sidecar replicates {}",
                                group.name, job.name, r.path, list(&replicates)
                            ),
                            "restored path",
                        );
                        for p in &replicates {
                            d.notes.push(
                                file.label(
                                    p.span.clone(),
                                    format!("sidecar replicates `{}`", p.path),
                                ),
                            );
                        }
                        d.help = Some("restore and replicate the same database path".to_string());
                        out.push(d);
                    }
                    Some(p) => {
                        let disjoint = !r.replicas.is_empty()
                            && !p.replicas.is_empty()
                            && !r.replicas.iter().any(|x| p.replicas.contains(x));
                        if disjoint {
                            let mut d = file.diag(
                                RULE.id,
                                r.span.clone(),
                                format!(
                                    "`{}` is restored from {} but replicated to {}",
                                    r.path,
                                    r.replicas.join(", "),
                                    p.replicas.join(", ")
                                ),
                                "restore reads a different replica",
                            );
                            d.notes
                                .push(file.label(p.span.clone(), "sidecar configuration"));
                            d.help = Some("use one replica URL for both, ideally one shared configuration template".to_string());
                            out.push(d);
                        }
                    }
                }
            }
            for p in &replicates {
                if !restores.iter().any(|r| same_path(&r.path, &p.path)) {
                    let mut d = file.diag(
                        RULE.id,
                        p.span.clone(),
                        format!(
                            "`{}` is replicated but the restore task restores only {}",
                            p.path,
                            list(&restores)
                        ),
                        "never restored",
                    );
                    d.help = Some(
                        "restore every replicated database before the main task starts".to_string(),
                    );
                    out.push(d);
                }
            }
        }
    }
    out
}
