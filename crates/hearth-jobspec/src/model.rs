//! A read-only view of the scanned tree: jobs, groups, tasks, mounts and volume declarations,
//! taken from hcl-edit's lossless syntax tree without evaluating anything.
//!
//! Rules work on this view instead of the raw syntax tree so that each rule stays short. Values are
//! kept as written, with byte spans into the file, and a flag saying whether they contain an
//! interpolation or another computed part (which rules then treat as unknown).

use std::ops::Range;

use hcl_edit::Span;
use hcl_edit::expr::{Expression, ObjectKey};
use hcl_edit::structure::{Block, BlockLabel, Body};
use hcl_edit::template::{Element, Template};

use crate::FileOutcome;
use crate::diag::{Diagnostic, Label, Severity};
use crate::source::{FileKind, LineIndex, SourceFile, Suppressions, templated};

/// A string value as written, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str {
    /// Literal text with interpolations kept verbatim (`${…}`).
    pub value: String,
    /// Byte range of the whole expression in its file.
    pub span: Range<usize>,
    /// Whether the value contains an interpolation, directive or is not a string at all.
    pub computed: bool,
}

/// A `volume` block in a group.
#[derive(Debug, Clone)]
pub struct VolumeRequest {
    /// The block label, which `volume_mount.volume` refers to.
    pub label: String,
    /// `host` or `csi`.
    pub kind: String,
    /// The `source` attribute: a volume ID (CSI) or host volume name.
    pub source: Option<Str>,
    /// `attachment_mode` (`file-system` or `block-device`), if written.
    pub attachment_mode: Option<String>,
    /// Whether `per_alloc = true` (the real IDs carry an `[N]` suffix).
    pub per_alloc: bool,
    /// Span of the block label.
    pub span: Range<usize>,
}

/// Where a task's mount comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A `volume_mount` of the group volume with this label.
    GroupVolume(String),
    /// A Docker bind mount of this host path.
    HostPath(String),
    /// A path inside the allocation or task directory (`local/`, `alloc/`, `secrets/`).
    TaskDir(String),
    /// A Docker named volume; `network` says why it is network storage, if it is.
    DockerVolume {
        /// The volume name.
        name: String,
        /// Why the volume is on network storage (its driver or `type` option), if it is.
        network: Option<String>,
    },
    /// Anything else (tmpfs, computed values).
    Other,
}

/// One mount into a task's file system.
#[derive(Debug, Clone)]
pub struct Mount {
    /// Path inside the task.
    pub destination: String,
    /// Where it comes from.
    pub source: MountSource,
    /// Span of the declaring expression or block.
    pub span: Range<usize>,
}

/// A `template` block.
#[derive(Debug, Clone)]
pub struct TemplateBlock {
    /// The inline `data`, if any.
    pub data: Option<Str>,
    /// `destination`, if written literally.
    pub destination: Option<String>,
}

/// A `task` block.
#[derive(Debug, Clone)]
pub struct Task {
    /// Task name.
    pub name: String,
    /// Span of the task's label.
    pub span: Range<usize>,
    /// `driver`.
    pub driver: Option<String>,
    /// `lifecycle.hook` (`prestart`, `poststart`, `poststop`).
    pub hook: Option<String>,
    /// `lifecycle.sidecar`.
    pub sidecar: bool,
    /// `config.image`.
    pub image: Option<Str>,
    /// `config.command` and `config.entrypoint`, then `config.args`, in order.
    pub command: Vec<Str>,
    /// `template` blocks.
    pub templates: Vec<TemplateBlock>,
    /// `env` entries.
    pub env: Vec<(String, Str)>,
    /// Mounts from `volume_mount` blocks and Docker `volumes`/`mount`.
    pub mounts: Vec<Mount>,
}

