//! Autoscaling of the ModelDeployments that set `spec.autoscaling`: from the requests in
//! progress that the proxies count per model (forwarded, or held for a model with no ready pod)
//! to `spec.replicas`, through the scale subresource.
//!
//! The decision is the Kubernetes HPA algorithm (docs/architecture.md, autoscaling, says where
//! it differs): a recommendation of `ceil(load / target)`, kept at the current size while the
//! load per replica is within 10 % of the target; scale-up takes the lowest recommendation of
//! its stabilization window and scale-down the highest of its own, so a short peak or dip
//! changes nothing. Zero is special both ways: a model leaves zero at once when a request is
//! held for it, and reaches zero only after `scaleToZeroAfterSeconds` without any request.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crds::{Autoscaling, AutoscalingStatus, DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS, ModelDeployment};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::apply::apply_status_as;
use crate::controller::Context;

/// The HPA's default tolerance: no change while load per replica is within 10 % of the target.
pub const TOLERANCE: f64 = 0.1;
/// Field manager of the autoscaler's writes (`spec.replicas`, `status.autoscaling`), apart from
/// the reconciler's so that neither removes what the other owns.
pub const FIELD_MANAGER: &str = "infergate-autoscaler";
/// How often the status is refreshed when the replica count does not change.
const STATUS_REFRESH: Duration = Duration::from_secs(15);
/// The largest metrics page read from a proxy.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// The demand on one model over the last sampling interval, summed over the proxies.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Average number of requests in progress (held or forwarded).
    pub in_flight: f64,
    /// Requests held now, waiting for a ready pod.
    pub held: u64,
}

impl Load {
    fn is_idle(&self) -> bool {
        self.in_flight <= 0.0 && self.held == 0
    }
}

/// A change of `spec.replicas` and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub replicas: i32,
    pub message: String,
}

/// The autoscaler's memory of one ModelDeployment: its recent recommendations and when it last
/// had a request.
#[derive(Debug, Clone)]
pub struct Scaler {
    recommendations: VecDeque<(Instant, i32)>,
    last_busy: Instant,
    last_change: Option<Instant>,
}

impl Scaler {
    /// A scaler that starts counting idle time at `now`: a new leader does not take the last
    /// pod of a model it has not watched for `scaleToZeroAfterSeconds`.
    pub fn new(now: Instant) -> Scaler {
        Scaler {
            recommendations: VecDeque::new(),
            last_busy: now,
            last_change: None,
        }
    }

