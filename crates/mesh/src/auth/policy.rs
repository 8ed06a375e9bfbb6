//! Which roles may call which RPC: one table, by full method path.
//!
//! **Invariant:** every RPC of every livemesh service has a rule here (a
//! test checks it against the descriptor set); a method without one is
//! refused, so a new RPC is closed until someone decides who may call it.

/// The mesh's own services; each mints a token with its name as its role.
pub const MESH_SERVICES: &[&str] = &[ONGOING_QUERY, SUBSCRIBE, PUBLISH, COUNTER, GIFT_SETTLER];

pub const ONGOING_QUERY: &str = "ongoing-query";
pub const SUBSCRIBE: &str = "subscribe";
pub const PUBLISH: &str = "publish";
pub const COUNTER: &str = "counter";
pub const GIFT_SETTLER: &str = "gift-settler";
/// The backend-for-frontend that viewers' apps talk to.
pub const BFF: &str = "bff";
/// People and jobs that settle rooms, reconcile and export the ledger.
pub const FINANCE: &str = "finance";
/// Operators who start and end rooms.
pub const ADMIN: &str = "admin";
/// The payment provider's callback that tops up balances.
pub const PAYMENTS: &str = "payments";

/// Whether a call must act for a viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewerRule {
    /// A verified viewer token (`x-livemesh-viewer`) is required.
    Required,
    /// A viewer token is verified when sent (Publish: comments carry one).
    Optional,
    /// Viewer tokens are ignored.
    None,
}

/// Who may call one method (or every method of a service, `Svc/*`).
#[derive(Debug)]
pub struct Rule {
    pub path: &'static str,
    pub roles: &'static [&'static str],
    pub viewer: ViewerRule,
    /// Counted against the per-viewer rate limit.
    pub viewer_facing: bool,
}

const fn rule(path: &'static str, roles: &'static [&'static str], viewer: ViewerRule) -> Rule {
    Rule {
        path,
        roles,
        viewer,
        viewer_facing: matches!(viewer, ViewerRule::Required),
    }
}

const MESH_AND_BFF: &[&str] = &[
    ONGOING_QUERY,
    SUBSCRIBE,
    PUBLISH,
    COUNTER,
    GIFT_SETTLER,
    BFF,
];

/// The policy. Read it as "PATH may be called by ROLES".
pub const RULES: &[Rule] = &[
    rule(
        "/livemesh.v1.SubscribeService/Deliver",
        &[PUBLISH],
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.SubscribeService/Subscribe",
        &[BFF],
        ViewerRule::Required,
    ),
    rule(
        "/livemesh.v1.PublishService/Publish",
        // Counter: love totals; gift-settler: gifts; publish: forwarding
        // between datacenters; subscribe: viewer counts; bff: comments.
        &[COUNTER, GIFT_SETTLER, PUBLISH, SUBSCRIBE, BFF],
        ViewerRule::Optional,
    ),
    rule(
        "/livemesh.v1.PublishService/PublishBatch",
        // The mesh's own events only (the gift-settler's gifts); no comments.
        &[COUNTER, GIFT_SETTLER, PUBLISH, SUBSCRIBE],
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.CounterService/SendLoves",
        &[BFF],
        ViewerRule::Required,
    ),
    rule(
        "/livemesh.v1.CounterService/GetLoves",
        MESH_AND_BFF,
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.CounterService/TopLovers",
        MESH_AND_BFF,
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.GiftsService/SendGift",
        &[BFF],
        ViewerRule::Required,
    ),
    rule(
        "/livemesh.v1.GiftsService/GetBalance",
        &[BFF],
        ViewerRule::Required,
    ),
    rule(
        "/livemesh.v1.GiftsService/Deposit",
        &[PAYMENTS],
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.SettlementService/*",
        &[FINANCE],
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.RoomAdminService/*",
        &[ADMIN],
        ViewerRule::None,
    ),
    rule(
        "/livemesh.v1.OngoingQueryService/*",
        MESH_AND_BFF,
        ViewerRule::None,
    ),
];

/// Services anyone may call: health checks and reflection.
const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Whether `path` needs no credentials.
pub fn is_open(path: &str) -> bool {
    OPEN_SERVICES.iter().any(|prefix| path.starts_with(prefix))
}

/// The rule for a full method path (`/pkg.Service/Method`).
pub fn rule_for(path: &str) -> Option<&'static Rule> {
    RULES.iter().find(|rule| match rule.path.strip_suffix('*') {
        Some(service) => path.starts_with(service),
        None => rule.path == path,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use prost::Message as _;

    /// Every method in the descriptor set has a rule, so no RPC is left
    /// to the default refusal by oversight.
    #[test]
    fn every_rpc_of_every_service_has_a_rule() {
        let set =
            prost_types::FileDescriptorSet::decode(livemesh_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package(), service.name(), method.name());
                    assert!(rule_for(&path).is_some(), "{path} has no rule");
                    methods += 1;
                }
            }
        }
        assert!(methods >= 19, "only {methods} methods found");
    }

    #[test]
    fn the_policy_reads_as_intended() {
        let roles = |path: &str| rule_for(path).unwrap().roles;
        assert_eq!(roles("/livemesh.v1.SubscribeService/Deliver"), &[PUBLISH]);
        assert_eq!(
            roles("/livemesh.v1.SettlementService/Reconcile"),
            &[FINANCE]
        );
        assert_eq!(roles("/livemesh.v1.RoomAdminService/EndRoom"), &[ADMIN]);
        assert!(rule_for("/livemesh.v1.Unknown/Method").is_none());
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(!is_open("/livemesh.v1.CounterService/SendLoves"));
    }
}
