//! `hearth jobspec` end to end: the real binary on temporary folders, checking output,
//! exit codes, formats, and that `migrate --write` rewrites files atomically and idempotently.

// Tests may unwrap (DEVELOPERS.md); helpers outside `#[test]` functions too.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

const JOB: &str = r#"job "app" {
  group "app" {
    volume "data" {
      type   = "csi"
      source = "glusterfs_app_data"
    }
    task "app" {
      driver = "docker"
      config {
        image   = "ghcr.io/example/app:latest"
        volumes = ["/data/compute/app:/config"] # bind mount
      }
      env {
        DB = "/data/app.db"
      }
      volume_mount {
        volume      = "data"
        destination = "/data"
      }
    }
  }
}
"#;

const TF: &str = r#"resource "nomad_csi_volume" "app" {
  plugin_id = "glusterfs"
  volume_id = "glusterfs_app_data"
  name      = "glusterfs_app_data"
}
"#;

const CLEAN: &str = r#"job "ok" {
  group "ok" {
    task "ok" {
      driver = "docker"
      config {
        image = "nginx:1.27.2"
      }
    }
  }
}
"#;

fn hearth(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .args(args)
        .output()
        .unwrap()
}

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("modules/app")).unwrap();
    std::fs::write(dir.path().join("modules/app/jobspec.nomad.hcl"), JOB).unwrap();
    std::fs::write(dir.path().join("modules/app/main.tf"), TF).unwrap();
    std::fs::write(dir.path().join("modules/app/README.md"), "not HCL").unwrap();
    std::fs::create_dir_all(dir.path().join("legacy")).unwrap();
    std::fs::write(
        dir.path().join("legacy/old.nomad"),
        "job \"[[ .name ]]\" {\n}\n",
    )
    .unwrap();
    dir
}

#[test]
fn check_reports_findings_with_exit_code_1() {
    let dir = tree();
    let out = hearth(dir.path(), &["jobspec", "check", "modules", "legacy"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("error[database-on-network-storage]"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--> modules/app/jobspec.nomad.hcl:14:15"),
        "{stdout}"
    );
    assert!(stdout.contains("error[volume-prevent-destroy]"), "{stdout}");
    assert!(stdout.contains("warning[image-latest]"), "{stdout}");
    assert!(
        stdout.contains("legacy/old.nomad:1:6: skipped: templated (Levant"),
        "{stdout}"
    );
    assert!(
        stdout.contains("checked 3 files (1 jobspec, 1 Terraform), 1 jobs: 3 findings (2 errors, 1 warnings, 0 notes), 1 skipped (templated), 0 not valid HCL"),
        "{stdout}"
    );
    assert!(!stdout.contains("\u{1b}["), "no colour when not a terminal");
}

#[test]
fn fail_on_threshold_and_clean_tree() {
    let dir = tree();
    let out = hearth(
        dir.path(),
        &[
            "jobspec",
            "check",
            "--fail-on",
            "error",
            "modules/app/jobspec.nomad.hcl",
        ],
    );
    // Alone, the job's CSI volume is not known to be GlusterFS: only the image warning remains.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::fs::write(dir.path().join("clean.nomad"), CLEAN).unwrap();
    let out = hearth(dir.path(), &["jobspec", "check", "clean.nomad"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn config_file_and_usage_errors_exit_2() {
    let dir = tree();
    std::fs::write(dir.path().join("hearth-jobspec.hcl"), "rule \"image-latest\" {\n  severity = \"off\"\n}\nrule \"volume-prevent-destroy\" {\n  severity = \"off\"\n}\nrule \"database-on-network-storage\" {\n  severity = \"note\"\n}\n").unwrap();
    let out = hearth(dir.path(), &["jobspec", "check", "modules"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("note[database-on-network-storage]"));

    let out = hearth(dir.path(), &["jobspec", "check", "no-such-folder"]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(dir.path().join("bad.hcl"), "rule \"nope\" {}\n").unwrap();
    let out = hearth(
        dir.path(),
        &["jobspec", "check", "--config", "bad.hcl", "modules"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown rule id"));
    let out = hearth(dir.path(), &["jobspec", "migrate", "modules"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn json_and_sarif() {
    let dir = tree();
    let out = hearth(
        dir.path(),
        &["jobspec", "check", "--format", "json", "modules"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["findings"], 3);
    assert_eq!(v["summary"]["jobs"], 1);
    let out = hearth(
        dir.path(),
        &["jobspec", "check", "--format", "sarif", "modules"],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], "2.1.0");
    assert_eq!(v["runs"][0]["results"].as_array().unwrap().len(), 3);
}

#[test]
fn migrate_prints_a_diff_then_writes_idempotently() {
    let dir = tree();
    let args = [
        "jobspec",
        "migrate",
        "--path",
        "/data/compute=/data/services",
        "--volume",
        "glusterfs_*=nfs_*",
        "modules",
    ];
    let out = hearth(dir.path(), &args);
    assert_eq!(out.status.code(), Some(0));
    let diff = String::from_utf8(out.stdout).unwrap();
    let log = String::from_utf8(out.stderr).unwrap();
    assert!(
        diff.contains("-        volumes = [\"/data/compute/app:/config\"] # bind mount"),
        "{diff}"
    );
    assert!(
        diff.contains("+        volumes = [\"/data/services/app:/config\"] # bind mount"),
        "{diff}"
    );
    assert!(diff.contains("+  volume_id = \"nfs_app_data\""), "{diff}");
    assert!(
        log.contains(
            "modules/app/jobspec.nomad.hcl:11:21: path `/data/compute` -> `/data/services`"
        ),
        "{log}"
    );
    // Dry run: nothing written.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("modules/app/jobspec.nomad.hcl")).unwrap(),
        JOB
    );

    let mut write = args.to_vec();
    write.push("--write");
    let out = hearth(dir.path(), &write);
    assert_eq!(out.status.code(), Some(0));
    let job = std::fs::read_to_string(dir.path().join("modules/app/jobspec.nomad.hcl")).unwrap();
    assert_eq!(
        job,
        JOB.replace("/data/compute", "/data/services")
            .replace("glusterfs_app_data", "nfs_app_data")
    );
    let tf = std::fs::read_to_string(dir.path().join("modules/app/main.tf")).unwrap();
    assert!(tf.contains("volume_id = \"nfs_app_data\""));

    let out = hearth(dir.path(), &write);
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 replacements in 0 files"));
    let again = std::fs::read_to_string(dir.path().join("modules/app/jobspec.nomad.hcl")).unwrap();
    assert_eq!(again, job);
}

#[test]
fn rules_lists_every_rule() {
    let dir = tempfile::tempdir().unwrap();
    let out = hearth(dir.path(), &["jobspec", "rules"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for r in hearth_jobspec::rules::ALL {
        assert!(text.contains(&format!("### `{}`", r.id)));
    }
}

#[test]
fn colour_on_request() {
    let dir = tree();
    let out = hearth(
        dir.path(),
        &["jobspec", "check", "--color", "always", "modules"],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\u{1b}["));
}
