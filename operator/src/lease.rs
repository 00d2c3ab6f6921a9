//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas
//! exactly one writes.
//!
//! The rules are client-go's: a holder renews its Lease every `retry` period; another replica
//! takes it over only after it has watched the Lease stay unchanged for a whole lease duration,
//! measured on its own clock (never by comparing the holder's timestamps with its own, so
//! clock skew between nodes cannot elect two leaders); a holder that cannot renew within the
//! renew deadline stops leading at once.

use std::future::Future;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

/// Timing of the election; client-go's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a Lease left unrenewed keeps others from taking it.
    pub lease_duration: Duration,
    /// How long the holder keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the holder renews and the others try.
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// One replica's view of the election.
#[derive(Debug)]
pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The Lease as last seen (holder and renew time) and when this replica first saw it so.
    observed: Option<(String, Instant)>,
}

/// Whether `identity` may write the Lease `spec`, which has looked the same for `unchanged_for`.
pub fn may_hold(
    spec: &LeaseSpec,
    identity: &str,
    unchanged_for: Duration,
    lease_duration: Duration,
) -> bool {
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(holder) if holder == identity => true,
        Some(_) => unchanged_for >= lease_duration,
    }
}

/// Why this replica stopped leading.
#[derive(Debug, thiserror::Error)]
#[error("lost the leader Lease: no renewal succeeded for {0:?}")]
pub struct LostLease(Duration);

impl LeaderLease {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: Timing) -> LeaderLease {
        LeaderLease {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observed: None,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let held_before = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs() as i32),
            acquire_time: if held_before {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if held_before || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease when the rules allow; `Ok(true)` when this replica holds it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = format!(
            "{:?}/{:?}",
            spec.holder_identity,
            spec.renew_time.as_ref().map(|t| t.0)
        );
        let first_seen = match &self.observed {
            Some((previous, since)) if *previous == seen => *since,
            _ => {
                self.observed = Some((seen, Instant::now()));
                Instant::now()
            }
        };
        if !may_hold(
            &spec,
            &self.identity,
            first_seen.elapsed(),
            self.timing.lease_duration,
        ) {
            return Ok(false);
        }
        lease.spec = Some(self.spec(Some(&spec)));
        // The resourceVersion read above makes this a compare-and-swap: of two replicas racing
        // for an expired Lease, the API server lets exactly one through.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Gives the Lease up so that a standby takes over without waiting for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }

    /// Waits until this replica holds the Lease; `on_standby` runs after each attempt that
    /// reached the API server without winning.
    pub async fn acquire(&mut self, mut on_standby: impl FnMut()) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => on_standby(),
                Err(error) => {
                    tracing::warn!(%error, lease = %self.name, "could not read or write the leader Lease")
                }
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Runs `work` while holding the Lease, renewing it; returns when `work` ends (then the
    /// Lease is released) or with [`LostLease`] when renewals failed for the renew deadline
    /// (then `work` is dropped mid-way, which reconciles tolerate: they are idempotent).
    pub async fn lead<F: Future<Output = ()>>(&mut self, work: F) -> Result<(), LostLease> {
        let timing = self.timing;
        let renewing = async {
            let mut last_renewed = Instant::now();
            loop {
                tokio::time::sleep(timing.retry).await;
                match self.try_acquire_or_renew().await {
                    Ok(true) => last_renewed = Instant::now(),
                    Ok(false) => return LostLease(last_renewed.elapsed()),
                    Err(error) => {
                        tracing::warn!(%error, "could not renew the leader Lease");
                    }
                }
                if last_renewed.elapsed() >= timing.renew_deadline {
                    return LostLease(last_renewed.elapsed());
                }
            }
        };
        tokio::select! {
            () = work => {}
            lost = renewing => return Err(lost),
        }
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "could not release the leader Lease; standbys take over when it expires");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_taken_when_free_ours_or_left_unrenewed_a_whole_duration() {
        let duration = Duration::from_secs(15);
        let fresh = Duration::from_secs(3);
        assert!(may_hold(&held_by(None), "a", fresh, duration));
        assert!(may_hold(&held_by(Some("")), "a", fresh, duration));
        assert!(may_hold(&held_by(Some("a")), "a", fresh, duration));
        assert!(!may_hold(&held_by(Some("b")), "a", fresh, duration));
        assert!(may_hold(&held_by(Some("b")), "a", duration, duration));
    }
}
