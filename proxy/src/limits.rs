//! Per-token limits (an AccessToken's `spec.limits`), enforced as one limit across every proxy
//! replica.
//!
//! Rates (requests per minute, generation tokens per minute) are GCRA buckets: a steady rate
//! with a burst of one second's worth. Requests per minute are taken at admission; tokens per
//! minute are only checked there (a request is admitted while the token is not in debt) and
//! charged with what the runtime reported when the request ends. Concurrency counts requests
//! from admission to their end.
//!
//! With a shared store (Redis or Valkey, `--limits-store`), every replica counts in the same
//! keys with atomic scripts on the store's clock, so the limits hold exactly for all replicas
//! together. Without one, each of the N ready proxy replicas enforces 1/N of each limit: one
//! limit in total while clients spread over the replicas, as a load balancer spreads them.
//! When the store cannot be reached within [`STORE_TIMEOUT`], `--limits-store-failure` decides:
//! `local` (the per-replica share), `open` (no limit) or `closed` (503).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crds::TokenLimits;
use internal_token::usage::{Unit, Usage};
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::error::{Limit, Rejection};

/// The longest a request waits for the store before the failure policy applies.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(250);

/// What to do when the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreFailure {
    /// Enforce this replica's share, as without a store.
    Local,
    /// Admit: the limits are not enforced until the store is back.
    Open,
    /// Refuse with 503 `limits_unavailable`.
    Closed,
}

/// A GCRA bucket: the theoretical arrival time of the next unit, in seconds from an epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gcra {
    tat: f64,
}

impl Gcra {
    /// Charges `cost` units at `now` at `rate` units a second with a burst of `burst` units:
    /// when `check`, only if the bucket is not past its burst (else the seconds to wait).
    pub fn take(
        &mut self,
        now: f64,
        rate: f64,
        burst: f64,
        cost: f64,
        check: bool,
    ) -> Result<(), f64> {
        let interval = 1.0 / rate;
        let tolerance = (burst - 1.0).max(0.0) * interval;
        let tat = self.tat.max(now);
        if check && tat - now > tolerance {
            return Err(tat - tolerance - now);
        }
        self.tat = tat + cost * interval;
        Ok(())
    }
}

/// One second's worth of a per-minute rate, at least one unit.
fn burst(per_minute: f64) -> f64 {
    (per_minute / 60.0).max(1.0)
}

/// This replica's counts of one token.
#[derive(Debug, Default)]
struct Local {
    requests: Gcra,
    tokens: Gcra,
    in_progress: u32,
}

/// A connection to the shared store, made in the background and remade by the manager.
struct Store {
    url: String,
    connection: Arc<ArcSwapOption<ConnectionManager>>,
    /// Whether the store was reached: on connecting, then by the last call.
    up: Arc<AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

/// Per-token limits of this proxy.
#[derive(Debug)]
pub struct Limits {
    local: Mutex<HashMap<String, Local>>,
    epoch: Instant,
    store: Option<Store>,
    on_store_failure: StoreFailure,
}

/// What an admitted request holds until it ends.
#[derive(Debug)]
pub struct Admitted {
    token: String,
    limits: TokenLimits,
    /// Where the request's concurrency slot is: released on drop when local.
    slot: Option<Slot>,
    /// Whether the store counts this request (else this replica, with `peers`).
    shared: bool,
    peers: f64,
}

#[derive(Debug)]
enum Slot {
    /// Held for its drop, which gives the slot back.
    Local {
        _held: LocalSlot,
    },
    Shared {
        member: String,
    },
}

/// A concurrency slot of this replica, given back when dropped (a request future dropped
/// mid-way included).
#[derive(Debug)]
struct LocalSlot {
    limits: Arc<Limits>,
    token: String,
}

impl Drop for LocalSlot {
    fn drop(&mut self) {
        let mut local = self.limits.lock_local();
        if let Some(state) = local.get_mut(&self.token) {
            state.in_progress = state.in_progress.saturating_sub(1);
        }
    }
}

/// GCRA on the store's clock: KEYS[1] holds the TAT in microseconds. ARGV: microseconds per
/// unit, tolerance in microseconds, cost, check (1/0). Returns 0 when taken, else the
/// microseconds to wait.
const RATE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if ARGV[4] == '1' and tat - now > tolerance then
  return math.max(1, math.ceil(tat - tolerance - now))
end
if cost > 0 then
  local next = tat + cost * interval
  redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.ceil((next - now) / 1000) + 1000)
end
return 0
";

static RATE: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RATE_SCRIPT));
static SLOT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SLOT_SCRIPT));

