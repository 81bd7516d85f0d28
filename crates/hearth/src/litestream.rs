//! Litestream compatibility: translates Litestream 0.5 command lines (Go-style flags) into hearth's own commands.

use std::process::ExitCode;

pub fn main(_args: Vec<String>) -> ExitCode {
    eprintln!("hearth litestream: not built yet");
    ExitCode::from(crate::EXIT_USAGE)
}