impl Task {
    /// What the task runs as shell: `command`/`args` values and the templates that are scripts
    /// (a `#!` line, a `.sh`/`.bash` destination, or a destination the command names). Other
    /// templates are configuration files and are not read as shell.
    pub fn script_parts(&self) -> impl Iterator<Item = &Str> {
        let is_script = |t: &&TemplateBlock| {
            let dest = t.destination.as_deref().unwrap_or("");
            let data = t.data.as_ref().map_or("", |d| d.value.trim_start());
            let named = dest.trim_start_matches("${NOMAD_TASK_DIR}/");
            data.starts_with("#!")
                || dest.ends_with(".sh")
                || dest.ends_with(".bash")
                || (!named.is_empty() && self.command.iter().any(|c| c.value.contains(named)))
        };
        self.command.iter().chain(
            self.templates
                .iter()
                .filter(is_script)
                .filter_map(|t| t.data.as_ref()),
        )
    }
}

/// A `group` block.
#[derive(Debug, Clone)]
pub struct Group {
    /// Group name.
    pub name: String,
    /// `volume` blocks.
    pub volumes: Vec<VolumeRequest>,
    /// `task` blocks.
    pub tasks: Vec<Task>,
}

/// A `job` block.
#[derive(Debug, Clone)]
pub struct Job {
    /// Job name (the block label).
    pub name: String,
    /// Span of the label.
    pub span: Range<usize>,
    /// Groups.
    pub groups: Vec<Group>,
}

/// The kind of a declared volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// A CSI volume.
    Csi,
    /// A host volume (static in client configuration, or dynamic).
    Host,
}

/// A volume declared somewhere in the tree.
#[derive(Debug, Clone)]
pub struct Declaration {
    /// CSI or host.
    pub kind: VolumeKind,
    /// The ID jobs use as `source`.
    pub id: Str,
    /// CSI or dynamic host volume plugin.
    pub plugin: Option<String>,
    /// `capability.attachment_mode` values.
    pub attachment_modes: Vec<String>,
    /// For static host volumes, the host path.
    pub path: Option<String>,
    /// Where it came from, e.g. `resource "nomad_csi_volume"`.
    pub origin: String,
}

/// A Terraform resource that manages volume lifecycle.
#[derive(Debug, Clone)]
pub struct TfVolumeResource {
    /// Resource type, e.g. `nomad_csi_volume`.
    pub resource_type: String,
    /// Resource name (second label).
    pub name: String,
    /// Span of the `resource` keyword through the labels.
    pub span: Range<usize>,
    /// Whether `lifecycle { prevent_destroy = true }` is present.
    pub prevent_destroy: bool,
}

/// One parsed file.
#[derive(Debug)]
pub struct File {
    /// Display path.
    pub path: String,
    /// Text.
    pub text: String,
    /// Line index for positions.
    pub index: LineIndex,
    /// Parse outcome.
    pub outcome: FileOutcome,
    /// The syntax tree, when the file parsed and is not templated.
    pub body: Option<Body>,
    /// Inline suppressions.
    pub suppressions: Suppressions,
    /// Jobs.
    pub jobs: Vec<Job>,
    /// Volume declarations.
    pub declarations: Vec<Declaration>,
    /// Terraform volume resources.
    pub tf_volumes: Vec<TfVolumeResource>,
    /// Module or folder name, used as `<service>` for Terraform declarations.
    pub module: Option<String>,
}

/// All files of one run.
#[derive(Debug)]
pub struct Tree {
    /// Files in input order.
    pub files: Vec<File>,
}

impl Tree {
    /// Parses every file and builds the view.
    pub fn build(sources: &[SourceFile]) -> Tree {
        Tree {
            files: sources.iter().map(build_file).collect(),
        }
    }

    /// Looks up a file by display path.
    pub fn file(&self, path: &str) -> Option<&File> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Outcomes in input order.
    pub fn outcomes(&self) -> Vec<(String, FileOutcome)> {
        self.files
            .iter()
            .map(|f| (f.path.clone(), f.outcome.clone()))
            .collect()
    }

    /// Every declared volume with its file.
    pub fn declarations(&self) -> impl Iterator<Item = (&File, &Declaration)> {
        self.files
            .iter()
            .flat_map(|f| f.declarations.iter().map(move |d| (f, d)))
    }

    /// Every job with its file.
    pub fn jobs(&self) -> impl Iterator<Item = (&File, &Job)> {
        self.files
            .iter()
            .flat_map(|f| f.jobs.iter().map(move |j| (f, j)))
    }

