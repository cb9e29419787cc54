//! `callops migrate [--check]`: the configured store's layout version beside this build's.
//! `--check` reads only (no lock, nothing written: it works while a server runs) and says
//! what a start would do; without it the migrations are applied, as a start would apply
//! them (backups included), and the command exits.

use std::process::ExitCode;

use crate::config::{Config, StoreLocation};
use crate::store::Storage;

/// `callops migrate` options.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Only say what would be done: exit 0 when up to date or migratable, 1 when the store
    /// is newer than this build or cannot be read.
    #[arg(long)]
    pub check: bool,
}

/// Runs the command, prints what it found and did, and returns the exit code.
pub async fn main(args: &MigrateArgs, config: &Config) -> ExitCode {
    let store = match config.store.location() {
        Ok(StoreLocation::Memory) => "memory".to_owned(),
        Ok(StoreLocation::Sqlite(path)) => format!("SQLite {}", path.display()),
        Ok(StoreLocation::Redis(url)) => {
            format!("Redis {url} (prefix {})", config.store.redis_prefix)
        }
        Err(error) => {
            eprintln!("cannot read the store location: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("store: {store}");
    let result = if args.check {
        Storage::schema_status(config).await
    } else {
        Storage::migrate(config).await
    };
    match result {
        Ok(None) => {
            println!("nothing to migrate: a store in memory keeps nothing");
            ExitCode::SUCCESS
        }
        Ok(Some(status)) if status.is_newer() => {
            println!("{status}");
            ExitCode::FAILURE
        }
        Ok(Some(status)) if args.check => {
            println!("{status}");
            ExitCode::SUCCESS
        }
        Ok(Some(status)) => {
            println!("{}", status.applied());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "{}: {error:#}",
                if args.check {
                    "check failed"
                } else {
                    "migration failed"
                }
            );
            ExitCode::FAILURE
        }
    }
}
