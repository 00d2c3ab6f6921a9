//! Token parsing on arbitrary strings: what parses is exactly the string given, hashes to 64
//! hex digits, and stops parsing when any one character changes (the checksum catches it
//! before any lookup).
#![no_main]

use crds::Token;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(candidate) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = Token::parse(candidate) else {
        return;
    };
    assert_eq!(token.expose_secret(), candidate);
    assert_eq!(token.sha256_hex().len(), 64);
    let chars: Vec<char> = candidate.chars().collect();
    for i in 0..chars.len() {
        let mut mutated = chars.clone();
        mutated[i] = if chars[i] == 'a' { 'b' } else { 'a' };
        let mutated: String = mutated.into_iter().collect();
        assert!(
            Token::parse(&mutated).is_err(),
            "{i}: one changed character still parses"
        );
    }
});