    /// Finds the declaration for a volume source, ignoring a `[N]` per-allocation suffix.
    pub fn declaration(&self, kind: VolumeKind, source: &str) -> Option<(&File, &Declaration)> {
        self.declarations()
            .find(|(_, d)| d.kind == kind && strip_index(&d.id.value) == strip_index(source))
    }
}

/// Removes a trailing `[N]` or `[${…}]` per-allocation index from a volume ID.
pub fn strip_index(id: &str) -> &str {
    match id.rfind('[') {
        Some(i) if id.ends_with(']') => &id[..i],
        _ => id,
    }
}

impl File {
    /// Builds a diagnostic located at `span` in this file.
    pub fn diag(
        &self,
        rule: &'static str,
        span: Range<usize>,
        message: impl Into<String>,
        label: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = self.index.position(&self.text, span.start);
        Diagnostic {
            rule,
            severity: Severity::Warning,
            file: self.path.clone(),
            span,
            line,
            column,
            message: message.into(),
            label: label.into(),
            notes: Vec::new(),
            help: None,
        }
    }

    /// Builds a secondary label located at `span` in this file.
    pub fn label(&self, span: Range<usize>, message: impl Into<String>) -> Label {
        let (line, column) = self.index.position(&self.text, span.start);
        Label {
            file: self.path.clone(),
            span,
            line,
            column,
            message: message.into(),
        }
    }

    /// Finds `needle` inside `within` (a span of this file) and returns its absolute span; falls
    /// back to `within` when the text is not found verbatim (e.g. because of escapes).
    pub fn find_in(&self, within: &Range<usize>, needle: &str) -> Range<usize> {
        self.text
            .get(within.clone())
            .and_then(|s| s.find(needle))
            .map_or(within.clone(), |i| {
                within.start + i..within.start + i + needle.len()
            })
    }
}

fn build_file(src: &SourceFile) -> File {
    let index = LineIndex::new(&src.text);
    let suppressions = Suppressions::parse(&src.text);
    let parsed = hcl_edit::parser::parse_body(&src.text);
    let error_at = parsed.as_ref().err().map(|e| e.location().offset());
    let mut file = File {
        path: src.path.clone(),
        text: src.text.clone(),
        index,
        outcome: FileOutcome::Checked {
            kind: FileKind::Other,
            jobs: 0,
        },
        body: None,
        suppressions,
        jobs: Vec::new(),
        declarations: Vec::new(),
        tf_volumes: Vec::new(),
        module: module_name(&src.path),
    };
    if let Some((reason, at)) = templated(&src.path, &src.text, error_at) {
        let (line, column) = file.index.position(&src.text, at);
        file.outcome = FileOutcome::SkippedTemplated {
            reason,
            line,
            column,
        };
        return file;
    }
    let body = match parsed {
        Ok(body) => body,
        Err(e) => {
            file.outcome = FileOutcome::ParseError {
                message: e.message().to_string(),
                line: e.location().line(),
                column: e.location().column(),
            };
            return file;
        }
    };
    let kind = classify(&body);
    let text = src.text.as_str();
    for block in body.blocks() {
        match block.ident.as_str() {
            "job" => file.jobs.push(job(block, text)),
            "resource" => tf_resource(block, text, &mut file),
            "client" => client_config(block, text, &mut file),
            _ => {}
        }
    }
    if kind == FileKind::VolumeSpec {
        volume_spec(&body, text, &mut file);
    }
    file.outcome = FileOutcome::Checked {
        kind,
        jobs: file.jobs.len(),
    };
    file.body = Some(body);
    file
}

/// `modules/<name>/…` gives `<name>`; otherwise the parent folder's name.
fn module_name(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split(['/', '\\']).collect();
    // `modules/<name>/file`: the folder right after `modules`, if the file is below it.
    if let Some(i) = parts.iter().position(|p| *p == "modules")
        && i + 2 < parts.len()
    {
        return Some(parts[i + 1].to_string());
    }
    parts
        .len()
        .checked_sub(2)
        .map(|i| parts[i].to_string())
        .filter(|s| !s.is_empty() && s != ".")
}

