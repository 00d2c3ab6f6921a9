//! The model-thread half of `embedding`: the encoder and its sentence-transformers pooling.

use std::path::Path;

use tch::{Device, Kind};

use crate::encoder::{EncoderModel, PaddedBatch, tensor_rows};
use crate::error::BackendError;
use crate::models::pooling::Pooling;
use crate::models::{LoadError, LoadedEncoder};

/// The model thread's half: encoder and pooling.
#[derive(Debug)]
pub struct EmbeddingBackend {
    encoder: LoadedEncoder,
    pooling: Pooling,
    device: Device,
}

impl EmbeddingBackend {
    pub fn load(
        dir: &Path,
        device: Device,
        kind: Kind,
        pooling: Pooling,
    ) -> Result<EmbeddingBackend, LoadError> {
        Ok(EmbeddingBackend {
            encoder: LoadedEncoder::load(dir, device, kind)?,
            pooling,
            device,
        })
    }
}

impl EncoderModel for EmbeddingBackend {
    fn forward(&mut self, batch: &PaddedBatch) -> Result<Vec<Vec<f32>>, BackendError> {
        let _guard = tch::no_grad_guard();
        let (ids, types, mask) = batch.tensors(self.device);
        let hidden = self.encoder.forward(&ids, &types, &mask);
        tensor_rows(&self.pooling.apply(&hidden, &mask))
    }

    fn pad_id(&self) -> i64 {
        self.encoder.config.pad_token_id
    }
}
