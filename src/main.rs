//! The `flywheel` command. Parsing and dispatch only; the work lives in the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = flywheel::cli::Cli::parse();
    flywheel::cli::run(cli)
}
