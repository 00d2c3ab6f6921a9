//! The proxy's view of the world: token records, models and their ready endpoints, built into
//! one immutable [`Snapshot`] per source sync and swapped atomically, so a request sees one
//! coherent view from its head to its log line without taking a lock.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crds::{RequestTimeouts, Token, TokenRecord};
use jiff::Timestamp;

use crate::error::Rejection;
use crate::metrics::ModelSeries;

/// Default largest request body forwarded to a model (docs/architecture.md, limits).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// One upstream address of a model's runtime, with the requests in flight to it. Endpoints are
/// shared between snapshots (see [`EndpointPool`]) so that in-flight counts survive a reload.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    inflight: AtomicUsize,
}

impl Endpoint {
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// Counts a request against its endpoint for as long as it lives.
#[derive(Debug)]
pub struct InflightGuard(Arc<Endpoint>);

impl InflightGuard {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(endpoint)
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.0
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hands out the same [`Endpoint`] for the same address across snapshots.
#[derive(Debug, Default)]
pub struct EndpointPool {
    endpoints: Mutex<HashMap<SocketAddr, Arc<Endpoint>>>,
}

impl EndpointPool {
    /// The endpoint of each address, created on first use.
    fn resolve(&self, addrs: &[SocketAddr]) -> Vec<Arc<Endpoint>> {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        addrs
            .iter()
            .map(|&addr| {
                endpoints
                    .entry(addr)
                    .or_insert_with(|| {
                        Arc::new(Endpoint {
                            addr,
                            inflight: AtomicUsize::new(0),
                        })
                    })
                    .clone()
            })
            .collect()
    }

    /// Forgets the endpoints of addresses no model uses any more.
    fn retain(&self, in_use: &std::collections::HashSet<&SocketAddr>) {
        let mut endpoints = self
            .endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        endpoints.retain(|addr, _| in_use.contains(&addr));
    }
}

/// A model version the proxy routes to.
#[derive(Debug)]
pub struct Model {
    pub id: String,
    pub timeouts: RequestTimeouts,
    pub max_body_bytes: u64,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Whether a request that finds no endpoint waits for one (the model scales from zero).
    pub hold_when_idle: bool,
    /// Its metric series, looked up by the first request that needs them.
    pub series: OnceLock<ModelSeries>,
}

/// A model as a source describes it, before endpoints are pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub id: String,
    pub timeouts: RequestTimeouts,
    pub max_body_bytes: u64,
    pub endpoints: Vec<SocketAddr>,
    pub hold_when_idle: bool,
}

/// Everything a request needs to be authenticated and routed.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Token records by the lower-case hex SHA-256 of their token.
    tokens: HashMap<String, TokenRecord>,
    models: HashMap<String, Arc<Model>>,
    /// Proxy replicas sharing per-token limits, this one included (at least 1).
    pub peers: usize,
}

impl Snapshot {
    /// Builds a snapshot; the pool keeps endpoint identities (and in-flight counts) stable.
    pub fn build(
        models: Vec<ModelSpec>,
        tokens: Vec<TokenRecord>,
        peers: usize,
        pool: &EndpointPool,
    ) -> Snapshot {
        let in_use: std::collections::HashSet<&SocketAddr> =
            models.iter().flat_map(|m| &m.endpoints).collect();
        pool.retain(&in_use);
        let models = models
            .iter()
            .map(|spec| {
                let model = Model {
                    id: spec.id.clone(),
                    timeouts: spec.timeouts,
                    max_body_bytes: spec.max_body_bytes,
                    endpoints: pool.resolve(&spec.endpoints),
                    hold_when_idle: spec.hold_when_idle,
                    series: OnceLock::new(),
                };
                (spec.id.clone(), Arc::new(model))
            })
            .collect();
        let tokens = tokens
            .into_iter()
            .map(|record| (record.sha256.clone(), record))
            .collect();
        Snapshot {
            tokens,
            models,
            peers: peers.max(1),
        }
    }

