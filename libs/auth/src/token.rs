//! Tokens: JWTs signed with EdDSA (Ed25519), carrying a [`Scope`], for the
//! `tenant` scope the tenant it is for, and an expiry. Only EdDSA is
//! accepted (no `none`, no HMAC with the public key as its secret), and
//! every token must expire.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use safekeeper_protocol::ids::TenantId;

/// Clock difference between the machine that minted a token and the one
/// checking it that is forgiven at its expiry.
pub const EXPIRY_LEEWAY: Duration = Duration::from_secs(30);
/// Longest token text a port reads (a real one is about 250 bytes).
pub const MAX_TOKEN_BYTES: usize = 4096;

/// What a token lets its holder do (the table is [`crate::access`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// A compute (its shim, `sync-safekeepers`, its standbys and
    /// pg_receivewal): push WAL to, read WAL and status of, the timelines
    /// of the tenant in the token.
    Tenant,
    /// Peers and page servers: WAL, status and feedback of every tenant.
    SafekeeperData,
    /// Operators: deleting timelines, node-wide listings, configuration.
    Admin,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(text: &str) -> Result<Scope, String> {
        match text {
            "tenant" => Ok(Scope::Tenant),
            "safekeeper_data" => Ok(Scope::SafekeeperData),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("unknown scope {other:?}: use tenant, safekeeper_data or admin")),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Tenant => "tenant",
            Scope::SafekeeperData => "safekeeper_data",
            Scope::Admin => "admin",
        })
    }
}

/// A token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub scope: Scope,
    /// The tenant of a `tenant` token (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<TenantId>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

/// Why a token was not accepted: all of these are "401 Unauthorized" (and
/// SQLSTATE 28P01 on the pg port). The text never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no token given")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token expired")]
    Expired,
    #[error("token not signed by this service's key")]
    BadSignature,
    #[error("a tenant token must name its tenant_id; other scopes must not")]
    TenantMismatch,
}

/// Checks tokens against the public keys of `--auth-public-key`: one or
/// more Ed25519 keys in one PEM file (two during a key rotation: a token
/// signed by either is accepted). [`TokenVerifier::reload`] reads the file
/// again (SIGHUP); until it succeeds the keys already loaded stay.
pub struct TokenVerifier {
    keys: RwLock<Arc<[DecodingKey]>>,
    /// Where the keys came from (`None`: given as text, nothing to reload).
    path: Option<PathBuf>,
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier")
    }
}

/// The PEM blocks of `text` (each `-----BEGIN ...` to its `-----END ...`).
fn pem_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let Some(end_marker) = rest[begin..].find("-----END ") else { break };
        let end_start = begin + end_marker;
        let end = rest[end_start + 9..].find("-----").map_or(rest.len(), |i| end_start + 9 + i + 5);
        blocks.push(&rest[begin..end]);
        rest = &rest[end..];
    }
    blocks
}

fn parse_public_keys(pem: &[u8]) -> Result<Arc<[DecodingKey]>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file (not text)".to_string())?;
    let keys = pem_blocks(text)
        .into_iter()
        .enumerate()
        .map(|(index, block)| {
            DecodingKey::from_ed_pem(block.as_bytes())
                .map_err(|e| format!("PEM block {}: not an Ed25519 public key: {e}", index + 1))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("holds no PEM public key".to_string());
    }
    Ok(keys.into())
}

impl TokenVerifier {
    /// From Ed25519 public keys in PEM (`openssl pkey -pubout`; several
    /// concatenated are all trusted).
    pub fn from_public_key_pem(pem: &[u8]) -> Result<TokenVerifier, String> {
        let keys = parse_public_keys(pem)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = EXPIRY_LEEWAY.as_secs();
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = false;
        Ok(TokenVerifier { keys: RwLock::new(keys), path: None, validation })
    }