fn classify(body: &Body) -> FileKind {
    let blocks: Vec<&str> = body.blocks().map(|b| b.ident.as_str()).collect();
    let has = |k: &str| blocks.contains(&k);
    if has("job") {
        FileKind::Jobspec
    } else if [
        "resource",
        "module",
        "provider",
        "terraform",
        "data",
        "output",
    ]
    .iter()
    .any(|k| has(k))
    {
        FileKind::Terraform
    } else if body.has_attribute("type")
        && (body.has_attribute("plugin_id") || body.has_blocks("capability"))
    {
        FileKind::VolumeSpec
    } else if [
        "client",
        "server",
        "plugin",
        "consul",
        "telemetry",
        "acl",
        "ports",
        "addresses",
    ]
    .iter()
    .any(|k| has(k))
        || body.has_attribute("data_dir")
    {
        FileKind::AgentConfig
    } else {
        FileKind::Other
    }
}

fn span_of(e: &impl Span) -> Range<usize> {
    e.span().unwrap_or(0..0)
}

fn label_span(label: &BlockLabel) -> Range<usize> {
    match label {
        BlockLabel::Ident(i) => span_of(i),
        BlockLabel::String(s) => span_of(s),
    }
}

fn block_name(block: &Block) -> (String, Range<usize>) {
    match block.labels.first() {
        Some(l) => (l.as_str().to_string(), label_span(l)),
        None => (block.ident.as_str().to_string(), span_of(&block.ident)),
    }
}

/// Appends the text of template elements; interpolations and directives are copied from source.
fn template_text(t: &Template, text: &str, out: &mut String) -> bool {
    let mut computed = false;
    for el in t.iter() {
        match el {
            Element::Literal(l) => out.push_str(l.value()),
            Element::Interpolation(i) => {
                computed = true;
                out.push_str(i.span().and_then(|s| text.get(s)).unwrap_or("${…}"));
            }
            Element::Directive(d) => {
                computed = true;
                out.push_str(d.span().and_then(|s| text.get(s)).unwrap_or("%{…}"));
            }
        }
    }
    computed
}

/// A string view of any expression. Non-string expressions become their source text, computed.
pub fn expr_str(e: &Expression, text: &str) -> Str {
    let span = span_of(e);
    match e {
        Expression::String(s) => Str {
            value: s.value().clone(),
            span,
            computed: false,
        },
        Expression::StringTemplate(t) => {
            let mut value = String::new();
            let computed = template_text(t, text, &mut value);
            Str {
                value,
                span,
                computed,
            }
        }
        Expression::HeredocTemplate(h) => {
            let mut value = String::new();
            let computed = template_text(&h.template, text, &mut value);
            Str {
                value,
                span,
                computed,
            }
        }
        Expression::Parenthesis(p) => expr_str(p.inner(), text),
        other => Str {
            value: text.get(span.clone()).unwrap_or_default().to_string(),
            span: span_of(other),
            computed: true,
        },
    }
}

fn attr_str(body: &Body, key: &str, text: &str) -> Option<Str> {
    body.get_attribute(key).map(|a| expr_str(&a.value, text))
}

fn attr_literal(body: &Body, key: &str, text: &str) -> Option<String> {
    attr_str(body, key, text)
        .filter(|s| !s.computed)
        .map(|s| s.value)
}

fn attr_bool(body: &Body, key: &str) -> bool {
    body.get_attribute(key)
        .and_then(|a| a.value.as_bool())
        .unwrap_or(false)
}

fn list(e: &Expression, text: &str) -> Vec<Str> {
    match e {
        Expression::Array(a) => a.iter().map(|v| expr_str(v, text)).collect(),
        other => vec![expr_str(other, text)],
    }
}

/// Entries of a map written either as a block (`env { A = "b" }`) or an attribute (`env = {…}`),
/// which Nomad treats alike.
fn map_entries(body: &Body, key: &str, text: &str) -> Vec<(String, Str)> {
    let mut out = Vec::new();
    for b in body.get_blocks(key) {
        for a in b.body.attributes() {
            out.push((a.key.as_str().to_string(), expr_str(&a.value, text)));
        }
    }
    if let Some(Expression::Object(o)) = body.get_attribute(key).map(|a| &a.value) {
        for (k, v) in o.iter() {
            let k = match k {
                ObjectKey::Ident(i) => i.as_str().to_string(),
                ObjectKey::Expression(e) => expr_str(e, text).value,
            };
            out.push((k, expr_str(v.expr(), text)));
        }
    }
    out
}

