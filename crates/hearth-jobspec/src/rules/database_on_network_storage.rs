//! Rule `database-on-network-storage`: embedded databases on NFS, GlusterFS and similar.

use std::ops::Range;
use std::sync::LazyLock;

use regex::Regex;

use super::{Rule, tasks};
use crate::config::Config;
use crate::diag::{Diagnostic, Label, Severity};
use crate::model::{File, Group, Mount, MountSource, Task, Tree, VolumeKind};
use crate::path_under;
use crate::source::unreachable_regex;

/// See [`Rule`].
pub static RULE: Rule = Rule {
    id: "database-on-network-storage",
    default_severity: Severity::Error,
    summary: "An embedded database (SQLite and its `-wal`/`-shm` files, LevelDB, Bleve, a Postgres data directory) lies under a mount backed by network storage: a CSI `file-system` volume of a network plugin (`network_plugins`), a Docker volume of type `nfs`/`cifs` or a non-local volume driver, or a host path or host volume under a configured `network_mounts` prefix.",
    rationale: "These databases rely on POSIX byte-range locks and on `fsync` ordering that NFS and GlusterFS do not provide reliably (SQLite's own documentation warns against network file systems); two writers or one crash corrupt the file. Keep the database on local or ephemeral disk (`alloc/`) and replicate it (Litestream), or use a CSI `block-device` volume. A database is recognised by a path in the task's env, command, args or templates (`*.db`, `*.sqlite`, `*.sqlite3`, `*.db3`, a `leveldb` or `*.bleve` component) or by a Postgres image's data directory (`PGDATA` or `/var/lib/postgresql/data`). CSI volumes whose plugin is not declared in the scanned tree are unknown and not flagged.",
    check,
};

static PATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"/[^\s"'=:,;()\[\]{}<>|&`]+"#).unwrap_or_else(|_| unreachable_regex())
});

/// What kind of database a path names, if any.
fn database_kind(path: &str) -> Option<&'static str> {
    let p = path.trim_end_matches('/').to_ascii_lowercase();
    let base = p
        .trim_end_matches("-wal")
        .trim_end_matches("-shm")
        .trim_end_matches("-journal");
    if [".db", ".sqlite", ".sqlite3", ".db3"]
        .iter()
        .any(|e| base.ends_with(e))
    {
        return Some("SQLite database");
    }
    if p.split('/').any(|c| c.contains("leveldb")) {
        return Some("LevelDB database");
    }
    if p.split('/').any(|c| c.ends_with(".bleve")) {
        return Some("Bleve index");
    }
    None
}

/// Why a mount is network storage, with the location of the declaration that says so.
pub(crate) fn network_reason(
    tree: &Tree,
    group: &Group,
    mount: &Mount,
    config: &Config,
) -> Option<(String, Option<Label>)> {
    match &mount.source {
        MountSource::GroupVolume(label) => {
            let v = group.volumes.iter().find(|v| &v.label == label)?;
            let source = v.source.as_ref().filter(|s| !s.computed)?;
            if v.kind == "csi" {
                if v.attachment_mode.as_deref() == Some("block-device") {
                    return None;
                }
                let (df, d) = tree.declaration(VolumeKind::Csi, &source.value)?;
                if !d.attachment_modes.is_empty()
                    && d.attachment_modes.iter().all(|m| m == "block-device")
                {
                    return None;
                }
                let plugin = d.plugin.as_deref()?;
                config.network_plugin(plugin)?;
                Some((
                    format!(
                        "CSI file-system volume `{}` of plugin `{plugin}`",
                        source.value
                    ),
                    Some(df.label(
                        d.id.span.clone(),
                        format!("declared here with plugin `{plugin}`"),
                    )),
                ))
            } else {
                let (df, d) = tree.declaration(VolumeKind::Host, &source.value)?;
                let path = d.path.as_deref()?;
                let m = config.network_mount(path)?;
                Some((
                    format!(
                        "host volume `{}` at `{path}` under network mount `{m}`",
                        source.value
                    ),
                    Some(df.label(d.id.span.clone(), format!("host volume path `{path}`"))),
                ))
            }
        }
        MountSource::HostPath(p) => config
            .network_mount(p)
            .map(|m| (format!("host path `{p}` under network mount `{m}`"), None)),
        MountSource::DockerVolume {
            name,
            network: Some(why),
        } => Some((format!("Docker volume `{name}` with {why}"), None)),
        _ => None,
    }
}

struct Candidate {
    path: String,
    kind: &'static str,
    span: Range<usize>,
}

fn candidates(file: &File, task: &Task) -> Vec<Candidate> {
    let mut out = Vec::new();
    let strs = task
        .env
        .iter()
        .map(|(_, v)| v)
        .chain(task.command.iter())
        .chain(task.templates.iter().filter_map(|t| t.data.as_ref()));
    for s in strs {
        for m in PATH.find_iter(&s.value) {
            if let Some(kind) = database_kind(m.as_str()) {
                out.push(Candidate {
                    path: m.as_str().to_string(),
                    kind,
                    span: file.find_in(&s.span, m.as_str()),
                });
            }
        }
    }
    for m in &task.mounts {
        if let Some(kind) = database_kind(&m.destination) {
            out.push(Candidate {
                path: m.destination.clone(),
                kind,
                span: m.span.clone(),
            });
        }
    }
    let postgres = task.image.as_ref().is_some_and(|i| {
        let name = i
            .value
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        name.starts_with("postgres")
            || name.starts_with("postgis")
            || name.starts_with("timescaledb")
    });
    if postgres {
        let pgdata = task.env.iter().find(|(k, _)| k == "PGDATA");
        let (path, span) = match pgdata {
            Some((_, v)) if !v.computed => (v.value.clone(), v.span.clone()),
            _ => (
                "/var/lib/postgresql/data".to_string(),
                task.image
                    .as_ref()
                    .map_or(task.span.clone(), |i| i.span.clone()),
            ),
        };
        out.push(Candidate {
            path,
            kind: "Postgres data directory",
            span,
        });
    }
    out
}

fn check(tree: &Tree, config: &Config) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for (file, job, group, task) in tasks(tree) {
        for c in candidates(file, task) {
            // The innermost mount wins, as in the container's mount table. A Postgres data
            // directory also counts when a volume is mounted at a parent of it or inside it.
            let mount = task
                .mounts
                .iter()
                .filter(|m| {
                    path_under(&c.path, &m.destination)
                        || (c.kind == "Postgres data directory"
                            && path_under(&m.destination, &c.path))
                })
                .max_by_key(|m| m.destination.len());
            let Some(mount) = mount else { continue };
            let Some((why, decl)) = network_reason(tree, group, mount, config) else {
                continue;
            };
            let mut d = file.diag(
                RULE.id,
                c.span.clone(),
                format!(
                    "{} `{}` is on network storage ({why}) in task `{}` of job `{}`",
                    c.kind, c.path, task.name, job.name
                ),
                "database on network storage",
            );
            if mount.span != c.span {
                d.notes.push(file.label(
                    mount.span.clone(),
                    format!("mounted at `{}` here", mount.destination),
                ));
            }
            d.notes.extend(decl);
            d.help = Some("keep the database on local or ephemeral disk (`alloc/`) and replicate it, or use a CSI block-device volume".to_string());
            out.push(d);
        }
    }
    out
}