    pub fn from_public_key_file(path: &Path) -> Result<TokenVerifier, String> {
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let verifier = TokenVerifier::from_public_key_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TokenVerifier { path: Some(path.to_path_buf()), ..verifier })
    }

    /// Read the key file again; on success tokens are checked against the
    /// keys it holds now. Returns how many keys are trusted.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.path else { return Err("the keys were not read from a file".to_string()) };
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let keys = parse_public_keys(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
        let count = keys.len();
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
        Ok(count)
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed(format!("longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner).clone();
        // The first key the signature matches decides (expiry is checked
        // after the signature, so "expired" means one of ours signed it).
        let mut claims = Err(TokenError::BadSignature);
        for key in keys.iter() {
            claims =
                jsonwebtoken::decode::<Claims>(token, key, &self.validation).map(|data| data.claims).map_err(|error| {
                    match error.kind() {
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::InvalidSignature => TokenError::BadSignature,
                        // Another algorithm than ours: not signed by our key.
                        ErrorKind::InvalidAlgorithm => TokenError::BadSignature,
                        _ => TokenError::Malformed(error.to_string()),
                    }
                });
            if claims != Err(TokenError::BadSignature) {
                break;
            }
        }
        let claims = claims?;
        if (claims.scope == Scope::Tenant) != claims.tenant_id.is_some() {
            return Err(TokenError::TenantMismatch);
        }
        Ok(claims)
    }
}

/// Mints tokens with the private key (`safekeeper token`).
pub struct TokenSigner {
    key: EncodingKey,
}

impl TokenSigner {
    /// From an Ed25519 private key in PEM (`openssl genpkey -algorithm ed25519`).
    pub fn from_private_key_pem(pem: &[u8]) -> Result<TokenSigner, String> {
        let key = EncodingKey::from_ed_pem(pem).map_err(|e| format!("not an Ed25519 private key in PEM: {e}"))?;
        Ok(TokenSigner { key })
    }

    pub fn from_private_key_file(path: &Path) -> Result<TokenSigner, String> {
        let pem = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        TokenSigner::from_private_key_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A token for `scope` (and `tenant_id`, required for `tenant` and
    /// refused for the others), valid from `now` for `ttl`.
    pub fn mint(
        &self,
        scope: Scope,
        tenant_id: Option<TenantId>,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<String, String> {
        if (scope == Scope::Tenant) != tenant_id.is_some() {
            return Err(match scope {
                Scope::Tenant => "a tenant token needs --tenant-id".to_string(),
                other => format!("a {other} token is for every tenant: drop --tenant-id"),
            });
        }
        let iat = now.duration_since(UNIX_EPOCH).map_err(|_| "the clock is before 1970".to_string())?.as_secs();
        let claims = Claims { scope, tenant_id, iat, exp: iat.saturating_add(ttl.as_secs()) };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key).map_err(|e| e.to_string())
    }
}

/// A token kept in a file (`--auth-token-file`): read at each use, so a
/// rotated token is picked up without a restart. Surrounding whitespace is
/// ignored; the error names the file, never its contents.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES || token.contains(char::is_whitespace) {
        return Err(format!("the token file {} does not hold one token", path.display()));
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_trusted_keys_and_a_reload() {
        let other = TokenSigner::from_private_key_pem(OTHER_PRIVATE.as_bytes()).unwrap();
        let ours = TokenSigner::from_private_key_pem(PRIVATE.as_bytes()).unwrap();
        let hour = Duration::from_secs(3600);
        let other_token = other.mint(Scope::Admin, None, SystemTime::now(), hour).unwrap();
        let our_token = ours.mint(Scope::Admin, None, SystemTime::now(), hour).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.pub");
        std::fs::write(&path, PUBLIC).unwrap();
        let verifier = TokenVerifier::from_public_key_file(&path).unwrap();
        assert!(verifier.verify(&our_token).is_ok());
        assert_eq!(verifier.verify(&other_token), Err(TokenError::BadSignature));
        // Rotation: both keys in the file, reloaded.
        let other_public = other_public_pem();
        std::fs::write(&path, format!("{PUBLIC}{other_public}")).unwrap();
        assert_eq!(verifier.reload(), Ok(2));
        assert!(verifier.verify(&our_token).is_ok() && verifier.verify(&other_token).is_ok());
        // The old key dropped.
        std::fs::write(&path, &other_public).unwrap();
        assert_eq!(verifier.reload(), Ok(1));
        assert_eq!(verifier.verify(&our_token), Err(TokenError::BadSignature));
        // A file that does not load keeps the keys there are.
        std::fs::write(&path, "not a key").unwrap();
        assert!(verifier.reload().unwrap_err().contains("no PEM public key"));
        assert!(verifier.verify(&other_token).is_ok());
    }

    /// The public half of OTHER_PRIVATE, derived the way operators do.
    fn other_public_pem() -> String {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("other.key");
        std::fs::write(&private, OTHER_PRIVATE).unwrap();
        let output = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .output()
            .expect("openssl");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    // Test keys (generated with openssl for these tests only).
    const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIGACOt6zJTII4GrF77Ng2voiohOnXc8ITzfANOCU9JWA
-----END PRIVATE KEY-----
";
    const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAR7z3XMTEGXqAPhuAHPUM6KGaw+dQlqflPdjENGnmpHg=
-----END PUBLIC KEY-----
";
    const OTHER_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIB8MtOaCtBe6PKQhyQWa0Ieba8C/TJmPXMIG7cuNdy9l
-----END PRIVATE KEY-----
";

    fn tenant() -> TenantId {
        "0123456789abcdef0123456789abcdef".parse().unwrap()
    }

    fn mint(key: &str, scope: Scope, tenant_id: Option<TenantId>, ttl_s: u64, age_s: u64) -> String {
        let now = SystemTime::now() - Duration::from_secs(age_s);
        TokenSigner::from_private_key_pem(key.as_bytes())
            .unwrap()
            .mint(scope, tenant_id, now, Duration::from_secs(ttl_s))
            .unwrap()
    }

    fn verifier() -> TokenVerifier {
        TokenVerifier::from_public_key_pem(PUBLIC.as_bytes()).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_claims() {
        let claims = verifier().verify(&mint(PRIVATE, Scope::Tenant, Some(tenant()), 600, 0)).unwrap();
        assert_eq!((claims.scope, claims.tenant_id), (Scope::Tenant, Some(tenant())));
        assert_eq!(claims.exp - claims.iat, 600);
        let admin = verifier().verify(&mint(PRIVATE, Scope::Admin, None, 600, 0)).unwrap();
        assert_eq!((admin.scope, admin.tenant_id), (Scope::Admin, None));
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let verifier = verifier();
        assert_eq!(verifier.verify(""), Err(TokenError::Missing));
        assert_eq!(verifier.verify(&mint(PRIVATE, Scope::Admin, None, 60, 3600)), Err(TokenError::Expired));
        assert_eq!(verifier.verify(&mint(OTHER_PRIVATE, Scope::Admin, None, 600, 0)), Err(TokenError::BadSignature));
        assert!(matches!(verifier.verify("a.b.c"), Err(TokenError::Malformed(_))));
        // A token whose signature was made for other claims.
        let good = mint(PRIVATE, Scope::SafekeeperData, None, 600, 0);
        let admin = mint(PRIVATE, Scope::Admin, None, 600, 0);
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], admin.split('.').nth(1).unwrap(), parts[2]);
        assert_eq!(verifier.verify(&forged), Err(TokenError::BadSignature));
        // `alg: none` with no signature.
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
        let unsigned = format!("{none_header}.{}.", admin.split('.').nth(1).unwrap());
        assert!(verifier.verify(&unsigned).is_err());
    }

    #[test]
    fn scopes_and_tenants_must_match() {
        let signer = TokenSigner::from_private_key_pem(PRIVATE.as_bytes()).unwrap();
        let now = SystemTime::now();
        assert!(signer.mint(Scope::Tenant, None, now, Duration::from_secs(60)).is_err());
        assert!(signer.mint(Scope::Admin, Some(tenant()), now, Duration::from_secs(60)).is_err());
        assert!(TokenSigner::from_private_key_pem(PUBLIC.as_bytes()).is_err(), "a public key cannot sign");
        assert!(TokenVerifier::from_public_key_pem(b"not a key").is_err());
    }

    proptest::proptest! {
        /// Whatever a client sends as its token, the answer is an error,
        /// never a panic.
        #[test]
        fn arbitrary_tokens_are_refused(text in ".{0,600}") {
            proptest::prop_assert!(verifier().verify(&text).is_err());
        }
    }
}
