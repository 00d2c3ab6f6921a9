//! MarianMT's tokenizer: SentencePiece pieces mapped through the shared `vocab.json`.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::ApiError;
use crate::models::{LoadError, read_json, sentencepiece};

/// Marian's tokenization: SentencePiece pieces of the source model mapped through the shared
/// `vocab.json`, EOS appended; decoding joins target pieces.
#[derive(Debug)]
pub struct MarianTokenizer {
    source: Tokenizer,
    vocab: HashMap<String, i64>,
    pieces: HashMap<i64, String>,
    eos: i64,
    pad: i64,
    unk: i64,
}

impl MarianTokenizer {
    pub fn load(dir: &Path) -> Result<MarianTokenizer, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            path: dir.to_owned(),
            message,
        };
        let source =
            sentencepiece::load(&dir.join("source.spm")).map_err(|e| invalid(e.to_string()))?;
        let vocab: HashMap<String, i64> = read_json(&dir.join("vocab.json"))?;
        let id = |piece: &str| {
            vocab
                .get(piece)
                .copied()
                .ok_or_else(|| invalid(format!("vocab.json has no {piece}")))
        };
        let (eos, pad, unk) = (id("</s>")?, id("<pad>")?, id("<unk>")?);
        let pieces = vocab.iter().map(|(p, i)| (*i, p.clone())).collect();
        Ok(MarianTokenizer {
            source,
            vocab,
            pieces,
            eos,
            pad,
            unk,
        })
    }

    /// Ids of `text`, a leading `>>lang<<` (multi-target models) kept as its own token.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, ApiError> {
        let mut ids = Vec::new();
        let mut rest = text;
        if let Some(code) = text.strip_prefix(">>").and_then(|t| t.split_once("<<"))
            && let Some(&id) = self.vocab.get(&format!(">>{}<<", code.0))
        {
            ids.push(id);
            rest = code.1;
        }
        let encoding = self
            .source
            .encode(rest, false)
            .map_err(|e| ApiError::InvalidField(format!("text cannot be tokenized: {e}")))?;
        ids.extend(
            encoding
                .get_tokens()
                .iter()
                .map(|piece| self.vocab.get(piece).copied().unwrap_or(self.unk)),
        );
        ids.push(self.eos);
        Ok(ids)
    }

    /// Text of generated `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let text: String = ids
            .iter()
            .filter(|&&id| id != self.eos && id != self.pad && id != self.unk)
            .filter_map(|id| self.pieces.get(id).map(String::as_str))
            .collect();
        text.replace('▁', " ").trim().to_owned()
    }

    /// The `>>lang<<` token of `target_lang`, when the vocabulary has one.
    pub fn language_token(&self, lang: &str) -> Option<String> {
        let token = format!(">>{lang}<<");
        self.vocab.contains_key(&token).then_some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_language_token_leads_the_source_ids() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/marian");
        let mut tokenizer = MarianTokenizer::load(&dir).unwrap();
        let id = tokenizer.vocab.len() as i64;
        tokenizer.vocab.insert(">>fra<<".to_owned(), id);
        assert_eq!(tokenizer.language_token("fra").as_deref(), Some(">>fra<<"));
        assert_eq!(tokenizer.language_token("deu"), None);
        let plain = tokenizer.encode("the cat").unwrap();
        let prefixed = tokenizer.encode(">>fra<< the cat").unwrap();
        assert_eq!(prefixed[0], id);
        assert_eq!(&prefixed[1..], &plain[..]);
    }
}
