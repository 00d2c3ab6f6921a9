//! Text to token ids with the model's `tokenizer.json`, enforcing the input length limit.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::encoder::Sequence;
use crate::error::ApiError;
use crate::models::LoadError;

/// The model's tokenizer, once as trained and once truncating at the model's limit.
#[derive(Debug)]
pub struct TextEncoder {
    plain: Tokenizer,
    truncating: Tokenizer,
    max_length: usize,
    vocab_size: usize,
}

impl TextEncoder {
    pub fn load(dir: &Path, max_length: usize) -> Result<TextEncoder, LoadError> {
        let path = dir.join("tokenizer.json");
        let invalid = |e: &dyn std::fmt::Display| LoadError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut plain = Tokenizer::from_file(&path).map_err(|e| invalid(&e))?;
        plain.with_padding(None);
        plain.with_truncation(None).map_err(|e| invalid(&e))?;
        let mut truncating = plain.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| invalid(&e))?;
        let vocab_size = plain.get_vocab_size(true);
        Ok(TextEncoder {
            plain,
            truncating,
            max_length,
            vocab_size,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenizes input `index` with the model's special tokens. Longer than the limit is an
    /// error unless `truncate`.
    pub fn encode(&self, index: usize, text: &str, truncate: bool) -> Result<Sequence, ApiError> {
        self.encode_input(index, || text.into(), truncate)
    }

    /// Tokenizes a pair (query and passage) as the model's template joins them; the type ids
    /// mark the second text where the model uses them.
    pub fn encode_pair(
        &self,
        index: usize,
        first: &str,
        second: &str,
        truncate: bool,
    ) -> Result<Sequence, ApiError> {
        self.encode_input(
            index,
            || tokenizers::EncodeInput::Dual(first.into(), second.into()),
            truncate,
        )
    }

    fn encode_input<'s>(
        &self,
        index: usize,
        input: impl Fn() -> tokenizers::EncodeInput<'s>,
        truncate: bool,
    ) -> Result<Sequence, ApiError> {
        let failed = |e: tokenizers::Error| {
            ApiError::InvalidField(format!("inputs[{index}] cannot be tokenized: {e}"))
        };
        let encoding = self.plain.encode(input(), true).map_err(failed)?;
        let encoding = if encoding.len() <= self.max_length {
            encoding
        } else if truncate {
            self.truncating.encode(input(), true).map_err(failed)?
        } else {
            return Err(ApiError::InputTooLong {
                index,
                tokens: encoding.len(),
                limit: self.max_length,
            });
        };
        let widen = |ids: &[u32]| ids.iter().map(|&id| i64::from(id)).collect();
        Ok(Sequence {
            ids: widen(encoding.get_ids()),
            type_ids: widen(encoding.get_type_ids()),
        })
    }

    /// Input already tokenized by the client: ids are checked against the vocabulary and the
    /// length limit, and taken as they are (special tokens included or not, as sent).
    pub fn from_ids(
        &self,
        index: usize,
        ids: &[u32],
        truncate: bool,
    ) -> Result<Sequence, ApiError> {
        if ids.is_empty() {
            return Err(ApiError::InvalidField(format!(
                "inputs[{index}] is an empty list of token ids"
            )));
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(ApiError::InvalidField(format!(
                "inputs[{index}] has token id {bad}, outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        let ids = match (ids.len() > self.max_length, truncate) {
            (false, _) => ids,
            (true, true) => &ids[..self.max_length],
            (true, false) => {
                return Err(ApiError::InputTooLong {
                    index,
                    tokens: ids.len(),
                    limit: self.max_length,
                });
            }
        };
        Ok(Sequence {
            ids: ids.iter().map(|&id| i64::from(id)).collect(),
            type_ids: vec![0; ids.len()],
        })
    }
}
