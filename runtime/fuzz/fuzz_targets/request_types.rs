//! Every request body the runtime deserialises (OpenAI, TGI, TEI and the seed's shapes) from
//! arbitrary bytes: serde either builds the value or refuses it; nothing panics, and what was
//! accepted serialises back to JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runtime::tasks::classification::http as classify;
use runtime::tasks::embedding::http as embed;
use runtime::tasks::text_generation::http as generation;
use runtime::tasks::text_to_image::http as image;
use runtime::tasks::text_to_speech::http as synthesize;
use runtime::tasks::translation::http as translate;

fn accepts<T: for<'de> serde::Deserialize<'de>>(data: &[u8]) -> bool {
    serde_json::from_slice::<T>(data).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let _ = accepts::<generation::ChatRequest>(data);
    let _ = accepts::<generation::CompletionRequest>(data);
    let _ = accepts::<generation::GenerateRequest>(data);
    let _ = accepts::<embed::EmbedRequest>(data);
    let _ = accepts::<embed::OpenAiEmbeddingsRequest>(data);
    let _ = accepts::<embed::SimilarityRequest>(data);
    let _ = accepts::<classify::ClassifyRequest>(data);
    let _ = accepts::<classify::PredictRequest>(data);
    let _ = accepts::<classify::RootClassifyRequest>(data);
    let _ = accepts::<translate::TranslateRequest>(data);
    let _ = accepts::<translate::RootTranslateRequest>(data);
    let _ = accepts::<synthesize::SpeechRequest>(data);
    let _ = accepts::<image::ImageRequest>(data);
});
