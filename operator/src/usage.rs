//! Each AccessToken's `status.usage`: the proxies count requests and work per token record id
//! (the AccessToken's UID) in their metrics; the operator, which reads every proxy's page for
//! the autoscaler anyway, adds up how much each counter grew on each proxy and adds that to
//! the token's status every `--usage-interval-seconds`.
//!
//! A counter that went down belongs to a restarted proxy and counts from zero. What the proxies
//! counted before the operator's first reading is in the status already, or lost with the
//! operator that did not write it: that first reading is only a baseline.

use std::collections::{BTreeMap, HashMap, HashSet};

use crds::{AccessToken, TokenUsage};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::apply::apply_status_as;
use crate::controller::Context;

/// Field manager of `status.usage`: it owns that field alone.
const FIELD_MANAGER: &str = "infergate-usage";

/// What a counter counts, for one token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Figure {
    /// Requests of a status class (`2xx`, `4xx`, `5xx`).
    Requests(String),
    /// Work in a task's unit.
    Units(String),
}

/// One proxy's per-token counters, and when each token was last used (Unix seconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenCounters {
    pub counts: HashMap<(String, Figure), f64>,
    pub last_used: HashMap<String, f64>,
}

/// The per-token series of a proxy's Prometheus text page.
pub fn parse_token_counters(page: &str) -> TokenCounters {
    let mut counters = TokenCounters::default();
    for line in page.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (Some((name, labels)), Ok(value)) = (series.split_once('{'), value.parse::<f64>())
        else {
            continue;
        };
        let labels = parse_labels(labels.trim_end_matches('}'));
        let label = |key: &str| labels.get(key).cloned();
        let Some(token) = label("token") else {
            continue;
        };
        let figure = match name {
            "infergate_proxy_token_requests_total" => label("class").map(Figure::Requests),
            "infergate_proxy_token_usage_total" => label("unit").map(Figure::Units),
            "infergate_proxy_token_last_used_timestamp_seconds" => {
                counters.last_used.insert(token, value);
                continue;
            }
            _ => continue,
        };
        if let Some(figure) = figure {
            // One series per model: a token's figure sums them.
            *counters.counts.entry((token, figure)).or_default() += value;
        }
    }
    counters
}

/// `k="v",k="v"` as the text format writes label pairs (our values never hold quotes).
fn parse_labels(text: &str) -> HashMap<String, String> {
    text.split("\",")
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((key.to_owned(), value.trim_end_matches('"').to_owned()))
        })
        .collect()
}

/// What each token gained since the last write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gain {
    pub requests: BTreeMap<String, f64>,
    pub units: BTreeMap<String, f64>,
    pub last_used: Option<f64>,
}

/// The increases of every proxy's counters, per token, not yet in any status.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The last counters read from each proxy pod (by UID).
    seen: HashMap<String, TokenCounters>,
    /// Whether a reading was taken: a proxy first met later started counting from zero.
    primed: bool,
    gained: HashMap<String, Gain>,
}

impl Ledger {
    /// Takes one round of readings, by proxy pod UID; pods not in it are forgotten.
    pub fn observe(&mut self, readings: Vec<(String, TokenCounters)>) {
        let live: HashSet<&String> = readings.iter().map(|(pod, _)| pod).collect();
        self.seen.retain(|pod, _| live.contains(pod));
        for (pod, counters) in readings {
            let previous = self.seen.get(&pod);
            if previous.is_some() || self.primed {
                for ((token, figure), value) in &counters.counts {
                    let before = previous
                        .and_then(|p| p.counts.get(&(token.clone(), figure.clone())))
                        .copied()
                        .unwrap_or(0.0);
                    let grown = if *value >= before {
                        value - before
                    } else {
                        *value
                    };
                    if grown > 0.0 {
                        let gain = self.gained.entry(token.clone()).or_default();
                        let (map, key) = match figure {
                            Figure::Requests(class) => (&mut gain.requests, class),
                            Figure::Units(unit) => (&mut gain.units, unit),
                        };
                        *map.entry(key.clone()).or_default() += grown;
                    }
                }
                for (token, at) in &counters.last_used {
                    let newer = previous
                        .and_then(|p| p.last_used.get(token))
                        .is_none_or(|before| at > before);
                    if newer {
                        let gain = self.gained.entry(token.clone()).or_default();
                        gain.last_used = Some(gain.last_used.map_or(*at, |t| t.max(*at)));
                    }
                }
            }
            self.seen.insert(pod, counters);
        }
        self.primed = true;
    }

