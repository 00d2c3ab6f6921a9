//! Finds a token in text it must never reach: logs, error bodies, metrics, Kubernetes Events and
//! status. A careless line rarely prints a token as is, so every form it might take is looked
//! for. The same for the JWTs the proxy signs for runtimes: good for seconds, but a credential
//! while they are.

/// The forms of the token `secret` (`igt_` and its random part) that `text` shows: the token
/// raw, standard or URL-safe base64 of it, percent-encoded, or any 12 characters of its random
/// part. Empty when `text` shows none.
pub fn token_leaks(secret: &str, text: &str) -> Vec<String> {
    let random_part = secret.strip_prefix("igt_").unwrap_or(secret);
    let standard = base64_of(secret.as_bytes());
    let url_safe = standard
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_");
    let mut leaks: Vec<String> = [
        ("base64", standard.clone()),
        ("URL-safe base64", url_safe),
        ("percent-encoded", secret.replace('_', "%5F")),
    ]
    .into_iter()
    .filter(|(_, form)| text.contains(form.as_str()))
    .map(|(what, _)| what.to_owned())
    .collect();
    if let Some(window) = shown_window(random_part, 12, text) {
        leaks.push(format!("the 12 characters {window:?}"));
    }
    leaks
}

/// The first `width` consecutive characters of `secret` (ASCII) that `text` shows.
fn shown_window<'a>(secret: &'a str, width: usize, text: &str) -> Option<&'a str> {
    let windows = (secret.len() + 1).saturating_sub(width);
    (0..windows)
        .map(|i| &secret[i..i + width])
        .find(|window| text.contains(window))
}

/// The parts of the JWT `jwt` that `text` shows: the whole of it, its claims, or any 16
/// characters of its signature. Empty when `text` shows none. Its header (algorithm and key id)
/// is no secret.
pub fn jwt_leaks(jwt: &str, text: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    if text.contains(jwt) {
        leaks.push("the whole JWT".to_owned());
    }
    let parts: Vec<&str> = jwt.split('.').collect();
    if let [_, claims, signature] = parts[..] {
        if text.contains(claims) {
            leaks.push("its claims".to_owned());
        }
        if let Some(window) = shown_window(signature, 16, text) {
            leaks.push(format!("the 16 signature characters {window:?}"));
        }
    }
    leaks
}

/// Standard base64 with padding, as a client or a log formatter would encode the token.
fn base64_of(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "igt_RmlFoYybrnsINs7Le8WiXlUHWxbDXsh9KL2X1PfG8Ec49Xc72";

    #[test]
    fn base64_matches_the_rfc_4648_examples() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_of(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn every_form_of_the_token_is_found_and_nothing_else() {
        assert!(token_leaks(SECRET, "token=app status=401 code=invalid_token").is_empty());
        assert!(token_leaks(SECRET, "igt_").is_empty());
        let standard = base64_of(SECRET.as_bytes());
        for (text, form) in [
            (SECRET.to_owned(), "12 characters"),
            (format!("Bearer {}", &SECRET[20..32]), "12 characters"),
            (format!("auth={standard}"), "base64"),
            (SECRET.replace('_', "%5F"), "percent-encoded"),
        ] {
            let leaks = token_leaks(SECRET, &text);
            assert!(leaks.iter().any(|l| l.contains(form)), "{text}: {leaks:?}");
        }
        // Eleven characters are too few to tell a token from chance.
        assert!(token_leaks(SECRET, &SECRET[20..31]).is_empty());
    }

    #[test]
    fn a_jwt_leaks_whole_by_its_claims_or_by_part_of_its_signature() {
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ0b2stMSJ9.Q2FyZWxlc3NseSBsb2dnZWQgc2lnbmF0dXJlIGJ5dGVz";
        assert!(jwt_leaks(jwt, "alg=EdDSA kid=abc sub=tok-1").is_empty());
        assert!(
            jwt_leaks(jwt, "eyJhbGciOiJFZERTQSJ9").is_empty(),
            "the header alone"
        );
        for (text, form) in [
            (format!("authorization: Bearer {jwt}"), "whole"),
            ("claims eyJzdWIiOiJ0b2stMSJ9".to_owned(), "claims"),
            (format!("sig={}", &jwt[50..66]), "signature"),
        ] {
            let leaks = jwt_leaks(jwt, &text);
            assert!(leaks.iter().any(|l| l.contains(form)), "{text}: {leaks:?}");
        }
    }
}
