//! `status.limits` of each AccessToken with `spec.limits`: how the proxies enforce them, as
//! their metrics say (`infergate_proxy_limit_peers`, `infergate_proxy_limits_store_up`), so a
//! platform engineer sees whether a limit holds globally or as shares per replica.

use crds::{AccessToken, LimitsStatus, ReplicaShare, TokenLimits};
use kube::ResourceExt;

use crate::apply::apply_status_as;
use crate::controller::Context;

/// Field manager of `status.limits`: it owns that field alone.
const FIELD_MANAGER: &str = "infergate-limits";

/// What one proxy says of its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyLimits {
    /// Replicas it shares limits with (its own count of ready proxies).
    pub peers: Option<u32>,
    /// `Some` with a store configured: whether it reached it.
    pub store_up: Option<bool>,
}

/// Reads the two gauges from a proxy's metrics page.
pub fn parse_proxy_limits(page: &str) -> ProxyLimits {
    let mut limits = ProxyLimits::default();
    for line in page.lines() {
        if let Some(value) = line.strip_prefix("infergate_proxy_limit_peers ") {
            limits.peers = value.trim().parse::<f64>().ok().map(|v| v as u32);
        } else if let Some(value) = line.strip_prefix("infergate_proxy_limits_store_up ") {
            limits.store_up = value.trim().parse::<f64>().ok().map(|v| v >= 1.0);
        }
    }
    limits
}

/// The status of `limits` as enforced by the proxies that answered.
pub fn status(limits: &TokenLimits, proxies: &[ProxyLimits]) -> Option<LimitsStatus> {
    if proxies.is_empty() {
        return None;
    }
    let replicas = proxies
        .iter()
        .filter_map(|p| p.peers)
        .max()
        .unwrap_or(proxies.len() as u32)
        .max(proxies.len() as u32);
    let with_store: Vec<bool> = proxies.iter().filter_map(|p| p.store_up).collect();
    if !with_store.is_empty() {
        let down = with_store.iter().filter(|up| !**up).count();
        return Some(LimitsStatus {
            enforcement: "Global".to_owned(),
            replicas,
            per_replica: None,
            message: if down == 0 {
                format!(
                    "counted in the shared store by all {replicas} proxy replicas: each limit holds for them together"
                )
            } else {
                format!(
                    "{down} of {} proxy replicas cannot reach the shared store; they apply their --limits-store-failure policy meanwhile",
                    with_store.len()
                )
            },
        });
    }
    let divide = f64::from(replicas);
    Some(LimitsStatus {
        enforcement: "PerReplica".to_owned(),
        replicas,
        per_replica: Some(ReplicaShare {
            requests_per_minute: limits
                .requests_per_minute
                .map(|n| round(f64::from(n) / divide)),
            concurrent_requests: limits.concurrent_requests.map(|n| (n / replicas).max(1)),
            tokens_per_minute: limits.tokens_per_minute.map(|n| round(n as f64 / divide)),
        }),
        message: format!(
            "no shared store: each of the {replicas} proxy replicas admits 1/{replicas} of each limit, one limit in total while clients spread evenly over them"
        ),
    })
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Writes `status.limits` of every AccessToken with limits whose status says otherwise.
pub async fn publish(ctx: &Context, proxies: &[ProxyLimits], tokens: &[AccessToken]) {
    for token in tokens {
        let Some(limits) = &token.spec.limits else {
            continue;
        };
        let wanted = status(limits, proxies);
        let current = token.status.as_ref().and_then(|s| s.limits.clone());
        if wanted.is_none() || wanted == current {
            continue;
        }
        let patch = serde_json::json!({"limits": wanted});
        if let Err(error) = apply_status_as(FIELD_MANAGER, token, &patch, &ctx.client).await {
            tracing::warn!(access_token = %token.name_any(), %error, "could not write the limits status");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TokenLimits = TokenLimits {
        requests_per_minute: Some(600),
        concurrent_requests: Some(10),
        tokens_per_minute: Some(90_000),
    };

    #[test]
    fn without_a_store_each_replica_is_told_its_share() {
        let page = "# TYPE infergate_proxy_limit_peers gauge\ninfergate_proxy_limit_peers 3\n";
        let proxy = parse_proxy_limits(page);
        assert_eq!(
            proxy,
            ProxyLimits {
                peers: Some(3),
                store_up: None
            }
        );
        let status = status(&LIMITS, &[proxy; 3]).unwrap();
        assert_eq!(status.enforcement, "PerReplica");
        assert_eq!(status.replicas, 3);
        let share = status.per_replica.unwrap();
        assert_eq!(share.requests_per_minute, Some(200.0));
        assert_eq!(share.concurrent_requests, Some(3));
        assert_eq!(share.tokens_per_minute, Some(30_000.0));
    }

    #[test]
    fn with_a_store_the_limits_are_global_and_an_unreachable_store_is_named() {
        let up = parse_proxy_limits(
            "infergate_proxy_limit_peers 2\ninfergate_proxy_limits_store_up 1\n",
        );
        let down = ProxyLimits {
            store_up: Some(false),
            ..up
        };
        let global = status(&LIMITS, &[up, up]).unwrap();
        assert_eq!(
            (global.enforcement.as_str(), global.per_replica),
            ("Global", None)
        );
        let degraded = status(&LIMITS, &[up, down]).unwrap();
        assert!(
            degraded
                .message
                .starts_with("1 of 2 proxy replicas cannot reach"),
            "{}",
            degraded.message
        );
        assert_eq!(
            status(&LIMITS, &[]),
            None,
            "no proxy answered: nothing to say"
        );
    }
}
