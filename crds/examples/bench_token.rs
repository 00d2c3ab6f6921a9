//! Prints a fresh token and its record as JSON, for benchmarks and manual tests:
//! `{"token": "igt_...", "record": {...}}`. The record allows the model `bench`.

fn main() {
    let token = crds::Token::generate().expect("the OS random number generator works");
    let record = crds::TokenRecord {
        id: "bench".into(),
        name: "bench/bench".into(),
        sha256: token.sha256_hex(),
        models: vec!["bench".into()],
        expires_at: None,
        revoked: false,
        limits: None,
    };
    let out = serde_json::json!({"token": token.expose_secret(), "record": record});
    println!("{out}");
}
