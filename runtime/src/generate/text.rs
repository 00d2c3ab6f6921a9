//! From token ids to text as it streams: incremental detokenization that never emits half a
//! character, and stop strings that end the text before them without ever showing a part of
//! one that later completes.

use tokenizers::Tokenizer;

/// Turns tokens into text deltas as they arrive. Decoding a window of recent tokens (rather
/// than each token alone) keeps the spaces and merges that depend on neighbours; a delta that
/// ends in U+FFFD is held back until the next tokens complete its bytes.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// The text `token` adds (possibly empty while a character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: i64) -> String {
        self.ids.push(u32::try_from(token).unwrap_or(u32::MAX));
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let now = decode(&self.ids[self.prefix_offset..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let delta = now[before.len()..].to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// What is left once the sequence ends (bytes that never completed a character).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let now = decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        now.strip_prefix(&before)
            .map(str::to_owned)
            .unwrap_or_default()
    }
}

/// Stop strings over streamed text.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received but not yet released: it may be the start of a stop string.
    held: String,
}

/// What `StopStrings::push` releases.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop string was found: `text` ends right before it and the sequence should end.
    pub stopped: bool,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> StopStrings {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Released {
        self.held.push_str(delta);
        let first = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first {
            let text = self.held[..at].to_owned();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len())
                    .filter(|&n| stop.is_char_boundary(n) && self.held.ends_with(&stop[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_owned();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases what was held when the sequence ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_string_completed_first_ends_the_text_even_if_another_began_earlier() {
        // "ese" begins before "s" in "Dies", but generation ends when "s" is complete, as
        // TGI's stop criteria end it. Found by the stream_text fuzz target (its oracle had
        // wanted the earliest start over the whole text).
        let mut stops = StopStrings::new(vec!["ese".into(), "s".into()]);
        assert_eq!(
            stops.push("Die"),
            Released {
                text: "Di".into(),
                stopped: false
            }
        );
        assert_eq!(
            stops.push("s"),
            Released {
                text: "e".into(),
                stopped: true
            }
        );
        // Complete in the same delta, the one that begins first wins.
        let mut stops = StopStrings::new(vec!["ese".into(), "s".into()]);
        assert_eq!(stops.push("Diese").text, "Di");
    }

    #[test]
    fn text_before_a_stop_string_is_released_and_the_rest_never_is() {
        let mut stops = StopStrings::new(vec!["\nUser:".into(), "###".into()]);
        assert_eq!(
            stops.push("Hello"),
            Released {
                text: "Hello".into(),
                stopped: false
            }
        );
        assert_eq!(
            stops.push(" world\nUs"),
            Released {
                text: " world".into(),
                stopped: false
            }
        );
        assert_eq!(
            stops.push("er: more"),
            Released {
                text: "".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn a_held_prefix_that_does_not_complete_is_released() {
        let mut stops = StopStrings::new(vec!["###".into()]);
        assert_eq!(
            stops.push("a ##"),
            Released {
                text: "a ".into(),
                stopped: false
            }
        );
        assert_eq!(
            stops.push("b"),
            Released {
                text: "##b".into(),
                stopped: false
            }
        );
        assert_eq!(
            stops.push("#"),
            Released {
                text: "".into(),
                stopped: false
            }
        );
        assert_eq!(stops.finish(), "#");
    }

    #[test]
    fn the_earliest_stop_string_wins() {
        let mut stops = StopStrings::new(vec!["world".into(), "lo".into()]);
        assert_eq!(
            stops.push("hello world"),
            Released {
                text: "hel".into(),
                stopped: true
            }
        );
    }
}
