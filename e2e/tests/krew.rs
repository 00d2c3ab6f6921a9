//! `kubectl infergate` installed as krew users install plugins: the archive and manifest that
//! scripts/krew-package.sh makes from .krew.yaml, installed by the real krew (built from
//! e2e/krew's Go module; it checks the archive against the manifest's sha256), then found and
//! run by the real kubectl.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{built, succeeded};

/// krew, built once into `dir` (Go's build cache makes a rebuild quick).
fn krew(dir: &Path) -> PathBuf {
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("krew");
    let binary = dir.join("kubectl-krew");
    succeeded(
        "go build krew",
        &Command::new("go")
            .args(["build", "-trimpath", "-ldflags=-s", "-o"])
            .arg(&binary)
            .arg("sigs.k8s.io/krew/cmd/krew")
            .current_dir(module)
            .env("CGO_ENABLED", "0")
            .output()
            .expect("go (scripts/setup.sh)"),
    );
    binary
}

#[test]
fn krew_installs_the_packaged_plugin_and_kubectl_runs_it() {
    let dir = std::env::temp_dir().join(format!("infergate-krew-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let krew = krew(&dir);
    let package = dir.join("package");
    let printed = succeeded(
        "scripts/krew-package.sh",
        &Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/krew-package.sh"))
            .args(["--version", "v9.9.9", "--binary"])
            .arg(built("infergate"))
            .arg("--out")
            .arg(&package)
            .output()
            .unwrap(),
    );
    let manifest = package.join("infergate.yaml");
    let archive = package.join("kubectl-infergate_linux_amd64.tar.gz");
    assert_eq!(
        printed.lines().collect::<Vec<_>>(),
        [archive.to_str().unwrap(), manifest.to_str().unwrap()]
    );
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(
        !text.contains("{{"),
        "every template action rendered:\n{text}"
    );
    assert!(
        text.contains("uri: https://github.com/infergate/infergate/releases/download/v9.9.9/kubectl-infergate_linux_amd64.tar.gz"),
        "{text}"
    );

    let root = dir.join("krew-root");
    let installed = Command::new(&krew)
        .args(["install", "--manifest"])
        .arg(&manifest)
        .arg("--archive")
        .arg(&archive)
        .env("KREW_ROOT", &root)
        .output()
        .unwrap();
    succeeded("krew install", &installed);
    // A manifest whose digest is not the archive's is refused.
    let tampered = dir.join("tampered.yaml");
    let digest_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("sha256:"))
        .unwrap();
    std::fs::write(
        &tampered,
        text.replace(digest_line, &format!("      sha256: {}", "a".repeat(64))),
    )
    .unwrap();
    let refused = Command::new(&krew)
        .args(["install", "--manifest"])
        .arg(&tampered)
        .arg("--archive")
        .arg(&archive)
        .env("KREW_ROOT", dir.join("other-root"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("checksum does not match"), "{stderr}");

    // kubectl finds the plugin krew linked into its bin directory, and runs it.
    let kubectl = &e2e::test_bed().kubectl;
    let path = format!(
        "{}:{}",
        root.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let plugins = succeeded(
        "kubectl plugin list",
        &Command::new(kubectl)
            .args(["plugin", "list"])
            .env("PATH", &path)
            .output()
            .unwrap(),
    );
    assert!(
        plugins.contains(&root.join("bin/kubectl-infergate").display().to_string()),
        "{plugins}"
    );
    let version = succeeded(
        "kubectl infergate --version",
        &Command::new(kubectl)
            .args(["infergate", "--version"])
            .env("PATH", &path)
            .output()
            .unwrap(),
    );
    assert_eq!(
        version.trim(),
        concat!("infergate ", env!("CARGO_PKG_VERSION"))
    );
    let _ = std::fs::remove_dir_all(dir);
}
