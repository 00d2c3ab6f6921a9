//! The `Authorization` header a runtime verifies before any work: arbitrary bytes as the header,
//! and near misses made by writing the input over a JWT the proxy's key really signed. Nothing
//! panics, and nothing but the signed token itself (in an encoding of the same bytes) is
//! accepted, with exactly its claims.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use internal_token::{Claims, Forwarded, Signer, SigningKeys, Verifier};
use libfuzzer_sys::fuzz_target;

const MODEL: &str = "minilm-v1";

struct Fixture {
    verifier: Verifier,
    header: Vec<u8>,
    claims: Claims,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let now = SystemTime::now();
        let keys = SigningKeys::first(now - Duration::from_secs(1)).unwrap();
        let jwks = serde_json::to_vec(&keys.verifying_keys().unwrap()).unwrap();
        let mut claims = Claims::new(
            Forwarded {
                model_version_id: MODEL,
                token_record_id: "tok-1",
                request_id: "req-1",
                remaining: Duration::from_secs(60),
            },
            now,
        );
        // Good for the whole run, so that near misses meet the signature check, not the clock.
        claims.exp += 86_400;
        let jwt = Signer::new(&keys).unwrap().sign(&claims, now).unwrap();
        Fixture {
            verifier: Verifier::parse(&jwks, MODEL).unwrap(),
            header: format!("Bearer {jwt}").into_bytes(),
            claims,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    assert!(
        fixture.verifier.verify(Some(data)).is_err(),
        "no key of the fuzzer's signs"
    );
    if let Some((&at, patch)) = data.split_first() {
        let mut near_miss = fixture.header.clone();
        let start = usize::from(at) % near_miss.len();
        let end = (start + patch.len()).min(near_miss.len());
        near_miss.splice(start..end, patch.iter().copied());
        if let Ok(claims) = fixture.verifier.verify(Some(&near_miss)) {
            assert_eq!(claims, fixture.claims);
        }
    }
});
