//! `hearth jobspec`: reads files and folders, runs the sans-IO checks and migrations of `hearth-jobspec`, prints and writes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use hearth_jobspec::{Config, MigrateError, Migration, Severity, SourceFile, render};

#[derive(clap::Args)]
pub struct JobspecArgs {
    #[command(subcommand)]
    command: JobspecCommand,
}

#[derive(clap::Subcommand)]
enum JobspecCommand {
    /// Report data hazards (exit 0: nothing at or above --fail-on, 1: findings, 2: usage or read errors).
    Check(CheckArgs),
    /// Rewrite host paths and volume names; prints a unified diff unless --write.
    Migrate(MigrateArgs),
    /// Print the rules with their default severity and rationale (Markdown).
    Rules,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Human,
    Json,
    Sarif,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Files or folders (folders are searched for *.nomad, *.nomad.hcl, *.hcl, *.job and *.tf).
    #[arg(default_value = ".")]
    paths: Vec<PathBuf>,
    /// Configuration file; defaults to ./hearth-jobspec.hcl when it exists.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    format: Format,
    /// Lowest severity that makes the exit code 1.
    #[arg(long, default_value = "warning", value_parser = parse_severity)]
    fail_on: Severity,
    /// Colour in human output.
    #[arg(long, value_enum, default_value = "auto")]
    color: ColorChoice,
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// Files or folders to rewrite.
    #[arg(default_value = ".")]
    paths: Vec<PathBuf>,
    /// Host path prefix to replace, OLD=NEW (repeatable).
    #[arg(long = "path", value_parser = parse_pair)]
    path_pairs: Vec<(String, String)>,
    /// Volume ID or name to rename, OLD=NEW; `glusterfs_*=nfs_*` renames by prefix (repeatable).
    #[arg(long = "volume", value_parser = parse_pair)]
    volume_pairs: Vec<(String, String)>,
    /// Write the files (atomically) instead of printing a diff.
    #[arg(long)]
    write: bool,
}

fn parse_severity(s: &str) -> Result<Severity, String> {
    Severity::parse(s).ok_or_else(|| "expected error, warning or note".to_string())
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() && a != b => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => Err("expected OLD=NEW with two different, non-empty values".to_string()),
    }
}

pub fn main(args: JobspecArgs) -> ExitCode {
    let result = match args.command {
        JobspecCommand::Check(a) => check(a),
        JobspecCommand::Migrate(a) => migrate(a),
        JobspecCommand::Rules => {
            print!("{}", hearth_jobspec::rules::markdown_list());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hearth jobspec: {e:#}");
            ExitCode::from(crate::EXIT_USAGE)
        }
    }
}

/// Whether a folder entry is a file `check` and `migrate` look at.
fn wanted(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    [".nomad", ".hcl", ".job", ".tf"]
        .iter()
        .any(|e| name.ends_with(e))
}

/// Expands paths into files. Explicitly named files are taken whatever their extension;
/// hidden folders (`.git`, `.terraform`) are not entered. Read problems are collected, not fatal.
fn collect(paths: &[PathBuf], errors: &mut Vec<String>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_file() {
            out.push(p.clone());
            continue;
        }
        if !p.exists() {
            errors.push(format!("{}: no such file or folder", p.display()));
            continue;
        }
        let walker = walkdir::WalkDir::new(p)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| {
                e.depth() == 0 || !e.file_name().to_str().is_some_and(|n| n.starts_with('.'))
            });
        for entry in walker {
            match entry {
                Ok(e) if e.file_type().is_file() && wanted(e.path()) => out.push(e.into_path()),
                Ok(_) => {}
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            }
        }
    }
    out
}