    /// Runs the contract's checks in order: credential present, well-formed and known, not
    /// expired, not revoked, scoped to the model, and the model exists.
    pub fn authorize(
        &self,
        presented: Option<&str>,
        model_id: &str,
        now: Timestamp,
    ) -> Result<(&TokenRecord, &Arc<Model>), Rejection> {
        let presented = presented.ok_or(Rejection::MissingToken)?;
        let token = Token::parse(presented).map_err(|_| Rejection::InvalidToken)?;
        let digest = token.sha256_hex();
        let record = self.tokens.get(&digest).ok_or(Rejection::InvalidToken)?;
        // The map lookup already matched; this comparison does not leak, through timing, how
        // much of a digest matched, should the map's equality ever be reached on a near miss.
        if !constant_time_eq(record.sha256.as_bytes(), digest.as_bytes()) {
            return Err(Rejection::InvalidToken);
        }
        if record.is_expired_at(now) {
            return Err(Rejection::TokenExpired);
        }
        if record.revoked {
            return Err(Rejection::TokenRevoked);
        }
        if !record.allows_model(model_id) {
            return Err(Rejection::ModelNotAllowed {
                model: model_id.to_owned(),
            });
        }
        let model = self
            .models
            .get(model_id)
            .ok_or_else(|| Rejection::ModelNotFound {
                model: model_id.to_owned(),
            })?;
        Ok((record, model))
    }

    /// The record ids of every token known.
    pub fn token_ids(&self) -> impl Iterator<Item = &str> {
        self.tokens.values().map(|record| record.id.as_str())
    }

    pub fn model(&self, id: &str) -> Option<&Arc<Model>> {
        self.models.get(id)
    }

    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Least in-flight requests over two endpoints drawn at random (power of two choices), skipping
/// the ones already tried for this request. `None` when every endpoint was tried.
pub fn pick_endpoint(endpoints: &[Arc<Endpoint>], tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
    let candidates: Vec<&Arc<Endpoint>> = endpoints
        .iter()
        .filter(|e| !tried.contains(&e.addr))
        .collect();
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0].clone()),
        n => {
            let draw = random_u64();
            let first = (draw % n as u64) as usize;
            let second = (first + 1 + ((draw >> 32) % (n as u64 - 1)) as usize) % n;
            let (a, b) = (candidates[first], candidates[second]);
            Some(if b.inflight() < a.inflight() {
                b.clone()
            } else {
                a.clone()
            })
        }
    }
}

