//! Per-rule positive and negative cases, snapshotted as the human output a user would see.

// Helpers outside `#[test]` functions unwrap too; tests may unwrap (DEVELOPERS.md).
#![allow(clippy::unwrap_used)]

use hearth_jobspec::{Config, SourceFile, check, render};

/// Checks the files with the configuration and renders findings of `rule` only, plus the summary.
fn run(rule: &str, files: &[(&str, &str)], config: &str) -> String {
    let config = Config::parse(config).unwrap();
    let sources: Vec<SourceFile> = files.iter().map(|(p, t)| SourceFile::new(*p, *t)).collect();
    let mut report = check(&sources, &config);
    report.diagnostics.retain(|d| d.rule == rule);
    render::human(&report, &sources, false)
}

fn count(rule: &str, files: &[(&str, &str)], config: &str) -> usize {
    let config = Config::parse(config).unwrap();
    let sources: Vec<SourceFile> = files.iter().map(|(p, t)| SourceFile::new(*p, *t)).collect();
    check(&sources, &config)
        .diagnostics
        .iter()
        .filter(|d| d.rule == rule)
        .count()
}

const RESTORE_SWALLOWED: &str = r#"job "app" {
  group "app" {
    task "restore" {
      driver = "docker"
      lifecycle {
        hook = "prestart"
      }
      config {
        image   = "litestream/litestream:0.5.17"
        command = "/bin/sh"
        args    = ["-c", "litestream restore -config /local/litestream.yml /alloc/app.db || true"]
      }
    }
  }
}
"#;

const RESTORE_OK: &str = r#"job "app" {
  group "app" {
    task "restore" {
      driver = "docker"
      lifecycle {
        hook = "prestart"
      }
      config {
        image   = "litestream/litestream:0.5.17"
        command = "/bin/sh"
        args    = ["-c", "litestream restore -if-replica-exists -config /local/litestream.yml /alloc/app.db"]
      }
    }
  }
}
"#;

const RESTORE_SCRIPT: &str = r#"job "app" {
  group "app" {
    task "restore" {
      driver = "exec"
      lifecycle {
        hook = "prestart"
      }
      config {
        command = "local/restore.sh"
      }
      template {
        destination = "local/restore.sh"
        data        = <<-EOF
          #!/bin/sh
          set +e
          restic restore latest --target /alloc/data
          exit 0
        EOF
      }
    }
  }
}
"#;

#[test]
fn restore_failure_swallowed() {
    insta::assert_snapshot!(
        "restore_positive",
        run(
            "restore-failure-swallowed",
            &[("jobs/app.nomad.hcl", RESTORE_SWALLOWED)],
            ""
        )
    );
    insta::assert_snapshot!(
        "restore_script",
        run(
            "restore-failure-swallowed",
            &[("jobs/app.nomad.hcl", RESTORE_SCRIPT)],
            ""
        )
    );
    insta::assert_snapshot!(
        "restore_negative",
        run(
            "restore-failure-swallowed",
            &[("jobs/app.nomad.hcl", RESTORE_OK)],
            ""
        )
    );
    assert_eq!(
        count("restore-failure-swallowed", &[("a.hcl", RESTORE_OK)], ""),
        0
    );
    assert_eq!(
        count(
            "restore-failure-swallowed",
            &[("a.hcl", RESTORE_SCRIPT)],
            ""
        ),
        2
    );
}

#[test]
fn restore_in_main_task_is_not_flagged() {
    let main_task = RESTORE_SWALLOWED.replace("hook = \"prestart\"", "hook = \"poststop\"");
    assert_eq!(
        count("restore-failure-swallowed", &[("a.hcl", &main_task)], ""),
        0
    );
}

