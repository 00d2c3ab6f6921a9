//! Images, as a container runtime pulls them: `skopeo` copies an image from its registry into
//! the node's OCI layout (checking every blob's digest), `umoci` unpacks its layers (whiteouts
//! included) into a root filesystem once per manifest digest, and the image's config says what
//! to run, as whom, where and with which environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::process::Command;

/// An image unpacked on this node.
#[derive(Debug, Clone)]
pub struct Image {
    /// `REPOSITORY@sha256:…`, for the container status' `imageID`.
    pub id: String,
    /// The unpacked layers: the read-only lower layer of each container's root.
    pub rootfs: PathBuf,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE` pairs of the image's config, in its order.
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    /// The image's `USER` (`uid[:gid]` or a name in its /etc/passwd), empty for root.
    pub user: String,
}

/// Why a pull failed, for the container's `ErrImagePull` message.
#[derive(Debug)]
pub struct PullError(pub String);

/// The node's images: an OCI layout of pulled blobs and a root filesystem per digest.
pub struct ImageStore {
    dir: PathBuf,
    /// Registries spoken to over plain HTTP (`HOST:PORT`), as containerd's config names them.
    insecure: Vec<String>,
    /// One pull per reference at a time: pods starting together share the first one's work.
    pulling: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    pub fn new(dir: PathBuf, insecure: Vec<String>) -> ImageStore {
        ImageStore {
            dir,
            insecure,
            pulling: Mutex::default(),
        }
    }

    fn layout(&self) -> PathBuf {
        self.dir.join("layout")
    }

    /// The image of `reference`, pulled and unpacked unless this node has it.
    pub async fn pull(&self, reference: &str) -> Result<Image, PullError> {
        let lock = self
            .pulling
            .lock()
            .expect("pulling lock")
            .entry(reference.to_owned())
            .or_default()
            .clone();
        let _held = lock.lock().await;
        std::fs::create_dir_all(self.dir.join("rootfs"))
            .map_err(|e| PullError(format!("{}: {e}", self.dir.display())))?;
        let name = layout_name(reference);
        let pinned = reference.contains("@sha256:");
        // A reference by digest names content that cannot change: a node that has it does not
        // ask the registry again (a tag is asked every time, as with imagePullPolicy Always).
        if !(pinned && self.manifest_digest(&name).is_ok()) {
            let mut copy = Command::new("skopeo");
            copy.args(["copy", "--quiet"]);
            if self.insecure.iter().any(|r| registry_of(reference) == r) {
                copy.arg("--src-tls-verify=false");
            }
            copy.arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:{name}", self.layout().display()));
            succeeds(copy, &format!("pulling {reference}")).await?;
        }
        let digest = self.manifest_digest(&name)?;
        let hex = digest.trim_start_matches("sha256:");
        let rootfs = self.dir.join("rootfs").join(hex);
        if !rootfs.exists() {
            let staged = self.dir.join("rootfs").join(format!(".{hex}.tmp"));
            let _ = std::fs::remove_dir_all(&staged);
            let mut unpack = Command::new("umoci");
            unpack
                .args(["raw", "unpack", "--image"])
                .arg(format!("{}:{name}", self.layout().display()))
                .arg(&staged);
            succeeds(unpack, &format!("unpacking {reference}")).await?;
            std::fs::rename(&staged, &rootfs)
                .map_err(|e| PullError(format!("unpacking {reference}: {e}")))?;
        }
        let manifest = self.blob(&digest)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| PullError(format!("{reference}: its manifest names no config")))?;
        let config = &self.blob(config_digest)?["config"];
        let strings = |key: &str| -> Vec<String> {
            config[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let repository = reference
            .split_once('@')
            .map_or(reference, |(repository, _)| repository);
        let repository = match repository.rsplit_once(':') {
            Some((head, tag)) if !tag.contains('/') => head,
            _ => repository,
        };
        Ok(Image {
            id: format!("{repository}@{digest}"),
            rootfs,
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env")
                .into_iter()
                .filter_map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                })
                .collect(),
            working_dir: config["WorkingDir"].as_str().unwrap_or_default().to_owned(),
            user: config["User"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// The manifest digest the layout's `index.json` holds under `name`.
    fn manifest_digest(&self, name: &str) -> Result<String, PullError> {
        let index = read_json(&self.layout().join("index.json"))?;
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .and_then(|m| m["digest"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| PullError(format!("no image {name} in the node's layout")))
    }

    fn blob(&self, digest: &str) -> Result<Value, PullError> {
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or_else(|| PullError(format!("{digest:?} is not a digest")))?;
        read_json(&self.layout().join("blobs").join(algorithm).join(hex))
    }
}

/// Runs a tool to success; its error output, after `doing`, is the pull error.
async fn succeeds(mut command: Command, doing: &str) -> Result<(), PullError> {
    let output = command
        .output()
        .await
        .map_err(|e| PullError(format!("{doing}: {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(PullError(format!(
            "{doing}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn read_json(path: &Path) -> Result<Value, PullError> {
    let text = std::fs::read(path).map_err(|e| PullError(format!("{}: {e}", path.display())))?;
    serde_json::from_slice(&text).map_err(|e| PullError(format!("{}: {e}", path.display())))
}

/// The registry part of a reference (`127.0.0.1:5000` of `127.0.0.1:5000/infergate/proxy:x`);
/// Docker Hub's for a reference without one.
fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// A reference as a tag of the node's layout, whose tags allow `[A-Za-z0-9._-]` only.
fn layout_name(reference: &str) -> String {
    reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The user and group an image's `USER` names, looked up in the image's own /etc/passwd and
/// /etc/group for names, as container runtimes do; None for root or an empty USER.
pub fn image_user(rootfs: &Path, user: &str) -> Result<Option<(u32, u32)>, String> {
    if user.is_empty() {
        return Ok(None);
    }
    let lookup = |file: &str, name: &str| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(rootfs.join("etc").join(file)).ok()?;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name)).then(|| {
                let id = fields.get(2)?.parse().ok()?;
                Some((id, fields.get(3).and_then(|g| g.parse().ok())))
            })?
        })
    };
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let (uid, primary) = match user_part.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => lookup("passwd", user_part)
            .ok_or_else(|| format!("user {user_part:?} is not in the image's /etc/passwd"))?,
    };
    let gid = match group_part {
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("group", group)
                    .ok_or_else(|| format!("group {group:?} is not in the image's /etc/group"))?
                    .0
            }
        },
        None => primary.unwrap_or(0),
    };
    Ok((uid != 0).then_some((uid, gid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_is_the_first_part_when_it_looks_like_a_host() {
        assert_eq!(
            registry_of("127.0.0.1:5000/infergate/proxy@sha256:ab"),
            "127.0.0.1:5000"
        );
        assert_eq!(registry_of("localhost/infergate/proxy:x"), "localhost");
        assert_eq!(registry_of("ghcr.io/infergate/proxy:0.1.0"), "ghcr.io");
        assert_eq!(registry_of("infergate/proxy:test-bed"), "docker.io");
        assert_eq!(registry_of("busybox"), "docker.io");
    }

    #[test]
    fn layout_names_keep_only_what_an_oci_tag_allows() {
        assert_eq!(
            layout_name("127.0.0.1:5000/infergate/runtime@sha256:0f"),
            "127.0.0.1_5000_infergate_runtime_sha256_0f"
        );
    }

    #[test]
    fn an_image_user_is_numeric_or_looked_up_in_the_images_own_files() {
        let root = std::env::temp_dir().join(format!("image-user-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        assert_eq!(image_user(&root, ""), Ok(None));
        assert_eq!(image_user(&root, "0"), Ok(None));
        assert_eq!(image_user(&root, "65532:65532"), Ok(Some((65532, 65532))));
        assert_eq!(image_user(&root, "1000"), Ok(Some((1000, 0))));
        assert_eq!(image_user(&root, "nonroot"), Ok(Some((65532, 65532))));
        assert_eq!(image_user(&root, "nonroot:staff"), Ok(Some((65532, 50))));
        assert!(image_user(&root, "ghost").unwrap_err().contains("ghost"));
        std::fs::remove_dir_all(root).unwrap();
    }
}