/// A cheap, non-cryptographic random number for load balancing: SipHash with a per-process
/// random key over a counter.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEY: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    KEY.get_or_init(RandomState::new)
        .hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        snapshot: Snapshot,
        valid: String,
        expired: String,
        revoked: String,
        other_model: String,
    }

    fn record(
        token: &Token,
        models: &[&str],
        expires_at: Option<&str>,
        revoked: bool,
    ) -> TokenRecord {
        TokenRecord {
            id: format!("id-{}", &token.sha256_hex()[..6]),
            name: "demo/t".into(),
            sha256: token.sha256_hex(),
            models: models.iter().map(|m| m.to_string()).collect(),
            expires_at: expires_at.map(|t| t.parse().unwrap()),
            revoked,
            limits: None,
        }
    }

    fn fixture() -> Fixture {
        let tokens: Vec<Token> = (0..4).map(|_| Token::generate().unwrap()).collect();
        let records = vec![
            record(&tokens[0], &["minilm"], Some("2030-01-01T00:00:00Z"), false),
            record(&tokens[1], &["minilm"], Some("2020-01-01T00:00:00Z"), false),
            record(&tokens[2], &["minilm"], None, true),
            record(&tokens[3], &["llama"], None, false),
        ];
        let model = ModelSpec {
            id: "minilm".into(),
            timeouts: RequestTimeouts::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            endpoints: vec!["127.0.0.1:9001".parse().unwrap()],
            hold_when_idle: false,
        };
        let secrets: Vec<String> = tokens
            .iter()
            .map(|t| t.expose_secret().to_owned())
            .collect();
        Fixture {
            snapshot: Snapshot::build(vec![model], records, 1, &EndpointPool::default()),
            valid: secrets[0].clone(),
            expired: secrets[1].clone(),
            revoked: secrets[2].clone(),
            other_model: secrets[3].clone(),
        }
    }

    fn now() -> Timestamp {
        "2026-11-25T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_valid_scoped_token_reaches_its_model() {
        let f = fixture();
        let (record, model) = f
            .snapshot
            .authorize(Some(&f.valid), "minilm", now())
            .unwrap();
        assert_eq!(model.id, "minilm");
        assert!(record.id.starts_with("id-"));
    }

    #[test]
    fn checks_fail_in_the_documented_order() {
        let f = fixture();
        let check = |token: Option<&str>, model: &str| {
            f.snapshot
                .authorize(token, model, now())
                .map(|_| ())
                .unwrap_err()
        };
        let unknown = Token::generate().unwrap();
        assert_eq!(check(None, "minilm"), Rejection::MissingToken);
        assert_eq!(
            check(Some("igt_garbage"), "minilm"),
            Rejection::InvalidToken
        );
        assert_eq!(
            check(Some(unknown.expose_secret()), "minilm"),
            Rejection::InvalidToken
        );
        assert_eq!(check(Some(&f.expired), "minilm"), Rejection::TokenExpired);
        assert_eq!(check(Some(&f.revoked), "minilm"), Rejection::TokenRevoked);
        assert_eq!(
            check(Some(&f.other_model), "minilm"),
            Rejection::ModelNotAllowed {
                model: "minilm".into()
            }
        );
        // Scope is checked before existence, so a token cannot probe which models exist.
        assert_eq!(
            check(Some(&f.valid), "nope"),
            Rejection::ModelNotAllowed {
                model: "nope".into()
            }
        );
        assert_eq!(
            check(Some(&f.other_model), "llama"),
            Rejection::ModelNotFound {
                model: "llama".into()
            }
        );
    }

    #[test]
    fn expiry_is_judged_at_request_time() {
        let f = fixture();
        let after_expiry: Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            f.snapshot
                .authorize(Some(&f.valid), "minilm", after_expiry)
                .map(|_| ()),
            Err(Rejection::TokenExpired)
        );
    }

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| format!("127.0.0.1:{}", 9000 + i).parse().unwrap())
            .collect();
        EndpointPool::default().resolve(&addrs)
    }

    #[test]
    fn power_of_two_choices_never_picks_the_busier_of_its_pair() {
        let endpoints = endpoints(2);
        let _busy: Vec<InflightGuard> = (0..5)
            .map(|_| InflightGuard::new(endpoints[0].clone()))
            .collect();
        for _ in 0..100 {
            assert_eq!(
                pick_endpoint(&endpoints, &[]).unwrap().addr,
                endpoints[1].addr
            );
        }
    }

    #[test]
    fn load_spreads_over_idle_endpoints() {
        let endpoints = endpoints(4);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(pick_endpoint(&endpoints, &[]).unwrap().addr);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn tried_endpoints_are_skipped_until_none_is_left() {
        let endpoints = endpoints(2);
        let first = endpoints[0].addr;
        assert_eq!(
            pick_endpoint(&endpoints, &[first]).unwrap().addr,
            endpoints[1].addr
        );
        assert!(pick_endpoint(&endpoints, &[first, endpoints[1].addr]).is_none());
    }

    #[test]
    fn in_flight_counts_survive_a_snapshot_rebuild() {
        let pool = EndpointPool::default();
        let addr: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let spec = ModelSpec {
            id: "m".into(),
            timeouts: RequestTimeouts::default(),
            max_body_bytes: 1,
            endpoints: vec![addr],
            hold_when_idle: false,
        };
        let before = Snapshot::build(vec![spec.clone()], vec![], 1, &pool);
        let _guard = InflightGuard::new(before.model("m").unwrap().endpoints[0].clone());
        let after = Snapshot::build(vec![spec], vec![], 1, &pool);
        assert_eq!(after.model("m").unwrap().endpoints[0].inflight(), 1);
    }
}
