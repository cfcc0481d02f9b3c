//! What each scope may do: every operation a port serves is one
//! [`Access`], and [`Access::check`] is the whole table (docs/security.md
//! prints it). A `tenant` token reaches only its own tenant; `admin` is for
//! management and never reads or writes WAL; `safekeeper_data` reads
//! everything a peer or a page server needs and writes nothing but
//! feedback.

use safekeeper_protocol::ids::TenantId;

use crate::token::{Claims, Scope};

/// An operation, with the tenant it touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `/metrics`, the liveness endpoint: no token needed.
    Open,
    /// Node-wide status (`GET /v1/status`).
    NodeStatus,
    /// Node-wide listings and configuration (`GET /v1/timelines`, the
    /// shim's `POST /v1/membership`).
    NodeAdmin,
    /// One timeline's status document.
    TimelineStatus(TenantId),
    /// Reading a timeline's WAL: HTTP WAL and segments; on the pg port
    /// IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY, START_REPLICATION.
    ReadWal(TenantId),
    /// Writing a timeline's WAL: START_WAL_PUSH.
    PushWal(TenantId),
    /// A consumer's feedback (drives retention).
    Feedback(TenantId),
    /// Deleting a timeline.
    DeleteTimeline(TenantId),
}

/// Why a valid token may not do this: "403 Forbidden" (SQLSTATE 28000 on
/// the pg port).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("a {scope} token may not do this; it needs one of: {allowed}")]
    Scope { scope: Scope, allowed: &'static str },
    #[error("this token is for another tenant")]
    OtherTenant,
}

impl Access {
    /// Whether `claims` (None: auth is off on this port) allow this.
    pub fn check(self, claims: Option<&Claims>) -> Result<(), Denied> {
        let Some(claims) = claims else { return Ok(()) };
        use Scope::*;
        let (allowed, tenant): (&[Scope], Option<TenantId>) = match self {
            Access::Open => return Ok(()),
            Access::NodeStatus => (&[SafekeeperData, Admin], None),
            Access::NodeAdmin => (&[Admin], None),
            Access::TimelineStatus(tenant) => (&[Tenant, SafekeeperData, Admin], Some(tenant)),
            Access::ReadWal(tenant) => (&[Tenant, SafekeeperData], Some(tenant)),
            Access::PushWal(tenant) => (&[Tenant], Some(tenant)),
            Access::Feedback(tenant) => (&[SafekeeperData], Some(tenant)),
            Access::DeleteTimeline(tenant) => (&[Admin], Some(tenant)),
        };
        if !allowed.contains(&claims.scope) {
            return Err(Denied::Scope { scope: claims.scope, allowed: names(allowed) });
        }
        if claims.scope == Tenant && claims.tenant_id != tenant {
            return Err(Denied::OtherTenant);
        }
        Ok(())
    }
}

fn names(scopes: &[Scope]) -> &'static str {
    use Scope::*;
    match scopes {
        [SafekeeperData, Admin] => "safekeeper_data, admin",
        [Admin] => "admin",
        [Tenant, SafekeeperData, Admin] => "tenant (its own), safekeeper_data, admin",
        [Tenant, SafekeeperData] => "tenant (its own), safekeeper_data",
        [Tenant] => "tenant (its own)",
        [SafekeeperData] => "safekeeper_data",
        _ => "another scope",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(scope: Scope, tenant_id: Option<TenantId>) -> Claims {
        Claims { scope, tenant_id, iat: 0, exp: u64::MAX }
    }

    /// The table of docs/security.md, row by row.
    #[test]
    fn each_scope_reaches_what_the_table_says() {
        let mine: TenantId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let other: TenantId = "fedcba9876543210fedcba9876543210".parse().unwrap();
        let tenant = claims(Scope::Tenant, Some(mine));
        let data = claims(Scope::SafekeeperData, None);
        let admin = claims(Scope::Admin, None);
        let table = [
            (Access::Open, [true, true, true]),
            (Access::NodeStatus, [false, true, true]),
            (Access::NodeAdmin, [false, false, true]),
            (Access::TimelineStatus(mine), [true, true, true]),
            (Access::ReadWal(mine), [true, true, false]),
            (Access::PushWal(mine), [true, false, false]),
            (Access::Feedback(mine), [false, true, false]),
            (Access::DeleteTimeline(mine), [false, false, true]),
        ];
        for (access, allowed) in table {
            for (claims, allowed) in [&tenant, &data, &admin].into_iter().zip(allowed) {
                assert_eq!(access.check(Some(claims)).is_ok(), allowed, "{access:?} for {:?}", claims.scope);
            }
            assert!(access.check(None).is_ok(), "no auth configured: {access:?} is open");
        }
        for access in [Access::TimelineStatus(other), Access::ReadWal(other), Access::PushWal(other)] {
            assert_eq!(access.check(Some(&tenant)), Err(Denied::OtherTenant), "{access:?}");
        }
    }
}