const SLEEP: &str = r#"job "web" {
  group "web" {
    task "web" {
      driver = "docker"
      config {
        image   = "nginx:1.27"
        command = "/bin/sh"
        args    = ["-c", "sleep 60 && exec nginx -g 'daemon off;'"]
      }
    }
    task "wait" {
      driver = "exec"
      lifecycle {
        hook = "prestart"
      }
      config {
        command = "sleep"
        args    = ["30"]
      }
    }
  }
}
"#;

const SLEEP_OK: &str = r#"job "web" {
  group "web" {
    task "web" {
      driver = "docker"
      config {
        image   = "nginx:1.27"
        command = "/bin/sh"
        args    = ["-c", "until nc -z db 5432; do sleep 1; done; exec nginx"]
      }
    }
    task "keepalive" {
      driver = "exec"
      lifecycle {
        hook    = "prestart"
        sidecar = true
      }
      config {
        command = "/bin/sh"
        args    = ["-c", "while true; do date; sleep 60; done"]
      }
    }
  }
}
"#;

#[test]
fn sleep_readiness_wait() {
    insta::assert_snapshot!(
        "sleep_positive",
        run("sleep-readiness-wait", &[("web.nomad", SLEEP)], "")
    );
    insta::assert_snapshot!(
        "sleep_negative",
        run("sleep-readiness-wait", &[("web.nomad", SLEEP_OK)], "")
    );
    assert_eq!(
        count("sleep-readiness-wait", &[("web.nomad", SLEEP)], ""),
        2
    );
    // A configuration template is not a script, even when a line in it looks like one.
    let config_template = SLEEP_OK.replace(
        "    task \"keepalive\" {\n",
        "    task \"keepalive\" {\n      template {\n        destination = \"local/motd.txt\"\n        data        = \"sleep 5\\nthen work\"\n      }\n",
    );
    assert!(config_template.contains("motd"));
    assert_eq!(
        count(
            "sleep-readiness-wait",
            &[("web.nomad", &config_template)],
            ""
        ),
        0
    );
    let script_template = config_template.replace("local/motd.txt", "local/start.sh");
    assert_eq!(
        count(
            "sleep-readiness-wait",
            &[("web.nomad", &script_template)],
            ""
        ),
        1
    );
}

const DB_JOB: &str = r#"job "vaultwarden" {
  group "vw" {
    volume "data" {
      type            = "csi"
      source          = "glusterfs_vaultwarden_data"
      attachment_mode = "file-system"
      access_mode     = "single-node-writer"
    }
    task "vw" {
      driver = "docker"
      config {
        image = "vaultwarden/server:1.32.0"
      }
      env {
        DATABASE_URL = "/data/db.sqlite3"
      }
      volume_mount {
        volume      = "data"
        destination = "/data"
      }
    }
  }
}
"#;

const DB_TF: &str = r#"resource "nomad_csi_volume" "vaultwarden" {
  plugin_id = "glusterfs"
  volume_id = "glusterfs_vaultwarden_data"
  name      = "glusterfs_vaultwarden_data"
  capability {
    access_mode     = "single-node-writer"
    attachment_mode = "file-system"
  }
  lifecycle {
    prevent_destroy = true
  }
}
"#;

const PG_NFS: &str = r#"job "pg" {
  group "pg" {
    task "postgres" {
      driver = "docker"
      config {
        image   = "postgres:16"
        volumes = ["/mnt/nfs/postgres:/var/lib/postgresql/data"]
      }
    }
  }
}
"#;

const DOCKER_NFS: &str = r#"job "app" {
  group "app" {
    task "app" {
      driver = "docker"
      config {
        image = "ghcr.io/example/app:2.1"
        args  = ["--db", "/srv/state/app.db"]
        mount {
          type   = "volume"
          source = "appdata"
          target = "/srv/state"
          volume_options {
            driver_config {
              name = "local"
              options {
                type   = "nfs"
                device = ":/exports/app"
                o      = "addr=10.0.0.2,rw"
              }
            }
          }
        }
      }
    }
  }
}
"#;

