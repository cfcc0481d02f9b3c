//! Who may call what (docs/security.md).
//!
//! - [`token`]: the JWT every client presents (EdDSA over Ed25519, a scope,
//!   a tenant for the `tenant` scope, an expiry), minted with the private
//!   key by `safekeeper token` and verified with the public key by every
//!   port that has `--auth-public-key`.
//! - [`access`]: what each scope allows: one table from an operation
//!   (an endpoint or a pg-port command, with the tenant it touches) to the
//!   scopes that may do it. The ports map their requests onto it; nothing
//!   else decides.

pub mod access;
pub mod token;

pub use access::{Access, Denied};
pub use token::{Claims, Scope, TokenError, TokenSigner, TokenVerifier};
