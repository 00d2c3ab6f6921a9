//! SentencePiece `.spm` models as `tokenizers` tokenizers, for checkpoints (Marian's) that ship
//! no `tokenizer.json`: the model file is a protobuf `ModelProto` whose pieces and scores make a
//! unigram model, whose precompiled character map is the normalizer, and whose `▁` marks word
//! starts. Only the fields that change tokenization are read.

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{NormalizerWrapper, Precompiled, Replace, Sequence, Strip};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{DecoderWrapper, Tokenizer};

/// Why an `.spm` file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SentencePieceError {
    #[error("{0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} is not a SentencePiece model: {1}")]
    Malformed(String, &'static str),
    #[error("{0}: only unigram SentencePiece models are supported")]
    NotUnigram(String),
    #[error("{0}: {1}")]
    Tokenizer(String, String),
}

/// A protobuf reader for the few wire types ModelProto uses.
struct Wire<'a> {
    bytes: &'a [u8],
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.bytes.split_first()?;
            self.bytes = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    /// The next field: its number and its value (a varint, fixed 32/64 bits or bytes).
    fn field(&mut self) -> Option<(u64, Value<'a>)> {
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.bytes = self.bytes.get(8..)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).ok()?;
                let (head, rest) = self.bytes.split_at_checked(len)?;
                self.bytes = rest;
                Value::Bytes(head)
            }
            5 => {
                let (head, rest) = self.bytes.split_at_checked(4)?;
                self.bytes = rest;
                Value::Fixed32(u32::from_le_bytes(head.try_into().ok()?))
            }
            _ => return None,
        };
        Some((key >> 3, value))
    }

    fn fields(bytes: &'a [u8]) -> Result<Vec<(u64, Value<'a>)>, &'static str> {
        let mut wire = Wire { bytes };
        let mut fields = Vec::new();
        while !wire.bytes.is_empty() {
            fields.push(wire.field().ok_or("truncated or unknown protobuf field")?);
        }
        Ok(fields)
    }
}

#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    /// Skipped: no field read here is a 64-bit number.
    Fixed64,
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// `SentencePiece.Type`: UNKNOWN = 2; the others tokenize as plain pieces.
const PIECE_UNKNOWN: u64 = 2;
/// `TrainerSpec.ModelType`: UNIGRAM = 1.
const MODEL_UNIGRAM: u64 = 1;

/// The model in `path` as a tokenizer whose ids are the SentencePiece ids.
pub fn load(path: &Path) -> Result<Tokenizer, SentencePieceError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| SentencePieceError::Read(name.clone(), e))?;
    let malformed = |why| SentencePieceError::Malformed(name.clone(), why);
    let mut vocab = Vec::new();
    let mut unk = None;
    let mut charsmap: &[u8] = &[];
    let mut add_dummy_prefix = true;
    let mut remove_extra_whitespaces = true;
    for (number, value) in Wire::fields(&bytes).map_err(malformed)? {
        match (number, value) {
            (1, Value::Bytes(piece)) => {
                let (mut text, mut score, mut kind) = (String::new(), 0f64, 1u64);
                for field in Wire::fields(piece).map_err(malformed)? {
                    match field {
                        (1, Value::Bytes(t)) => text = String::from_utf8_lossy(t).into_owned(),
                        (2, Value::Fixed32(s)) => score = f64::from(f32::from_bits(s)),
                        (3, Value::Varint(k)) => kind = k,
                        _ => {}
                    }
                }
                if kind == PIECE_UNKNOWN {
                    unk = Some(vocab.len());
                }
                vocab.push((text, score));
            }
            (2, Value::Bytes(trainer)) => {
                for field in Wire::fields(trainer).map_err(malformed)? {
                    if let (3, Value::Varint(model_type)) = field
                        && model_type != MODEL_UNIGRAM
                    {
                        return Err(SentencePieceError::NotUnigram(name));
                    }
                }
            }
            (3, Value::Bytes(normalizer)) => {
                for field in Wire::fields(normalizer).map_err(malformed)? {
                    match field {
                        (2, Value::Bytes(map)) => charsmap = map,
                        (3, Value::Varint(v)) => add_dummy_prefix = v != 0,
                        (4, Value::Varint(v)) => remove_extra_whitespaces = v != 0,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if vocab.is_empty() {
        return Err(malformed("no pieces"));
    }
    let failed =
        |e: &dyn std::fmt::Display| SentencePieceError::Tokenizer(name.clone(), e.to_string());
    let model = Unigram::from(vocab, unk, false).map_err(|e| failed(&e))?;
    let mut tokenizer = Tokenizer::new(model);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if !charsmap.is_empty() {
        normalizers.push(Precompiled::from(charsmap).map_err(|e| failed(&e))?.into());
    }
    if remove_extra_whitespaces {
        normalizers.push(Strip::new(true, true).into());
        normalizers.push(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
                " ",
            )
            .map_err(|e| failed(&e))?
            .into(),
        );
    }
    tokenizer.with_normalizer(Some(Sequence::new(normalizers)));
    let scheme = if add_dummy_prefix {
        PrependScheme::Always
    } else {
        PrependScheme::Never
    };
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, true)));
    tokenizer.with_decoder(Some(DecoderWrapper::Metaspace(Metaspace::new(
        '▁', scheme, true,
    ))));
    Ok(tokenizer)
}
