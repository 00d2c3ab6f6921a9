//! Request deadlines of a model, as written in a ModelDeployment or the proxy's file config,
//! and the resolved values the proxy enforces.

use std::time::Duration as StdDuration;

use kube::KubeSchema;
use kube::core::Duration;
use serde::{Deserialize, Serialize};

/// Deadline when neither the client nor the model says otherwise.
pub const DEFAULT_TIMEOUT: StdDuration = StdDuration::from_secs(120);

/// Longest deadline a client may ask for when the model sets no maximum.
pub const DEFAULT_MAX_TIMEOUT: StdDuration = StdDuration::from_secs(600);

/// Deadlines as written by a person: Go-style durations such as `120s` or `10m`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
#[x_kube(validation = Rule::new("!has(self.default) || !has(self.max) || duration(self.default) <= duration(self.max)").message("timeouts.default must not exceed timeouts.max"))]
pub struct Timeouts {
    /// Deadline of a request that sends no `OICM-Request-Timeout` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("timeouts.default must be a positive duration"))]
    pub default: Option<Duration>,
    /// Largest deadline a client may ask for with `OICM-Request-Timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("timeouts.max must be a positive duration"))]
    pub max: Option<Duration>,
}

/// Deadlines ready to enforce: both positive, `default <= max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTimeouts {
    pub default: StdDuration,
    pub max: StdDuration,
}

impl Default for RequestTimeouts {
    fn default() -> Self {
        RequestTimeouts {
            default: DEFAULT_TIMEOUT,
            max: DEFAULT_MAX_TIMEOUT,
        }
    }
}

/// Why a pair of deadlines cannot be enforced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TimeoutsError {
    #[error("timeouts.{field} must be a positive duration")]
    NotPositive { field: &'static str },
    #[error("timeouts.default ({default:?}) must not exceed timeouts.max ({max:?})")]
    DefaultAboveMax {
        default: StdDuration,
        max: StdDuration,
    },
}

impl Timeouts {
    /// Fills in what is unset from the contract's defaults (120 s, at most 600 s).
    pub fn resolve(&self) -> Result<RequestTimeouts, TimeoutsError> {
        self.resolve_with(RequestTimeouts::default())
    }

    /// Fills in what is unset from `fallback` (an installation's defaults). An unset maximum is
    /// never below the default, and an unset default never above the maximum, so that setting
    /// only one of them is always valid.
    pub fn resolve_with(
        &self,
        fallback: RequestTimeouts,
    ) -> Result<RequestTimeouts, TimeoutsError> {
        let positive = |value: Option<Duration>, field| match value {
            None => Ok(None),
            Some(d) if d.is_negative() || StdDuration::from(d).is_zero() => {
                Err(TimeoutsError::NotPositive { field })
            }
            Some(d) => Ok(Some(StdDuration::from(d))),
        };
        let default = positive(self.default, "default")?;
        let max = positive(self.max, "max")?;
        let resolved = match (default, max) {
            (Some(default), Some(max)) => RequestTimeouts { default, max },
            (Some(default), None) => RequestTimeouts {
                default,
                max: default.max(fallback.max),
            },
            (None, Some(max)) => RequestTimeouts {
                default: max.min(fallback.default),
                max,
            },
            (None, None) => fallback,
        };
        if resolved.default > resolved.max {
            return Err(TimeoutsError::DefaultAboveMax {
                default: resolved.default,
                max: resolved.max,
            });
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts(default: Option<&str>, max: Option<&str>) -> Timeouts {
        Timeouts {
            default: default.map(|d| d.parse().unwrap()),
            max: max.map(|m| m.parse().unwrap()),
        }
    }

    fn secs(s: u64) -> StdDuration {
        StdDuration::from_secs(s)
    }

    #[test]
    fn an_installations_defaults_fill_in_what_the_model_leaves_unset() {
        let fallback = RequestTimeouts {
            default: secs(30),
            max: secs(90),
        };
        let resolve = |d, m| timeouts(d, m).resolve_with(fallback).unwrap();
        assert_eq!(resolve(None, None), fallback);
        assert_eq!(
            (
                resolve(Some("10s"), None).default,
                resolve(Some("10s"), None).max
            ),
            (secs(10), secs(90))
        );
        assert_eq!(
            resolve(None, Some("20s")).default,
            secs(20),
            "never above the model's max"
        );
        assert_eq!(
            resolve(Some("200s"), None).max,
            secs(200),
            "never below the model's default"
        );
    }

    #[test]
    fn unset_timeouts_resolve_to_120s_default_and_600s_max() {
        assert_eq!(
            Timeouts::default().resolve(),
            Ok(RequestTimeouts {
                default: secs(120),
                max: secs(600)
            })
        );
    }

    #[test]
    fn setting_only_one_bound_keeps_the_pair_consistent() {
        assert_eq!(
            timeouts(Some("15m"), None).resolve().unwrap(),
            RequestTimeouts {
                default: secs(900),
                max: secs(900)
            }
        );
        assert_eq!(
            timeouts(None, Some("30s")).resolve().unwrap(),
            RequestTimeouts {
                default: secs(30),
                max: secs(30)
            }
        );
        assert_eq!(
            timeouts(Some("10s"), None).resolve().unwrap(),
            RequestTimeouts {
                default: secs(10),
                max: secs(600)
            }
        );
    }

    #[test]
    fn default_above_max_is_refused() {
        assert!(matches!(
            timeouts(Some("5m"), Some("1m")).resolve(),
            Err(TimeoutsError::DefaultAboveMax { .. })
        ));
    }

    #[test]
    fn zero_or_negative_durations_are_refused_by_name() {
        assert_eq!(
            timeouts(Some("0s"), None).resolve(),
            Err(TimeoutsError::NotPositive { field: "default" })
        );
        assert_eq!(
            timeouts(None, Some("-1s")).resolve(),
            Err(TimeoutsError::NotPositive { field: "max" })
        );
    }

    #[test]
    fn timeouts_read_from_yaml_with_go_durations() {
        let parsed: Timeouts = serde_yaml::from_str("{default: 90s, max: 1h30m}").unwrap();
        assert_eq!(
            parsed.resolve().unwrap(),
            RequestTimeouts {
                default: secs(90),
                max: secs(5400)
            }
        );
        assert!(serde_yaml::from_str::<Timeouts>("{default: 90s, maximum: 1h}").is_err());
    }
}