    /// The replica count `spec` asks for at `now`, given the `current` count and the `load`;
    /// `None` when it stays as it is.
    pub fn decide(
        &mut self,
        now: Instant,
        spec: &Autoscaling,
        current: i32,
        load: Load,
    ) -> Option<Decision> {
        if !load.is_idle() {
            self.last_busy = now;
        }
        let target = spec.in_flight_per_replica;
        let demand = load.in_flight.max(load.held as f64);
        let wanted = (demand / target).ceil() as i32;
        // The HPA's recommendation before stabilization and bounds.
        let recommendation =
            if current > 0 && (demand / (target * current as f64) - 1.0).abs() <= TOLERANCE {
                current
            } else {
                wanted
            };
        let window = Duration::from_secs(
            spec.scale_up_stabilization_seconds
                .max(spec.scale_down_stabilization_seconds)
                .max(0) as u64,
        );
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > window)
        {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back((now, recommendation));
        let within = |seconds: i32| {
            let seconds = Duration::from_secs(seconds.max(0) as u64);
            self.recommendations
                .iter()
                .filter(move |(at, _)| now.duration_since(*at) <= seconds)
                .map(|(_, r)| *r)
        };
        let up = within(spec.scale_up_stabilization_seconds)
            .min()
            .unwrap_or(recommendation);
        let down = within(spec.scale_down_stabilization_seconds)
            .max()
            .unwrap_or(recommendation);
        let mut next = current.max(up).min(down);

        let idle_for = now.duration_since(self.last_busy);
        let zero_after = Duration::from_secs(
            spec.scale_to_zero_after_seconds
                .unwrap_or(DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS)
                .max(0) as u64,
        );
        let floor = match spec.min_replicas {
            0 if current == 0 && load.is_idle() => 0,
            0 if idle_for >= zero_after && load.is_idle() => 0,
            0 => 1,
            min => min,
        };
        if current == 0 && !load.is_idle() {
            // A held request waits for this pod: no stabilization window delays it.
            next = next.max(wanted).max(1);
        }
        let mut next = next.max(floor).min(spec.max_replicas.max(floor));
        let down_window = Duration::from_secs(spec.scale_down_stabilization_seconds.max(0) as u64);
        if next < current
            && current <= spec.max_replicas
            && self
                .last_change
                .is_some_and(|at| now.duration_since(at) < down_window)
        {
            // As load falls, the window's highest recommendation falls in steps (the second
            // in which clients left counts part of their load): one scale-down per window, not
            // a staircase of them.
            next = current;
        }
        if next == current {
            return None;
        }
        self.last_change = Some(now);
        let message = if next == 0 {
            format!(
                "scaled {current} → 0: no request for {} s",
                idle_for.as_secs()
            )
        } else if current == 0 {
            format!(
                "scaled 0 → {next}: {} request(s) held, {demand:.1} in flight, target {target} per replica",
                load.held
            )
        } else {
            let plain = wanted.max(floor).min(spec.max_replicas.max(floor));
            let windows = if next > plain {
                format!(
                    "; the last {} s still ask for {next}",
                    spec.scale_down_stabilization_seconds
                )
            } else if next < plain {
                format!(
                    "; the last {} s ask for no more",
                    spec.scale_up_stabilization_seconds
                )
            } else {
                String::new()
            };
            format!(
                "scaled {current} → {next}: {demand:.1} in flight, target {target} per replica{windows}"
            )
        };
        Some(Decision {
            replicas: next,
            message,
        })
    }
}

/// The counters one proxy reported, by model id: the integral of requests in progress
/// (seconds) and the requests held now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyReport {
    pub demand_seconds: HashMap<String, f64>,
    pub held: HashMap<String, u64>,
}

/// Reads the autoscaler's two series out of a proxy's Prometheus text page.
pub fn parse_report(page: &str) -> ProxyReport {
    let mut report = ProxyReport::default();
    for line in page.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, model) = match series.split_once("{model=\"") {
            Some((name, rest)) => match rest.strip_suffix("\"}") {
                Some(model) => (name, model.to_owned()),
                None => continue,
            },
            None => continue,
        };
        match name {
            "infergate_proxy_demand_seconds_total" => {
                report.demand_seconds.insert(model, value);
            }
            "infergate_proxy_held" => {
                report.held.insert(model, value.max(0.0) as u64);
            }
            _ => {}
        }
    }
    report
}

/// Turns successive reports of each proxy into the load per model: the rate of each proxy's
/// demand integral since its previous report, summed.
#[derive(Debug, Default)]
pub struct LoadMeter {
    previous: HashMap<String, (Instant, ProxyReport)>,
}

impl LoadMeter {
    /// Takes this round's reports (proxy pod uid → when read, what it said) and returns the
    /// load per model. A proxy seen for the first time adds its held requests only; a proxy not
    /// in `reports` is forgotten.
    pub fn measure(
        &mut self,
        reports: Vec<(String, Instant, ProxyReport)>,
    ) -> HashMap<String, Load> {
        let mut loads: HashMap<String, Load> = HashMap::new();
        let mut seen = HashMap::new();
        for (proxy, at, report) in reports {
            for (model, held) in &report.held {
                loads.entry(model.clone()).or_default().held += held;
            }
            if let Some((before, previous)) = self.previous.get(&proxy) {
                let elapsed = at.duration_since(*before).as_secs_f64();
                for (model, total) in &report.demand_seconds {
                    let earlier = previous.demand_seconds.get(model).copied().unwrap_or(0.0);
                    // A restarted proxy starts its counter again from zero.
                    let added = if *total >= earlier {
                        total - earlier
                    } else {
                        *total
                    };
                    if elapsed > 0.0 {
                        loads.entry(model.clone()).or_default().in_flight += added / elapsed;
                    }
                }
            }
            seen.insert(proxy, (at, report));
        }
        self.previous = seen;
        loads
    }
}

