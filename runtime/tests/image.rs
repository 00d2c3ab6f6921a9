//! `text-to-image` over HTTP on the tiny Stable Diffusion fixture: the seed's
//! `/v1/generate-image`, OpenAI's `/v1/images/generations`, the endpoint root Hugging Face
//! clients post to, seeds that reproduce an image, bad bodies answered with a 400 naming the
//! field, and a deadline that stops the denoising loop.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::Runtime;

async fn start() -> Runtime {
    Runtime::start_task(
        "text-to-image",
        &support::fixture("stable-diffusion").0,
        &[],
    )
    .await
}

/// (width, height, RGB pixels) of a PNG this runtime wrote.
fn read_png(file: &[u8]) -> (u32, u32, Vec<u8>) {
    assert_eq!(&file[..8], b"\x89PNG\r\n\x1a\n");
    let (mut at, mut size, mut data) = (8, (0, 0), Vec::new());
    while at + 8 <= file.len() {
        let length = u32::from_be_bytes(file[at..at + 4].try_into().unwrap()) as usize;
        let body = &file[at + 8..at + 8 + length];
        match &file[at + 4..at + 8] {
            b"IHDR" => {
                size = (
                    u32::from_be_bytes(body[0..4].try_into().unwrap()),
                    u32::from_be_bytes(body[4..8].try_into().unwrap()),
                );
                assert_eq!(&body[8..10], [8, 2], "8-bit RGB");
            }
            b"IDAT" => data.extend_from_slice(body),
            _ => {}
        }
        at += 12 + length;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&data[..])
        .read_to_end(&mut raw)
        .unwrap();
    let row = size.0 as usize * 3;
    assert_eq!(raw.len(), size.1 as usize * (row + 1));
    let pixels = raw.chunks(row + 1).flat_map(|r| r[1..].to_vec()).collect();
    (size.0, size.1, pixels)
}

async fn generate(runtime: &Runtime, body: Value) -> (u32, u32, Vec<u8>) {
    let (status, answer) = runtime.post("/v1/generate-image", &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(answer["image"].as_str().unwrap())
        .unwrap();
    read_png(&png)
}

#[tokio::test]
async fn a_seed_reproduces_an_image_of_the_asked_size() {
    let runtime = start().await;
    let body = json!({"prompt": "a red fox in the snow", "num_inference_steps": 2, "seed": 5,
                      "width": 48, "height": 32, "scheduler": "euler"});
    let (width, height, first) = generate(&runtime, body.clone()).await;
    assert_eq!((width, height), (48, 32));
    assert_eq!(first.len(), 48 * 32 * 3);
    let (_, _, again) = generate(&runtime, body.clone()).await;
    assert_eq!(first, again, "the same seed gives the same image");
    let mut other = body;
    other["seed"] = json!(6);
    assert_ne!(first, generate(&runtime, other).await.2);
    // Defaults: the model's size.
    let plain = json!({"prompt": "a cat", "num_inference_steps": 2, "seed": 3});
    let (width, height, image) = generate(&runtime, plain.clone()).await;
    assert_eq!((width, height), (64, 64));
    // high_noise_frac, the seed's 8 included: without a refiner the base model runs every step,
    // so the image is the same.
    for frac in [json!(8), json!(0.8), json!(1)] {
        let mut body = plain.clone();
        body["high_noise_frac"] = frac.clone();
        assert_eq!(
            generate(&runtime, body).await.2,
            image,
            "high_noise_frac {frac}"
        );
    }
}

#[tokio::test]
async fn openai_images_and_the_endpoint_root_answer_as_their_clients_expect() {
    let runtime = start().await;
    let (status, answer) = runtime
        .post(
            "/v1/images/generations",
            &json!({"model": "dall-e-2", "prompt": "a cat", "n": 2, "size": "32x32",
                    "response_format": "b64_json"})
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["created"].as_u64().unwrap() > 0);
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for image in data {
        let png = base64::engine::general_purpose::STANDARD
            .decode(image["b64_json"].as_str().unwrap())
            .unwrap();
        assert_eq!(read_png(&png).0, 32);
    }
    let response = reqwest::Client::new()
        .post(format!("{}/", runtime.url))
        .header("content-type", "application/json")
        .body(
            json!({"inputs": "a cat", "parameters": {"num_inference_steps": 1, "width": 32,
                   "height": 40, "guidance_scale": 1.0, "seed": 1}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let (width, height, _) = read_png(&response.bytes().await.unwrap());
    assert_eq!((width, height), (32, 40));
}

#[tokio::test]
async fn bodies_out_of_range_are_400s_that_name_the_field() {
    let runtime = start().await;
    let cases = [
        ("/v1/generate-image", json!({"prompt": ""}), "prompt"),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "width": 30}),
            "width",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "height": 4096}),
            "height",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "num_inference_steps": 0}),
            "num_inference_steps",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "num_inference_steps": 151}),
            "num_inference_steps",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "guidance_scale": -1}),
            "guidance_scale",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "high_noise_frac": 0}),
            "high_noise_frac",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "high_noise_frac": -8}),
            "high_noise_frac",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "scheduler": "pndm"}),
            "scheduler",
        ),
        (
            "/v1/generate-image",
            json!({"prompt": "a", "steps": 3}),
            "steps",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "a", "response_format": "url"}),
            "response_format",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "a", "size": "big"}),
            "size",
        ),
        (
            "/v1/images/generations",
            json!({"prompt": "a", "n": 9}),
            "n",
        ),
    ];
    for (path, body, field) in cases {
        let (status, answer) = runtime.post(path, &body.to_string()).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{path} {body}: {message:?} does not name {field}"
        );
    }
}

#[tokio::test]
async fn a_deadline_stops_the_denoising_loop_between_steps() {
    let runtime = start().await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/generate-image", runtime.url))
        .header("content-type", "application/json")
        .header("OICM-Request-Timeout", "0.5")
        .body(
            json!({"prompt": "a", "num_inference_steps": 150, "width": 96, "height": 96})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    // The loop stopped: a small image right after is not queued behind the remaining steps.
    let (_, _, pixels) = generate(
        &runtime,
        json!({"prompt": "a", "num_inference_steps": 1, "width": 32, "height": 32}),
    )
    .await;
    assert_eq!(pixels.len(), 32 * 32 * 3);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let metrics = runtime.metrics().await;
    assert!(metrics.contains("infergate_runtime_abandoned_total 1"));
}
