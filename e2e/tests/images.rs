//! The images, as `docker/build-images.sh` builds them without a daemon from the binaries
//! under test: each is what its stage of docker/Dockerfile says (user, entrypoint, environment,
//! ports, files), runs as non-root 65532, operator and proxy without a shell, the runtime with
//! exactly the libtorch libraries its `ldd` resolves, and every program's libraries resolve
//! inside its own image. The cluster test (tests/cluster.rs) runs the same images as pods.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use e2e::built;
use serde_json::Value;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const TAG: &str = "image-test";
const IMAGES: [&str; 3] = ["operator", "proxy", "runtime"];
/// By path: the commands run inside an image get the image's environment only.
const CHROOT: &str = "/usr/sbin/chroot";

fn run(command: &mut Command) -> String {
    let output = command.output().expect("starting a command");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

fn script() -> Command {
    let mut command = Command::new("bash");
    command.arg(Path::new(REPO).join("docker/build-images.sh"));
    command
}

fn buildah(args: &[&str]) -> String {
    run(script().arg("--buildah").args(args))
}

/// The three images, built once for this test binary from the binaries cargo built.
fn build() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let bin_dir = built("infergate-runtime").parent().unwrap().to_owned();
        run(script()
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(["--tag", TAG])
            .args(IMAGES));
    });
}

fn name(image: &str) -> String {
    format!("localhost/infergate/{image}:{TAG}")
}

/// The image's OCI config (`User`, `Entrypoint`, `Env`, `ExposedPorts`, `Labels`).
fn config(image: &str) -> Value {
    build();
    let inspected: Value =
        serde_json::from_str(&buildah(&["inspect", "--type", "image", &name(image)])).unwrap();
    inspected["OCIv1"]["config"].clone()
}

/// The image's filesystem, mounted while the value lives.
struct Mounted {
    container: String,
    root: PathBuf,
}

impl Mounted {
    fn new(image: &str) -> Mounted {
        build();
        let container = buildah(&["from", "--pull-never", &name(image)])
            .trim()
            .to_owned();
        let root = PathBuf::from(buildah(&["mount", &container]).trim());
        Mounted { container, root }
    }

    /// What the dynamic linker of the image resolves for `program`, with `library_path`.
    fn resolved(&self, program: &str, library_path: &str) -> String {
        run(Command::new(CHROOT)
            .arg(&self.root)
            .args(["/lib64/ld-linux-x86-64.so.2", "--list", program])
            .env_clear()
            .env("LD_LIBRARY_PATH", library_path))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = script().args(["--buildah", "rm", &self.container]).output();
    }
}

/// Each image stage of docker/Dockerfile: instruction name to arguments, in order.
fn dockerfile_stages() -> BTreeMap<String, Vec<(String, String)>> {
    let text = std::fs::read_to_string(Path::new(REPO).join("docker/Dockerfile")).unwrap();
    let mut stages = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut logical = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        logical.push_str(line.trim_end_matches('\\'));
        logical.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        let instruction = std::mem::take(&mut logical);
        let (keyword, rest) = instruction
            .trim()
            .split_once(' ')
            .unwrap_or((&instruction, ""));
        if keyword == "FROM" {
            current = rest.split(" AS ").nth(1).map(|s| s.trim().to_owned());
            continue;
        }
        if let Some(stage) = &current {
            stages
                .entry(stage.clone())
                .or_insert_with(Vec::new)
                .push((keyword.to_owned(), rest.trim().to_owned()));
        }
    }
    stages
}

fn instruction<'a>(stage: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn each_image_is_what_its_dockerfile_stage_says() {
    let stages = dockerfile_stages();
    for image in IMAGES {
        let stage = &stages[image];
        let config = config(image);
        assert_eq!(config["User"], instruction(stage, "USER")[0], "{image}");
        let entrypoint: Value = serde_json::from_str(instruction(stage, "ENTRYPOINT")[0]).unwrap();
        assert_eq!(config["Entrypoint"], entrypoint, "{image}");
        for ports in instruction(stage, "EXPOSE") {
            for port in ports.split_whitespace() {
                assert!(
                    config["ExposedPorts"].get(format!("{port}/tcp")).is_some(),
                    "{image} exposes {port}: {config}"
                );
            }
        }
        let env: BTreeSet<&str> = config["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for variables in instruction(stage, "ENV") {
            for pair in variables.split_whitespace() {
                assert!(env.contains(pair), "{image} sets {pair}: {env:?}");
            }
        }
        let mounted = Mounted::new(image);
        for copy in instruction(stage, "COPY") {
            let destination = copy.split_whitespace().last().unwrap();
            assert!(
                mounted
                    .root
                    .join(destination.trim_start_matches('/'))
                    .exists(),
                "{image} has {destination}"
            );
        }
    }
}

#[test]
fn images_carry_their_source_version_and_revision() {
    let revision = run(Command::new("git").args(["-C", REPO, "rev-parse", "HEAD"]));
    for image in IMAGES {
        let labels = &config(image)["Labels"];
        assert_eq!(
            labels["org.opencontainers.image.version"],
            env!("CARGO_PKG_VERSION"),
            "{image}"
        );
        let labelled = labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap();
        assert!(
            labelled.starts_with(revision.trim()),
            "{image}: {labelled} is not {revision}"
        );
        assert!(
            labels["org.opencontainers.image.source"]
                .as_str()
                .unwrap()
                .starts_with("https://"),
            "{image}: {labels}"
        );
    }
}

#[test]
fn operator_and_proxy_run_as_nonroot_without_a_shell() {
    for image in ["operator", "proxy"] {
        assert_eq!(config(image)["User"], "65532:65532");
        let mounted = Mounted::new(image);
        for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "usr/local/bin"] {
            for shell in ["sh", "bash", "dash", "busybox"] {
                assert!(
                    !mounted.root.join(dir).join(shell).exists(),
                    "{image} has /{dir}/{shell}"
                );
            }
        }
        let program = format!("/usr/local/bin/infergate-{image}");
        let libraries = mounted.resolved(&program, "");
        assert!(!libraries.contains("not found"), "{image}: {libraries}");
        let help = run(Command::new(CHROOT)
            .args(["--userspec=65532:65532"])
            .arg(&mounted.root)
            .args([&program, "--help"]));
        assert!(help.contains("Usage:"), "{image}: {help}");
    }
}

#[test]
fn the_runtime_image_holds_exactly_the_libtorch_libraries_its_binary_loads() {
    let mounted = Mounted::new("runtime");
    let program = "/usr/local/bin/infergate-runtime";
    let libraries = mounted.resolved(program, "/opt/libtorch");
    assert!(!libraries.contains("not found"), "{libraries}");
    let loaded: BTreeSet<String> = libraries
        .lines()
        .filter_map(|line| line.split("=> ").nth(1))
        .filter_map(|path| path.split_whitespace().next())
        .filter(|path| path.starts_with("/opt/libtorch/"))
        .map(|path| path.trim_start_matches("/opt/libtorch/").to_owned())
        .collect();
    let shipped: BTreeSet<String> = std::fs::read_dir(mounted.root.join("opt/libtorch"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(shipped, loaded);
    assert!(shipped.contains("libtorch_cpu.so"), "{shipped:?}");
    let help = run(Command::new(CHROOT)
        .args(["--userspec=65532:65532"])
        .arg(&mounted.root)
        .args([program, "--help"])
        .env_clear()
        .env("LD_LIBRARY_PATH", "/opt/libtorch"));
    assert!(help.contains("Usage:"), "{help}");
}
