//! Nomad jobspec checks and storage migrations, sans-IO: text in, diagnostics or rewritten text out.
