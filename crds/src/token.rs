//! The token format: `igt_` + 43 base62 characters of 32 random bytes + 6 base62 characters of
//! the CRC32 of everything before them (53 characters). The shape follows GitHub's tokens so that
//! secret scanners recognise a leaked token and a mistyped one is refused without a lookup.

use std::fmt;

use sha2::{Digest, Sha256};

const PREFIX: &str = "igt_";
const RANDOM_BYTES: usize = 32;
/// ceil(256 / log2(62)): the fewest base62 digits that hold any 32-byte number.
const RANDOM_DIGITS: usize = 43;
/// ceil(32 / log2(62)): the fewest base62 digits that hold any CRC32.
const CHECKSUM_DIGITS: usize = 6;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Length of every token.
pub const TOKEN_LEN: usize = PREFIX.len() + RANDOM_DIGITS + CHECKSUM_DIGITS;

/// A plaintext access token. It exists once, when issued; everything else holds its SHA-256.
/// `Debug` never shows it, so a token inside a logged struct stays secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

/// Why a string is not a well-formed token. The messages never repeat the input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenFormatError {
    #[error("token does not start with igt_")]
    MissingPrefix,
    #[error("token is not {TOKEN_LEN} characters long")]
    WrongLength,
    #[error("token contains characters outside 0-9A-Za-z")]
    InvalidCharacter,
    #[error("token checksum does not match; it was mistyped or truncated")]
    ChecksumMismatch,
    #[error("the operating system's random number generator failed: {0}")]
    RandomSource(String),
}

impl Token {
    /// A new token from 32 bytes of the operating system's CSPRNG.
    pub fn generate() -> Result<Token, TokenFormatError> {
        let mut random = [0u8; RANDOM_BYTES];
        getrandom::fill(&mut random).map_err(|e| TokenFormatError::RandomSource(e.to_string()))?;
        Ok(Token::from_random_bytes(random))
    }

    fn from_random_bytes(random: [u8; RANDOM_BYTES]) -> Token {
        let mut token = String::with_capacity(TOKEN_LEN);
        token.push_str(PREFIX);
        token.push_str(&base62(&random, RANDOM_DIGITS));
        let checksum = checksum_digits(&token);
        token.push_str(&checksum);
        Token(token)
    }

    /// Checks the shape and checksum of a presented token. It does not say whether the token was
    /// ever issued: that takes a lookup of its hash.
    pub fn parse(candidate: &str) -> Result<Token, TokenFormatError> {
        if !candidate.starts_with(PREFIX) {
            return Err(TokenFormatError::MissingPrefix);
        }
        if candidate.len() != TOKEN_LEN {
            return Err(TokenFormatError::WrongLength);
        }
        // Before any slicing: a multi-byte character could put a slice boundary inside itself.
        if !candidate[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(TokenFormatError::InvalidCharacter);
        }
        let (body, checksum) = candidate.split_at(TOKEN_LEN - CHECKSUM_DIGITS);
        if checksum_digits(body) != checksum {
            return Err(TokenFormatError::ChecksumMismatch);
        }
        Ok(Token(candidate.to_owned()))
    }

    /// The plaintext, for the one place it is written: the user's Secret or terminal.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Lower-case hex SHA-256 of the token: what records store and the proxy looks up.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(self.0.as_bytes())
    }

    /// `igt_` and the first four random characters: enough for a person to tell tokens apart,
    /// about 24 of 256 random bits, so never enough to use one.
    pub fn display_prefix(&self) -> &str {
        &self.0[..PREFIX.len() + 4]
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    hex
}

fn checksum_digits(body: &str) -> String {
    base62(
        &crc32fast::hash(body.as_bytes()).to_be_bytes(),
        CHECKSUM_DIGITS,
    )
}

