//! The HTTP half of `text-to-image`: the seed's `/v1/generate-image`, OpenAI's
//! `/v1/images/generations` and the endpoint root; prompts tokenized for CLIP, images as PNG.

use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use internal_token::usage::Unit;

use crate::error::ApiError;
use crate::executor::Executor;
use crate::models::diffusion::scheduler::Sampler;
use crate::models::diffusion::{Denoise, load_tokenizer};
use crate::models::{LoadError, read_json};
use crate::server::ValidJson;

use super::backend::{Image, Job};

/// CLIP prompts as the pipeline encodes them: start and end tokens, cut to the encoder's
/// length (keeping the end token), padded with the tokenizer's pad token.
#[derive(Debug)]
pub struct ClipPrompts {
    tokenizer: Tokenizer,
    pad: i64,
    pub length: usize,
}

impl ClipPrompts {
    pub fn load(dir: &Path, length: usize) -> Result<ClipPrompts, LoadError> {
        let tokenizer = load_tokenizer(dir)?;
        let config: serde_json::Value =
            read_json(&dir.join("tokenizer_config.json")).unwrap_or_default();
        let pad_token = match &config["pad_token"] {
            serde_json::Value::String(token) => token.clone(),
            serde_json::Value::Object(token) => {
                token["content"].as_str().unwrap_or_default().to_owned()
            }
            _ => "<|endoftext|>".to_owned(),
        };
        let pad = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| LoadError::Invalid {
                path: dir.to_owned(),
                message: format!("the pad token {pad_token:?} is not in the vocabulary"),
            })?;
        Ok(ClipPrompts {
            tokenizer,
            pad: i64::from(pad),
            length,
        })
    }

    pub fn ids(&self, text: &str) -> Result<Vec<i64>, ApiError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::InvalidField(format!("prompt: cannot be tokenized: {e}")))?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        if ids.len() > self.length {
            let end = *ids.last().expect("at least the start and end tokens");
            ids.truncate(self.length - 1);
            ids.push(end);
        }
        ids.resize(self.length, self.pad);
        Ok(ids)
    }
}

/// A PNG of 8-bit RGB pixels: unfiltered rows, zlib-compressed.
pub fn png(image: &Image) -> Vec<u8> {
    use std::io::Write;
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&image.width.to_be_bytes());
    header.extend_from_slice(&image.height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    let row = image.width as usize * 3;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    for line in image.rgb.chunks(row) {
        encoder.write_all(&[0]).expect("writes to memory");
        encoder.write_all(line).expect("writes to memory");
    }
    let data = encoder.finish().expect("writes to memory");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &header);
    chunk(&mut out, b"IDAT", &data);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// The HTTP half.
#[derive(Debug)]
pub struct ImageTask {
    pub executor: Executor<Job, Image>,
    pub prompts: Arc<ClipPrompts>,
    pub default_size: i64,
    /// Image sizes must be multiples of this (the VAE's and the UNet's downscaling).
    pub size_multiple: i64,
    pub default_sampler: Sampler,
}

pub fn routes() -> Router<Arc<ImageTask>> {
    Router::new()
        .route("/", post(root))
        .route("/v1/generate-image", post(generate_image))
        .route("/generate-image", post(generate_image))
        .route("/v1/images/generations", post(openai_images))
}

/// Largest side of an image, in pixels.
const MAX_SIDE: i64 = 2048;
const MAX_STEPS: usize = 150;

/// The seed's request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub num_inference_steps: Option<usize>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub width: Option<i64>,
    #[serde(default)]
    pub height: Option<i64>,
    /// The share of the denoising steps the base model runs before a refiner would take over
    /// (diffusers' SDXL base + refiner); see [`base_share`]. No refiner is configured, so the
    /// base model runs every step whatever it says.
    #[serde(default)]
    pub high_noise_frac: Option<f64>,
    /// `ddim` or `euler`; the repository's scheduler when unset.
    #[serde(default)]
    pub scheduler: Option<String>,
}

