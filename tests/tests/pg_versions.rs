//! PostgreSQL versions (issue 17). This build speaks PostgreSQL 15's WAL
//! only: a primary of 16, 17 or 18 (real binaries, tests/src/pg_versions.rs)
//! is refused at the shim's start with one line naming the supported
//! versions and exit status 8, before anything is written: no slot on the
//! primary, no timeline on any safekeeper. (Before, the WAL was refused by
//! the safekeepers as invalid and the shim reconnected forever while
//! commits hung.)

use anyhow::{ensure, Context, Result};
use integration_tests::cluster::{SHIM_APPLICATION_NAME, SHIM_SLOT, TENANT, TIMELINE};
use integration_tests::pg::PgCluster;
use integration_tests::pg_versions::{options_for, OTHER_MAJORS};
use integration_tests::processes::{ComputeShim, Safekeeper, ShimArgs, EXIT_TIMEOUT};

const TIMELINE_PATH: &str = "/v1/tenant/0123456789abcdef0123456789abcdef/timeline/fedcba9876543210fedcba9876543210";

#[test]
fn a_primary_of_an_unsupported_version_is_refused_at_the_shims_start() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("pg-versions-").tempdir()?;
    let safekeepers =
        (1..=3).map(|id| Safekeeper::start(id, &dir.path().join(format!("sk{id}")))).collect::<Result<Vec<_>>>()?;
    let mut checked = Vec::new();
    for major in OTHER_MAJORS {
        let Some(options) = options_for(major)? else { continue };
        let mut pg =
            PgCluster::init(options.setting("synchronous_standby_names", &format!("'{SHIM_APPLICATION_NAME}'")))?;
        pg.start()?;
        let version = pg.psql("SHOW server_version_num")?;
        ensure!(version.starts_with(&major.to_string()), "PG{major}_BINDIR runs server_version_num {version}");
        let args = ShimArgs {
            pg_conninfo: pg.connection_string("postgres"),
            safekeepers: safekeepers.iter().map(|sk| sk.pg_addr).collect(),
            tenant_id: TENANT.to_string(),
            timeline_id: TIMELINE.to_string(),
            application_name: SHIM_APPLICATION_NAME.to_string(),
            slot: SHIM_SLOT.to_string(),
            extra: Vec::new(),
        };
        let mut shim = ComputeShim::spawn(&args, dir.path())?;
        let exit = shim
            .process
            .wait_exit(EXIT_TIMEOUT)?
            .with_context(|| format!("a shim on PostgreSQL {major} kept running"))?;
        let log = shim.process.log_tail();
        let line = format!("PostgreSQL {major} (server_version_num {version}) is not supported; supported: 15");
        ensure!(exit.code() == Some(8) && log.contains(&line), "a shim on PostgreSQL {major}: {exit}: {log}");
        let slots = pg.psql("SELECT count(*) FROM pg_replication_slots")?;
        ensure!(slots == "0", "the refused shim created a slot on PostgreSQL {major}");
        for sk in &safekeepers {
            let (code, _) = sk.http_get(TIMELINE_PATH)?;
            ensure!(code == 404, "safekeeper {} has the timeline after the refusal ({code})", sk.id);
        }
        pg.stop_fast()?;
        checked.push(major);
        println!("PostgreSQL {major}: refused at the shim's start, exit 8, nothing written");
    }
    println!("unsupported versions checked: {checked:?}");
    Ok(())
}
