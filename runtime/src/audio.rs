//! Audio files to the 16 kHz mono samples speech models take: any container and codec
//! symphonia reads here (WAV, MP3, FLAC, Ogg Vorbis), any sample rate, channels averaged, and a
//! band-limited resampler.
//!
//! Nothing is allocated from what a header claims: samples are appended as packets decode, and
//! decoding stops at the duration limit. A file whose header promises more audio than its data
//! holds is refused as truncated rather than transcribed in part.

use std::io::ErrorKind;

use bytes::Bytes;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// The rate speech models take.
pub const TARGET_RATE: u32 = 16_000;

/// Sample rates accepted: telephone audio up to studio masters.
const RATES: std::ops::RangeInclusive<u32> = 4_000..=384_000;

/// Why an upload cannot be transcribed; each names what is wrong with the file.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AudioError {
    #[error("the audio file is empty")]
    Empty,
    #[error("not a supported audio file (wav, mp3, flac, ogg): {0}")]
    Unsupported(String),
    #[error("the audio file is invalid: {0}")]
    Invalid(String),
    #[error(
        "the audio file is truncated: its header says {claimed:.2} s, its data holds {decoded:.2} s"
    )]
    Truncated { claimed: f64, decoded: f64 },
    #[error("the audio is longer than the limit of {limit} s")]
    TooLong { limit: u64 },
    #[error("the audio file holds no samples")]
    Silent,
}

/// Decodes `bytes` and returns its samples at 16 kHz, mono, and the duration in seconds.
pub fn decode_to_16k(bytes: Bytes, max_seconds: u64) -> Result<(Vec<f32>, f64), AudioError> {
    let (samples, rate) = decode(bytes, max_seconds)?;
    let seconds = samples.len() as f64 / f64::from(rate);
    Ok((resample(&samples, rate, TARGET_RATE), seconds))
}

/// Decodes `bytes` to mono samples at the file's own rate.
pub fn decode(bytes: Bytes, max_seconds: u64) -> Result<(Vec<f32>, u32), AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    check_wav_header(&bytes)?;
    // symphonia asserts on some malformed headers; a panic is a refused file, not a dead worker.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_checked(bytes, max_seconds)
    }))
    .unwrap_or_else(|_| {
        Err(AudioError::Invalid(
            "the decoder cannot read this file".to_owned(),
        ))
    })
}

/// Checks the format chunk of every WAV header in `bytes` before symphonia reads it: symphonia
/// panics on a zero sample rate or block size instead of returning an error, and its probe
/// finds a header past leading junk, so every `RIFF....WAVE` is checked, not only one at the
/// start. Other formats pass through.
pub fn check_wav_header(bytes: &[u8]) -> Result<(), AudioError> {
    for start in 0..bytes.len().saturating_sub(11) {
        if &bytes[start..start + 4] == b"RIFF" && &bytes[start + 8..start + 12] == b"WAVE" {
            check_wav_at(&bytes[start..])?;
        }
    }
    Ok(())
}

fn check_wav_at(bytes: &[u8]) -> Result<(), AudioError> {
    let invalid = |message: &str| Err(AudioError::Invalid(format!("WAV header: {message}")));
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let mut at = 12usize;
    while let Some(header) = bytes.get(at..at + 8) {
        let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        match &header[0..4] {
            b"fmt " => {
                let Some(fmt) = bytes.get(at + 8..at + 8 + 16).filter(|_| length >= 16) else {
                    return invalid("the fmt chunk is shorter than 16 bytes");
                };
                let rate = u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]);
                return match (u16_at(fmt, 2), rate, u16_at(fmt, 12), u16_at(fmt, 14)) {
                    (0, ..) => invalid("0 channels"),
                    (_, 0, ..) => invalid("a sample rate of 0 Hz"),
                    (_, _, 0, _) => invalid("a block size of 0 bytes"),
                    (.., 0) => invalid("0 bits per sample"),
                    _ => Ok(()),
                };
            }
            b"data" => return invalid("the data chunk comes before the fmt chunk"),
            _ => {}
        }
        // Chunks are padded to an even length.
        at = match at.checked_add(8 + length + (length & 1)) {
            Some(next) => next,
            None => break,
        };
    }
    invalid("no fmt chunk")
}

