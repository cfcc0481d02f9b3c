//! Keys and tokens for the tests of docs/security.md: an Ed25519 key pair
//! made with openssl, a second ("foreign") one, and tokens minted by the
//! operator's own tool, `safekeeper token`, written to files as the
//! services read them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::processes::binary;

pub struct TestKeys {
    pub dir: tempfile::TempDir,
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    /// A key pair the services do not trust.
    pub foreign_private_key: PathBuf,
}

impl TestKeys {
    pub fn generate() -> Result<TestKeys> {
        let dir = tempfile::Builder::new().prefix("keys-").tempdir()?;
        let private_key = dir.path().join("auth.key");
        let public_key = dir.path().join("auth.pub");
        let foreign_private_key = dir.path().join("foreign.key");
        for key in [&private_key, &foreign_private_key] {
            openssl(&["genpkey", "-algorithm", "ed25519", "-out", &key.display().to_string()])?;
        }
        openssl(&[
            "pkey",
            "-in",
            &private_key.display().to_string(),
            "-pubout",
            "-out",
            &public_key.display().to_string(),
        ])?;
        Ok(TestKeys { dir, private_key, public_key, foreign_private_key })
    }

    /// `safekeeper token --scope scope [--tenant-id t] --ttl-s ttl` with our key.
    pub fn token(&self, scope: &str, tenant_id: Option<&str>, ttl_s: u64) -> Result<String> {
        mint(&self.private_key, scope, tenant_id, ttl_s)
    }

    /// The same, signed with the foreign key.
    pub fn foreign_token(&self, scope: &str, tenant_id: Option<&str>) -> Result<String> {
        mint(&self.foreign_private_key, scope, tenant_id, 3600)
    }

    /// A token that expired an hour ago (minted valid for a second, its
    /// claims then back-dated is not possible without the key: so it is
    /// minted by the library with a past issue time).
    pub fn expired_token(&self, scope: &str, tenant_id: Option<&str>) -> Result<String> {
        let signer = auth::TokenSigner::from_private_key_file(&self.private_key).map_err(anyhow::Error::msg)?;
        let tenant_id = tenant_id.map(str::parse).transpose().map_err(|e| anyhow::anyhow!("tenant id: {e:?}"))?;
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        let scope = scope.parse().map_err(anyhow::Error::msg)?;
        signer.mint(scope, tenant_id, an_hour_ago, std::time::Duration::from_secs(60)).map_err(anyhow::Error::msg)
    }

    /// `token` written to a file (owner-only, as a service reads it).
    pub fn file(&self, name: &str, token: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{token}\n"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl").args(args).output().context("running openssl (is it installed?)")?;
    ensure!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

fn mint(key: &Path, scope: &str, tenant_id: Option<&str>, ttl_s: u64) -> Result<String> {
    let mut command = Command::new(binary("safekeeper", "safekeeper")?);
    command.arg("token").arg("--private-key").arg(key).args(["--scope", scope, "--ttl-s", &ttl_s.to_string()]);
    if let Some(tenant_id) = tenant_id {
        command.args(["--tenant-id", tenant_id]);
    }
    let output = command.output()?;
    ensure!(output.status.success(), "safekeeper token: {}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout)?.trim().to_string();
    ensure!(token.split('.').count() == 3, "safekeeper token printed {token:?}");
    Ok(token)
}
