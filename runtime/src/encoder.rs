//! Encoder passes, shared by the tasks whose model is a text encoder (embedding,
//! classification, rerank): tokenized inputs padded into one rectangle, one output vector per
//! input, the executor backend that runs them, and what their handlers share in front of it.

use std::sync::Arc;

use internal_token::usage::Unit;

use crate::error::{ApiError, BackendError};
use crate::executor::{Backend, Executor, Shape, Wanted, Work, failed};
use crate::tokenize::TextEncoder;

/// One tokenized input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Sequences padded to a rectangle, as the model consumes them.
#[derive(Debug)]
pub struct PaddedBatch {
    pub input_ids: Vec<i64>,
    pub type_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub rows: usize,
    pub width: usize,
}

impl PaddedBatch {
    /// Right-pads every sequence to the longest with `pad_id`.
    pub fn new<'a>(
        sequences: impl Iterator<Item = &'a Sequence> + Clone,
        pad_id: i64,
    ) -> PaddedBatch {
        let width = sequences.clone().map(|s| s.ids.len()).max().unwrap_or(0);
        let mut batch = PaddedBatch {
            input_ids: Vec::new(),
            type_ids: Vec::new(),
            attention_mask: Vec::new(),
            rows: 0,
            width,
        };
        for sequence in sequences {
            let pad = width - sequence.ids.len();
            batch.input_ids.extend(
                sequence
                    .ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, pad)),
            );
            batch.type_ids.extend(
                sequence
                    .type_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            batch.attention_mask.extend(
                std::iter::repeat_n(1, sequence.ids.len()).chain(std::iter::repeat_n(0, pad)),
            );
            batch.rows += 1;
        }
        batch
    }
}

impl PaddedBatch {
    /// `(input_ids, type_ids, attention_mask)`, each [rows, width], on `device`.
    pub fn tensors(&self, device: tch::Device) -> (tch::Tensor, tch::Tensor, tch::Tensor) {
        let shape = [self.rows as i64, self.width as i64];
        let tensor = |values: &[i64]| {
            tch::Tensor::from_slice(values)
                .view(shape)
                .to_device(device)
        };
        (
            tensor(&self.input_ids),
            tensor(&self.type_ids),
            tensor(&self.attention_mask),
        )
    }
}

/// The rows of a [rows, width] output as `f32` vectors, whatever its dtype and device.
pub fn tensor_rows(output: &tch::Tensor) -> Result<Vec<Vec<f32>>, BackendError> {
    let output = output.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
    let width = output.size().get(1).copied().unwrap_or(1).max(1) as usize;
    let flat = Vec::<f32>::try_from(output.flatten(0, -1))?;
    Ok(flat.chunks(width).map(<[f32]>::to_vec).collect())
}

/// An encoder with its head: one output vector per row of a padded batch.
pub trait EncoderModel: 'static {
    fn forward(&mut self, batch: &PaddedBatch) -> Result<Vec<Vec<f32>>, BackendError>;
    fn pad_id(&self) -> i64;
}

/// The sequences of one request, run in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncoderJob(pub Vec<Sequence>);

impl Work for EncoderJob {
    fn shape(&self) -> Shape {
        Shape {
            rows: self.0.len(),
            width: self.0.iter().map(|s| s.ids.len()).max().unwrap_or(0),
        }
    }
}

/// Runs an encoder's passes for the executor: every job's sequences padded into one batch,
/// the outputs split back per job.
#[derive(Debug)]
pub struct Encoder<M>(pub M);

impl<M: EncoderModel> Backend for Encoder<M> {
    type Job = EncoderJob;
    type Output = Vec<Vec<f32>>;

    fn run_batch(
        &mut self,
        jobs: Vec<EncoderJob>,
        _: &Wanted<'_>,
    ) -> Vec<Result<Vec<Vec<f32>>, BackendError>> {
        let padded = PaddedBatch::new(jobs.iter().flat_map(|job| job.0.iter()), self.0.pad_id());
        match self.0.forward(&padded) {
            Ok(outputs) if outputs.len() == padded.rows => {
                let mut outputs = outputs.into_iter();
                jobs.iter()
                    .map(|job| Ok(outputs.by_ref().take(job.0.len()).collect()))
                    .collect()
            }
            Ok(outputs) => {
                let error = BackendError::Output(format!(
                    "{} output rows for {} inputs",
                    outputs.len(),
                    padded.rows
                ));
                failed(&error, jobs.len())
            }
            Err(error) => failed(&error, jobs.len()),
        }
    }
}

/// The handlers' side of an encoder task: the tokenizer, the executor in front of the model
/// thread, and the most inputs one request may send.
#[derive(Debug, Clone)]
pub struct EncoderFront {
    pub executor: Executor<EncoderJob, Vec<Vec<f32>>>,
    pub tokenizer: Arc<TextEncoder>,
    pub max_client_batch_size: usize,
}

impl EncoderFront {
    /// One output vector per input of the request's `field`, and the tokens they made. Refuses
    /// an empty or oversized list at once; takes the admission slot before tokenizing, so a
    /// refused request costs no tokenizer time; tokenizes off the async threads.
    pub async fn run<I: Send + Sync + 'static>(
        &self,
        field: &'static str,
        inputs: Vec<I>,
        tokenize: impl Fn(&TextEncoder, usize, &I) -> Result<Sequence, ApiError> + Send + 'static,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        if inputs.is_empty() {
            return Err(ApiError::InvalidField(format!("{field} must not be empty")));
        }
        if inputs.len() > self.max_client_batch_size {
            return Err(ApiError::TooManyInputs {
                field,
                count: inputs.len(),
                limit: self.max_client_batch_size,
            });
        }
        let admission = self.executor.admit()?;
        let tokenizer = self.tokenizer.clone();
        let sequences: Vec<Sequence> = tokio::task::spawn_blocking(move || {
            inputs
                .iter()
                .enumerate()
                .map(|(index, input)| tokenize(&tokenizer, index, input))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))??;
        let tokens = sequences.iter().map(|s| s.ids.len()).sum();
        let outputs = self
            .executor
            .submit(admission, EncoderJob(sequences))
            .await?;
        crate::usage::record(Unit::Inputs, outputs.len() as f64);
        Ok((outputs, tokens))
    }
}