/// Reads `GET /metrics` of one proxy: HTTP/1.1 with `Connection: close`, the whole page.
pub async fn read_metrics(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream
            .take(MAX_METRICS_BYTES as u64)
            .read_to_end(&mut response)
            .await?;
        let text = String::from_utf8(response)?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("no end of headers"))?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "answered {}",
            head.lines().next().unwrap_or_default()
        );
        anyhow::ensure!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "a chunked metrics page"
        );
        Ok::<_, anyhow::Error>(body.to_owned())
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {timeout:?}"))?
}

/// Where and how often the autoscaler reads the proxies.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    /// How often the tokens' usage read from the proxies is added to their status.
    pub usage_interval: Duration,
    /// Label selector of the proxy pods in the gateway namespace.
    pub proxy_selector: String,
    pub proxy_metrics_port: u16,
}

impl Default for Settings {
    /// The chart's: read every second, the proxy pods by their name label, metrics on 9090.
    fn default() -> Settings {
        Settings {
            interval: Duration::from_secs(1),
            usage_interval: Duration::from_secs(30),
            proxy_selector: "app.kubernetes.io/name=infergate-proxy".to_owned(),
            proxy_metrics_port: 9090,
        }
    }
}

/// The autoscaler's loop: every interval, read every proxy pod, then decide for every
/// ModelDeployment with `spec.autoscaling`; every usage interval, add what the tokens were
/// used for to their status (`crate::usage`). Runs on the leader only, beside the controllers.
pub async fn run(ctx: Arc<Context>, models: Store<ModelDeployment>) {
    let settings = ctx.config.autoscaler.clone();
    let (proxies, writer) = reflector::store::<Pod>();
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ctx.config.gateway_namespace);
    let watch = reflector(
        writer,
        watcher(
            pods,
            watcher::Config::default().labels(&settings.proxy_selector),
        ),
    )
    .default_backoff()
    .for_each(|_| async {});
    tokio::pin!(watch);
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut meter = LoadMeter::default();
    let mut ledger = crate::usage::Ledger::default();
    let mut usage_written = Instant::now();
    let mut scalers: HashMap<String, Scaler> = HashMap::new();
    let mut written: HashMap<String, (Instant, AutoscalingStatus)> = HashMap::new();
    loop {
        tokio::select! {
            () = &mut watch => return,
            _ = ticker.tick() => {}
        }
        let reads = proxies.state().into_iter().filter_map(|pod| {
            let ip = pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?;
            let uid = pod.uid()?;
            let addr = SocketAddr::new(ip, settings.proxy_metrics_port);
            let timeout = settings.interval;
            Some(async move {
                match read_metrics(addr, timeout).await {
                    Ok(page) => Some((
                        uid,
                        Instant::now(),
                        parse_report(&page),
                        (
                            crate::usage::parse_token_counters(&page),
                            crate::enforcement::parse_proxy_limits(&page),
                        ),
                    )),
                    Err(error) => {
                        tracing::debug!(%addr, %error, "could not read a proxy's metrics");
                        None
                    }
                }
            })
        });
        let (reports, tokens): (Vec<_>, Vec<_>) = futures::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
            .map(|(uid, at, report, tokens)| ((uid.clone(), at, report), (uid, tokens)))
            .unzip();
        let loads = meter.measure(reports);
        let (usage, limits): (Vec<_>, Vec<_>) = tokens
            .into_iter()
            .map(|(uid, (usage, limits))| ((uid, usage), limits))
            .unzip();
        ledger.observe(usage);
        if usage_written.elapsed() >= settings.usage_interval {
            match crate::usage::list_tokens(&ctx).await {
                Ok(tokens) => {
                    crate::usage::publish(&ctx, &mut ledger, &tokens).await;
                    crate::enforcement::publish(&ctx, &limits, &tokens).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "could not list AccessTokens to write their status");
                }
            }
            usage_written = Instant::now();
        }
        let now = Instant::now();

        let autoscaled: Vec<_> = models
            .state()
            .into_iter()
            .filter(|md| md.spec.autoscaling.is_some() && md.metadata.deletion_timestamp.is_none())
            .collect();
        let live: std::collections::HashSet<String> =
            autoscaled.iter().filter_map(|md| md.uid()).collect();
        scalers.retain(|uid, _| live.contains(uid));
        written.retain(|uid, _| live.contains(uid));
        for md in autoscaled {
            let (Some(uid), Some(id), Some(spec)) = (
                md.uid(),
                md.model_version_id(),
                md.spec.autoscaling.as_ref(),
            ) else {
                continue;
            };
            let load = loads.get(&id).copied().unwrap_or_default();
            let current = md.spec.replicas;
            let decision = scalers
                .entry(uid.clone())
                .or_insert_with(|| Scaler::new(now))
                .decide(now, spec, current, load);
            let previous = written
                .get(&uid)
                .map(|(_, status)| status.clone())
                .or_else(|| md.status.as_ref().and_then(|s| s.autoscaling.clone()));
            let mut status = AutoscalingStatus {
                desired_replicas: current,
                in_flight: (load.in_flight.max(load.held as f64) * 10.0).round() / 10.0,
                last_scale_time: previous.as_ref().and_then(|p| p.last_scale_time.clone()),
                message: previous
                    .as_ref()
                    .map(|p| p.message.clone())
                    .unwrap_or_default(),
            };
            if let Some(decision) = &decision {
                if let Err(error) = scale(&ctx, &md, decision.replicas).await {
                    tracing::warn!(model_deployment = %md.name_any(), %error, "could not scale");
                    continue;
                }
                tracing::info!(model_deployment = %md.name_any(), namespace = %md.namespace().unwrap_or_default(), "{}", decision.message);
                // Events of one action are merged into a series that keeps the first note:
                // an action per change keeps each kind of change readable.
                let action = format!("ScaleFrom{current}To{}", decision.replicas);
                ctx.event(
                    md.as_ref(),
                    false,
                    "Scaled",
                    &action,
                    decision.message.clone(),
                )
                .await;
                status.desired_replicas = decision.replicas;
                status.last_scale_time = Some(Time(jiff::Timestamp::now()));
                status.message = decision.message.clone();
            }
            let stale = match written.get(&uid) {
                Some((at, last)) => {
                    decision.is_some()
                        || (now.duration_since(*at) >= STATUS_REFRESH && *last != status)
                }
                None => previous.as_ref() != Some(&status),
            };
            if stale {
                match write_status(&ctx, &md, &status).await {
                    Ok(()) => {
                        written.insert(uid, (now, status));
                    }
                    Err(error) => {
                        tracing::warn!(model_deployment = %md.name_any(), %error, "could not write the autoscaling status")
                    }
                }
            }
        }
    }
}

