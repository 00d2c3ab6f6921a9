//! Local mode's internal keys: the proxy signs every forwarded request with them and each
//! runtime verifies it, as in a cluster, so that a process on this machine cannot skip the
//! proxy's token check by calling a runtime's port. The files live in the state directory:
//! `internal-keys/signing.json` (the private keys, readable by this user only) and
//! `internal-keys/jwks.json` (the public halves). Both processes re-read them when they change,
//! so a rotation needs no restart.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use internal_token::{Schedule, SigningKeys};

use super::write_atomically;

/// A key is replaced daily while `infergate up` runs; runtimes re-read the public keys every
/// half second, so a new key signs after a few of those.
pub const SCHEDULE: Schedule = Schedule {
    period: Duration::from_secs(24 * 3600),
    activation: Duration::from_secs(2),
};

/// The file that asks the running `infergate up` for a rotation (`infergate rotate-keys`).
const ROTATE_REQUEST: &str = "rotate-requested";

/// The directory of the key files.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("internal-keys")
}

/// What the proxy reads (`--internal-signing-keys`).
pub fn signing_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("signing.json")
}

/// What each runtime reads (`--internal-keys`).
pub fn jwks_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("jwks.json")
}

/// Asks the `infergate up` of `state_dir` for a rotation.
pub fn request_rotation(state_dir: &Path) -> std::io::Result<PathBuf> {
    let request = dir(state_dir).join(ROTATE_REQUEST);
    std::fs::write(&request, b"")?;
    Ok(request)
}

/// The key files of one `infergate up`, kept rotated.
#[derive(Debug)]
pub struct InternalKeys {
    state_dir: PathBuf,
    keys: SigningKeys,
}

impl InternalKeys {
    /// The keys of an earlier run, or a first key; both files written.
    pub fn open(state_dir: &Path, now: SystemTime) -> anyhow::Result<InternalKeys> {
        let dir = dir(state_dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let keys = match std::fs::read(signing_path(state_dir)) {
            Ok(bytes) => SigningKeys::parse(&bytes)?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => SigningKeys::first(now)?,
            Err(error) => return Err(error.into()),
        };
        let keys = InternalKeys {
            state_dir: state_dir.to_owned(),
            keys,
        };
        keys.write()?;
        Ok(keys)
    }

    /// Rotates when the period is up or a rotation was asked for, and retires replaced keys
    /// past their grace; returns the id of a new key.
    pub fn tick(&mut self, now: SystemTime) -> anyhow::Result<Option<String>> {
        let request = dir(&self.state_dir).join(ROTATE_REQUEST);
        let asked = request.exists();
        let maintained = self.keys.maintain(now, SCHEDULE, asked)?;
        if maintained.changed {
            self.write()?;
        }
        if asked {
            std::fs::remove_file(&request)?;
        }
        Ok(maintained.rotated)
    }

    /// The public keys first, so that no runtime meets a JWT signed by a key it has not seen;
    /// each file replaced whole (a rename), so no reader sees half of one.
    fn write(&self) -> anyhow::Result<()> {
        let jwks = serde_json::to_vec_pretty(&self.keys.verifying_keys()?)?;
        write_atomically(&jwks_path(&self.state_dir), &jwks, 0o644)?;
        write_atomically(
            &signing_path(&self.state_dir),
            self.keys.to_json().as_bytes(),
            0o600,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("infergate-keys-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_first_start_writes_a_private_file_only_its_user_reads_and_the_public_keys() {
        let state = scratch("first");
        InternalKeys::open(&state, at(0)).unwrap();
        let mode = |path: PathBuf| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(signing_path(&state)), 0o600);
        assert_eq!(mode(dir(&state)), 0o700);
        let jwks = std::fs::read_to_string(jwks_path(&state)).unwrap();
        assert!(
            jwks.contains("Ed25519") && !jwks.contains("PRIVATE"),
            "{jwks}"
        );
    }

    #[test]
    fn a_restart_keeps_the_keys() {
        let state = scratch("restart");
        let first = InternalKeys::open(&state, at(0)).unwrap();
        let again = InternalKeys::open(&state, at(10)).unwrap();
        assert_eq!(first.keys, again.keys);
    }

    #[test]
    fn a_rotation_asked_for_is_done_once_and_the_old_key_goes_after_its_grace() {
        let state = scratch("rotate");
        let mut keys = InternalKeys::open(&state, at(0)).unwrap();
        assert_eq!(keys.tick(at(1)).unwrap(), None);
        request_rotation(&state).unwrap();
        let new = keys.tick(at(2)).unwrap().expect("rotated");
        assert_eq!(keys.tick(at(3)).unwrap(), None, "one request, one rotation");
        let on_disk = SigningKeys::parse(&std::fs::read(signing_path(&state)).unwrap()).unwrap();
        assert_eq!(on_disk.keys.len(), 2, "both verify during the overlap");
        let activation = SCHEDULE.activation.as_secs();
        keys.tick(at(2 + activation + SCHEDULE.grace().as_secs()))
            .unwrap();
        let on_disk = SigningKeys::parse(&std::fs::read(signing_path(&state)).unwrap()).unwrap();
        assert_eq!(on_disk.keys.len(), 1);
        assert_eq!(on_disk.keys[0].kid, new);
    }

    #[test]
    fn a_key_is_replaced_every_period() {
        let state = scratch("period");
        let mut keys = InternalKeys::open(&state, at(0)).unwrap();
        assert!(
            keys.tick(at(SCHEDULE.period.as_secs() - 1))
                .unwrap()
                .is_none()
        );
        assert!(keys.tick(at(SCHEDULE.period.as_secs())).unwrap().is_some());
    }
}