fn job(block: &Block, text: &str) -> Job {
    let (name, span) = block_name(block);
    Job {
        name,
        span,
        groups: block
            .body
            .get_blocks("group")
            .map(|g| group(g, text))
            .collect(),
    }
}

fn group(block: &Block, text: &str) -> Group {
    let (name, _) = block_name(block);
    let volumes = block
        .body
        .get_blocks("volume")
        .map(|v| {
            let (label, span) = block_name(v);
            VolumeRequest {
                label,
                kind: attr_literal(&v.body, "type", text).unwrap_or_else(|| "host".to_string()),
                source: attr_str(&v.body, "source", text),
                attachment_mode: attr_literal(&v.body, "attachment_mode", text),
                per_alloc: attr_bool(&v.body, "per_alloc"),
                span,
            }
        })
        .collect();
    Group {
        name,
        volumes,
        tasks: block
            .body
            .get_blocks("task")
            .map(|t| task(t, text))
            .collect(),
    }
}

fn task(block: &Block, text: &str) -> Task {
    let (name, span) = block_name(block);
    let b = &block.body;
    let lifecycle = b.get_blocks("lifecycle").next();
    let mut t = Task {
        name,
        span,
        driver: attr_literal(b, "driver", text),
        hook: lifecycle.and_then(|l| attr_literal(&l.body, "hook", text)),
        sidecar: lifecycle.is_some_and(|l| attr_bool(&l.body, "sidecar")),
        image: None,
        command: Vec::new(),
        templates: b
            .get_blocks("template")
            .map(|tb| TemplateBlock {
                data: attr_str(&tb.body, "data", text),
                destination: attr_literal(&tb.body, "destination", text),
            })
            .collect(),
        env: map_entries(b, "env", text),
        mounts: Vec::new(),
    };
    for vm in b.get_blocks("volume_mount") {
        if let (Some(v), Some(d)) = (
            attr_literal(&vm.body, "volume", text),
            attr_literal(&vm.body, "destination", text),
        ) {
            t.mounts.push(Mount {
                destination: d,
                source: MountSource::GroupVolume(v),
                span: span_of(vm),
            });
        }
    }
    if let Some(config) = b.get_blocks("config").next() {
        let c = &config.body;
        t.image = attr_str(c, "image", text);
        for key in ["entrypoint", "command", "args"] {
            if let Some(a) = c.get_attribute(key) {
                t.command.extend(list(&a.value, text));
            }
        }
        if let Some(a) = c.get_attribute("volumes") {
            let driver = attr_literal(c, "volume_driver", text);
            for v in list(&a.value, text) {
                if let Some(m) = docker_volume_string(&v, driver.as_deref()) {
                    t.mounts.push(m);
                }
            }
        }
        for m in c.get_blocks("mount") {
            if let Some(m) = docker_mount_block(m, text) {
                t.mounts.push(m);
            }
        }
    }
    t
}

/// `"/host/path:/container/path:ro"`, `"local/x:/y"` or `"named:/y"`.
fn docker_volume_string(v: &Str, driver: Option<&str>) -> Option<Mount> {
    let mut parts = v.value.splitn(3, ':');
    let host = parts.next()?;
    let dest = parts.next()?;
    if host.is_empty() || dest.is_empty() {
        return None;
    }
    let source = if host.contains("${") {
        MountSource::Other
    } else if host.starts_with('/') {
        MountSource::HostPath(host.to_string())
    } else if host.starts_with("local")
        || host.starts_with("alloc")
        || host.starts_with("secrets")
        || host.starts_with('.')
    {
        MountSource::TaskDir(host.to_string())
    } else {
        MountSource::DockerVolume {
            name: host.to_string(),
            network: driver
                .filter(|d| *d != "local")
                .map(|d| format!("volume driver `{d}`")),
        }
    };
    Some(Mount {
        destination: dest.to_string(),
        source,
        span: v.span.clone(),
    })
}

