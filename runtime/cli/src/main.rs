//! `outpost`: keys, signed model bundles, devices and fleets from one binary.

use std::process::ExitCode;

use clap::Parser;

mod bundle_cmd;
mod key_cmd;
mod util;

/// Outpost: signed ML model bundles served on edge devices.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate and manage signing keys.
    #[command(subcommand)]
    Key(key_cmd::KeyCommand),
    /// Build, sign, verify and inspect model bundles (`*.opb`).
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Key(cmd) => key_cmd::run(cmd),
        Command::Bundle(cmd) => bundle_cmd::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