impl ImageTask {
    async fn generate(&self, request: ImageRequest) -> Result<Image, ApiError> {
        if request.prompt.trim().is_empty() {
            return Err(ApiError::InvalidField("prompt: empty".to_owned()));
        }
        let steps = request.num_inference_steps.unwrap_or(50);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(ApiError::InvalidField(format!(
                "num_inference_steps: must be between 1 and {MAX_STEPS}"
            )));
        }
        let guidance_scale = request.guidance_scale.unwrap_or(7.5);
        if !(0.0..=30.0).contains(&guidance_scale) {
            return Err(ApiError::InvalidField(
                "guidance_scale: must be between 0 and 30".to_owned(),
            ));
        }
        // Validated, but it cannot change the image: without a refiner there is no one to hand
        // the remaining steps to.
        base_share(request.high_noise_frac)?;
        let side = |name: &str, value: Option<i64>| {
            let value = value.unwrap_or(self.default_size);
            if value < self.size_multiple || value > MAX_SIDE || value % self.size_multiple != 0 {
                Err(ApiError::InvalidField(format!(
                    "{name}: {value} must be a multiple of {} between {} and {MAX_SIDE}",
                    self.size_multiple, self.size_multiple
                )))
            } else {
                Ok(value)
            }
        };
        let width = side("width", request.width)?;
        let height = side("height", request.height)?;
        let sampler = match request.scheduler.as_deref() {
            None => self.default_sampler,
            Some(name) => Sampler::parse(name).ok_or_else(|| {
                ApiError::InvalidField(format!("scheduler: {name:?} is not ddim or euler"))
            })?,
        };
        let denoise = Denoise {
            prompt: self.prompts.ids(&request.prompt)?,
            negative: self
                .prompts
                .ids(request.negative_prompt.as_deref().unwrap_or(""))?,
            steps,
            guidance_scale,
            sampler,
        };
        // The model thread stops between denoising steps once this handler is dropped (client
        // gone, deadline passed).
        let image = self
            .executor
            .run(Job {
                denoise,
                width,
                height,
                seed: request.seed.unwrap_or_else(random_seed),
            })
            .await?;
        crate::usage::record(Unit::Images, 1.0);
        crate::usage::record(Unit::Steps, steps as f64);
        Ok(image)
    }
}

/// The share of the steps the base model runs, as `high_noise_frac` asks: any finite number
/// above 0, where 1 and more (the seed's example sends 8) mean every step; every step when
/// unset.
pub fn base_share(high_noise_frac: Option<f64>) -> Result<f64, ApiError> {
    match high_noise_frac {
        None => Ok(1.0),
        Some(f) if f.is_finite() && f > 0.0 => Ok(f.min(1.0)),
        Some(f) => Err(ApiError::InvalidField(format!(
            "high_noise_frac: {f} must be a finite number above 0 (1 or more: the base model runs every step)"
        ))),
    }
}

/// A seed for requests that give none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() >> 1
}

/// The seed's endpoint: `{image: base64 PNG}`.
async fn generate_image(
    State(task): State<Arc<ImageTask>>,
    ValidJson(request): ValidJson<ImageRequest>,
) -> Result<Json<GeneratedImage>, ApiError> {
    let image = task.generate(request).await?;
    Ok(Json(GeneratedImage {
        image: base64::engine::general_purpose::STANDARD.encode(png(&image)),
    }))
}

/// The seed's answer: a base64 PNG.
#[derive(Debug, Serialize)]
struct GeneratedImage {
    image: String,
}

/// OpenAI's images answer.
#[derive(Debug, Serialize)]
struct OpenAiImages {
    created: u64,
    data: Vec<OpenAiImage>,
}

#[derive(Debug, Serialize)]
struct OpenAiImage {
    b64_json: String,
}

/// OpenAI's image request; `model`, `quality`, `style` and `user` are accepted (the URL chose
/// the model).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiImageRequest {
    prompt: String,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    output_format: Option<String>,
    #[serde(default, rename = "model")]
    _model: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "quality")]
    _quality: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "style")]
    _style: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "user")]
    _user: Option<serde::de::IgnoredAny>,
}