/// A Docker `mount { type = "volume"|"bind" … }` block.
fn docker_mount_block(m: &Block, text: &str) -> Option<Mount> {
    let b = &m.body;
    let ty = attr_literal(b, "type", text).unwrap_or_else(|| "volume".to_string());
    let target = attr_literal(b, "target", text)?;
    let src = attr_literal(b, "source", text).unwrap_or_default();
    let source = match ty.as_str() {
        "bind" if src.starts_with('/') => MountSource::HostPath(src),
        "bind" => MountSource::TaskDir(src),
        "volume" => {
            let mut network = None;
            for vo in b.get_blocks("volume_options") {
                for dc in vo.body.get_blocks("driver_config") {
                    let name = attr_literal(&dc.body, "name", text);
                    let opts = map_entries(&dc.body, "options", text);
                    if let Some((_, t)) = opts.iter().find(|(k, _)| k == "type")
                        && matches!(t.value.as_str(), "nfs" | "nfs4" | "cifs" | "glusterfs")
                    {
                        network = Some(format!("driver option `type = \"{}\"`", t.value));
                    }
                    if network.is_none() {
                        network = name
                            .filter(|n| n != "local")
                            .map(|n| format!("volume driver `{n}`"));
                    }
                }
            }
            MountSource::DockerVolume { name: src, network }
        }
        _ => MountSource::Other,
    };
    Some(Mount {
        destination: target,
        source,
        span: span_of(m),
    })
}

fn capability_modes(body: &Body, text: &str) -> Vec<String> {
    body.get_blocks("capability")
        .filter_map(|c| attr_literal(&c.body, "attachment_mode", text))
        .collect()
}

fn tf_resource(block: &Block, text: &str, file: &mut File) {
    let (Some(ty), Some(name)) = (block.labels.first(), block.labels.get(1)) else {
        return;
    };
    let ty = ty.as_str();
    let b = &block.body;
    let kind = match ty {
        "nomad_csi_volume" | "nomad_csi_volume_registration" => VolumeKind::Csi,
        "nomad_dynamic_host_volume" | "nomad_dynamic_host_volume_registration" => VolumeKind::Host,
        _ => return,
    };
    let prevent_destroy = b
        .get_blocks("lifecycle")
        .any(|l| attr_bool(&l.body, "prevent_destroy"));
    let span = span_of(&block.ident).start..label_span(name).end;
    file.tf_volumes.push(TfVolumeResource {
        resource_type: ty.to_string(),
        name: name.as_str().to_string(),
        span,
        prevent_destroy,
    });
    let id = match kind {
        VolumeKind::Csi => attr_str(b, "volume_id", text).or_else(|| attr_str(b, "name", text)),
        VolumeKind::Host => attr_str(b, "name", text),
    };
    if let Some(id) = id {
        file.declarations.push(Declaration {
            kind,
            id,
            plugin: attr_literal(b, "plugin_id", text),
            attachment_modes: capability_modes(b, text),
            path: None,
            origin: format!("resource \"{ty}\""),
        });
    }
}

fn client_config(block: &Block, text: &str, file: &mut File) {
    for hv in block.body.get_blocks("host_volume") {
        let (name, span) = block_name(hv);
        file.declarations.push(Declaration {
            kind: VolumeKind::Host,
            id: Str {
                value: name,
                span,
                computed: false,
            },
            plugin: None,
            attachment_modes: Vec::new(),
            path: attr_literal(&hv.body, "path", text),
            origin: "client host_volume".to_string(),
        });
    }
}

fn volume_spec(body: &Body, text: &str, file: &mut File) {
    let kind = match attr_literal(body, "type", text).as_deref() {
        Some("csi") => VolumeKind::Csi,
        Some("host") => VolumeKind::Host,
        _ => return,
    };
    let id = match kind {
        VolumeKind::Csi => attr_str(body, "id", text).or_else(|| attr_str(body, "name", text)),
        VolumeKind::Host => attr_str(body, "name", text),
    };
    if let Some(id) = id {
        file.declarations.push(Declaration {
            kind,
            id,
            plugin: attr_literal(body, "plugin_id", text),
            attachment_modes: capability_modes(body, text),
            path: None,
            origin: "volume specification".to_string(),
        });
    }
}
