//! Streamed text as the runtime frames it into SSE events: arbitrary token ids through the
//! incremental decoder (the tiny Llama's byte-level BPE, so half characters occur) and
//! arbitrary stop strings. The deltas add up to what decoding the whole sequence gives, never
//! split a character; the released text stops at the first delta that completes a stop string
//! (as TGI's stop criteria: generation ends there), right before the earliest stop string
//! complete by then; each event's JSON stays on one line, so no delta can break the framing.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use runtime::generate::text::{IncrementalDecoder, StopStrings};
use tokenizers::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/llama/tokenizer.json");
        Tokenizer::from_file(path).expect("the tiny Llama's tokenizer")
    })
}

/// Splits the input into up to three stop strings (each after a length byte) and token ids
/// (two bytes each, over the vocabulary and a little past it).
fn parse(data: &[u8]) -> (Vec<String>, Vec<i64>) {
    let Some((&count, mut rest)) = data.split_first() else {
        return (Vec::new(), Vec::new());
    };
    let mut stops = Vec::new();
    for _ in 0..count % 4 {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let len = usize::from(len % 8).min(tail.len());
        stops.push(String::from_utf8_lossy(&tail[..len]).into_owned());
        rest = &tail[len..];
    }
    let vocabulary = tokenizer().get_vocab_size(true) as i64;
    let ids = rest
        .chunks_exact(2)
        .map(|pair| i64::from(u16::from_le_bytes([pair[0], pair[1]])) % (vocabulary + 8))
        .collect();
    (stops, ids)
}

fuzz_target!(|data: &[u8]| {
    let (stops, ids) = parse(data);
    let tokenizer = tokenizer();
    let whole = {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&id| u32::try_from(id).unwrap_or(u32::MAX))
            .collect();
        tokenizer.decode(&ids, true).unwrap_or_default()
    };

    let mut decoder = IncrementalDecoder::default();
    let mut stop_strings = StopStrings::new(stops.clone());
    let (mut streamed, mut released, mut stopped) = (String::new(), String::new(), false);
    // Where each delta ends in the whole text.
    let mut boundaries = Vec::new();
    for &id in &ids {
        let delta = decoder.push(tokenizer, id);
        let event = serde_json::json!({"choices": [{"text": delta}]}).to_string();
        assert!(!event.contains(['\n', '\r']), "an event spans lines");
        streamed.push_str(&delta);
        boundaries.push(streamed.len());
        if !stopped {
            let out = stop_strings.push(&delta);
            released.push_str(&out.text);
            stopped = out.stopped;
        }
    }
    let rest = decoder.finish(tokenizer);
    streamed.push_str(&rest);
    boundaries.push(streamed.len());
    assert_eq!(streamed, whole, "the deltas of {ids:?}");
    if !stopped {
        released.push_str(&stop_strings.push(&rest).text);
        released.push_str(&stop_strings.finish());
    }

    // Every occurrence of a stop string, as (start, end).
    let occurrences: Vec<(usize, usize)> = stops
        .iter()
        .filter(|stop| !stop.is_empty())
        .flat_map(|stop| {
            whole
                .match_indices(stop.as_str())
                .map(move |(start, _)| (start, start + stop.len()))
        })
        .collect();
    let first_complete = boundaries
        .iter()
        .find(|&&boundary| occurrences.iter().any(|&(_, end)| end <= boundary));
    let earliest = first_complete.and_then(|&boundary| {
        occurrences
            .iter()
            .filter(|&&(_, end)| end <= boundary)
            .map(|&(start, _)| start)
            .min()
    });
    match earliest {
        Some(at) => assert_eq!(released, whole[..at], "stops {stops:?} over {whole:?}"),
        None => assert_eq!(released, whole, "no stop of {stops:?} in {whole:?}"),
    }
});