fn read_all(files: &[PathBuf], errors: &mut Vec<String>) -> Vec<SourceFile> {
    files
        .iter()
        .filter_map(|p| match std::fs::read(p) {
            // Lossy decoding keeps a stray non-UTF-8 byte from hiding a whole file.
            Ok(bytes) => Some(SourceFile::new(
                p.display().to_string(),
                String::from_utf8_lossy(&bytes),
            )),
            Err(e) => {
                errors.push(format!("{}: cannot read: {e}", p.display()));
                None
            }
        })
        .collect()
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let default = Path::new("hearth-jobspec.hcl");
    let path = match path {
        Some(p) => p,
        None if default.is_file() => default,
        None => return Ok(Config::default()),
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration {}", path.display()))?;
    Config::parse(&text).with_context(|| format!("parsing configuration {}", path.display()))
}

fn check(a: CheckArgs) -> anyhow::Result<u8> {
    let config = load_config(a.config.as_deref())?;
    let mut errors = Vec::new();
    let files = collect(&a.paths, &mut errors);
    let sources = read_all(&files, &mut errors);
    let report = hearth_jobspec::check(&sources, &config);
    let mut stdout = std::io::stdout().lock();
    let out = match a.format {
        Format::Human => {
            let color = match a.color {
                ColorChoice::Always => true,
                ColorChoice::Never => false,
                ColorChoice::Auto => {
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
                }
            };
            render::human(&report, &sources, color)
        }
        Format::Json => render::json(&report) + "\n",
        Format::Sarif => render::sarif(&report) + "\n",
    };
    stdout
        .write_all(out.as_bytes())
        .context("writing the report")?;
    for e in &errors {
        eprintln!("error: {e}");
    }
    if !errors.is_empty() {
        return Ok(crate::EXIT_USAGE);
    }
    let failing = report.diagnostics.iter().any(|d| d.severity >= a.fail_on);
    Ok(u8::from(failing))
}

/// Writes `text` to `path` through a temporary file in the same folder: write, fsync, rename,
/// then fsync the folder, so a crash leaves either the old or the new file.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .context("writing the temporary file")?;
    tmp.as_file()
        .sync_all()
        .context("syncing the temporary file")?;
    if let Ok(meta) = std::fs::metadata(path) {
        // Keep the original file's permissions (tempfile creates 0600).
        std::fs::set_permissions(tmp.path(), meta.permissions()).context("copying permissions")?;
    }
    tmp.persist(path)
        .with_context(|| format!("renaming over {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

fn migrate(a: MigrateArgs) -> anyhow::Result<u8> {
    if a.path_pairs.is_empty() && a.volume_pairs.is_empty() {
        bail!("nothing to do: give at least one --path OLD=NEW or --volume OLD=NEW");
    }
    let m = Migration {
        paths: a.path_pairs,
        volumes: a.volume_pairs,
    };
    let mut errors = Vec::new();
    let files = collect(&a.paths, &mut errors);
    let sources = read_all(&files, &mut errors);
    let (mut changed, mut replaced, mut skipped, mut unsafe_count) = (0, 0, 0, 0);
    let mut stdout = std::io::stdout().lock();
    for (src, path) in sources.iter().zip(&files) {
        match hearth_jobspec::migrate(src, &m) {
            Ok(rw) => {
                for r in &rw.replacements {
                    eprintln!(
                        "{}:{}:{}: {} `{}` -> `{}`",
                        src.path, r.line, r.column, r.kind, r.old, r.new
                    );
                }
                for u in &rw.unsafe_sites {
                    eprintln!(
                        "{}:{}:{}: not rewritten: {}",
                        src.path, u.line, u.column, u.message
                    );
                }
                unsafe_count += rw.unsafe_sites.len();
                if rw.changed() {
                    changed += 1;
                    replaced += rw.replacements.len();
                    if a.write {
                        write_atomically(path, &rw.text)
                            .with_context(|| format!("rewriting {}", src.path))?;
                    } else {
                        let diff =
                            hearth_jobspec::migrate::unified_diff(&src.path, &src.text, &rw.text);
                        stdout
                            .write_all(diff.as_bytes())
                            .context("writing the diff")?;
                    }
                }
            }
            Err(e @ (MigrateError::Templated { .. } | MigrateError::Parse { .. })) => {
                skipped += 1;
                eprintln!("{}: {e}", src.path);
            }
            Err(e) => errors.push(format!("{}: {e}", src.path)),
        }
    }
    eprintln!(
        "{} files, {replaced} replacements in {changed} files{}, {unsafe_count} places not rewritten, {skipped} skipped",
        sources.len(),
        if a.write {
            " (written)"
        } else {
            " (dry run; --write to apply)"
        }
    );
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(if errors.is_empty() {
        0
    } else {
        crate::EXIT_USAGE
    })
}
