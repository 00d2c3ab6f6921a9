//! The DDIM and Euler schedulers as diffusers runs them from a `scheduler_config.json`: the
//! training noise schedule, the inference timesteps by `timestep_spacing`, and one denoising
//! step for ε- or v-prediction.
//!
//! Reference: diffusers v0.42.1, `schedulers/scheduling_ddim.py` and
//! `scheduling_euler_discrete.py`.

use serde::Deserialize;
use tch::Tensor;

#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub clip_sample: bool,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_schedule() -> String {
    "linear".to_owned()
}
fn default_prediction() -> String {
    "epsilon".to_owned()
}
fn default_true() -> bool {
    true
}

/// Which sampler walks the timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    Ddim,
    Euler,
}

impl Sampler {
    pub fn parse(name: &str) -> Option<Sampler> {
        match name.to_ascii_lowercase().as_str() {
            "ddim" | "ddimscheduler" => Some(Sampler::Ddim),
            "euler" | "eulerdiscretescheduler" => Some(Sampler::Euler),
            _ => None,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.beta_schedule.as_str(), "linear" | "scaled_linear") {
            return Err(format!(
                "beta_schedule {:?} is not supported; supported: linear, scaled_linear",
                self.beta_schedule
            ));
        }
        if !matches!(self.prediction_type.as_str(), "epsilon" | "v_prediction") {
            return Err(format!(
                "prediction_type {:?} is not supported; supported: epsilon, v_prediction",
                self.prediction_type
            ));
        }
        if self.clip_sample {
            return Err("clip_sample: true is not supported".to_owned());
        }
        Ok(())
    }

    /// The sampler the repository names, DDIM for any other.
    pub fn default_sampler(&self) -> Sampler {
        Sampler::parse(&self.class_name).unwrap_or(Sampler::Ddim)
    }

    /// ᾱ_t for every training step, in float32 as diffusers keeps it.
    fn alphas_cumprod(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let mut product = 1f32;
        (0..n)
            .map(|i| {
                let fraction = i as f64 / (n - 1).max(1) as f64;
                let beta = if self.beta_schedule == "scaled_linear" {
                    let root = self.beta_start.sqrt()
                        + (self.beta_end.sqrt() - self.beta_start.sqrt()) * fraction;
                    (root as f32).powi(2)
                } else {
                    (self.beta_start + (self.beta_end - self.beta_start) * fraction) as f32
                };
                product *= 1.0 - beta;
                f64::from(product)
            })
            .collect()
    }

    /// The inference timesteps, from noisiest down, by `timestep_spacing` (each sampler's own
    /// default when the configuration has none).
    fn timesteps(&self, steps: usize, sampler: Sampler) -> Vec<f64> {
        let n = self.num_train_timesteps;
        let default = match sampler {
            Sampler::Ddim => "leading",
            Sampler::Euler => "linspace",
        };
        match self.timestep_spacing.as_deref().unwrap_or(default) {
            "linspace" => (0..steps)
                .rev()
                .map(|i| {
                    let t = (n - 1) as f64 * i as f64 / (steps - 1).max(1) as f64;
                    if sampler == Sampler::Ddim {
                        t.round()
                    } else {
                        f64::from(t as f32)
                    }
                })
                .collect(),
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                (0..steps)
                    .map(|i| (n as f64 - i as f64 * ratio).round() - 1.0)
                    .collect()
            }
            _ => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as f64)
                    .collect()
            }
        }
    }
}

/// A scheduler set up for one generation.
#[derive(Debug)]
pub struct Schedule {
    sampler: Sampler,
    v_prediction: bool,
    pub timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    step_ratio: usize,
    /// Euler: σ per timestep, then 0.
    sigmas: Vec<f64>,
}

