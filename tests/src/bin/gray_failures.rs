//! `gray_failures` (run by `scripts/bench-gray-failures`): commit latency
//! of one client session while one safekeeper of three fails grayly,
//! against the healthy cluster of the same run. One cluster (PostgreSQL
//! 15, three safekeepers, compute_shim with its default limits, every
//! shim link through a fault proxy so every phase pays the same hop); a
//! phase per row, each with its own commit loop: one member SIGSTOPped;
//! its fsync slowed; its link delayed each way; its link partitioned both
//! ways; each right after a healthy phase, its reference (on a shared
//! machine the healthy figure drifts over minutes: a fault is compared
//! with the cluster as it was just before). Each fault phase lasts past the shim's silence timeout and the
//! links' TCP_USER_TIMEOUT (both 10 s) with the default 15 s. Once a
//! phase's load stops, the member catches up (a slow one while still slow,
//! a hung or cut-off one once healed) and the time that takes is shown.
//!
//! Per row: commits/s of the session, median and longest commit wait, the
//! ratios to the healthy phase before it, and PASS or MISS against the target
//! (median latency within 10% of healthy). A MISS is reported, not failed.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;

use integration_tests::minority::{measure_phase, FaultedCluster, MinorityFault, PhaseFigures};
use integration_tests::pg::PgOptions;

/// The member that fails.
const IMPAIRED: usize = 2;
/// The target: a fault phase's median commit latency over the healthy one.
const TARGET_LATENCY_RATIO: f64 = 1.10;
/// How long a healed member may take to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(300);
/// Commits before the healthy phase, so it is not the cluster's first.
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(about = "Commit latency with one safekeeper of three hung, slow or cut off, against healthy")]
struct Cli {
    /// Seconds of load per phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Added to each WAL sync of the slow-disk member.
    #[arg(long, default_value_t = 200)]
    sync_delay_ms: u64,
    /// Each way, on the delayed link.
    #[arg(long, default_value_t = 300)]
    link_delay_ms: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let phase = Duration::from_secs(cli.seconds);
    let faults = [
        MinorityFault::Hang,
        MinorityFault::SlowSync(Duration::from_millis(cli.sync_delay_ms)),
        MinorityFault::SlowLink(Duration::from_millis(cli.link_delay_ms)),
        MinorityFault::Partition,
    ];
    eprintln!("starting Postgres, three safekeepers and compute_shim (debug builds, default limits)");
    let mut faulted = FaultedCluster::start(PgOptions::default(), &[])?;
    measure_phase(faulted.pg(), WARM_UP)?;
    println!("one client session, {} s per phase; target: median commit latency within 10% of healthy", cli.seconds);
    println!(
        "{:<36} {:>9} {:>6} {:>10} {:>6} {:>11} {:>6} {:>10}  target",
        "phase", "commits/s", "ratio", "median ms", "ratio", "longest ms", "ratio", "catch-up s"
    );
    for fault in faults {
        let healthy = measure_phase(faulted.pg(), phase)?;
        print_row("healthy", &healthy, &healthy, None);
        eprintln!("{fault} for {} s", cli.seconds);
        faulted.inject(IMPAIRED, fault)?;
        let figures = measure_phase(faulted.pg(), phase)?;
        let load_stopped = Instant::now();
        if fault.blocks_catch_up() {
            faulted.heal(IMPAIRED, fault)?;
        }
        faulted.wait_caught_up(IMPAIRED, CATCH_UP_TIMEOUT)?;
        let catch_up = load_stopped.elapsed();
        if !fault.blocks_catch_up() {
            faulted.heal(IMPAIRED, fault)?;
        }
        print_row(&fault.to_string(), &figures, &healthy, Some(catch_up));
    }
    Ok(())
}

/// One row: `figures` and their ratios to `healthy`; a fault row gets the
/// member's catch-up time and PASS or MISS.
fn print_row(name: &str, figures: &PhaseFigures, healthy: &PhaseFigures, catch_up: Option<Duration>) {
    let ratio = figures.latency_ratio(healthy);
    let verdict = match catch_up {
        None => "",
        Some(_) if ratio <= TARGET_LATENCY_RATIO => "PASS",
        Some(_) => "MISS",
    };
    println!(
        "{name:<36} {:>9.0} {:>6.2} {:>10.2} {ratio:>6.2} {:>11.1} {:>6.2} {:>10}  {verdict}",
        figures.commits_per_second(),
        figures.commits_per_second() / healthy.commits_per_second().max(1e-9),
        figures.median.as_secs_f64() * 1e3,
        figures.longest.as_secs_f64() * 1e3,
        figures.longest.as_secs_f64() / healthy.longest.as_secs_f64().max(1e-9),
        catch_up.map_or("-".to_string(), |took| format!("{:.2}", took.as_secs_f64())),
    );
}
