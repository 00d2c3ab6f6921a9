//! What a request used, in its task's units, as a runtime reports it to the proxy on the same
//! hop: a response header for an answer sent whole, and for a stream (whose total is known
//! only at its end) a last server-sent-events comment after every event. The proxy removes
//! both before the client sees the answer, so it counts usage per token without reading a
//! task's bodies; a comment is also what every SSE client ignores, should one ever get through.
//!
//! Both carry the same text: `unit=amount` pairs separated by `, `, e.g.
//! `prompt_tokens=12, completion_tokens=30`.

use std::fmt;

/// Response header of an answer sent whole.
pub const HEADER: &str = "infergate-usage";

/// Start of the comment that ends a stream: `: infergate-usage <pairs>\n\n`.
pub const STREAM_MARKER: &[u8] = b": infergate-usage ";

/// A unit of work. Every task reports in its own: encoders and tabular models in inputs,
/// generation in tokens, speech in seconds of audio, images in images and denoising steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// Texts embedded, classified or reranked, texts translated, rows predicted.
    Inputs,
    PromptTokens,
    CompletionTokens,
    /// Seconds of audio transcribed.
    AudioSecondsIn,
    /// Seconds of audio synthesized.
    AudioSecondsOut,
    Images,
    /// Denoising steps, over all images.
    Steps,
}

impl Unit {
    pub const ALL: [Unit; 7] = [
        Unit::Inputs,
        Unit::PromptTokens,
        Unit::CompletionTokens,
        Unit::AudioSecondsIn,
        Unit::AudioSecondsOut,
        Unit::Images,
        Unit::Steps,
    ];

    /// The name on the wire and in metrics' `unit` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Inputs => "inputs",
            Unit::PromptTokens => "prompt_tokens",
            Unit::CompletionTokens => "completion_tokens",
            Unit::AudioSecondsIn => "audio_seconds_in",
            Unit::AudioSecondsOut => "audio_seconds_out",
            Unit::Images => "images",
            Unit::Steps => "steps",
        }
    }

    fn parse(name: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|unit| unit.as_str() == name)
    }
}

/// Amounts by unit; units never used are absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    amounts: [f64; Unit::ALL.len()],
}

impl Usage {
    pub fn add(&mut self, unit: Unit, amount: f64) {
        if amount.is_finite() && amount > 0.0 {
            self.amounts[unit as usize] += amount;
        }
    }

    pub fn get(&self, unit: Unit) -> f64 {
        self.amounts[unit as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.amounts.iter().all(|amount| *amount == 0.0)
    }

    /// The units used, with their amounts.
    pub fn iter(&self) -> impl Iterator<Item = (Unit, f64)> + '_ {
        Unit::ALL
            .into_iter()
            .map(|unit| (unit, self.get(unit)))
            .filter(|(_, amount)| *amount > 0.0)
    }

    /// Reads the header's text (or a stream comment's, after the marker). Pairs that are not
    /// understood (a unit a newer runtime reports) are skipped; `None` when nothing is.
    pub fn parse(text: &str) -> Option<Usage> {
        let mut usage = Usage::default();
        for pair in text.split(',') {
            let Some((name, amount)) = pair.trim().split_once('=') else {
                continue;
            };
            if let (Some(unit), Ok(amount)) = (Unit::parse(name.trim()), amount.trim().parse()) {
                usage.add(unit, amount);
            }
        }
        (!usage.is_empty()).then_some(usage)
    }

    /// The comment that ends a stream, marker and blank line included.
    pub fn stream_comment(&self) -> Vec<u8> {
        let mut comment = STREAM_MARKER.to_vec();
        comment.extend_from_slice(self.to_string().as_bytes());
        comment.extend_from_slice(b"\n\n");
        comment
    }

    /// The usage a stream comment carries, if `bytes` are one whole.
    pub fn from_stream_comment(bytes: &[u8]) -> Option<Usage> {
        let text = bytes.strip_prefix(STREAM_MARKER)?.strip_suffix(b"\n\n")?;
        Usage::parse(std::str::from_utf8(text).ok()?)
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (unit, amount)) in self.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            // Whole counts print without a fraction; seconds keep milliseconds.
            let rounded = (amount * 1000.0).round() / 1000.0;
            write!(f, "{}={rounded}", unit.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_text_reads_back_as_written() {
        let mut usage = Usage::default();
        usage.add(Unit::PromptTokens, 12.0);
        usage.add(Unit::CompletionTokens, 30.0);
        usage.add(Unit::CompletionTokens, 1.0);
        assert_eq!(usage.to_string(), "prompt_tokens=12, completion_tokens=31");
        assert_eq!(Usage::parse(&usage.to_string()), Some(usage));
        let mut audio = Usage::default();
        audio.add(Unit::AudioSecondsIn, 2.500_04);
        assert_eq!(audio.to_string(), "audio_seconds_in=2.5");
    }

    #[test]
    fn unknown_units_and_bad_amounts_are_skipped_and_nothing_is_none() {
        let usage = Usage::parse("inputs=3, frames=9, images=x, steps=-2").unwrap();
        assert_eq!(usage.iter().collect::<Vec<_>>(), [(Unit::Inputs, 3.0)]);
        assert_eq!(Usage::parse("frames=9"), None);
        assert_eq!(Usage::parse(""), None);
    }

    #[test]
    fn a_stream_comment_is_an_sse_comment_that_reads_back() {
        let mut usage = Usage::default();
        usage.add(Unit::CompletionTokens, 200.0);
        let comment = usage.stream_comment();
        assert_eq!(comment, b": infergate-usage completion_tokens=200\n\n");
        assert_eq!(Usage::from_stream_comment(&comment), Some(usage));
        assert_eq!(
            Usage::from_stream_comment(b": infergate-usage completion"),
            None
        );
        assert_eq!(Usage::from_stream_comment(b"data: [DONE]\n\n"), None);
    }
}