#[test]
fn database_on_network_storage() {
    let rule = "database-on-network-storage";
    insta::assert_snapshot!(
        "db_csi_glusterfs",
        run(
            rule,
            &[
                ("modules/vaultwarden/jobspec.nomad.hcl", DB_JOB),
                ("modules/vaultwarden/main.tf", DB_TF)
            ],
            ""
        )
    );
    insta::assert_snapshot!(
        "db_postgres_host_path",
        run(
            rule,
            &[("pg.hcl", PG_NFS)],
            "network_mounts = [\"/mnt/nfs\"]"
        )
    );
    insta::assert_snapshot!("db_docker_nfs", run(rule, &[("app.hcl", DOCKER_NFS)], ""));
    // Negative: block devices, unknown plugins, local paths and unconfigured mounts.
    let block = DB_TF.replace(
        "attachment_mode = \"file-system\"",
        "attachment_mode = \"block-device\"",
    );
    insta::assert_snapshot!(
        "db_negative_block_device",
        run(rule, &[("j.hcl", DB_JOB), ("main.tf", &block)], "")
    );
    let local_plugin = DB_TF.replace("plugin_id = \"glusterfs\"", "plugin_id = \"hostpath\"");
    assert_eq!(
        count(rule, &[("j.hcl", DB_JOB), ("main.tf", &local_plugin)], ""),
        0
    );
    assert_eq!(
        count(rule, &[("j.hcl", DB_JOB)], ""),
        0,
        "undeclared volumes are unknown, not network"
    );
    assert_eq!(
        count(rule, &[("pg.hcl", PG_NFS)], ""),
        0,
        "no network mounts configured"
    );
    assert_eq!(
        count(
            rule,
            &[(
                "pg.hcl",
                &PG_NFS.replace("/mnt/nfs/postgres", "/srv/postgres")
            )],
            "network_mounts = [\"/mnt/nfs\"]"
        ),
        0
    );
}

const LS_JOB: &str = r#"job "app" {
  group "app" {
    task "restore" {
      driver = "docker"
      lifecycle {
        hook = "prestart"
      }
      config {
        image = "litestream/litestream:0.5.17"
        args  = ["restore", "-if-replica-exists", "-config", "/local/litestream.yml", "/alloc/data/app.db"]
      }
      template {
        destination = "local/litestream.yml"
        data        = <<-EOF
          dbs:
            - path: /alloc/data/app.db
              replica:
                url: s3://backups/app
        EOF
      }
    }
    task "litestream" {
      driver = "docker"
      lifecycle {
        hook    = "prestart"
        sidecar = true
      }
      config {
        image = "litestream/litestream:0.5.17"
        args  = ["replicate", "-config", "/local/litestream.yml"]
      }
      template {
        destination = "local/litestream.yml"
        data        = <<-EOF
          dbs:
            - path: /alloc/data/app.db
              replica:
                url: s3://backups/app
        EOF
      }
    }
  }
}
"#;

#[test]
fn litestream_config_mismatch() {
    let rule = "litestream-config-mismatch";
    let first = LS_JOB.find("s3://backups/app").unwrap();
    let mut other_bucket = LS_JOB.to_string();
    other_bucket.replace_range(
        first..first + "s3://backups/app".len(),
        "s3://old-backups/app",
    );
    insta::assert_snapshot!(
        "litestream_mismatch_replica",
        run(rule, &[("app.nomad", &other_bucket)], "")
    );
    let other_path = LS_JOB.replacen("/alloc/data/app.db\"]", "/alloc/app.db\"]", 1);
    insta::assert_snapshot!(
        "litestream_mismatch_path",
        run(rule, &[("app.nomad", &other_path)], "")
    );
    insta::assert_snapshot!(
        "litestream_negative",
        run(rule, &[("app.nomad", LS_JOB)], "")
    );
}