fn decode_checked(bytes: Bytes, max_seconds: u64) -> Result<(Vec<f32>, u32), AudioError> {
    let source = MediaSourceStream::new(Box::new(std::io::Cursor::new(bytes)), Default::default());
    let options = FormatOptions {
        // MP3 and Vorbis carry encoder delay and padding; trimming them keeps time aligned.
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&Hint::new(), source, &options, &MetadataOptions::default())
        .map_err(|e| AudioError::Unsupported(e.to_string()))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::Unsupported("no audio track".to_owned()))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    let rate = params
        .sample_rate
        .ok_or_else(|| AudioError::Invalid("no sample rate".to_owned()))?;
    if !RATES.contains(&rate) {
        return Err(AudioError::Invalid(format!(
            "sample rate {rate} Hz is outside {}..={} Hz",
            RATES.start(),
            RATES.end()
        )));
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| AudioError::Unsupported(e.to_string()))?;
    let limit = max_seconds.saturating_mul(u64::from(rate));
    let mut samples: Vec<f32> = Vec::new();
    let mut buffer: Option<SampleBuffer<f32>> = None;
    loop {
        let packet = match format.next_packet() {
            Ok(packet) => packet,
            Err(SymphoniaError::IoError(e)) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(AudioError::Invalid(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(decoded) => decoded,
            // A damaged packet is skipped, as players do; a file of nothing else decodes to no
            // samples and is refused below.
            Err(SymphoniaError::DecodeError(_)) => continue,
            Err(SymphoniaError::IoError(e)) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(AudioError::Invalid(e.to_string())),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count().max(1);
        let buffer = match &mut buffer {
            Some(b) if b.capacity() >= decoded.capacity() * channels => b,
            slot => slot.insert(SampleBuffer::new(decoded.capacity() as u64, spec)),
        };
        buffer.copy_interleaved_ref(decoded);
        let scale = 1.0 / channels as f32;
        samples.extend(
            buffer
                .samples()
                .chunks_exact(channels)
                .map(|frame| frame.iter().sum::<f32>() * scale),
        );
        if samples.len() as u64 > limit {
            return Err(AudioError::TooLong { limit: max_seconds });
        }
    }
    if samples.is_empty() {
        return Err(AudioError::Silent);
    }
    if let Some(claimed) = params.n_frames {
        // Gapless trimming and the last partial frame account for a few milliseconds.
        let slack = u64::from(rate) / 10;
        if claimed > samples.len() as u64 + slack {
            return Err(AudioError::Truncated {
                claimed: claimed as f64 / f64::from(rate),
                decoded: samples.len() as f64 / f64::from(rate),
            });
        }
    }
    Ok((samples, rate))
}

/// Zero crossings of the sinc on each side of a tap at the lower of the two Nyquist rates.
const ZERO_CROSSINGS: f64 = 24.0;
/// Filter table resolution: positions between two input samples, interpolated linearly.
const PHASES: usize = 256;
/// Passband edge as a fraction of the lower Nyquist rate; the rest is the transition band.
const PASSBAND: f64 = 0.95;
/// Kaiser window shape: about 90 dB of stopband attenuation.
const KAISER_BETA: f64 = 9.0;

/// Resamples `input` from `from` Hz to `to` Hz with a Kaiser-windowed sinc filter whose cutoff
/// sits below the lower Nyquist rate, so that downsampling does not alias. Output sample `n`
/// is the input's value at time `n / to`, so the two stay aligned.
pub fn resample(input: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || input.is_empty() {
        return input.to_vec();
    }
    let ratio = f64::from(to) / f64::from(from);
    // Cutoff in cycles per input sample, relative to the input's Nyquist rate.
    let cutoff = ratio.min(1.0) * PASSBAND;
    let half_width = (ZERO_CROSSINGS / cutoff).ceil() as usize;
    let taps = 2 * half_width;
    let i0 = bessel_i0(KAISER_BETA);
    // table[p][m]: the filter at distance x = p/PHASES + half_width - 1 - m input samples.
    let table: Vec<Vec<f32>> = (0..=PHASES)
        .map(|p| {
            (0..taps)
                .map(|m| {
                    let x = p as f64 / PHASES as f64 + half_width as f64 - 1.0 - m as f64;
                    let r = x / half_width as f64;
                    if r.abs() >= 1.0 {
                        return 0.0;
                    }
                    let window = bessel_i0(KAISER_BETA * (1.0 - r * r).sqrt()) / i0;
                    (cutoff * sinc(cutoff * x) * window) as f32
                })
                .collect()
        })
        .collect();
    let out_len = (input.len() as u64 * u64::from(to)).div_ceil(u64::from(from)) as usize;
    let (from, to) = (u64::from(from), u64::from(to));
    (0..out_len as u64)
        .map(|n| {
            let position = n * from;
            let index = (position / to) as i64;
            let fraction = (position % to) as f64 / to as f64;
            let scaled = fraction * PHASES as f64;
            let phase = scaled.floor() as usize;
            let blend = (scaled - phase as f64) as f32;
            let (lower, upper) = (&table[phase], &table[phase + 1]);
            let first = index - half_width as i64 + 1;
            let mut sum = 0f32;
            for m in 0..taps {
                let k = first + m as i64;
                if k < 0 || k >= input.len() as i64 {
                    continue;
                }
                let h = lower[m] + (upper[m] - lower[m]) * blend;
                sum += input[k as usize] * h;
            }
            sum
        })
        .collect()
}

fn sinc(x: f64) -> f64 {
    if x.abs() < 1e-12 {
        1.0
    } else {
        let px = std::f64::consts::PI * x;
        px.sin() / px
    }
}

/// The modified Bessel function of the first kind, order 0, by its power series.
fn bessel_i0(x: f64) -> f64 {
    let mut sum = 1.0;
    let mut term = 1.0;
    let quarter_square = x * x / 4.0;
    for k in 1..64 {
        term *= quarter_square / (k * k) as f64;
        sum += term;
        if term < sum * 1e-16 {
            break;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, hz: f64, seconds: f64) -> Vec<f32> {
        (0..(seconds * f64::from(rate)) as usize)
            .map(|i| (2.0 * std::f64::consts::PI * hz * i as f64 / f64::from(rate)).sin() as f32)
            .collect()
    }

    /// Largest difference away from the edges, where the filter sees zeros past the ends.
    fn max_inner_error(a: &[f32], b: &[f32], edge: usize) -> f32 {
        a.iter()
            .zip(b)
            .skip(edge)
            .take(a.len().min(b.len()) - 2 * edge)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn a_tone_in_the_passband_survives_every_common_rate() {
        for rate in [8_000, 11_025, 22_050, 44_100, 48_000, 96_000] {
            let resampled = resample(&tone(rate, 1000.0, 0.5), rate, TARGET_RATE);
            let expected = tone(TARGET_RATE, 1000.0, 0.5);
            assert!(resampled.len().abs_diff(expected.len()) <= 1, "{rate}");
            let error = max_inner_error(&resampled, &expected, 400);
            assert!(error < 2e-3, "{rate} Hz: max error {error}");
        }
    }

    #[test]
    fn a_tone_above_the_new_nyquist_rate_is_filtered_out_not_aliased() {
        // 12 kHz would alias to 4 kHz at 16 kHz.
        let resampled = resample(&tone(48_000, 12_000.0, 0.5), 48_000, TARGET_RATE);
        let inner = &resampled[400..resampled.len() - 400];
        let peak = inner.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(peak < 1e-3, "aliased peak {peak}");
    }

    #[test]
    fn the_same_rate_is_returned_unchanged() {
        let samples = tone(TARGET_RATE, 440.0, 0.01);
        assert_eq!(resample(&samples, TARGET_RATE, TARGET_RATE), samples);
    }

    #[test]
    fn bytes_that_are_not_audio_are_refused_by_name() {
        assert_eq!(decode(Bytes::new(), 60), Err(AudioError::Empty));
        let error = decode(Bytes::from_static(b"{\"not\": \"audio\"}"), 60).unwrap_err();
        assert!(matches!(error, AudioError::Unsupported(_)), "{error:?}");
    }

    fn wav_header(rate: u32, data_bytes: u32) -> Vec<u8> {
        let mut header = Vec::new();
        header.extend_from_slice(b"RIFF");
        header.extend_from_slice(&(36 + data_bytes).to_le_bytes());
        header.extend_from_slice(b"WAVEfmt ");
        header.extend_from_slice(&16u32.to_le_bytes());
        header.extend_from_slice(&1u16.to_le_bytes()); // PCM
        header.extend_from_slice(&1u16.to_le_bytes()); // mono
        header.extend_from_slice(&rate.to_le_bytes());
        header.extend_from_slice(&(rate * 2).to_le_bytes());
        header.extend_from_slice(&2u16.to_le_bytes());
        header.extend_from_slice(&16u16.to_le_bytes());
        header.extend_from_slice(b"data");
        header.extend_from_slice(&data_bytes.to_le_bytes());
        header
    }

    #[test]
    fn a_wav_that_claims_4_gib_is_refused_without_allocating_it() {
        let mut file = wav_header(16_000, u32::MAX - 64);
        file.extend(std::iter::repeat_n(0u8, 3200));
        let error = decode(Bytes::from(file), 600).unwrap_err();
        assert!(
            matches!(
                error,
                AudioError::Truncated { .. } | AudioError::TooLong { .. }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn a_wav_with_a_zero_sample_rate_is_refused_before_the_decoder_sees_it() {
        let mut file = wav_header(0, 3200);
        file.extend(std::iter::repeat_n(0u8, 3200));
        assert_eq!(
            decode(Bytes::from(file), 600).unwrap_err(),
            AudioError::Invalid("WAV header: a sample rate of 0 Hz".to_owned())
        );
    }

    #[test]
    fn a_wav_header_after_leading_junk_is_checked_too() {
        // Found by the audio_header fuzz target: symphonia's probe skips to a later header.
        let mut file = b"RIF+junkWAVEfm".to_vec();
        let mut wav = wav_header(0, 400);
        wav.extend(std::iter::repeat_n(0u8, 400));
        file.extend(wav);
        assert_eq!(
            decode(Bytes::from(file), 600).unwrap_err(),
            AudioError::Invalid("WAV header: a sample rate of 0 Hz".to_owned())
        );
    }

    #[test]
    fn wav_headers_are_checked_at_every_length_without_panicking() {
        let mut file = wav_header(16_000, 3200);
        file.extend(std::iter::repeat_n(0u8, 3200));
        for cut in 0..60 {
            let _ = check_wav_header(&file[..cut]);
        }
        assert_eq!(check_wav_header(&file), Ok(()));
        let mut zero_channels = file.clone();
        zero_channels[22] = 0;
        assert!(check_wav_header(&zero_channels).is_err());
        let mut huge_chunk = file.clone();
        huge_chunk[12..16].copy_from_slice(b"LIST");
        huge_chunk[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(check_wav_header(&huge_chunk).is_err());
    }

    #[test]
    fn decoding_stops_at_the_duration_limit() {
        let mut file = wav_header(16_000, 16_000 * 2 * 3);
        file.extend(std::iter::repeat_n(0u8, 16_000 * 2 * 3));
        assert_eq!(
            decode(Bytes::from(file), 2).unwrap_err(),
            AudioError::TooLong { limit: 2 }
        );
    }
}