/// `number` (big-endian) in base62, left-padded with `0` to exactly `digits` characters.
fn base62(number: &[u8], digits: usize) -> String {
    let mut number = number.to_vec();
    let mut out = vec![b'0'; digits];
    for slot in out.iter_mut().rev() {
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let accumulator = (remainder << 8) | u32::from(*byte);
            *byte = (accumulator / 62) as u8;
            remainder = accumulator % 62;
        }
        *slot = BASE62[remainder as usize];
    }
    debug_assert!(
        number.iter().all(|&b| b == 0),
        "{digits} base62 digits cannot hold the number"
    );
    String::from_utf8(out).expect("base62 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn a_multibyte_character_of_the_right_byte_length_is_refused_not_a_panic() {
        // Found by the token_checksum fuzz target: the two bytes of 'ы' straddled the checksum.
        let token = Token::generate().unwrap();
        let mut bytes = token.expose_secret().to_owned();
        bytes.replace_range(
            TOKEN_LEN - CHECKSUM_DIGITS - 1..TOKEN_LEN - CHECKSUM_DIGITS + 1,
            "ы",
        );
        assert_eq!(bytes.len(), TOKEN_LEN);
        assert_eq!(
            Token::parse(&bytes),
            Err(TokenFormatError::InvalidCharacter)
        );
    }

    fn is_well_formed(token: &str) -> bool {
        token.len() == 53
            && token.starts_with("igt_")
            && token[4..].bytes().all(|b| b.is_ascii_alphanumeric())
    }

    // Expected values computed independently with Python: int.from_bytes, a base62 loop and
    // zlib.crc32 over the first 47 characters.
    #[test]
    fn all_zero_bytes_give_the_known_token() {
        let token = Token::from_random_bytes([0; 32]);
        assert_eq!(
            token.expose_secret(),
            "igt_00000000000000000000000000000000000000000000O8QaJ"
        );
    }

    #[test]
    fn all_one_bits_give_the_known_token() {
        let token = Token::from_random_bytes([0xff; 32]);
        assert_eq!(
            token.expose_secret(),
            "igt_yhjskwdA6OZ1AL1YmHWZWm8LLG7HjnuCA2j5rOw8Xp13Ue1sh"
        );
    }

    #[test]
    fn a_generated_token_has_the_documented_shape_and_parses() {
        let token = Token::generate().unwrap();
        assert!(is_well_formed(token.expose_secret()));
        assert_eq!(Token::parse(token.expose_secret()), Ok(token));
    }

    #[test]
    fn a_thousand_generated_tokens_are_unique_well_formed_and_uniformly_spread() {
        let tokens: Vec<Token> = (0..1000).map(|_| Token::generate().unwrap()).collect();
        let distinct: HashSet<&str> = tokens.iter().map(Token::expose_secret).collect();
        assert_eq!(distinct.len(), 1000);
        assert!(tokens.iter().all(|t| is_well_formed(t.expose_secret())));

        // Chi-square of the 42 low random digits of each token over the 62 symbols (the leading
        // digit is slightly biased by construction: 2^256 is not a power of 62). With 61 degrees
        // of freedom the statistic has mean 61 and standard deviation 11; a healthy generator
        // exceeds 150 with probability below 1e-9, a broken one (stuck bytes, a short range) far
        // above it.
        let mut counts = [0f64; 62];
        for token in &tokens {
            for b in token.expose_secret()[5..47].bytes() {
                counts[BASE62.iter().position(|&c| c == b).unwrap()] += 1.0;
            }
        }
        let expected = 1000.0 * 42.0 / 62.0;
        let chi_square: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        assert!(
            chi_square < 150.0,
            "chi-square {chi_square:.1} over 61 degrees of freedom"
        );
    }

    #[test]
    fn a_mistyped_token_fails_its_checksum() {
        let token = Token::generate().unwrap();
        let mut typo = token.expose_secret().as_bytes().to_vec();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            Token::parse(std::str::from_utf8(&typo).unwrap()),
            Err(TokenFormatError::ChecksumMismatch)
        );
    }

    #[test]
    fn every_one_character_substitution_is_refused_before_any_lookup() {
        // 100 000 random substitutions of one character (any position after the prefix, any
        // other alphanumeric): CRC-32 catches every error within 32 bits, and the six base-62
        // digits keep all of its 2^32 values, so none may pass.
        const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let tokens: Vec<Token> = (0..100).map(|_| Token::generate().unwrap()).collect();
        for i in 0..100_000 {
            let token = &tokens[i % tokens.len()];
            let mut bytes = token.expose_secret().as_bytes().to_vec();
            let at = PREFIX.len() + (next() as usize) % (TOKEN_LEN - PREFIX.len());
            let replacement = loop {
                let c = ALPHABET[(next() as usize) % ALPHABET.len()];
                if c != bytes[at] {
                    break c;
                }
            };
            bytes[at] = replacement;
            let mutated = std::str::from_utf8(&bytes).unwrap();
            assert_eq!(
                Token::parse(mutated),
                Err(TokenFormatError::ChecksumMismatch),
                "a substitution at {at} passed"
            );
        }
    }

    #[test]
    fn malformed_tokens_are_refused_for_the_right_reason() {
        let valid = Token::generate().unwrap();
        let valid = valid.expose_secret();
        assert_eq!(
            Token::parse(&valid.replacen("igt_", "ghp_", 1)),
            Err(TokenFormatError::MissingPrefix)
        );
        assert_eq!(
            Token::parse(&valid[..52]),
            Err(TokenFormatError::WrongLength)
        );
        assert_eq!(
            Token::parse(&format!("{valid}0")),
            Err(TokenFormatError::WrongLength)
        );
        assert_eq!(
            Token::parse(&valid.replacen('_', "_-", 1)[..53]),
            Err(TokenFormatError::InvalidCharacter)
        );
        assert_eq!(Token::parse("igt_é"), Err(TokenFormatError::WrongLength));
        assert_eq!(Token::parse(""), Err(TokenFormatError::MissingPrefix));
    }

    #[test]
    fn token_never_appears_in_debug_output_or_errors() {
        let token = Token::generate().unwrap();
        let secret = token.expose_secret();
        assert!(!format!("{token:?}").contains(&secret[4..]));
        let mut corrupt = secret.to_owned();
        corrupt.push('x');
        let error = Token::parse(&corrupt).unwrap_err().to_string();
        assert!(!error.contains(&secret[4..12]));
    }

    #[test]
    fn sha256_matches_the_published_test_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn display_prefix_is_igt_and_four_characters() {
        let token = Token::generate().unwrap();
        assert_eq!(token.display_prefix(), &token.expose_secret()[..8]);
    }
}
