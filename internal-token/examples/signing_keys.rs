//! Prints a new signing key set (the proxy's `--internal-signing-keys` file) that signs from
//! now, for benchmarks and runs by hand: `cargo run -p internal-token --example signing_keys`.

fn main() -> Result<(), internal_token::KeysError> {
    let keys = internal_token::SigningKeys::first(std::time::SystemTime::now())?;
    print!("{}", keys.to_json());
    Ok(())
}
