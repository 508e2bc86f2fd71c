//! meshd's agent, CLI and configuration. The `meshd` binary is a thin `main` over this
//! library; the fuzz targets (`fuzz/`) and their corpus replay reach the parsers through it.

pub mod agent;
pub mod cli;
pub mod config;
pub mod fuzzing;

/// How the CLI prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}