async fn scale(ctx: &Context, md: &ModelDeployment, replicas: i32) -> Result<(), kube::Error> {
    let api: Api<ModelDeployment> =
        Api::namespaced(ctx.client.clone(), &md.namespace().unwrap_or_default());
    api.patch_scale(
        &md.name_any(),
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        },
        &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
    )
    .await?;
    Ok(())
}

async fn write_status(
    ctx: &Context,
    md: &ModelDeployment,
    status: &AutoscalingStatus,
) -> Result<(), kube::Error> {
    let status = serde_json::json!({"autoscaling": status});
    apply_status_as(FIELD_MANAGER, md, &status, &ctx.client).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: i32, max: i32, target: f64, up: i32, down: i32, zero: Option<i32>) -> Autoscaling {
        Autoscaling {
            min_replicas: min,
            max_replicas: max,
            in_flight_per_replica: target,
            scale_up_stabilization_seconds: up,
            scale_down_stabilization_seconds: down,
            scale_to_zero_after_seconds: zero,
        }
    }

    fn busy(in_flight: f64) -> Load {
        Load { in_flight, held: 0 }
    }

    /// Runs one decision per second over `loads`, applying each change, and returns the
    /// replica count after each second.
    fn replay(spec: &Autoscaling, start: i32, loads: &[Load]) -> Vec<i32> {
        let t0 = Instant::now();
        let mut scaler = Scaler::new(t0);
        let mut current = start;
        loads
            .iter()
            .enumerate()
            .map(|(second, load)| {
                let now = t0 + Duration::from_secs(second as u64 + 1);
                if let Some(decision) = scaler.decide(now, spec, current, *load) {
                    current = decision.replicas;
                }
                current
            })
            .collect()
    }

    #[test]
    fn replicas_follow_load_over_target_rounded_up() {
        let spec = spec(1, 10, 8.0, 0, 0, None);
        assert_eq!(replay(&spec, 2, &[busy(37.0)]), [5]);
        assert_eq!(replay(&spec, 5, &[busy(9.0)]), [2]);
    }

    #[test]
    fn load_within_the_tolerance_of_the_target_changes_nothing() {
        let spec = spec(1, 10, 10.0, 0, 0, None);
        // 3 replicas within 10 % of their target stay 3, though ceil(32/10) is 4.
        assert_eq!(replay(&spec, 3, &[busy(32.0), busy(28.0)]), [3, 3]);
        assert_eq!(replay(&spec, 3, &[busy(34.0)]), [4]);
        assert_eq!(replay(&spec, 3, &[busy(19.0)]), [2]);
    }

    #[test]
    fn bounds_hold_whatever_the_load() {
        let spec = spec(2, 4, 1.0, 0, 0, None);
        assert_eq!(replay(&spec, 3, &[busy(100.0)]), [4]);
        assert_eq!(replay(&spec, 3, &[busy(0.0)]), [2]);
        // A count set by hand below the minimum is raised.
        assert_eq!(replay(&spec, 0, &[busy(0.0)]), [2]);
    }

    #[test]
    fn scale_down_waits_for_its_window_of_lower_recommendations() {
        let spec = spec(1, 10, 1.0, 0, 5, None);
        let mut loads = vec![busy(4.0); 3];
        loads.extend(vec![busy(1.0); 8]);
        let replicas = replay(&spec, 4, &loads);
        // The load fell at second 4; the highest recommendation of the last 5 s is 4 until
        // second 9.
        assert_eq!(replicas, [4, 4, 4, 4, 4, 4, 4, 4, 1, 1, 1]);
    }

    #[test]
    fn falling_load_scales_down_once_per_window_not_in_a_staircase() {
        let spec = spec(1, 10, 1.0, 0, 5, None);
        // 6 in flight, then a second at 3 while clients leave, then 1.
        let mut loads = vec![busy(6.0); 2];
        loads.push(busy(3.0));
        loads.extend(vec![busy(1.0); 12]);
        let replicas = replay(&spec, 6, &loads);
        // The 6s leave the window at second 8 (→ 3); the next step waits 5 s (→ 1 at 13).
        assert_eq!(replicas, [6, 6, 6, 6, 6, 6, 6, 3, 3, 3, 3, 3, 1, 1, 1]);
        let t0 = Instant::now();
        let mut scaler = Scaler::new(t0);
        assert_eq!(scaler.decide(t0, &spec, 6, busy(6.0)), None);
        let at = |seconds: u64| t0 + Duration::from_secs(seconds);
        assert_eq!(scaler.decide(at(2), &spec, 6, busy(3.0)), None);
        let step = scaler.decide(at(6), &spec, 6, busy(1.0)).unwrap();
        assert_eq!(
            step.message,
            "scaled 6 → 3: 1.0 in flight, target 1 per replica; the last 5 s still ask for 3"
        );
    }

    #[test]
    fn a_short_dip_inside_the_window_removes_no_pod() {
        let spec = spec(1, 10, 1.0, 0, 5, None);
        let loads = [
            busy(4.0),
            busy(4.0),
            busy(0.5),
            busy(0.5),
            busy(4.0),
            busy(4.0),
        ];
        assert_eq!(replay(&spec, 4, &loads), [4; 6]);
    }

    #[test]
    fn scale_up_takes_the_lowest_recommendation_of_its_window() {
        let spec = spec(1, 10, 1.0, 3, 0, None);
        let loads = [busy(1.0), busy(6.0), busy(6.0), busy(6.0), busy(6.0)];
        // 6 in flight from second 2: every recommendation of the last 3 s is 6 at second 5.
        assert_eq!(replay(&spec, 1, &loads), [1, 1, 1, 1, 6]);
    }

    #[test]
    fn an_idle_model_reaches_zero_only_after_its_idle_time() {
        let spec = spec(0, 3, 2.0, 0, 2, Some(6));
        let mut loads = vec![busy(2.0); 2];
        loads.extend(vec![busy(0.0); 8]);
        let replicas = replay(&spec, 1, &loads);
        // Last request at second 2; zero at second 8.
        assert_eq!(replicas, [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn a_held_request_brings_a_model_back_from_zero_at_once() {
        let spec = spec(0, 3, 2.0, 30, 300, Some(60));
        let held = Load {
            in_flight: 0.2,
            held: 1,
        };
        assert_eq!(replay(&spec, 0, &[busy(0.0), busy(0.0), held]), [0, 0, 1]);
        let crowd = Load {
            in_flight: 5.0,
            held: 5,
        };
        assert_eq!(replay(&spec, 0, &[crowd]), [3]);
    }

    #[test]
    fn a_model_at_zero_without_requests_stays_at_zero() {
        let spec = spec(0, 3, 2.0, 0, 0, Some(60));
        assert_eq!(replay(&spec, 0, &[busy(0.0); 5]), [0; 5]);
    }

    #[test]
    fn decisions_say_what_changed_and_why() {
        let spec = spec(0, 10, 8.0, 0, 0, Some(0));
        let t0 = Instant::now();
        let mut scaler = Scaler::new(t0);
        let up = scaler.decide(t0, &spec, 2, busy(37.0)).unwrap();
        assert_eq!(
            up.message,
            "scaled 2 → 5: 37.0 in flight, target 8 per replica"
        );
        let held = Load {
            in_flight: 0.0,
            held: 2,
        };
        let from_zero = scaler.decide(t0, &spec, 0, held).unwrap();
        assert_eq!(
            from_zero.message,
            "scaled 0 → 1: 2 request(s) held, 2.0 in flight, target 8 per replica"
        );
        let later = t0 + Duration::from_secs(30);
        let to_zero = scaler.decide(later, &spec, 1, busy(0.0)).unwrap();
        assert_eq!(to_zero.message, "scaled 1 → 0: no request for 30 s");
    }

    #[test]
    fn the_report_of_a_proxy_is_read_from_its_metrics_page() {
        let page = "# HELP infergate_proxy_demand_seconds_total x\n\
            # TYPE infergate_proxy_demand_seconds_total counter\n\
            infergate_proxy_demand_seconds_total{model=\"chat-1\"} 12.5\n\
            infergate_proxy_demand_seconds_total{model=\"minilm\"} 0\n\
            infergate_proxy_held{model=\"chat-1\"} 3\n\
            infergate_proxy_inflight{model=\"chat-1\"} 7\n";
        let report = parse_report(page);
        assert_eq!(report.demand_seconds["chat-1"], 12.5);
        assert_eq!(report.demand_seconds["minilm"], 0.0);
        assert_eq!(report.held["chat-1"], 3);
        assert_eq!(report.held.len(), 1);
    }

    #[test]
    fn load_is_the_rate_of_each_proxys_integral_summed() {
        let report = |pairs: &[(&str, f64)], held: &[(&str, u64)]| ProxyReport {
            demand_seconds: pairs.iter().map(|(m, v)| (m.to_string(), *v)).collect(),
            held: held.iter().map(|(m, v)| (m.to_string(), *v)).collect(),
        };
        let t0 = Instant::now();
        let t2 = t0 + Duration::from_secs(2);
        let mut meter = LoadMeter::default();
        let first = meter.measure(vec![
            ("a".into(), t0, report(&[("m", 10.0)], &[])),
            ("b".into(), t0, report(&[("m", 100.0)], &[("m", 1)])),
        ]);
        // Nothing to difference yet; held requests count at once.
        assert_eq!(
            first["m"],
            Load {
                in_flight: 0.0,
                held: 1
            }
        );
        let second = meter.measure(vec![
            ("a".into(), t2, report(&[("m", 16.0)], &[])),
            // Proxy b restarted: its counter began again from zero.
            ("b".into(), t2, report(&[("m", 2.0)], &[])),
        ]);
        assert_eq!(
            second["m"],
            Load {
                in_flight: 4.0,
                held: 0
            }
        );
    }
}
