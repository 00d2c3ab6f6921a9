//! The model-thread half of `text-generation`: a Llama-family decoder as the continuous-batching
//! scheduler (`crate::generate::engine`) drives it.

use tch::{Device, Tensor};

use crate::generate::engine::Decoder;
use crate::models::llama::{KvCache, LlamaModel, Logits, Placement};

impl Decoder for LlamaModel {
    type Cache = KvCache;

    fn new_cache(&self, slots: i64, positions: i64) -> KvCache {
        LlamaModel::new_cache(self, slots, positions)
    }

    fn device(&self) -> Device {
        LlamaModel::device(self)
    }

    fn forward(
        &self,
        tokens: &Tensor,
        placements: &[Placement],
        cache: &mut KvCache,
        logits: Logits<'_>,
    ) -> Tensor {
        LlamaModel::forward(self, tokens, placements, cache, logits)
    }
}
