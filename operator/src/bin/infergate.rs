//! `infergate`: the command line of infergate. `infergate token new` prints a fresh token and
//! the digest to put in an AccessToken's `spec.tokenHash`; nothing is stored anywhere.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "infergate", version, about = "infergate's command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Prints a new token (shown once) and its `sha256:` digest for `spec.tokenHash`.
    New,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Token {
            command: TokenCommand::New,
        } => {
            let token = crds::Token::generate()?;
            println!("token:     {}", token.expose_secret());
            println!("tokenHash: sha256:{}", token.sha256_hex());
            eprintln!(
                "The token is shown once; store it now. Only the tokenHash goes into the AccessToken."
            );
        }
    }
    Ok(())
}
