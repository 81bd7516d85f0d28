//! `hearth sqlite`: replicate, restore, run and status for SQLite databases.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct SqliteArgs {}

pub fn main(_args: SqliteArgs) -> ExitCode {
    eprintln!("hearth sqlite: not built yet");
    ExitCode::from(crate::EXIT_USAGE)
}
