//! `migrate`: path prefixes and volume names across jobspecs, Terraform and heredocs, with
//! comments and layout kept, computed values reported, and idempotence.

// Helpers outside `#[test]` functions unwrap too; tests may unwrap (DEVELOPERS.md).
#![allow(clippy::unwrap_used)]

use hearth_jobspec::migrate::unified_diff;
use hearth_jobspec::{MigrateError, Migration, SourceFile, migrate};

const JOB: &str = r#"# Vaultwarden, see the runbook.
locals {
  data_root = "/data/compute" # keep in sync with the NAS
}

job "vaultwarden" {
  group "vw" {
    volume "data" {
      type            = "csi"
      source          = "glusterfs_vaultwarden_data" // the old store
      attachment_mode = "file-system"
    }

    task "vw" {
      driver = "docker"
      config {
        image   = "vaultwarden/server:1.32.0"
        volumes = [
          "/data/compute/vaultwarden:/data",   # bind mount
          "/data/computer/unrelated:/x",
          "/data/${var.tier}/cache:/cache",
        ]
        mount {
          type   = "bind"
          source = "/data/compute/vaultwarden/config"
          target = "/config"
        }
      }
      template {
        destination = "local/litestream.yml"
        data        = <<-EOF
          dbs:
            - path: /data/compute/vaultwarden/db.sqlite3
              replica:
                url: s3://backups/vaultwarden
        EOF
      }
    }
  }
}
"#;

const TF: &str = r#"resource "nomad_csi_volume" "vaultwarden" {
  plugin_id = "glusterfs"
  volume_id = "glusterfs_vaultwarden_data"
  name      = "glusterfs_vaultwarden_data"

  lifecycle {
    prevent_destroy = true
  }
}

resource "nomad_csi_volume" "per_alloc" {
  count     = 2
  plugin_id = "glusterfs"
  volume_id = "glusterfs_db[${count.index}]"
  name      = "glusterfs_db[${count.index}]"
}
"#;

fn sample() -> Migration {
    Migration {
        paths: vec![("/data/compute".into(), "/data/services".into())],
        volumes: vec![("glusterfs_*".into(), "nfs_*".into())],
    }
}

fn describe(path: &str, text: &str, m: &Migration) -> String {
    let rw = migrate(&SourceFile::new(path, text), m).unwrap();
    let mut out = unified_diff(path, text, &rw.text);
    for r in &rw.replacements {
        out.push_str(&format!(
            "{path}:{}:{}: {} `{}` -> `{}`\n",
            r.line, r.column, r.kind, r.old, r.new
        ));
    }
    for u in &rw.unsafe_sites {
        out.push_str(&format!(
            "{path}:{}:{}: not rewritten: {}\n",
            u.line, u.column, u.message
        ));
    }
    out
}

#[test]
fn rewrites_jobspec_paths_volumes_and_heredocs() {
    insta::assert_snapshot!(
        "migrate_job",
        describe("modules/vaultwarden/jobspec.nomad.hcl", JOB, &sample())
    );
}

#[test]
fn rewrites_terraform_volumes() {
    insta::assert_snapshot!(
        "migrate_tf",
        describe("modules/vaultwarden/main.tf", TF, &sample())
    );
}

#[test]
fn keeps_comments_and_is_idempotent() {
    let first = migrate(&SourceFile::new("a.hcl", JOB), &sample()).unwrap();
    assert!(first.text.contains("# keep in sync with the NAS"));
    assert!(first.text.contains("// the old store"));
    assert!(first.text.contains("\"/data/computer/unrelated:/x\""));
    assert_eq!(first.replacements.len(), 5);
    assert_eq!(first.unsafe_sites.len(), 1);
    let second = migrate(&SourceFile::new("a.hcl", first.text.clone()), &sample()).unwrap();
    assert!(second.replacements.is_empty());
    assert_eq!(second.text, first.text);
}

#[test]
fn new_path_under_old_path_is_idempotent() {
    let m = Migration {
        paths: vec![("/data".into(), "/data/services".into())],
        volumes: vec![],
    };
    let first = migrate(&SourceFile::new("a.hcl", JOB), &m).unwrap();
    assert!(first.changed());
    let second = migrate(&SourceFile::new("a.hcl", first.text.clone()), &m).unwrap();
    assert!(second.replacements.is_empty(), "{:?}", second.replacements);
}

#[test]
fn refuses_templated_and_invalid_files() {
    let levant = "job \"[[ .name ]]\" {\n}\n";
    assert!(matches!(
        migrate(&SourceFile::new("a.nomad", levant), &sample()),
        Err(MigrateError::Templated { line: 1, .. })
    ));
    assert!(matches!(
        migrate(&SourceFile::new("a.nomad", "job {"), &sample()),
        Err(MigrateError::Parse { .. })
    ));
}
