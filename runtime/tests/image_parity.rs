//! The native Stable Diffusion pipeline against diffusers on the tiny random fixture
//! (`runtime/fixtures/make_image_fixtures.py`): CLIP's token ids (from tokenizer.json and from
//! vocab.json + merges.txt), text embeddings and one UNet noise prediction within 1e-4, and the
//! whole pipeline's image, DDIM and Euler, within 1e-3 mean absolute difference from the same
//! initial latents.

mod support;

use std::collections::HashMap;
use std::path::Path;

use runtime::models::diffusion::scheduler::Sampler;
use runtime::models::diffusion::{Denoise, StableDiffusion};
use runtime::tasks::text_to_image::http::ClipPrompts;
use tch::{Device, Kind, Tensor};

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

#[test]
fn clip_token_ids_match_from_either_tokenizer_file() {
    let (dir, settings) = support::fixture("stable-diffusion");
    let expected = Vec::<i64>::try_from(&reference(&dir)["ids"]).unwrap();
    let prompt = settings["prompt"].as_str().unwrap();
    let fast = ClipPrompts::load(&dir.join("tokenizer"), 77).unwrap();
    assert_eq!(fast.ids(prompt).unwrap(), expected);
    // A repository with only the slow tokenizer's files.
    let slow_dir = std::env::temp_dir().join(format!("infergate-clip-{}", std::process::id()));
    std::fs::create_dir_all(&slow_dir).unwrap();
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(dir.join("tokenizer").join(name), slow_dir.join(name)).unwrap();
    }
    let slow = ClipPrompts::load(&slow_dir, 77).unwrap();
    for text in [
        prompt,
        "An astronaut riding a horse, on Mars!",
        "  spaces\tand CAPS  ",
    ] {
        assert_eq!(slow.ids(text).unwrap(), fast.ids(text).unwrap(), "{text:?}");
    }
    std::fs::remove_dir_all(&slow_dir).unwrap();
}

#[test]
fn text_embeddings_and_one_unet_step_match_diffusers() {
    let (dir, settings) = support::fixture("stable-diffusion");
    let expected = reference(&dir);
    let pipeline = StableDiffusion::load(&dir, Device::Cpu, Kind::Float).unwrap();
    tch::no_grad(|| {
        let embeddings = pipeline.text_encoder.forward(&expected["ids"].unsqueeze(0));
        let delta = max_abs(&embeddings.squeeze_dim(0), &expected["embeddings"]);
        eprintln!("max |Δembeddings| = {delta:e}");
        assert!(delta <= 1e-4, "max |Δembeddings| = {delta:e}");
        let noise = pipeline.unet.forward(
            &expected["latents"],
            settings["timestep"].as_f64().unwrap(),
            &embeddings,
        );
        let delta = max_abs(&noise, &expected["noise"]);
        eprintln!("max |Δnoise| = {delta:e}");
        assert!(delta <= 1e-4, "max |Δnoise| = {delta:e}");
    });
}

#[test]
fn the_whole_pipeline_matches_diffusers_with_ddim_and_euler() {
    let (dir, settings) = support::fixture("stable-diffusion");
    let expected = reference(&dir);
    let pipeline = StableDiffusion::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let prompts = ClipPrompts::load(&dir.join("tokenizer"), 77).unwrap();
    for (name, sampler) in [("ddim", Sampler::Ddim), ("euler", Sampler::Euler)] {
        let request = Denoise {
            prompt: prompts.ids(settings["prompt"].as_str().unwrap()).unwrap(),
            negative: prompts
                .ids(settings["negative_prompt"].as_str().unwrap())
                .unwrap(),
            steps: settings["steps"].as_u64().unwrap() as usize,
            guidance_scale: settings["guidance_scale"].as_f64().unwrap(),
            sampler,
        };
        let image = pipeline
            .generate(&request, &expected["latents"], &|| true)
            .unwrap();
        assert_eq!(image.size(), expected[name].size(), "{name}");
        let mean = f64::try_from((&image - &expected[name]).abs().mean(Kind::Double)).unwrap();
        let max = max_abs(&image, &expected[name]);
        eprintln!("{name}: mean |Δimage| = {mean:e}, max = {max:e}");
        assert!(mean <= 1e-3, "{name}: mean |Δimage| = {mean:e}");
    }
}