#[test]
fn litestream_db_not_on_alloc() {
    let rule = "litestream-db-not-on-alloc";
    let host = LS_JOB.replace("/alloc/data/app.db", "/data/app.db");
    insta::assert_snapshot!(
        "litestream_not_alloc",
        run(rule, &[("app.nomad", &host)], "")
    );
    insta::assert_snapshot!(
        "litestream_on_alloc",
        run(rule, &[("app.nomad", LS_JOB)], "")
    );
    let nomad_dir = LS_JOB.replace("/alloc/data/app.db", "${NOMAD_ALLOC_DIR}/data/app.db");
    assert_eq!(count(rule, &[("app.nomad", &nomad_dir)], ""), 0);
}

const TF_VOLUMES: &str = r#"resource "nomad_csi_volume" "data" {
  plugin_id = "nfs"
  volume_id = "nfs_app_data"
  name      = "nfs_app_data"
}

resource "nomad_dynamic_host_volume" "cache" {
  name      = "app_cache"
  plugin_id = "mkdir"
}

resource "nomad_csi_volume_registration" "kept" {
  plugin_id   = "nfs"
  volume_id   = "nfs_app_kept"
  name        = "nfs_app_kept"
  external_id = "x"

  lifecycle {
    prevent_destroy = true
  }
}
"#;

#[test]
fn volume_prevent_destroy() {
    insta::assert_snapshot!(
        "prevent_destroy",
        run(
            "volume-prevent-destroy",
            &[("modules/app/main.tf", TF_VOLUMES)],
            ""
        )
    );
    assert_eq!(
        count("volume-prevent-destroy", &[("main.tf", TF_VOLUMES)], ""),
        2
    );
    assert_eq!(
        count("volume-prevent-destroy", &[("main.tf", DB_TF)], ""),
        0
    );
}

const USES: &str = r#"job "app" {
  group "app" {
    volume "data" {
      type      = "csi"
      source    = "nfs_app_data"
      per_alloc = true
    }
    volume "typo" {
      type   = "csi"
      source = "nfs_app_dta"
    }
    volume "cache" {
      type   = "host"
      source = "app_cache"
    }
  }
}
"#;

#[test]
fn volume_undeclared_and_unused() {
    let files = [
        ("modules/app/main.tf", TF_VOLUMES),
        ("modules/app/jobspec.nomad.hcl", USES),
    ];
    insta::assert_snapshot!("undeclared", run("volume-undeclared", &files, ""));
    insta::assert_snapshot!("unused", run("volume-unused", &files, ""));
    // Without any declarations in the tree, nothing can be called undeclared.
    assert_eq!(count("volume-undeclared", &[("j.hcl", USES)], ""), 0);
    // Without any job in the tree, nothing can be called unused.
    assert_eq!(count("volume-unused", &[("main.tf", TF_VOLUMES)], ""), 0);
}

#[test]
fn volume_naming() {
    let config = "volume_name_patterns = [\"nfs_<service>_<type>\"]";
    let files = [
        ("modules/app/main.tf", TF_VOLUMES),
        ("modules/app/jobspec.nomad.hcl", USES),
    ];
    insta::assert_snapshot!("naming", run("volume-naming", &files, config));
    assert_eq!(
        count("volume-naming", &files, ""),
        0,
        "off without patterns"
    );
    let good = [(
        "modules/app/main.tf",
        TF_VOLUMES.replace("app_cache", "nfs_app_cache"),
    )];
    assert_eq!(
        count("volume-naming", &[(good[0].0, good[0].1.as_str())], config),
        0
    );
}

const PATHS: &str = r#"locals {
  base = "/data/compute"
}

job "app" {
  group "app" {
    task "app" {
      driver = "docker"
      config {
        image   = "app:1.0"
        volumes = ["/data/compute/app:/config", "/data/computer/x:/y"]
      }
      template {
        destination = "local/litestream.yml"
        data        = <<EOF
dbs:
  - path: /data/compute/app/app.db
EOF
      }
    }
  }
}
"#;

