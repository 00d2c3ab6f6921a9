//! Writes the CustomResourceDefinitions to `crds/manifests/` and to the Helm chart's `crds/`, or
//! with `--check`, fails when the committed files differ from what the types generate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--check") => true,
        Some(other) => {
            eprintln!("usage: crdgen [--check]  (unexpected argument {other:?})");
            return ExitCode::from(2);
        }
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for (name, yaml) in crds::manifests::rendered() {
        for dir in crds::manifests::OUTPUT_DIRS {
            let path: PathBuf = workspace.join(dir).join(&name);
            let current = std::fs::read_to_string(&path).unwrap_or_default();
            if current == yaml {
                continue;
            }
            if check {
                stale.push(path);
            } else if let Err(e) = std::fs::write(&path, &yaml) {
                eprintln!("cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            } else {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    if stale.is_empty() {
        return ExitCode::SUCCESS;
    }
    for path in stale {
        eprintln!(
            "stale: {} (run `cargo run -p crds --bin crdgen`)",
            path.display()
        );
    }
    ExitCode::FAILURE
}
