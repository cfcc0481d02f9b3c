//! Certificates for the TLS tests, made with openssl as an operator would:
//! a CA, and leaf certificates it signs for the loopback names the test
//! processes listen on (IP 127.0.0.1 and DNS localhost). A second CA makes
//! "a certificate nobody trusts".

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// A CA's certificate and key in a directory of its own.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub certificate: PathBuf,
    key: PathBuf,
}

/// A leaf certificate and its key (PEM files, the key owner-only).
#[derive(Clone, Debug)]
pub struct LeafCertificate {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn generate(name: &str) -> Result<TestCa> {
        let dir = tempfile::Builder::new().prefix("ca-").tempdir()?;
        let certificate = dir.path().join(format!("{name}.crt"));
        let key = dir.path().join(format!("{name}.key"));
        let subject = format!("/CN={name}");
        let mut args = vec!["req", "-x509"];
        args.extend(new_p256_key(&key));
        args.extend(["-out", path(&certificate), "-days", "2", "-subj", &subject]);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args)?;
        Ok(TestCa { dir, certificate, key })
    }

    /// A server certificate for 127.0.0.1 and localhost, signed by this CA,
    /// written as `<name>.crt` / `<name>.key` in `dir`.
    pub fn issue(&self, dir: &Path, name: &str) -> Result<LeafCertificate> {
        let certificate = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let request = dir.join(format!("{name}.csr"));
        let extensions = dir.join(format!("{name}.ext"));
        std::fs::write(
            &extensions,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        let mut args = vec!["req"];
        args.extend(new_p256_key(&key));
        args.extend(["-out", path(&request), "-subj", "/CN=localhost"]);
        openssl(&args)?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            path(&request),
            "-CA",
            path(&self.certificate),
            "-CAkey",
            path(&self.key),
            "-CAcreateserial",
            "-out",
            path(&certificate),
            "-days",
            "2",
            "-extfile",
            path(&extensions),
        ])?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        Ok(LeafCertificate { certificate, key })
    }
}

/// `openssl req` arguments making a new P-256 key, unencrypted, in `key`.
fn new_p256_key(key: &Path) -> [&str; 7] {
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", path(key)]
}

fn path(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn openssl(args: &[&str]) -> Result<()> {
    let output = Command::new("openssl").args(args).output().context("running openssl (is it installed?)")?;
    ensure!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}