    /// The gains not yet written, by token record id.
    pub fn take(&mut self) -> HashMap<String, Gain> {
        std::mem::take(&mut self.gained)
    }

    /// Puts back a gain that could not be written, to go with the next write.
    pub fn restore(&mut self, token: String, gain: Gain) {
        let kept = self.gained.entry(token).or_default();
        for (class, n) in gain.requests {
            *kept.requests.entry(class).or_default() += n;
        }
        for (unit, n) in gain.units {
            *kept.units.entry(unit).or_default() += n;
        }
        kept.last_used = match (kept.last_used, gain.last_used) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// `previous` with `gain` added, as of `now`.
pub fn add(previous: Option<&TokenUsage>, gain: &Gain, now: jiff::Timestamp) -> TokenUsage {
    let mut usage = previous.cloned().unwrap_or_default();
    for (class, n) in &gain.requests {
        let n = n.round() as u64;
        *usage.requests_by_class.entry(class.clone()).or_default() += n;
        usage.requests += n;
    }
    for (unit, n) in &gain.units {
        let total = usage.units.entry(unit.clone()).or_default();
        // Seconds keep milliseconds; counts stay whole.
        *total = ((*total + n) * 1000.0).round() / 1000.0;
    }
    if let Some(at) = gain
        .last_used
        .and_then(|s| jiff::Timestamp::from_millisecond((s * 1000.0) as i64).ok())
    {
        let later = usage.last_used_at.as_ref().is_none_or(|t| t.0 < at);
        if later {
            usage.last_used_at = Some(Time(at));
        }
    }
    usage.updated_at = Some(Time(now));
    usage
}

/// The AccessTokens the operator reconciles, for their status.
pub async fn list_tokens(ctx: &Context) -> Result<Vec<AccessToken>, kube::Error> {
    let tokens: Api<AccessToken> = match &ctx.config.watch_namespace {
        Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
        None => Api::all(ctx.client.clone()),
    };
    Ok(tokens.list(&ListParams::default()).await?.items)
}

/// Adds every gain to its AccessToken's `status.usage`. A token that is gone takes its gain
/// with it; one that could not be written keeps it for the next round.
pub async fn publish(ctx: &Context, ledger: &mut Ledger, tokens: &[AccessToken]) {
    let gains = ledger.take();
    if gains.is_empty() {
        return;
    }
    let by_uid: HashMap<String, &AccessToken> = tokens
        .iter()
        .filter_map(|token| Some((token.uid()?, token)))
        .collect();
    let now = jiff::Timestamp::now();
    for (uid, gain) in gains {
        let Some(token) = by_uid.get(&uid).copied() else {
            continue;
        };
        let previous = token.status.as_ref().and_then(|s| s.usage.as_ref());
        let usage = add(previous, &gain, now);
        let status = serde_json::json!({"usage": usage});
        if let Err(error) = apply_status_as(FIELD_MANAGER, token, &status, &ctx.client).await {
            tracing::warn!(access_token = %token.name_any(), %error, "could not write usage");
            ledger.restore(uid, gain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP infergate_proxy_token_requests_total Requests.
# TYPE infergate_proxy_token_requests_total counter
infergate_proxy_token_requests_total{class="2xx",model="chat",token="u1"} 5
infergate_proxy_token_requests_total{class="2xx",model="embed",token="u1"} 2
infergate_proxy_token_requests_total{class="4xx",model="chat",token="u1"} 1
infergate_proxy_token_usage_total{model="chat",token="u1",unit="completion_tokens"} 40
infergate_proxy_token_last_used_timestamp_seconds{token="u1"} 1764936000.5
infergate_proxy_requests_total{code="200",model="chat"} 7
"#;

    fn reading(pod: &str, page: &str) -> (String, TokenCounters) {
        (pod.to_owned(), parse_token_counters(page))
    }

    #[test]
    fn a_page_gives_each_tokens_figures_summed_over_models() {
        let counters = parse_token_counters(PAGE);
        let count = |figure| counters.counts[&("u1".to_owned(), figure)];
        assert_eq!(count(Figure::Requests("2xx".into())), 7.0);
        assert_eq!(count(Figure::Requests("4xx".into())), 1.0);
        assert_eq!(count(Figure::Units("completion_tokens".into())), 40.0);
        assert_eq!(counters.last_used["u1"], 1_764_936_000.5);
        assert_eq!(counters.counts.len(), 3);
    }

    #[test]
    fn the_first_reading_is_a_baseline_and_later_ones_add_their_growth() {
        let mut ledger = Ledger::default();
        ledger.observe(vec![reading("a", PAGE)]);
        assert!(
            ledger.take().is_empty(),
            "counted before: not counted again"
        );
        let grown = PAGE
            .replace("token=\"u1\"} 5", "token=\"u1\"} 8")
            .replace("} 40", "} 52");
        ledger.observe(vec![reading("a", &grown)]);
        let gain = &ledger.take()["u1"];
        assert_eq!(gain.requests, BTreeMap::from([("2xx".to_owned(), 3.0)]));
        assert_eq!(
            gain.units,
            BTreeMap::from([("completion_tokens".to_owned(), 12.0)])
        );
        assert_eq!(gain.last_used, None, "not used since");
    }

    #[test]
    fn a_proxy_met_later_or_restarted_counts_from_zero() {
        let mut ledger = Ledger::default();
        ledger.observe(vec![reading("a", PAGE)]);
        let restarted = PAGE.replace("token=\"u1\"} 5", "token=\"u1\"} 1");
        ledger.observe(vec![reading("a", &restarted), reading("b", PAGE)]);
        let gain = &ledger.take()["u1"];
        // a's 2xx (both models) went from 7 to 3: a restart, so 3; b is new: all 7 of its own.
        assert_eq!(gain.requests["2xx"], 3.0 + 7.0);
        assert_eq!(gain.requests["4xx"], 1.0);
        assert_eq!(gain.last_used, Some(1_764_936_000.5));
    }

    #[test]
    fn gains_add_to_the_status_and_a_failed_write_keeps_them() {
        let mut ledger = Ledger::default();
        ledger.observe(vec![]);
        ledger.observe(vec![reading("a", PAGE)]);
        let gain = ledger.take().remove("u1").unwrap();
        let now: jiff::Timestamp = "2026-12-05T12:00:00Z".parse().unwrap();
        let first = add(None, &gain, now);
        assert_eq!(first.requests, 8);
        assert_eq!(first.requests_by_class["2xx"], 7);
        assert_eq!(first.units["completion_tokens"], 40.0);
        assert_eq!(
            first.last_used_at.as_ref().unwrap().0.to_string(),
            "2025-12-05T12:00:00.5Z"
        );
        let second = add(Some(&first), &gain, now);
        assert_eq!(second.requests, 16);
        assert_eq!(second.units["completion_tokens"], 80.0);

        ledger.restore("u1".into(), gain.clone());
        ledger.restore("u1".into(), gain);
        assert_eq!(ledger.take()["u1"].requests["2xx"], 14.0);
    }
}
