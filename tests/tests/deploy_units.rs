//! The systemd units in deploy/systemd/ are installable as written: every
//! flag their ExecStart passes is one the binary takes (`--help`), every
//! variable it uses is set in the unit's example environment file, and
//! `systemd-analyze verify` accepts each unit with the binaries built here
//! in place of /usr/local/bin (a missing systemd-analyze is a loud skip
//! locally and a failure in CI, where `CI` is set).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use integration_tests::processes::{binary, workspace_root};

/// Where the units expect the binaries.
const INSTALLED_BIN_DIR: &str = "/usr/local/bin/";

struct Unit {
    path: PathBuf,
    text: String,
    /// ExecStart with its continuation lines joined.
    exec_start: String,
}

fn units() -> Result<Vec<Unit>> {
    let dir = workspace_root().join("deploy/systemd");
    let mut units = vec![];
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "service") {
            let text = std::fs::read_to_string(&path)?;
            let joined = text.replace("\\\n", " ");
            let exec_start = joined
                .lines()
                .find_map(|line| line.strip_prefix("ExecStart="))
                .with_context(|| format!("{} has no ExecStart", path.display()))?
                .to_string();
            units.push(Unit { path, text, exec_start });
        }
    }
    ensure!(units.len() == 3, "expected the three binaries' units, found {}", units.len());
    Ok(units)
}

/// The binary an ExecStart runs (`/usr/local/bin/NAME ...`).
fn program(unit: &Unit) -> Result<String> {
    let first = unit.exec_start.split_whitespace().next().unwrap_or_default();
    let name = first.strip_prefix(INSTALLED_BIN_DIR).with_context(|| format!("ExecStart runs {first}"))?;
    Ok(name.to_string())
}

/// Variables an ExecStart expands: `${NAME}` and `$NAME`.
fn variables(exec_start: &str) -> BTreeSet<String> {
    exec_start
        .split('$')
        .skip(1)
        .map(|rest| {
            let rest = rest.trim_start_matches('{');
            rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
        })
        .collect()
}

/// Test: each unit's flags exist and its variables are set in its example.
#[test]
fn units_pass_flags_the_binaries_take() -> Result<()> {
    for unit in units()? {
        let name = program(&unit)?;
        let built = binary(&name, &name)?;
        let help = Command::new(&built).arg("--help").output()?;
        let help = String::from_utf8_lossy(&help.stdout);
        let flags: BTreeSet<&str> = help
            .split_whitespace()
            .filter(|word| word.starts_with("--"))
            .map(|word| word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
            .collect();
        for flag in unit.exec_start.split_whitespace().filter(|word| word.starts_with("--")) {
            ensure!(flags.contains(flag), "{}: {name} has no flag {flag}", unit.path.display());
        }
        let example = unit.path.with_file_name(format!("{name}.env.example"));
        let example = std::fs::read_to_string(&example).with_context(|| format!("reading {}", example.display()))?;
        let set: BTreeSet<&str> = example
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim()))
            .collect();
        // The flags the example passes in its variables exist too.
        let values = example.lines().filter(|line| !line.starts_with('#')).filter_map(|line| line.split_once('='));
        for (_, value) in values {
            for flag in value.split_whitespace().filter(|word| word.starts_with("--")) {
                ensure!(flags.contains(flag), "{}'s example: {name} has no flag {flag}", unit.path.display());
            }
        }
        for variable in variables(&unit.exec_start) {
            ensure!(set.contains(variable.as_str()), "{}: ${variable} is not in its example", unit.path.display());
        }
        ensure!(unit.text.contains("Restart=always"), "{}: not restarted", unit.path.display());
    }
    Ok(())
}

/// Test: `systemd-analyze verify` accepts every unit.
#[test]
fn systemd_accepts_the_units() -> Result<()> {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        ensure!(std::env::var_os("CI").is_none(), "systemd-analyze is missing on a CI machine");
        eprintln!("SKIPPED: systemd-analyze is not installed; the units were not verified");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    for unit in units()? {
        let name = program(&unit)?;
        let built = binary(&name, &name)?;
        let built_dir = format!("{}/", built.parent().unwrap_or(Path::new("/")).display());
        let file = dir.path().join(unit.path.file_name().context("unit name")?);
        std::fs::write(&file, unit.text.replace(INSTALLED_BIN_DIR, &built_dir))?;
    }
    let files: Vec<PathBuf> = std::fs::read_dir(dir.path())?.map(|entry| Ok(entry?.path())).collect::<Result<_>>()?;
    let verified = Command::new("systemd-analyze").arg("verify").args(&files).output()?;
    let said = format!("{}{}", String::from_utf8_lossy(&verified.stdout), String::from_utf8_lossy(&verified.stderr));
    ensure!(verified.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    Ok(())
}