/// A slot in KEYS[1], a sorted set of requests by the instant (ms, store clock) their deadline
/// ends: expired ones are dropped first, so a proxy that died mid-request frees its slots by
/// their deadline. ARGV: limit, member, deadline in ms from now. Returns 1 when taken.
const SLOT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local budget = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + budget, ARGV[2])
redis.call('PEXPIRE', KEYS[1], budget + 1000)
return 1
";

impl Limits {
    /// Limits with an optional store (`redis://host:port`), connected in the background.
    pub fn new(store_url: Option<&str>, on_store_failure: StoreFailure) -> anyhow::Result<Limits> {
        let store = match store_url {
            Some(url) => {
                let client = redis::Client::open(url)?;
                let connection = Arc::new(ArcSwapOption::empty());
                let up = Arc::new(AtomicBool::new(false));
                connect_in_background(client, connection.clone(), up.clone());
                Some(Store {
                    url: url.to_owned(),
                    connection,
                    up,
                })
            }
            None => None,
        };
        Ok(Limits {
            local: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            store,
            on_store_failure,
        })
    }

    /// `Some(reachable)` with a store configured.
    pub fn store_up(&self) -> Option<bool> {
        self.store.as_ref().map(|s| s.up.load(Ordering::Relaxed))
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Admits a request of token record `token` under its `limits`; `peers` is the number of
    /// ready proxy replicas sharing them, `budget` the request's deadline.
    pub async fn admit(
        self: &Arc<Self>,
        token: &str,
        limits: TokenLimits,
        peers: usize,
        request_id: &str,
        budget: Duration,
    ) -> Result<Option<Admitted>, Rejection> {
        if limits == TokenLimits::default() {
            return Ok(None);
        }
        let mut admitted = Admitted {
            token: token.to_owned(),
            limits,
            slot: None,
            shared: false,
            peers: peers.max(1) as f64,
        };
        if self.store.is_some() {
            match self.admit_shared(&mut admitted, request_id, budget).await {
                Ok(result) => return result.map(|()| Some(admitted)),
                Err(StoreDown) => match self.on_store_failure {
                    StoreFailure::Open => return Ok(None),
                    StoreFailure::Closed => return Err(Rejection::LimitsUnavailable),
                    StoreFailure::Local => {}
                },
            }
        }
        self.admit_local(&mut admitted)?;
        Ok(Some(admitted))
    }

    fn admit_local(self: &Arc<Self>, admitted: &mut Admitted) -> Result<(), Rejection> {
        let now = self.now();
        let peers = admitted.peers;
        let limits = admitted.limits;
        let mut local = self.lock_local();
        let state = local.entry(admitted.token.clone()).or_default();
        if let Some(per_minute) = limits.tokens_per_minute {
            let share = per_minute as f64 / peers;
            state
                .tokens
                .take(now, share / 60.0, burst(share), 0.0, true)
                .map_err(|wait| exceeded(Limit::TokensPerMinute, share, wait))?;
        }
        let share_of_slots = limits
            .concurrent_requests
            .map(|n| ((f64::from(n) / peers).floor() as u32).max(1));
        if let Some(slots) = share_of_slots
            && state.in_progress >= slots
        {
            return Err(exceeded(Limit::ConcurrentRequests, f64::from(slots), 1.0));
        }
        if let Some(per_minute) = limits.requests_per_minute {
            let share = f64::from(per_minute) / peers;
            state
                .requests
                .take(now, share / 60.0, burst(share), 1.0, true)
                .map_err(|wait| exceeded(Limit::RequestsPerMinute, share, wait))?;
        }
        if share_of_slots.is_some() {
            state.in_progress += 1;
            drop(local);
            admitted.slot = Some(Slot::Local {
                _held: LocalSlot {
                    limits: self.clone(),
                    token: admitted.token.clone(),
                },
            });
        }
        Ok(())
    }

    async fn admit_shared(
        &self,
        admitted: &mut Admitted,
        request_id: &str,
        budget: Duration,
    ) -> Result<Result<(), Rejection>, StoreDown> {
        let limits = admitted.limits;
        let token = &admitted.token;
        admitted.shared = true;
        if let Some(per_minute) = limits.tokens_per_minute {
            let per_minute = per_minute as f64;
            let wait = self
                .rate(&key(token, "tokens"), per_minute, 0.0, true)
                .await?;
            if wait > 0.0 {
                return Ok(Err(exceeded(Limit::TokensPerMinute, per_minute, wait)));
            }
        }
        if let Some(slots) = limits.concurrent_requests {
            let member = format!("{request_id}:{}", uuid_like());
            let mut invocation = SLOT.key(key(token, "in-progress"));
            invocation
                .arg(slots)
                .arg(&member)
                .arg(budget.as_millis().max(1) as u64);
            let taken: i64 = self
                .on_store(|mut c| async move { invocation.invoke_async(&mut c).await })
                .await?;
            if taken != 1 {
                return Ok(Err(exceeded(
                    Limit::ConcurrentRequests,
                    f64::from(slots),
                    1.0,
                )));
            }
            admitted.slot = Some(Slot::Shared { member });
        }
        if let Some(per_minute) = limits.requests_per_minute {
            let per_minute = f64::from(per_minute);
            let wait = self
                .rate(&key(token, "requests"), per_minute, 1.0, true)
                .await?;
            if wait > 0.0 {
                self.release_shared(admitted).await;
                return Ok(Err(exceeded(Limit::RequestsPerMinute, per_minute, wait)));
            }
        }
        Ok(Ok(()))
    }

    /// Charges what the request used (generation tokens) and gives its slot back.
    pub async fn finish(&self, mut admitted: Admitted, usage: Option<&Usage>) {
        let used = usage.map_or(0.0, |u| {
            u.get(Unit::PromptTokens) + u.get(Unit::CompletionTokens)
        });
        if let Some(per_minute) = admitted.limits.tokens_per_minute
            && used > 0.0
        {
            let per_minute = per_minute as f64;
            let charged = if admitted.shared {
                self.rate(&key(&admitted.token, "tokens"), per_minute, used, false)
                    .await
                    .is_ok()
            } else {
                false
            };
            if !charged {
                let share = per_minute / admitted.peers;
                let now = self.now();
                let mut local = self.lock_local();
                let state = local.entry(admitted.token.clone()).or_default();
                let _ = state
                    .tokens
                    .take(now, share / 60.0, burst(share), used, false);
            }
        }
        self.release_shared(&mut admitted).await;
    }

    async fn release_shared(&self, admitted: &mut Admitted) {
        if let Some(Slot::Shared { member }) = admitted.slot.take() {
            // Should this fail, the slot ends with the request's deadline.
            let mut command = redis::cmd("ZREM");
            command.arg(key(&admitted.token, "in-progress")).arg(member);
            let _: Result<i64, StoreDown> = self
                .on_store(|mut c| async move { command.query_async(&mut c).await })
                .await;
        }
    }

    /// Runs the GCRA script; the seconds to wait (0 when taken).
    async fn rate(
        &self,
        key: &str,
        per_minute: f64,
        cost: f64,
        check: bool,
    ) -> Result<f64, StoreDown> {
        let interval_us = 60_000_000.0 / per_minute;
        let tolerance_us = (burst(per_minute) - 1.0).max(0.0) * interval_us;
        let mut invocation = RATE.key(key);
        invocation
            .arg(format!("{interval_us:.3}"))
            .arg(format!("{tolerance_us:.3}"))
            .arg(format!("{cost}"))
            .arg(if check { "1" } else { "0" });
        let wait_us: i64 = self
            .on_store(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(wait_us as f64 / 1_000_000.0)
    }

    /// Runs `work` on the store's connection within [`STORE_TIMEOUT`].
    async fn on_store<T, F, Fut>(&self, work: F) -> Result<T, StoreDown>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let store = self.store.as_ref().ok_or(StoreDown)?;
        let connection = store.connection.load_full().ok_or(StoreDown)?;
        let result = tokio::time::timeout(STORE_TIMEOUT, work(connection.as_ref().clone())).await;
        self.outcome(store, result)
    }

    fn outcome<T>(
        &self,
        store: &Store,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreDown> {
        match result {
            Ok(Ok(value)) => {
                store.up.store(true, Ordering::Relaxed);
                Ok(value)
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "the limits store failed");
                store.up.store(false, Ordering::Relaxed);
                Err(StoreDown)
            }
            Err(_) => {
                tracing::debug!("the limits store did not answer in time");
                store.up.store(false, Ordering::Relaxed);
                Err(StoreDown)
            }
        }
    }
}

/// The store could not be reached (or answered an error).
#[derive(Debug)]
struct StoreDown;

fn key(token: &str, counter: &str) -> String {
    // One hash slot per token, should the store be a cluster.
    format!("infergate:{{{token}}}:{counter}")
}

/// A member name no other request of any replica uses at once.
fn uuid_like() -> String {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn exceeded(limit: Limit, enforced: f64, wait_seconds: f64) -> Rejection {
    Rejection::LimitExceeded {
        limit,
        enforced,
        retry_after: wait_seconds.ceil().max(1.0) as u32,
    }
}

/// Connects on a thread of its own, retrying every second until the store answers; the
/// manager then reconnects by itself. Requests never wait for this.
fn connect_in_background(
    client: redis::Client,
    slot: Arc<ArcSwapOption<ConnectionManager>>,
    up: Arc<AtomicBool>,
) {
    std::thread::Builder::new()
        .name("limits-store".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the limits store");
            runtime.block_on(async move {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(STORE_TIMEOUT))
                    .set_response_timeout(Some(STORE_TIMEOUT));
                loop {
                    match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                        Ok(manager) => {
                            slot.store(Some(Arc::new(manager)));
                            up.store(true, Ordering::Relaxed);
                            tracing::info!("connected to the limits store");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot reach the limits store; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                // The manager's connection tasks run on this runtime: keep it.
                std::future::pending::<()>().await;
            });
        })
        .expect("a thread for the limits store");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let mut bucket = Gcra::default();
        // 120 a minute: 2 a second, a burst of 2.
        let admitted = (0..10)
            .filter(|_| bucket.take(0.0, 2.0, 2.0, 1.0, true).is_ok())
            .count();
        assert_eq!(admitted, 2);
        let wait = bucket.take(0.0, 2.0, 2.0, 1.0, true).unwrap_err();
        assert!((wait - 0.5).abs() < 1e-9, "{wait}");
        // Over 10 s at most 2 a second more.
        let mut later = 0;
        for step in 1..=100 {
            if bucket
                .take(f64::from(step) * 0.1, 2.0, 2.0, 1.0, true)
                .is_ok()
            {
                later += 1;
            }
        }
        assert_eq!(later, 20);
    }

    #[test]
    fn a_charge_after_the_fact_can_overdraw_and_the_debt_is_waited_out() {
        let mut tokens = Gcra::default();
        // 600 tokens a minute = 10 a second, burst 10.
        assert!(tokens.take(0.0, 10.0, 10.0, 0.0, true).is_ok());
        tokens.take(0.0, 10.0, 10.0, 200.0, false).unwrap();
        let wait = tokens.take(0.0, 10.0, 10.0, 0.0, true).unwrap_err();
        // 200 tokens are 20 s of the rate, less the burst's 0.9 s.
        assert!((wait - 19.1).abs() < 1e-9, "{wait}");
        assert!(tokens.take(19.1, 10.0, 10.0, 0.0, true).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn each_of_n_replicas_admits_its_share_of_the_slots_and_gives_them_back() {
        let limits = Arc::new(Limits::new(None, StoreFailure::Local).unwrap());
        let token = TokenLimits {
            concurrent_requests: Some(7),
            ..TokenLimits::default()
        };
        let budget = Duration::from_secs(10);
        let mut held = Vec::new();
        // 7 over 3 replicas: 2 here.
        for _ in 0..2 {
            held.push(limits.admit("t", token, 3, "r", budget).await.unwrap());
        }
        let refused = limits.admit("t", token, 3, "r", budget).await.unwrap_err();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.code(), "concurrent_requests_exceeded");
        assert_eq!(refused.retry_after(), Some(1));
        limits.finish(held.pop().unwrap().unwrap(), None).await;
        assert!(
            limits
                .admit("t", token, 3, "r", budget)
                .await
                .unwrap()
                .is_some()
        );
        // A request dropped mid-way gives its slot back too.
        drop(held);
        assert!(
            limits
                .admit("t", token, 3, "r", budget)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_refusal_says_when_to_come_back() {
        let limits = Arc::new(Limits::new(None, StoreFailure::Local).unwrap());
        let token = TokenLimits {
            requests_per_minute: Some(6),
            ..TokenLimits::default()
        };
        let budget = Duration::from_secs(10);
        assert!(limits.admit("t", token, 1, "r", budget).await.is_ok());
        let refused = limits.admit("t", token, 1, "r", budget).await.unwrap_err();
        assert_eq!(refused.code(), "requests_per_minute_exceeded");
        assert_eq!(refused.retry_after(), Some(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(limits.admit("t", token, 1, "r", budget).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_cannot_be_reached_follows_the_failure_policy() {
        let token = TokenLimits {
            requests_per_minute: Some(60),
            ..TokenLimits::default()
        };
        let budget = Duration::from_secs(10);
        // Nothing listens on port 1: the store is never reached.
        let url = Some("redis://127.0.0.1:1");
        let closed = Arc::new(Limits::new(url, StoreFailure::Closed).unwrap());
        let refused = closed.admit("t", token, 1, "r", budget).await.unwrap_err();
        assert_eq!(
            (refused.status(), refused.code()),
            (503, "limits_unavailable")
        );
        assert_eq!(closed.store_up(), Some(false));
        let open = Arc::new(Limits::new(url, StoreFailure::Open).unwrap());
        for _ in 0..5 {
            assert!(
                open.admit("t", token, 1, "r", budget)
                    .await
                    .unwrap()
                    .is_none()
            );
        }
        let local = Arc::new(Limits::new(url, StoreFailure::Local).unwrap());
        assert!(local.admit("t", token, 1, "r", budget).await.is_ok());
        assert!(local.admit("t", token, 1, "r", budget).await.is_err());
    }
}
