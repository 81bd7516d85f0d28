//! `hearth jobspec`: reads files and folders, runs the sans-IO checks and migrations of `hearth-jobspec`, prints and writes.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct JobspecArgs {}

pub fn main(_args: JobspecArgs) -> ExitCode {
    eprintln!("hearth jobspec: not built yet");
    ExitCode::from(crate::EXIT_USAGE)
}