impl Schedule {
    pub fn new(config: &SchedulerConfig, sampler: Sampler, steps: usize) -> Schedule {
        let alphas_cumprod = config.alphas_cumprod();
        let timesteps = config.timesteps(steps, sampler);
        let sigmas = if sampler == Sampler::Euler {
            let table: Vec<f64> = alphas_cumprod
                .iter()
                .map(|&a| f64::from((((1.0 - a) / a) as f32).sqrt()))
                .collect();
            let interpolate = |t: f64| {
                let low = (t.floor() as usize).min(table.len() - 1);
                let high = (low + 1).min(table.len() - 1);
                let fraction = t - low as f64;
                f64::from((table[low] * (1.0 - fraction) + table[high] * fraction) as f32)
            };
            timesteps
                .iter()
                .map(|&t| interpolate(t))
                .chain(std::iter::once(0.0))
                .collect()
        } else {
            Vec::new()
        };
        Schedule {
            sampler,
            v_prediction: config.prediction_type == "v_prediction",
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            step_ratio: config.num_train_timesteps / steps,
            timesteps,
            alphas_cumprod,
            sigmas,
        }
    }

    /// The scale of the initial noise.
    pub fn init_noise_sigma(&self, config: &SchedulerConfig) -> f64 {
        match self.sampler {
            Sampler::Ddim => 1.0,
            Sampler::Euler => {
                let max = self.sigmas.iter().copied().fold(0.0, f64::max);
                match config.timestep_spacing.as_deref().unwrap_or("linspace") {
                    "linspace" | "trailing" => max,
                    _ => (max * max + 1.0).sqrt(),
                }
            }
        }
    }

    /// The UNet's input at step `index`.
    pub fn scale_model_input(&self, sample: &Tensor, index: usize) -> Tensor {
        match self.sampler {
            Sampler::Ddim => sample.shallow_clone(),
            Sampler::Euler => {
                let sigma = self.sigmas[index];
                sample / (sigma * sigma + 1.0).sqrt()
            }
        }
    }

    /// The sample after step `index`, given the model's output there.
    pub fn step(&self, output: &Tensor, index: usize, sample: &Tensor) -> Tensor {
        match self.sampler {
            Sampler::Ddim => {
                let t = self.timesteps[index] as usize;
                let alpha = self.alphas_cumprod[t];
                let previous = t
                    .checked_sub(self.step_ratio)
                    .map_or(self.final_alpha_cumprod, |p| self.alphas_cumprod[p]);
                let beta = 1.0 - alpha;
                let (original, epsilon) = if self.v_prediction {
                    (
                        sample * alpha.sqrt() - output * beta.sqrt(),
                        output * alpha.sqrt() + sample * beta.sqrt(),
                    )
                } else {
                    (
                        (sample - output * beta.sqrt()) / alpha.sqrt(),
                        output.shallow_clone(),
                    )
                };
                original * previous.sqrt() + epsilon * (1.0 - previous).sqrt()
            }
            Sampler::Euler => {
                let sigma = self.sigmas[index];
                let original = if self.v_prediction {
                    output * (-sigma / (sigma * sigma + 1.0).sqrt())
                        + sample / (sigma * sigma + 1.0)
                } else {
                    sample - output * sigma
                };
                let derivative = (sample - original) / sigma;
                sample + derivative * (self.sigmas[index + 1] - sigma)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(spacing: &str) -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
            "timestep_spacing": spacing, "set_alpha_to_one": false,
        }))
        .unwrap()
    }

    #[test]
    fn timesteps_follow_diffusers_spacings() {
        assert_eq!(
            config("leading").timesteps(4, Sampler::Ddim),
            [751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            config("trailing").timesteps(4, Sampler::Ddim),
            [999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(
            config("linspace").timesteps(3, Sampler::Ddim),
            [999.0, 500.0, 0.0]
        );
    }

    #[test]
    fn the_noise_schedule_decreases_from_almost_one() {
        let alphas = config("leading").alphas_cumprod();
        assert!((alphas[0] - (1.0 - 0.00085)).abs() < 1e-6);
        assert!(alphas.windows(2).all(|w| w[1] < w[0]));
        assert!(alphas[999] > 0.0 && alphas[999] < 0.01);
    }
}
