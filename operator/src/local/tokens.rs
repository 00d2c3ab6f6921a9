//! Tokens in local mode: issued with the operator's code, remembered by digest in the state
//! directory so a token keeps working across restarts of `infergate up`, shown once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crds::{AccessToken, ModelDeployment, Token, TokenRecord};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use super::write_atomically;
use crate::tokens::{Issuance, IssueError, own_token_digest, record, resolve_models};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Stored {
    sha256: String,
    prefix: Option<String>,
    issued_at: Timestamp,
}

/// Issuances by AccessToken (`namespace/name`), persisted as JSON.
#[derive(Debug)]
pub struct Issued {
    path: PathBuf,
    entries: BTreeMap<String, Stored>,
}

/// A token issued by this pass, whose plaintext is shown once.
#[derive(Debug)]
pub struct NewToken {
    pub access_token: String,
    pub token: Token,
    pub record: TokenRecord,
}

fn key(token: &AccessToken) -> String {
    format!(
        "{}/{}",
        token.namespace().unwrap_or_default(),
        token.name_any()
    )
}

impl Issued {
    pub fn open(path: &Path) -> anyhow::Result<Issued> {
        let entries = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                anyhow::anyhow!("{} is not a token state file: {e}", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        Ok(Issued {
            path: path.to_owned(),
            entries,
        })
    }

    /// The issuance remembered for `token`, once `infergate up` has issued it.
    pub fn issuance(&self, token: &AccessToken) -> Option<Issuance> {
        self.entries.get(&key(token)).map(|stored| Issuance {
            sha256: stored.sha256.clone(),
            prefix: stored.prefix.clone(),
            issued_at: stored.issued_at,
        })
    }

    /// The records of `tokens` for `models`, issuing what is new: a token without an
    /// issuance (or whose `tokenHash` changed) gets one; issuances of tokens no longer in the
    /// files are forgotten, so re-adding one issues a new token.
    pub fn records(
        &mut self,
        tokens: &[AccessToken],
        models: &[ModelDeployment],
    ) -> anyhow::Result<(Vec<TokenRecord>, Vec<NewToken>)> {
        let mut records = Vec::new();
        let mut fresh = Vec::new();
        let mut kept = BTreeMap::new();
        for access_token in tokens {
            let own = own_token_digest(access_token).map_err(describe)?;
            let stored = self
                .entries
                .get(&key(access_token))
                .filter(|s| own.as_ref().is_none_or(|own| *own == s.sha256))
                .cloned();
            let (stored, plaintext) = match (stored, own) {
                (Some(stored), _) => (stored, None),
                (None, Some(sha256)) => {
                    let issuance = Issuance::of_digest(sha256, Timestamp::now());
                    (stored_of(&issuance), None)
                }
                (None, None) => {
                    let token = Token::generate()?;
                    let issuance = Issuance::of_token(&token, Timestamp::now());
                    (stored_of(&issuance), Some(token))
                }
            };
            let issuance = Issuance {
                sha256: stored.sha256.clone(),
                prefix: stored.prefix.clone(),
                issued_at: stored.issued_at,
            };
            let ids = resolve_models(access_token, models).ids;
            let record = record(access_token, &issuance, ids).map_err(describe)?;
            if let Some(token) = plaintext {
                fresh.push(NewToken {
                    access_token: key(access_token),
                    token,
                    record: record.clone(),
                });
            }
            kept.insert(key(access_token), stored);
            records.push(record);
        }
        if kept != self.entries {
            self.entries = kept;
            self.save()?;
        }
        Ok((records, fresh))
    }

    fn save(&self) -> anyhow::Result<()> {
        write_atomically(
            &self.path,
            &serde_json::to_vec_pretty(&self.entries)?,
            0o644,
        )?;
        Ok(())
    }
}

fn stored_of(issuance: &Issuance) -> Stored {
    Stored {
        sha256: issuance.sha256.clone(),
        prefix: issuance.prefix.clone(),
        issued_at: issuance.issued_at,
    }
}

fn describe(error: IssueError) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}
