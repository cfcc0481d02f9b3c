//! The PostgreSQL versions the harness runs: 15 from Debian's packages
//! (`PG_BIN_DIR`, default /usr/lib/postgresql/15/bin), 16, 17 and 18 from
//! the binaries `scripts/install-postgres-versions` puts in a cache
//! directory, found through `PG16_BINDIR`, `PG17_BINDIR`, `PG18_BINDIR`
//! (.ci/run sets them). 17's package has the server only: its client
//! programs (psql, pg_isready, ...) are 18's.
//!
//! A version whose binaries are missing is skipped loudly on a developer's
//! machine and is an error in CI (`CI` set).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::pg::PgOptions;

/// The versions beside 15 the tests know how to run.
pub const OTHER_MAJORS: [u32; 3] = [16, 17, 18];

/// `PG{major}_BINDIR`, checked to hold a `postgres`.
fn bin_dir(major: u32) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(format!("PG{major}_BINDIR"))?);
    dir.join("postgres").exists().then_some(dir)
}

/// Options for a cluster of `major`, or `None` (said on stderr) when its
/// binaries are not installed here; in CI that is an error.
pub fn options_for(major: u32) -> Result<Option<PgOptions>> {
    let Some(bin_dir) = bin_dir(major) else {
        let message = format!(
            "PostgreSQL {major} binaries not found: set PG{major}_BINDIR (eval \"$(scripts/install-postgres-versions | grep '^export ')\")"
        );
        if std::env::var_os("CI").is_some() {
            bail!("{message}; CI must have every version");
        }
        eprintln!("SKIPPED (PostgreSQL {major}): {message}");
        return Ok(None);
    };
    let client_bin_dir = match major {
        17 => Some(bin_dir_or_error(18)?),
        _ => None,
    };
    Ok(Some(PgOptions { bin_dir, client_bin_dir, ..PgOptions::default() }))
}

fn bin_dir_or_error(major: u32) -> Result<PathBuf> {
    match bin_dir(major) {
        Some(dir) => Ok(dir),
        None => bail!("PostgreSQL {major}'s client programs are needed beside 17's server: set PG{major}_BINDIR"),
    }
}
