//! A test cluster with TLS and tokens on every hop (`SECURE_CLUSTER=1`, or
//! [`enable`] in a test binary): one CA, one certificate for 127.0.0.1 that
//! every process serves (Postgres included), an Ed25519 key pair and a
//! token per scope. With it the harness starts every process with the TLS
//! and token flags, speaks HTTPS with the admin token, gives Postgres
//! programs (psql, pg_receivewal, a standby) sslmode=verify-full and a
//! token as their password, and the shim `--pg ... sslmode=verify-full`.
//!
//! Everything lives in one directory readable by the Postgres OS user (a
//! standby and pg_receivewal read the CA certificate); the tokens are
//! owner-only files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};

use crate::certs::{LeafCertificate, TestCa};
use crate::cluster::TENANT;
use crate::tokens::TestKeys;

/// The environment variable that turns secure mode on for a test run.
pub const SECURE_CLUSTER_ENV: &str = "SECURE_CLUSTER";

pub struct Security {
    pub ca: TestCa,
    /// What every process serves (SAN IP:127.0.0.1, DNS:localhost).
    pub leaf: LeafCertificate,
    pub keys: TestKeys,
    pub admin_token: String,
    pub data_token: String,
    pub data_token_file: PathBuf,
    pub tenant_token_file: PathBuf,
    /// A client config trusting the CA, checking names (verify-full).
    pub client_tls: Arc<rustls::ClientConfig>,
    /// `Authorization: Bearer <safekeeper_data token>` for curl's `-H @file`,
    /// readable by the Postgres OS user.
    pub curl_header_file: PathBuf,
}

static SECURITY: OnceLock<Option<Security>> = OnceLock::new();
static FORCED: OnceLock<()> = OnceLock::new();

/// Turn secure mode on for this test process (before any cluster starts).
pub fn enable() {
    let _ = FORCED.set(());
}

/// The secure material, if this run is in secure mode (made once per test
/// process). Panics if it cannot be made: a secure run without security
/// would pass for the wrong reason.
pub fn security() -> Option<&'static Security> {
    SECURITY
        .get_or_init(|| {
            let wanted = FORCED.get().is_some() || std::env::var_os(SECURE_CLUSTER_ENV).is_some_and(|v| v == "1");
            wanted.then(|| Security::generate().expect("making the secure cluster's CA, certificates and tokens"))
        })
        .as_ref()
}

impl Security {
    fn generate() -> Result<Security> {
        let ca = TestCa::generate("secure-cluster-ca")?;
        // Readable by the Postgres OS user: the CA and the served pair.
        std::fs::set_permissions(ca.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&ca.certificate, std::fs::Permissions::from_mode(0o644))?;
        let leaf = ca.issue(ca.dir.path(), "localhost")?;
        let keys = TestKeys::generate()?;
        let admin_token = keys.token("admin", None, 86_400)?;
        let data_token = keys.token("safekeeper_data", None, 86_400)?;
        let tenant_token = keys.token("tenant", Some(TENANT), 86_400)?;
        let data_token_file = keys.file("data.token", &data_token)?;
        let tenant_token_file = keys.file("tenant.token", &tenant_token)?;
        let curl_header_file = ca.dir.path().join("data-token.header");
        std::fs::write(&curl_header_file, format!("Authorization: Bearer {data_token}\n"))?;
        std::fs::set_permissions(&curl_header_file, std::fs::Permissions::from_mode(0o644))?;
        let client_tls = net::tls::client_config(Some(&ca.certificate), net::tls::Verification::Full)
            .context("the harness's TLS client config")?;
        Ok(Security {
            ca,
            leaf,
            keys,
            admin_token,
            data_token,
            data_token_file,
            tenant_token_file,
            client_tls: Arc::new(client_tls),
            curl_header_file,
        })
    }

    /// The token a harness request needs (docs/security.md's table): a
    /// timeline's status, WAL and feedback take safekeeper_data, deleting
    /// it and everything node-wide admin.
    pub fn token_for(&self, method: &str, path: &str) -> &str {
        if path.contains("/timeline/") && method != "DELETE" {
            &self.data_token
        } else {
            &self.admin_token
        }
    }

    /// curl's options for a safekeeper's HTTPS port: trust the CA, send the
    /// safekeeper_data token from a header file (never in argv), as a
    /// `restore_command` run by the Postgres OS user needs.
    pub fn curl_options(&self) -> String {
        format!("--cacert {} -H @{}", self.ca.certificate.display(), self.curl_header_file.display())
    }

    pub fn ca_certificate(&self) -> &Path {
        &self.ca.certificate
    }

    /// A safekeeper's flags: TLS on both ports, tokens checked, peers
    /// reached over HTTPS with the safekeeper_data token.
    pub fn safekeeper_args(&self) -> Vec<String> {
        let mut args = self.server_tls_args();
        args.extend(flags(&[
            ("--auth-public-key", &self.keys.public_key),
            ("--peer-auth-token-file", &self.data_token_file),
            ("--tls-ca", &self.ca.certificate),
        ]));
        args
    }

    /// A shim's flags: its links over TLS with the tenant token, its own
    /// port over TLS checking tokens.
    pub fn shim_args(&self) -> Vec<String> {
        let mut args = self.server_tls_args();
        args.extend(flags(&[
            ("--auth-token-file", &self.tenant_token_file),
            ("--tls-ca", &self.ca.certificate),
            ("--auth-public-key", &self.keys.public_key),
        ]));
        args
    }

    /// The page server stub's flags: HTTPS to the safekeepers with the
    /// safekeeper_data token, HTTPS on its status port.
    pub fn stub_args(&self) -> Vec<String> {
        let mut args = self.server_tls_args();
        args.extend(flags(&[("--auth-token-file", &self.data_token_file), ("--tls-ca", &self.ca.certificate)]));
        args
    }

    /// What a libpq connection string to one of our pg ports (or the
    /// primary over TCP) adds.
    pub fn libpq_conninfo(&self) -> String {
        format!("sslmode=verify-full sslrootcert={}", self.ca.certificate.display())
    }

    fn server_tls_args(&self) -> Vec<String> {
        flags(&[("--tls-cert", &self.leaf.certificate), ("--tls-key", &self.leaf.key)])
    }
}

/// `security_flags` (pairs of flag and value) without the flags `given`
/// already has: a test's own `--tls-cert` (say) wins over the harness's.
pub fn not_given(security_flags: Vec<String>, given: &[String]) -> Vec<String> {
    security_flags.chunks(2).filter(|pair| !given.contains(&pair[0])).flat_map(|pair| pair.iter().cloned()).collect()
}

fn flags(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs.iter().flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()]).collect()
}