async fn openai_images(
    State(task): State<Arc<ImageTask>>,
    ValidJson(request): ValidJson<OpenAiImageRequest>,
) -> Result<Json<OpenAiImages>, ApiError> {
    if request
        .response_format
        .as_deref()
        .is_some_and(|f| f != "b64_json")
    {
        return Err(ApiError::InvalidField(
            "response_format: only b64_json is served (no image URLs)".to_owned(),
        ));
    }
    if request.output_format.as_deref().is_some_and(|f| f != "png") {
        return Err(ApiError::InvalidField(
            "output_format: only png is served".to_owned(),
        ));
    }
    let n = request.n.unwrap_or(1);
    if !(1..=4).contains(&n) {
        return Err(ApiError::InvalidField(
            "n: must be between 1 and 4".to_owned(),
        ));
    }
    let (width, height) = match request.size.as_deref() {
        None | Some("auto") => (None, None),
        Some(size) => {
            let parsed = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse::<i64>().ok()?, h.parse::<i64>().ok()?)));
            let (w, h) = parsed.ok_or_else(|| {
                ApiError::InvalidField(format!("size: {size:?} is not WIDTHxHEIGHT"))
            })?;
            (Some(w), Some(h))
        }
    };
    let mut data = Vec::with_capacity(n);
    for _ in 0..n {
        let image = task
            .generate(ImageRequest {
                prompt: request.prompt.clone(),
                width,
                height,
                ..Default::default()
            })
            .await?;
        data.push(OpenAiImage {
            b64_json: base64::engine::general_purpose::STANDARD.encode(png(&image)),
        });
    }
    Ok(Json(OpenAiImages {
        created: crate::server::unix_now(),
        data,
    }))
}

/// What Hugging Face clients post for text to image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootRequest {
    inputs: String,
    #[serde(default)]
    parameters: RootParameters,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RootParameters {
    negative_prompt: Option<String>,
    height: Option<i64>,
    width: Option<i64>,
    num_inference_steps: Option<usize>,
    guidance_scale: Option<f64>,
    seed: Option<u64>,
    scheduler: Option<String>,
}

/// The endpoint root (Hugging Face's text-to-image task): the raw `image/png`.
async fn root(
    State(task): State<Arc<ImageTask>>,
    ValidJson(request): ValidJson<RootRequest>,
) -> Result<Response, ApiError> {
    let p = request.parameters;
    let image = task
        .generate(ImageRequest {
            prompt: request.inputs,
            negative_prompt: p.negative_prompt,
            num_inference_steps: p.num_inference_steps,
            guidance_scale: p.guidance_scale,
            seed: p.seed,
            width: p.width,
            height: p.height,
            high_noise_frac: None,
            scheduler: p.scheduler,
        })
        .await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png(&image)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_png_has_its_signature_header_and_checksummed_chunks() {
        let image = Image {
            width: 2,
            height: 1,
            rgb: vec![255, 0, 0, 0, 0, 255],
        };
        let file = png(&image);
        assert_eq!(&file[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&file[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(file[16..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_be_bytes(file[20..24].try_into().unwrap()), 1);
        // The IHDR checksum of a 2×1 8-bit RGB image, as zlib's crc32 gives it.
        let mut crc = flate2::Crc::new();
        crc.update(&file[12..29]);
        assert_eq!(
            u32::from_be_bytes(file[29..33].try_into().unwrap()),
            crc.sum()
        );
        assert!(file.ends_with(b"IEND\xae\x42\x60\x82"));
    }

    #[test]
    fn high_noise_frac_is_a_share_of_the_steps_where_1_and_more_mean_all() {
        assert_eq!(base_share(None).unwrap(), 1.0);
        assert_eq!(base_share(Some(0.8)).unwrap(), 0.8);
        assert_eq!(base_share(Some(1.0)).unwrap(), 1.0);
        // The seed's example.
        assert_eq!(base_share(Some(8.0)).unwrap(), 1.0);
        assert_eq!(base_share(Some(1e300)).unwrap(), 1.0);
        for bad in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let error = base_share(Some(bad)).unwrap_err();
            assert_eq!(error.status(), 400, "{bad}");
            assert!(
                error.to_string().starts_with("high_noise_frac: "),
                "{error}"
            );
        }
    }
}