#[test]
fn deprecated_path() {
    let config = "deprecated_paths = [\"/data/compute\"]";
    insta::assert_snapshot!(
        "deprecated",
        run("deprecated-path", &[("app.hcl", PATHS)], config)
    );
    assert_eq!(count("deprecated-path", &[("app.hcl", PATHS)], config), 3);
    assert_eq!(count("deprecated-path", &[("app.hcl", PATHS)], ""), 0);
}

const IMAGES: &str = r#"job "x" {
  group "x" {
    task "a" {
      driver = "docker"
      config {
        image = "grafana/grafana:latest"
      }
    }
    task "b" {
      driver = "docker"
      config {
        image = "redis"
      }
    }
    task "c" {
      driver = "docker"
      config {
        image = "registry.local:5000/tool:1.2"
      }
    }
    task "d" {
      driver = "docker"
      config {
        image = "alpine@sha256:0123456789abcdef"
      }
    }
    task "e" {
      driver = "docker"
      config {
        image = "app:${var.version}"
      }
    }
  }
}
"#;

#[test]
fn image_latest() {
    insta::assert_snapshot!("images", run("image-latest", &[("x.nomad", IMAGES)], ""));
    assert_eq!(count("image-latest", &[("x.nomad", IMAGES)], ""), 2);
}

#[test]
fn inline_suppression_and_config() {
    let suppressed = IMAGES.replace(
        "        image = \"redis\"",
        "        # hearth:ignore image-latest\n        image = \"redis\"",
    );
    assert_eq!(count("image-latest", &[("x.nomad", &suppressed)], ""), 1);
    assert_eq!(
        count(
            "image-latest",
            &[("x.nomad", IMAGES)],
            "rule \"image-latest\" {\n  severity = \"off\"\n}\n"
        ),
        0
    );
    assert_eq!(
        count(
            "image-latest",
            &[("legacy/x.nomad", IMAGES)],
            "ignore = [\"legacy/**\"]"
        ),
        0
    );
    let config = Config::parse("rule \"image-latest\" {\n  severity = \"error\"\n}\n").unwrap();
    let report = check(&[SourceFile::new("x.nomad", IMAGES)], &config);
    assert!(
        report
            .diagnostics
            .iter()
            .all(|d| d.rule != "image-latest" || d.severity == hearth_jobspec::Severity::Error)
    );
    assert!(Config::parse("rule \"no-such-rule\" {}").is_err());
    assert!(Config::parse("network_plugin = [\"x\"]").is_err());
}

#[test]
fn templated_and_non_jobspec_files() {
    let levant = "job \"[[ .name ]]\" {\n  datacenters = [\"dc1\"]\n}\n";
    let tf_template = "job \"x\" {\n  datacenters = ${datacenters}\n}\n";
    let client = "client {\n  enabled = true\n  host_volume \"data\" {\n    path = \"/mnt/nfs/data\"\n  }\n}\n";
    let files = [
        ("a.nomad", levant),
        ("b.hcl", tf_template),
        ("client.hcl", client),
        ("broken.hcl", "job {"),
    ];
    insta::assert_snapshot!("templated", run("image-latest", &files, ""));
}

#[test]
fn json_and_sarif_formats() {
    let sources = [SourceFile::new("x.nomad", IMAGES)];
    let report = check(&sources, &Config::default());
    let json: serde_json::Value = serde_json::from_str(&render::json(&report)).unwrap();
    assert_eq!(json["summary"]["findings"], 2);
    assert_eq!(json["diagnostics"][0]["rule"], "image-latest");
    assert_eq!(json["diagnostics"][0]["line"], 6);
    let sarif: serde_json::Value = serde_json::from_str(&render::sarif(&report)).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    assert_eq!(sarif["runs"][0]["results"].as_array().unwrap().len(), 2);
    assert_eq!(
        sarif["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]["startLine"],
        6
    );
}
