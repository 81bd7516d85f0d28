//! The checker's configuration file (`hearth-jobspec.hcl`): network plugins and mounts,
//! deprecated paths, volume naming patterns, per-rule severities and ignores.
//!
//! ```hcl
//! network_plugins      = ["nfs", "glusterfs"]   # CSI plugin IDs containing these are network storage
//! network_mounts       = ["/mnt/nfs"]           # host paths under these are network storage
//! deprecated_paths     = ["/data/compute"]
//! volume_name_patterns = ["glusterfs_<service>_<type>"]
//! ignore               = ["legacy/**"]          # files no rule looks at
//!
//! rule "image-latest" {
//!   severity = "error"                          # error, warning, note or off
//!   ignore   = ["modules/sandbox/**"]
//! }
//! ```

use std::collections::BTreeMap;

use globset::{Glob, GlobSet, GlobSetBuilder};
use hcl_edit::expr::Expression;
use hcl_edit::structure::Body;

use crate::diag::Severity;
use crate::rules;

/// Errors in the configuration file. None of them go away on retry: the file must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid HCL.
    #[error("configuration is not valid HCL: {0}")]
    Parse(String),
    /// A key has the wrong type or an unknown value.
    #[error("configuration key `{key}`: {message}")]
    Invalid {
        /// The offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Per-rule settings.
#[derive(Debug, Clone, Default)]
struct RuleConfig {
    /// `None` keeps the rule's default; `Some(None)` turns it off.
    severity: Option<Option<Severity>>,
    ignore: Option<GlobSet>,
}

/// Checker configuration. [`Config::default`] is what runs without a file.
#[derive(Debug, Clone)]
pub struct Config {
    /// Substrings of CSI plugin IDs that mean network file storage.
    pub network_plugins: Vec<String>,
    /// Host path prefixes that are network mounts on the clients.
    pub network_mounts: Vec<String>,
    /// Path prefixes that should no longer be used.
    pub deprecated_paths: Vec<String>,
    /// Volume naming patterns; `<service>` is the job or module name, other `<x>` match one word.
    pub volume_name_patterns: Vec<String>,
    ignore: Option<GlobSet>,
    rules: BTreeMap<String, RuleConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            // Substrings: "gluster" covers "glusterfs", "nfs" covers "nfs.csi.k8s.io" and the like.
            network_plugins: [
                "nfs",
                "gluster",
                "cephfs",
                "smb",
                "cifs",
                "seaweedfs",
                "juicefs",
            ]
            .map(String::from)
            .to_vec(),
            network_mounts: Vec::new(),
            deprecated_paths: Vec::new(),
            volume_name_patterns: Vec::new(),
            ignore: None,
            rules: BTreeMap::new(),
        }
    }
}

fn strings(key: &str, e: &Expression) -> Result<Vec<String>, ConfigError> {
    let bad = || ConfigError::Invalid {
        key: key.to_string(),
        message: "expected a list of literal strings".to_string(),
    };
    let arr = e.as_array().ok_or_else(bad)?;
    arr.iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

fn globs(key: &str, patterns: &[String]) -> Result<Option<GlobSet>, ConfigError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| ConfigError::Invalid {
            key: key.to_string(),
            message: e.to_string(),
        })?;
        b.add(g);
    }
    b.build().map(Some).map_err(|e| ConfigError::Invalid {
        key: key.to_string(),
        message: e.to_string(),
    })
}

impl Config {
    /// Parses a configuration file's text. Unknown keys and unknown rule ids are errors, so that a
    /// typo does not silently leave a rule on.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let body: Body =
            hcl_edit::parser::parse_body(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let mut c = Config::default();
        for a in body.attributes() {
            let key = a.key.as_str();
            match key {
                "network_plugins" => c.network_plugins = strings(key, &a.value)?,
                "network_mounts" => c.network_mounts = strings(key, &a.value)?,
                "deprecated_paths" => c.deprecated_paths = strings(key, &a.value)?,
                "volume_name_patterns" => c.volume_name_patterns = strings(key, &a.value)?,
                "ignore" => c.ignore = globs(key, &strings(key, &a.value)?)?,
                _ => {
                    return Err(ConfigError::Invalid {
                        key: key.to_string(),
                        message: "unknown key".to_string(),
                    });
                }
            }
        }
        for b in body.blocks() {
            if b.ident.as_str() != "rule" {
                return Err(ConfigError::Invalid {
                    key: b.ident.as_str().to_string(),
                    message: "unknown block (only `rule \"<id>\" { … }` is allowed)".to_string(),
                });
            }
            let Some(id) = b.labels.first().map(|l| l.as_str().to_string()) else {
                return Err(ConfigError::Invalid {
                    key: "rule".to_string(),
                    message: "a rule block needs the rule id as its label".to_string(),
                });
            };
            if !rules::ALL.iter().any(|r| r.id == id) {
                return Err(ConfigError::Invalid {
                    key: format!("rule \"{id}\""),
                    message: "unknown rule id".to_string(),
                });
            }
            let mut rc = RuleConfig::default();
            for a in b.body.attributes() {
                let key = format!("rule \"{id}\".{}", a.key.as_str());
                match a.key.as_str() {
                    "severity" => {
                        let s = a.value.as_str().unwrap_or_default();
                        rc.severity = Some(if s == "off" {
                            None
                        } else {
                            Some(Severity::parse(s).ok_or_else(|| {
                                ConfigError::Invalid {
                                    key: key.clone(),
                                    message: "expected \"error\", \"warning\", \"note\" or \"off\""
                                        .to_string(),
                                }
                            })?)
                        });
                    }
                    "ignore" => rc.ignore = globs(&key, &strings(&key, &a.value)?)?,
                    _ => {
                        return Err(ConfigError::Invalid {
                            key,
                            message: "unknown key".to_string(),
                        });
                    }
                }
            }
            c.rules.insert(id, rc);
        }
        Ok(c)
    }

    /// Sets a rule's severity (`None` turns it off), as the configuration file's `rule` block does.
    pub fn set_severity(&mut self, rule: &str, severity: Option<Severity>) {
        self.rules.entry(rule.to_string()).or_default().severity = Some(severity);
    }

    /// The effective severity of a rule, or `None` when it is off.
    pub fn severity_for(&self, rule: &str, default: Severity) -> Option<Severity> {
        match self.rules.get(rule).and_then(|r| r.severity) {
            Some(s) => s,
            None => Some(default),
        }
    }

    /// Whether findings of `rule` in `file` are ignored by configuration.
    pub fn is_ignored(&self, rule: &str, file: &str) -> bool {
        self.ignore.as_ref().is_some_and(|g| g.is_match(file))
            || self
                .rules
                .get(rule)
                .and_then(|r| r.ignore.as_ref())
                .is_some_and(|g| g.is_match(file))
    }

    /// Whether a host path lies under a configured network mount.
    pub fn network_mount(&self, path: &str) -> Option<&str> {
        self.network_mounts
            .iter()
            .find(|m| crate::path_under(path, m))
            .map(String::as_str)
    }

    /// Whether a CSI plugin ID names network file storage.
    pub fn network_plugin(&self, plugin: &str) -> Option<&str> {
        let p = plugin.to_ascii_lowercase();
        self.network_plugins
            .iter()
            .find(|n| p.contains(&n.to_ascii_lowercase()))
            .map(String::as_str)
    }
}
