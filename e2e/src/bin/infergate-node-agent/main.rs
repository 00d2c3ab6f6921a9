//! `infergate-node-agent`: plays the kubelet of one Node of the cluster test bed, where there is
//! no container runtime. Each pod bound to the node runs as local processes, one per container,
//! in the pod's own network namespace (`ip netns` and a veth pair, pod IPs in 10.214.0.0/16) and
//! its own mount namespace. Images are pulled from their registry and unpacked once per digest
//! (`images`); each container runs chrooted into an overlay of its image's filesystem, with its
//! volumes bind-mounted at their mount paths (`enter`). For quick local runs, `--image` maps an
//! image to a binary of this machine instead. What it cannot honour is reported in the pod's
//! status with a reason, never run half-way. See e2e/cluster/README.md for the fields it honours.

mod enter;
mod images;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Container, Node, Pod, Probe};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(name = "infergate-node-agent", about)]
struct Args {
    /// Name of the Node this agent plays.
    #[arg(long, default_value = "infergate-node")]
    node: String,
    /// Host-binary mode, for quick local runs: an image that starts with IMAGE_PREFIX runs
    /// this machine's binary at PATH instead of being pulled (e.g.
    /// `infergate/runtime=/path/to/infergate-runtime`).
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<(String, PathBuf)>,
    /// A registry (`HOST:PORT`) pulled from over plain HTTP, such as the test bed's own.
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Where pod logs, volumes and service-account files live.
    #[arg(long)]
    state_dir: PathBuf,
    /// The API server as pods reach it, `LISTEN=UPSTREAM` (e.g.
    /// `10.0.0.1:443=127.0.0.1:16443`): the agent relays LISTEN to UPSTREAM, as kube-proxy does
    /// for the `kubernetes` Service, and gives containers KUBERNETES_SERVICE_HOST/PORT of LISTEN.
    #[arg(long, value_parser = parse_relay)]
    api_relay: Option<(std::net::SocketAddr, String)>,
    /// Where mapped binaries are copied for pods that run as another user (host-binary
    /// mode); readable by every user.
    #[arg(long, default_value = "/var/tmp/infergate-node/images")]
    image_dir: PathBuf,
}

fn parse_relay(text: &str) -> Result<(std::net::SocketAddr, String), String> {
    let (listen, upstream) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected LISTEN=UPSTREAM"))?;
    let listen = listen.parse().map_err(|e| format!("{listen:?}: {e}"))?;
    Ok((listen, upstream.to_owned()))
}

fn parse_image(text: &str) -> Result<(String, PathBuf), String> {
    let (prefix, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected IMAGE_PREFIX=PATH"))?;
    Ok((prefix.to_owned(), PathBuf::from(path)))
}

/// Pod networks: pod `n` gets 10.214.n.2/24, its host side 10.214.n.1.
struct Networks(AtomicU32);

impl Networks {
    fn next(&self) -> u32 {
        1 + self.0.fetch_add(1, Ordering::SeqCst) % 250
    }
}

struct Agent {
    client: Client,
    node: String,
    images: Vec<(String, PathBuf)>,
    store: images::ImageStore,
    state_dir: PathBuf,
    image_dir: PathBuf,
    /// KUBERNETES_SERVICE_HOST and _PORT for containers, when the API is relayed to pods.
    api_service: Option<std::net::SocketAddr>,
    networks: Networks,
    /// Running pods by UID: the sender stops them.
    pods: Mutex<HashMap<String, watch::Sender<bool>>>,
}

async fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output().await?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A pod's network namespace and veth pair.
struct PodNetwork {
    namespace: String,
    host_side: String,
    pod_ip: String,
    host_ip: String,
}

impl PodNetwork {
    async fn create(uid: &str, n: u32) -> anyhow::Result<PodNetwork> {
        let short = &uid[..8.min(uid.len())];
        let network = PodNetwork {
            namespace: format!("igpod-{short}"),
            host_side: format!("igp{short}"),
            pod_ip: format!("10.214.{n}.2"),
            host_ip: format!("10.214.{n}.1"),
        };
        network.delete().await;
        run_ip(&["netns", "add", &network.namespace]).await?;
        run_ip(&[
            "link",
            "add",
            &network.host_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &network.namespace,
        ])
        .await?;
        run_ip(&[
            "addr",
            "add",
            &format!("{}/24", network.host_ip),
            "dev",
            &network.host_side,
        ])
        .await?;
        run_ip(&["link", "set", &network.host_side, "up"]).await?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &network.namespace, "ip"];
            all.extend_from_slice(args);
            all.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        for args in [
            inside(&[
                "addr",
                "add",
                &format!("{}/24", network.pod_ip),
                "dev",
                "eth0",
            ]),
            inside(&["link", "set", "eth0", "up"]),
            inside(&["link", "set", "lo", "up"]),
            inside(&["route", "add", "default", "via", &network.host_ip]),
        ] {
            run_ip(&args.iter().map(String::as_str).collect::<Vec<_>>()).await?;
        }
        Ok(network)
    }

    async fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output()
            .await;
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_side])
            .output()
            .await;
    }
}

/// Why a pod cannot run here: shown as the waiting reason of its containers.
struct Refusal {
    reason: &'static str,
    message: String,
}

/// PATH in a container that sets none (what container runtimes default to).
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where a container's program comes from.
enum Source {
    /// Host-binary mode: a binary of this machine stands for the image.
    Mapped(PathBuf),
    Pulled(images::Image),
}

/// What a container runs.
enum Program {
    /// A binary of this machine (host-binary mode), with the pod's arguments.
    Host { binary: PathBuf, args: Vec<String> },
    /// An image's entrypoint, chrooted into an overlay of its unpacked filesystem.
    Image {
        image: images::Image,
        argv: Vec<String>,
        /// Supplementary groups: the pod's fsGroup.
        groups: Vec<i64>,
    },
}

/// A container ready to start: program, environment, bind mounts.
struct Launch {
    name: String,
    /// For the container's /etc/hosts.
    pod_name: String,
    program: Program,
    env: Vec<(String, String)>,
    mounts: Vec<(PathBuf, String)>,
    /// `runAsUser` and `runAsGroup` (or the image's USER), when not root.
    user: Option<(i64, i64)>,
    /// `preStop: {sleep: {seconds}}`: the wait between the stop and SIGTERM.
    pre_stop_sleep: Option<Duration>,
    /// `terminationMessagePath` in the container, and whether the log's tail stands in for
    /// an empty message after a failure (`FallbackToLogsOnError`).
    termination_path: String,
    fallback_to_logs: bool,
}

impl Launch {
    /// The container status' `imageID`: the digest pulled, or the mapped binary.
    fn image_id(&self) -> String {
        match &self.program {
            Program::Host { binary, .. } => binary.display().to_string(),
            Program::Image { image, .. } => image.id.clone(),
        }
    }
}

impl Agent {
    fn binary_for(&self, image: &str) -> Option<PathBuf> {
        self.images
            .iter()
            .find(|(prefix, _)| image.starts_with(prefix.as_str()))
            .map(|(_, path)| path.clone())
    }

    /// Host paths of the pod's volumes; a volume kind this agent cannot provide refuses the pod.
    /// A ConfigMap or Secret volume waits for its object, as the kubelet does, and is kept up
    /// to date until `stop`.
    async fn volumes(
        self: &Arc<Self>,
        pod: &Pod,
        dir: &Path,
        stop: &watch::Receiver<bool>,
    ) -> Result<HashMap<String, PathBuf>, Refusal> {
        let mut paths = HashMap::new();
        for volume in pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
        {
            let path = if let Some(source) = ObjectVolume::of(&volume) {
                let path = dir.join("volumes").join(&volume.name);
                let _ = std::fs::create_dir_all(&path);
                let namespace = pod.namespace().unwrap_or_default();
                let fs_group = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.security_context.as_ref())
                    .and_then(|c| c.fs_group);
                let files = VolumeFiles {
                    dir: path.clone(),
                    fs_group,
                };
                source
                    .first_fill(&self.client, &namespace, &files)
                    .await
                    .map_err(|e| Refusal {
                        reason: "VolumeSetupFailed",
                        message: format!("volume {:?}: {e}", volume.name),
                    })?;
                tokio::spawn(source.refresh(self.client.clone(), namespace, files, stop.clone()));
                path
            } else if let Some(host) = &volume.host_path {
                if host.type_.as_deref() == Some("DirectoryOrCreate") {
                    // As the kubelet makes it: root's, mode 0755.
                    let _ = std::fs::create_dir_all(&host.path);
                }
                PathBuf::from(&host.path)
            } else if volume.empty_dir.is_some() {
                let path = dir.join("volumes").join(&volume.name);
                let _ = std::fs::create_dir_all(&path);
                let fs_group = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.security_context.as_ref())
                    .and_then(|c| c.fs_group);
                if let Some(group) = fs_group {
                    // fsGroup: the pod's group owns its emptyDir volumes and may write them.
                    use std::os::unix::fs::PermissionsExt;
                    std::os::unix::fs::chown(&path, None, Some(group as u32))
                        .and_then(|()| {
                            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o2775))
                        })
                        .map_err(|e| Refusal {
                            reason: "VolumeSetupFailed",
                            message: format!("emptyDir {:?}: {e}", volume.name),
                        })?;
                }
                path
            } else if volume.projected.is_some() {
                // The service-account token volume the admission plugin adds.
                let path = dir.join("volumes").join(&volume.name);
                self.service_account_files(pod, &path)
                    .await
                    .map_err(|e| Refusal {
                        reason: "ServiceAccountTokenFailed",
                        message: e.to_string(),
                    })?;
                path
            } else {
                return Err(Refusal {
                    reason: "VolumeNotSupported",
                    message: format!(
                        "volume {:?}: the node agent provides hostPath, emptyDir, configMap, secret and the service-account token only",
                        volume.name
                    ),
                });
            };
            paths.insert(volume.name.clone(), path);
        }
        Ok(paths)
    }

    /// `token`, `ca.crt` and `namespace`, as the kubelet projects them.
    async fn service_account_files(&self, pod: &Pod, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let namespace = pod.namespace().unwrap_or_default();
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let request: serde_json::Value = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"audiences": [], "expirationSeconds": 86400}});
        let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &namespace);
        let response: serde_json::Value = api
            .create_subresource("token", &account, &PostParams::default(), &request)
            .await?;
        let token = response["status"]["token"]
            .as_str()
            .context("no token in the TokenRequest")?;
        std::fs::write(dir.join("token"), token)?;
        std::fs::write(dir.join("namespace"), &namespace)?;
        if let Ok(ca) = std::env::var("INFERGATE_NODE_AGENT_CA") {
            std::fs::copy(ca, dir.join("ca.crt"))?;
        }
        Ok(())
    }

    /// What a container runs: its image, pulled, unless host-binary mode maps it to a binary.
    async fn source_for(&self, container: &Container) -> Result<Source, Refusal> {
        let reference = container.image.clone().unwrap_or_default();
        if let Some(binary) = self.binary_for(&reference) {
            return Ok(Source::Mapped(binary));
        }
        self.store
            .pull(&reference)
            .await
            .map(Source::Pulled)
            .map_err(|error| Refusal {
                reason: "ErrImagePull",
                message: error.0,
            })
    }

    fn launch(
        &self,
        pod: &Pod,
        pod_ip: &str,
        container: &Container,
        source: Source,
        volumes: &HashMap<String, PathBuf>,
    ) -> Result<Launch, Refusal> {
        let mut env = Vec::new();
        // The image's environment first: the pod's variables of the same name replace it.
        if let Source::Pulled(image) = &source {
            env.extend(image.env.iter().cloned());
        }
        if let Some(api) = self.api_service {
            env.push(("KUBERNETES_SERVICE_HOST".to_owned(), api.ip().to_string()));
            env.push(("KUBERNETES_SERVICE_PORT".to_owned(), api.port().to_string()));
        }
        for var in container.env.clone().unwrap_or_default() {
            let value = match &var.value_from {
                None => var.value.unwrap_or_default(),
                Some(from) => {
                    let field = from
                        .field_ref
                        .as_ref()
                        .and_then(|f| field_value(pod, pod_ip, &f.field_path));
                    field.ok_or_else(|| Refusal {
                        reason: "EnvFromNotSupported",
                        message: format!(
                            "env {}: the node agent resolves valueFrom.fieldRef of metadata.name, metadata.namespace, metadata.uid, spec.nodeName, spec.serviceAccountName and status.podIP only",
                            var.name
                        ),
                    })?
                }
            };
            env.retain(|(name, _)| *name != var.name);
            env.push((var.name, value));
        }
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.clone().unwrap_or_default() {
            let host = volumes.get(&mount.name).ok_or_else(|| Refusal {
                reason: "VolumeNotSupported",
                message: format!("volume mount {:?} has no volume", mount.name),
            })?;
            let host = match mount.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => host.join(sub),
                _ => host.clone(),
            };
            mounts.push((host, mount.mount_path.clone()));
        }
        let mounts = in_mount_order(mounts);
        let pre_stop_sleep = match container
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
        {
            None => None,
            Some(handler)
                if handler.exec.is_none()
                    && handler.http_get.is_none()
                    && handler.tcp_socket.is_none() =>
            {
                handler
                    .sleep
                    .as_ref()
                    .map(|s| Duration::from_secs(s.seconds.max(0) as u64))
            }
            Some(_) => {
                return Err(Refusal {
                    reason: "PreStopNotSupported",
                    message: "the node agent honours a preStop sleep only".to_owned(),
                });
            }
        };
        let (program, user) = match source {
            Source::Pulled(image) => {
                let image_user = images::image_user(&image.rootfs, &image.user)
                    .map_err(|message| Refusal {
                        reason: "CreateContainerConfigError",
                        message,
                    })?
                    .map(|(u, g)| (i64::from(u), i64::from(g)));
                let user = unless_root(run_as(pod, container).or(image_user));
                let groups = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.security_context.as_ref())
                    .and_then(|c| c.fs_group)
                    .into_iter()
                    .collect();
                let argv = container_argv(container, &image);
                if argv.is_empty() {
                    return Err(Refusal {
                        reason: "CreateContainerConfigError",
                        message: format!("{}: no command, entrypoint or cmd to run", image.id),
                    });
                }
                (
                    Program::Image {
                        image,
                        argv,
                        groups,
                    },
                    user,
                )
            }
            Source::Mapped(binary) => {
                if container.command.is_some() {
                    return Err(Refusal {
                        reason: "CommandNotSupported",
                        message:
                            "host-binary mode runs the mapped binary; command cannot replace it"
                                .to_owned(),
                    });
                }
                let user = unless_root(run_as(pod, container));
                let binary = match user {
                    Some(_) => self.copy_for_other_users(&binary).map_err(|e| Refusal {
                        reason: "ErrImagePull",
                        message: format!(
                            "cannot make {} runnable by another user: {e}",
                            binary.display()
                        ),
                    })?,
                    None => binary,
                };
                let args = container.args.clone().unwrap_or_default();
                (Program::Host { binary, args }, user)
            }
        };
        Ok(Launch {
            name: container.name.clone(),
            pod_name: pod.name_any(),
            program,
            env,
            mounts,
            user,
            pre_stop_sleep,
            termination_path: container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".to_owned()),
            fallback_to_logs: container.termination_message_policy.as_deref()
                == Some("FallbackToLogsOnError"),
        })
    }

    /// A container's termination message, as the kubelet reports it: what the process wrote
    /// to its terminationMessagePath (4096 bytes at most), or after a failure and with
    /// `FallbackToLogsOnError` the last lines of its log.
    fn termination_message(&self, launch: &Launch, dir: &Path, failed: bool) -> String {
        let read_tail = |path: PathBuf, limit: usize| {
            let bytes = std::fs::read(path).unwrap_or_default();
            let start = bytes.len().saturating_sub(limit);
            String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
        };
        let message = std::fs::read(termination_log(dir, &launch.name))
            .map(|bytes| {
                String::from_utf8_lossy(&bytes[..bytes.len().min(4096)])
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default();
        if message.is_empty() && failed && launch.fallback_to_logs {
            return read_tail(dir.join(format!("{}.log", launch.name)), 2048);
        }
        message
    }

    /// Starts a container's process in the pod's namespaces, its output in the pod's log dir.
    /// Everything is mounted in the container's own mount namespace, so it all goes away with
    /// the process: the overlay of an image's filesystem, /proc, /dev, /sys and the volumes.
    fn spawn(&self, launch: &Launch, network: &PodNetwork, dir: &Path) -> anyhow::Result<Child> {
        let mut script = String::from("set -e\n");
        let tail: Vec<std::ffi::OsString> = match &launch.program {
            Program::Host { binary, args } => {
                for (host, target) in &launch.mounts {
                    script.push_str(&bind_mount(host, Path::new(target)));
                }
                match launch.user {
                    // After the mounts, which need root: the process runs as the pod asks.
                    Some((user, group)) => script.push_str(&format!(
                        "exec setpriv --reuid={user} --regid={group} --clear-groups -- \"$@\"\n"
                    )),
                    None => script.push_str("exec \"$@\"\n"),
                }
                std::iter::once(binary.into())
                    .chain(args.iter().map(Into::into))
                    .collect()
            }
            Program::Image {
                image,
                argv,
                groups,
            } => {
                // A fresh writable layer for each start, as a runtime makes a new container.
                let layer = dir.join("containers").join(&launch.name);
                let _ = std::fs::remove_dir_all(&layer);
                for part in ["upper", "work", "rootfs"] {
                    std::fs::create_dir_all(layer.join(part))?;
                }
                let root = layer.join("rootfs");
                let hosts = layer.join("hosts");
                std::fs::write(
                    &hosts,
                    format!(
                        "127.0.0.1\tlocalhost\n::1\tlocalhost\n{}\t{}\n",
                        network.pod_ip, launch.pod_name
                    ),
                )?;
                script.push_str(&format!(
                    "command -p mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}\n",
                    quote(&image.rootfs),
                    quote(&layer.join("upper")),
                    quote(&layer.join("work")),
                    quote(&root)
                ));
                let at = |path: &str| quote(&root.join(path));
                script.push_str(&format!(
                    "command -p mkdir -p {proc} {dev} {sys} {etc}\n\
                     command -p mount -t proc proc {proc}\n\
                     command -p mount -t tmpfs -o nosuid,mode=0755 dev {dev}\n\
                     for d in null zero full random urandom tty; do\n\
                     command -p touch {dev}/$d && command -p mount --bind /dev/$d {dev}/$d; done\n\
                     command -p mkdir -p {dev}/shm && command -p mount -t tmpfs -o nosuid,nodev,mode=1777 shm {dev}/shm\n\
                     command -p ln -s /proc/self/fd {dev}/fd\n\
                     command -p mount --rbind /sys {sys} && command -p mount -o remount,bind,ro {sys}\n",
                    proc = at("proc"),
                    dev = at("dev"),
                    sys = at("sys"),
                    etc = at("etc"),
                ));
                script.push_str(&bind_mount(&hosts, &root.join("etc/hosts")));
                // Writable by the container's user whoever that is, as the kubelet's file is.
                use std::os::unix::fs::PermissionsExt;
                let termination = termination_log(dir, &launch.name);
                std::fs::write(&termination, b"")?;
                std::fs::set_permissions(&termination, std::fs::Permissions::from_mode(0o666))?;
                script.push_str(&bind_mount(
                    &termination,
                    &root.join(launch.termination_path.trim_start_matches('/')),
                ));
                for (host, target) in &launch.mounts {
                    let target = root.join(target.trim_start_matches('/'));
                    script.push_str(&bind_mount(host, &target));
                }
                script.push_str("exec \"$@\"\n");
                // This process's own executable through /proc: a rebuild of the binary with the
                // same content (which keeps the test bed running) replaces the file the path
                // names, and a deleted path cannot be executed; the running image still can.
                let own_executable = format!("/proc/{}/exe", std::process::id());
                let mut tail: Vec<std::ffi::OsString> = vec![
                    own_executable.into(),
                    "enter-container".into(),
                    "--root".into(),
                    root.into(),
                    "--workdir".into(),
                    (if image.working_dir.is_empty() {
                        "/"
                    } else {
                        &image.working_dir
                    })
                    .into(),
                ];
                if let Some((user, group)) = launch.user {
                    tail.push("--user".into());
                    tail.push(format!("{user}:{group}").into());
                    for group in groups {
                        tail.push("--group".into());
                        tail.push(group.to_string().into());
                    }
                }
                tail.push("--".into());
                tail.extend(argv.iter().map(Into::into));
                tail
            }
        };
        let log = std::fs::File::create(dir.join(format!("{}.log", launch.name)))?;
        let mut command = Command::new(host_tool("ip"));
        command
            .args(["netns", "exec", &network.namespace])
            .arg(host_tool("unshare"))
            .args(["--mount", "--propagation", "private"])
            .arg(host_tool("sh"))
            .args(["-c", &script, "--"])
            .args(tail)
            // The pod's environment only, as a container has: the agent's own (its KUBECONFIG
            // with the cluster's admin key, the test's LD_LIBRARY_PATH) is not the pod's.
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .envs(launch.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        Ok(command.spawn()?)
    }
}

/// Where the agent keeps a container's termination message file (bind-mounted at its
/// terminationMessagePath; a container of host mode has none).
fn termination_log(dir: &Path, container: &str) -> PathBuf {
    dir.join(format!("{container}.termination-log"))
}

/// A shell word for `path`, single-quoted.
fn quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}

/// Shell lines that bind-mount `host` at `target`, making the mount point (a file for a file).
fn bind_mount(host: &Path, target: &Path) -> String {
    let (host_word, target_word) = (quote(host), quote(target));
    let parent = quote(target.parent().unwrap_or(Path::new("/")));
    if host.is_dir() {
        format!(
            "command -p mkdir -p {target_word} && command -p mount --bind {host_word} {target_word}\n"
        )
    } else {
        format!(
            "command -p mkdir -p {parent} && command -p touch {target_word} && command -p mount --bind {host_word} {target_word}\n"
        )
    }
}

/// A tool of this machine by absolute path, found on the agent's own PATH: a container's PATH
/// (which the spawned commands get) need not have it.
fn host_tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// What a container runs, as Kubernetes combines a pod's `command` and `args` with the image's
/// ENTRYPOINT and CMD: `command` replaces the entrypoint and the image's CMD with it, `args`
/// replaces CMD.
fn container_argv(container: &Container, image: &images::Image) -> Vec<String> {
    let (entrypoint, default_args) = match &container.command {
        Some(command) => (command.clone(), Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let args = container.args.clone().unwrap_or(default_args);
    entrypoint.into_iter().chain(args).collect()
}

/// The value of a `fieldRef` the kubelet resolves from the pod, or None when unsupported.
fn field_value(pod: &Pod, pod_ip: &str, path: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => Some(pod.name_any()),
        "metadata.namespace" => pod.namespace(),
        "metadata.uid" => pod.uid(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => Some(pod_ip.to_owned()),
        _ => None,
    }
}

/// The user and group a container's securityContext (over the pod's) asks for; None when
/// neither sets runAsUser (the image's USER then).
fn run_as(pod: &Pod, container: &Container) -> Option<(i64, i64)> {
    let pod_context = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let own = container.security_context.as_ref();
    let user = own
        .and_then(|c| c.run_as_user)
        .or_else(|| pod_context.and_then(|c| c.run_as_user))?;
    let group = own
        .and_then(|c| c.run_as_group)
        .or_else(|| pod_context.and_then(|c| c.run_as_group))
        .unwrap_or(user);
    Some((user, group))
}

/// A Launch's user: none for root.
fn unless_root(user: Option<(i64, i64)>) -> Option<(i64, i64)> {
    user.filter(|(user, _)| *user != 0)
}

impl Agent {
    /// Copies a mapped binary where any user may run it (host-binary mode).
    fn copy_for_other_users(&self, binary: &Path) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.image_dir)?;
        std::fs::set_permissions(&self.image_dir, std::fs::Permissions::from_mode(0o755))?;
        let name = binary.file_name().unwrap_or_default();
        let pulled = self.image_dir.join(name);
        let staged = self
            .image_dir
            .join(format!(".{}.tmp", name.to_string_lossy()));
        std::fs::copy(binary, &staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&staged, &pulled)?;
        Ok(pulled)
    }

    /// Relays connections to `listen` (an address pods reach) to the API server at `upstream`.
    async fn relay_api(listen: std::net::SocketAddr, upstream: String) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("the API relay cannot listen on {listen}"))?;
        loop {
            let (mut inbound, _) = listener.accept().await?;
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }
}

/// Resolves once the pod is to stop (its guard never held across an await).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One HTTP GET, as a probe does it: any 2xx or 3xx is a success.
async fn http_ok(ip: &str, port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        let status: u16 = std::str::from_utf8(&head[9..12]).ok()?.parse().ok()?;
        Some((200..400).contains(&status))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// The port a probe names (a number, or a container port's name).
fn probe_port(probe: &Probe, container: &Container) -> Option<(String, u16)> {
    let get = probe.http_get.as_ref()?;
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n as u16,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
            container
                .ports
                .as_ref()?
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))?
                .container_port as u16
        }
    };
    Some((get.path.clone().unwrap_or_else(|| "/".to_owned()), port))
}

/// What the agent knows of one running container.
struct Running {
    container: Container,
    launch: Launch,
    child: Option<Child>,
    started: bool,
    ready: bool,
    restarts: i32,
    started_at: Timestamp,
    last_probe: Instant,
    liveness_failures: i32,
    waiting: Option<(&'static str, String)>,
    restart_at: Option<Instant>,
}

fn now_time() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::now()))
}

impl Agent {
    async fn patch_status(&self, pod: &Pod, status: serde_json::Value) {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        if let Err(error) = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            tracing::warn!(%error, pod = %pod.name_any(), "could not write the pod's status");
        }
    }

    fn conditions(ready: bool, initialized: bool) -> serde_json::Value {
        let condition = |type_: &str, status: bool| json!({"type": type_, "status": if status { "True" } else { "False" }, "lastTransitionTime": now_time()});
        json!([
            condition("PodScheduled", true),
            condition("Initialized", initialized),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ])
    }

    /// Runs one pod until it is stopped: init containers, then containers with probes and
    /// restarts, reporting status on every change.
    async fn run_pod(self: Arc<Self>, pod: Pod, mut stop: watch::Receiver<bool>) {
        let uid = pod.uid().unwrap_or_default();
        let dir = self.state_dir.join("pods").join(format!(
            "{}_{}",
            pod.namespace().unwrap_or_default(),
            pod.name_any()
        ));
        let _ = std::fs::create_dir_all(&dir);
        let spec = pod.spec.clone().unwrap_or_default();
        let refuse = |refusal: Refusal| {
            let statuses: Vec<serde_json::Value> = spec
                .containers
                .iter()
                .map(|c| json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0,
                                "state": {"waiting": {"reason": refusal.reason, "message": refusal.message}}}))
                .collect();
            json!({"phase": "Pending", "conditions": Agent::conditions(false, false), "containerStatuses": statuses,
                   "message": refusal.message, "reason": refusal.reason})
        };
        let network = match PodNetwork::create(&uid, self.networks.next()).await {
            Ok(network) => network,
            Err(error) => {
                self.patch_status(
                    &pod,
                    refuse(Refusal {
                        reason: "NetworkSetupFailed",
                        message: error.to_string(),
                    }),
                )
                .await;
                let _ = stopped(&mut stop).await;
                self.finish(&pod).await;
                return;
            }
        };
        // Volumes, then every container's launch: any refusal leaves the pod Pending.
        let volumes_stop = stop.clone();
        let launches: Result<Vec<(Container, Launch)>, Refusal> = match tokio::select! {
            volumes = self.volumes(&pod, &dir, &volumes_stop) => volumes,
            _ = stopped(&mut stop) => {
                network.delete().await;
                self.finish(&pod).await;
                return;
            }
        } {
            Ok(volumes) => {
                let mut launches = Vec::new();
                let mut refused = None;
                for c in spec
                    .init_containers
                    .iter()
                    .flatten()
                    .chain(&spec.containers)
                {
                    // Pulled until it works (back-off in between), as the kubelet does.
                    let mut attempt = 0u32;
                    let source = loop {
                        match self.source_for(c).await {
                            Ok(source) => break source,
                            Err(refusal) => {
                                let reason = if attempt == 0 {
                                    "ErrImagePull"
                                } else {
                                    "ImagePullBackOff"
                                };
                                self.patch_status(&pod, refuse(Refusal { reason, ..refusal }))
                                    .await;
                                attempt += 1;
                                let delay = Duration::from_secs(1u64 << attempt.min(5));
                                tokio::select! {
                                    _ = tokio::time::sleep(delay) => {}
                                    _ = stopped(&mut stop) => {
                                        network.delete().await;
                                        self.finish(&pod).await;
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    match self.launch(&pod, &network.pod_ip, c, source, &volumes) {
                        Ok(launch) => launches.push((c.clone(), launch)),
                        Err(refusal) => {
                            refused = Some(refusal);
                            break;
                        }
                    }
                }
                refused.map_or(Ok(launches), Err)
            }
            Err(refusal) => Err(refusal),
        };
        let launches = match launches {
            Ok(launches) => launches,
            Err(refusal) => {
                self.patch_status(&pod, refuse(refusal)).await;
                let _ = stopped(&mut stop).await;
                network.delete().await;
                self.finish(&pod).await;
                return;
            }
        };
        let init_count = spec.init_containers.as_ref().map_or(0, Vec::len);
        let mut launches = launches.into_iter();
        // Init containers, in order, each to success (retried with back-off on failure).
        for (container, launch) in launches.by_ref().take(init_count) {
            let mut attempt = 0u32;
            // The last failure stays in lastState while the next attempt runs, as with the kubelet.
            let mut last_state = json!({});
            loop {
                self.patch_status(&pod, json!({"phase": "Pending", "podIP": network.pod_ip, "podIPs": [{"ip": network.pod_ip}], "hostIP": "127.0.0.1",
                    "conditions": Agent::conditions(false, false),
                    "initContainerStatuses": [{"name": container.name, "image": container.image, "imageID": "", "ready": false, "restartCount": attempt,
                        "lastState": last_state, "state": {"running": {"startedAt": now_time()}}}]})).await;
                let started_at = now_time();
                let status = match self.spawn(&launch, &network, &dir) {
                    Ok(mut child) => tokio::select! {
                        status = child.wait() => status.ok(),
                        _ = stopped(&mut stop) => { let _ = child.kill().await; None }
                    },
                    Err(error) => {
                        tracing::warn!(%error, "could not start an init container");
                        None
                    }
                };
                if *stop.borrow() {
                    network.delete().await;
                    self.finish(&pod).await;
                    return;
                }
                let succeeded = status.is_some_and(|s| s.success());
                let terminated = json!({
                    "exitCode": status.and_then(|s| s.code()).unwrap_or(137),
                    "reason": if succeeded { "Completed" } else { "Error" },
                    "message": self.termination_message(&launch, &dir, !succeeded),
                    "startedAt": started_at, "finishedAt": now_time()});
                if succeeded {
                    self.patch_status(&pod, json!({"initContainerStatuses": [{"name": container.name, "image": container.image, "imageID": launch.image_id(), "ready": true,
                        "restartCount": attempt, "lastState": last_state, "state": {"terminated": terminated}}]})).await;
                    break;
                }
                attempt += 1;
                last_state = json!({"terminated": terminated});
                self.patch_status(&pod, json!({"initContainerStatuses": [{"name": container.name, "image": container.image, "imageID": "", "ready": false,
                    "restartCount": attempt, "lastState": last_state,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": format!("exited with {status:?}; see {}", dir.display())}}}]})).await;
                let delay = Duration::from_secs(1u64 << attempt.min(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stopped(&mut stop) => { network.delete().await; self.finish(&pod).await; return; }
                }
            }
        }
        let mut running: Vec<Running> = launches
            .map(|(container, launch)| Running {
                container,
                launch,
                child: None,
                started: false,
                ready: false,
                restarts: 0,
                started_at: Timestamp::now(),
                last_probe: Instant::now(),
                liveness_failures: 0,
                waiting: None,
                restart_at: Some(Instant::now()),
            })
            .collect();
        let mut reported = serde_json::Value::Null;
        loop {
            for c in &mut running {
                // Start (or restart after back-off) what is not running.
                if c.child.is_none() && c.restart_at.is_some_and(|at| Instant::now() >= at) {
                    match self.spawn(&c.launch, &network, &dir) {
                        Ok(child) => {
                            c.child = Some(child);
                            c.started = c.container.startup_probe.is_none();
                            c.ready = false;
                            c.started_at = Timestamp::now();
                            c.waiting = None;
                            c.restart_at = None;
                        }
                        Err(error) => {
                            c.waiting = Some(("StartError", error.to_string()));
                            c.restart_at = Some(Instant::now() + Duration::from_secs(5));
                        }
                    }
                }
                // An exited process is restarted (restartPolicy Always) with back-off.
                if let Some(child) = c.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    c.child = None;
                    c.restarts += 1;
                    c.ready = false;
                    c.waiting = Some((
                        "CrashLoopBackOff",
                        format!("exited with {status}; log in {}", dir.display()),
                    ));
                    c.restart_at = Some(
                        Instant::now() + Duration::from_secs(1u64 << (c.restarts as u32).min(5)),
                    );
                }
                if c.child.is_none() {
                    continue;
                }
                // Probes run every second, whatever their periodSeconds (README).
                let due = c.last_probe.elapsed() >= Duration::from_secs(1);
                if !due {
                    continue;
                }
                c.last_probe = Instant::now();
                if !c.started {
                    if let Some((path, port)) = c
                        .container
                        .startup_probe
                        .as_ref()
                        .and_then(|p| probe_port(p, &c.container))
                    {
                        c.started = http_ok(&network.pod_ip, port, &path).await;
                    }
                    continue;
                }
                c.ready = match c
                    .container
                    .readiness_probe
                    .as_ref()
                    .and_then(|p| probe_port(p, &c.container))
                {
                    Some((path, port)) => http_ok(&network.pod_ip, port, &path).await,
                    None => true,
                };
                if let Some(probe) = &c.container.liveness_probe
                    && let Some((path, port)) = probe_port(probe, &c.container)
                {
                    if http_ok(&network.pod_ip, port, &path).await {
                        c.liveness_failures = 0;
                    } else {
                        c.liveness_failures += 1;
                        if c.liveness_failures >= probe.failure_threshold.unwrap_or(3)
                            && let Some(mut child) = c.child.take()
                        {
                            let _ = child.kill().await;
                            c.restarts += 1;
                            c.liveness_failures = 0;
                            c.waiting = Some((
                                "LivenessProbeFailed",
                                "restarted after failed liveness probes".to_owned(),
                            ));
                            c.restart_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
            }
            let all_ready = running.iter().all(|c| c.ready);
            let statuses: Vec<serde_json::Value> = running
                .iter()
                .map(|c| {
                    let state = match (&c.child, &c.waiting) {
                        (Some(_), _) => json!({"running": {"startedAt": Time(Timestamp::from_second(c.started_at.as_second()).unwrap_or(c.started_at))}}),
                        (None, Some((reason, message))) => json!({"waiting": {"reason": reason, "message": message}}),
                        (None, None) => json!({"waiting": {"reason": "ContainerCreating"}}),
                    };
                    json!({"name": c.container.name, "image": c.container.image, "imageID": c.launch.image_id(),
                           "ready": c.ready, "started": c.started, "restartCount": c.restarts, "state": state})
                })
                .collect();
            let status = json!({"phase": "Running", "podIP": network.pod_ip, "podIPs": [{"ip": network.pod_ip}], "hostIP": "127.0.0.1",
                                "containerStatuses": statuses, "ready": all_ready});
            if status != reported {
                let mut full = status.clone();
                full.as_object_mut().expect("an object").remove("ready");
                full["conditions"] = Agent::conditions(all_ready, true);
                self.patch_status(&pod, full).await;
                reported = status;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stopped(&mut stop) => break,
            }
        }
        // Termination: the preStop sleep, SIGTERM, the rest of the grace period, then SIGKILL.
        let grace =
            Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
        let stopping = Instant::now();
        let pre_stop = running
            .iter()
            .filter_map(|c| c.launch.pre_stop_sleep)
            .max()
            .unwrap_or_default()
            .min(grace);
        tokio::time::sleep(pre_stop).await;
        for c in &running {
            if let Some(pid) = c.child.as_ref().and_then(Child::id) {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        let deadline = stopping + grace;
        for c in &mut running {
            if let Some(mut child) = c.child.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
        network.delete().await;
        self.finish(&pod).await;
    }

    /// The kubelet's last word on a deleted pod: remove it for good.
    async fn finish(&self, pod: &Pod) {
        self.pods
            .lock()
            .expect("pods lock")
            .remove(&pod.uid().unwrap_or_default());
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _ = api.delete(&pod.name_any(), &params).await;
    }

    async fn register(&self) -> anyhow::Result<()> {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"}},
        }))?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(error) => return Err(error.into()),
        }
        let capacity = json!({"cpu": cpus.to_string(), "memory": "16Gi", "pods": "110"});
        nodes
            .patch_status(&self.node, &PatchParams::default(), &Patch::Merge(json!({"status": {
                "capacity": capacity, "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.node}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "infergate node agent is ready",
                                "lastHeartbeatTime": now_time(), "lastTransitionTime": now_time()}],
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.36.3-infergate-node-agent",
                             "kubeProxyVersion": "", "containerRuntimeVersion": "processes://", "kernelVersion": "", "osImage": "",
                             "bootID": "", "machineID": "", "systemUUID": ""},
            }})))
            .await?;
        Ok(())
    }

    /// Node heartbeats: the Lease every 10 s, the Ready condition every 40 s.
    async fn heartbeat(self: Arc<Self>) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let mut beats = 0u64;
        loop {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.node.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.node.clone()),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(MicroTime(Timestamp::now())),
                    ..LeaseSpec::default()
                }),
            };
            let params = PatchParams::apply("infergate-node-agent").force();
            if let Err(error) = leases
                .patch(&self.node, &params, &Patch::Apply(&lease))
                .await
            {
                tracing::warn!(%error, "node lease");
            }
            if beats.is_multiple_of(4)
                && let Err(error) = self.register().await
            {
                tracing::warn!(%error, "node status");
            }
            beats += 1;
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }
}

/// A ConfigMap or Secret volume: its object, the keys it projects (all when `items` is unset)
/// and the files' mode.
struct ObjectVolume {
    secret: bool,
    name: String,
    items: Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    default_mode: i32,
    optional: bool,
}

/// Where a volume's files go, and the pod's fsGroup that may read them.
struct VolumeFiles {
    dir: PathBuf,
    fs_group: Option<i64>,
}

/// How often a mounted ConfigMap or Secret is compared with the API server's (the kubelet's
/// default is about a minute; the test bed's key rotations use a few seconds' activation).
const VOLUME_REFRESH: Duration = Duration::from_secs(1);

impl ObjectVolume {
    fn of(volume: &k8s_openapi::api::core::v1::Volume) -> Option<ObjectVolume> {
        if let Some(source) = &volume.config_map {
            return Some(ObjectVolume {
                secret: false,
                name: source.name.clone(),
                items: source.items.clone(),
                default_mode: source.default_mode.unwrap_or(0o644),
                optional: source.optional.unwrap_or(false),
            });
        }
        let source = volume.secret.as_ref()?;
        Some(ObjectVolume {
            secret: true,
            name: source.secret_name.clone().unwrap_or_default(),
            items: source.items.clone(),
            default_mode: source.default_mode.unwrap_or(0o644),
            optional: source.optional.unwrap_or(false),
        })
    }

    /// The object's data, by key; `None` while it does not exist.
    async fn data(
        &self,
        client: &Client,
        namespace: &str,
    ) -> anyhow::Result<Option<HashMap<String, Vec<u8>>>> {
        if self.secret {
            let api: Api<k8s_openapi::api::core::v1::Secret> =
                Api::namespaced(client.clone(), namespace);
            Ok(api.get_opt(&self.name).await?.map(|secret| {
                secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.0))
                    .collect()
            }))
        } else {
            let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
                Api::namespaced(client.clone(), namespace);
            Ok(api.get_opt(&self.name).await?.map(|config_map| {
                config_map
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.into_bytes()))
                    .collect()
            }))
        }
    }

    /// Waits for the object (unless optional), then writes its files.
    async fn first_fill(
        &self,
        client: &Client,
        namespace: &str,
        files: &VolumeFiles,
    ) -> anyhow::Result<()> {
        loop {
            match self.data(client, namespace).await? {
                Some(data) => return self.write(&data, files),
                None if self.optional => return Ok(()),
                None => tokio::time::sleep(VOLUME_REFRESH).await,
            }
        }
    }

    /// Rewrites the files that changed until `stop`.
    async fn refresh(
        self,
        client: Client,
        namespace: String,
        files: VolumeFiles,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(VOLUME_REFRESH) => {}
                _ = stopped(&mut stop) => return,
            }
            match self.data(&client, &namespace).await {
                Ok(Some(data)) => {
                    if let Err(error) = self.write(&data, &files) {
                        tracing::warn!(%error, volume = %self.name, "could not refresh a volume");
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, volume = %self.name, "volume refresh"),
            }
        }
    }

    /// Each projected key's file, replaced whole (a rename) when its content changed, so a
    /// reader never sees half of one. With an fsGroup the pod's group owns the files and may
    /// read them, as the kubelet arranges.
    fn write(&self, data: &HashMap<String, Vec<u8>>, files: &VolumeFiles) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let projected: Vec<(String, String, i32)> = match &self.items {
            Some(items) => items
                .iter()
                .map(|item| {
                    (
                        item.key.clone(),
                        item.path.clone(),
                        item.mode.unwrap_or(self.default_mode),
                    )
                })
                .collect(),
            None => data
                .keys()
                .map(|key| (key.clone(), key.clone(), self.default_mode))
                .collect(),
        };
        for (key, path, mode) in projected {
            let Some(bytes) = data.get(&key) else {
                continue;
            };
            let target = files.dir.join(&path);
            if std::fs::read(&target).is_ok_and(|current| &current == bytes) {
                continue;
            }
            let partial = files.dir.join(format!("..{path}.partial"));
            std::fs::write(&partial, bytes)?;
            let mut mode = mode as u32 & 0o777;
            if let Some(group) = files.fs_group {
                std::os::unix::fs::chown(&partial, None, Some(group as u32))?;
                mode |= (mode & 0o400) >> 3;
            }
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&partial, &target)?;
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    // Starting a container from an image ends in this binary (see `enter`): before any
    // thread exists, since it changes its user.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "enter-container")
    {
        return enter::run(enter::Enter::parse_from(std::env::args_os().skip(1)));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let client = Client::try_default().await?;
    let store = images::ImageStore::new(args.state_dir.join("images"), args.insecure_registry);
    std::fs::create_dir_all(&args.state_dir)?;
    let agent = Arc::new(Agent {
        client: client.clone(),
        node: args.node.clone(),
        images: args.images,
        store,
        state_dir: args.state_dir,
        image_dir: args.image_dir,
        api_service: args.api_relay.as_ref().map(|(listen, _)| *listen),
        networks: Networks(AtomicU32::new(0)),
        pods: Mutex::default(),
    });
    if let Some((listen, upstream)) = args.api_relay {
        tokio::spawn(async move {
            if let Err(error) = Agent::relay_api(listen, upstream).await {
                tracing::error!(%error, "API relay stopped");
            }
        });
    }
    agent.register().await?;
    tokio::spawn(agent.clone().heartbeat());
    tracing::info!(node = %agent.node, "node agent running");
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", args.node));
    let mut events = watcher(pods, config).boxed();
    while let Some(event) = events.try_next().await? {
        let (pods, deleted): (Vec<Pod>, bool) = match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => (vec![pod], false),
            watcher::Event::Delete(pod) => (vec![pod], true),
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        for pod in pods {
            let uid = pod.uid().unwrap_or_default();
            let terminating = deleted || pod.metadata.deletion_timestamp.is_some();
            let mut known = agent.pods.lock().expect("pods lock");
            match (known.get(&uid), terminating) {
                (Some(stop), true) => {
                    let _ = stop.send(true);
                }
                (None, false) => {
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                    if matches!(phase.as_deref(), Some("Succeeded" | "Failed")) {
                        continue;
                    }
                    let (stop, stopped) = watch::channel(false);
                    known.insert(uid, stop);
                    tokio::spawn(agent.clone().run_pod(pod, stopped));
                }
                (None, true) if !deleted => {
                    // Deleted while this agent was not running it: confirm the deletion.
                    let agent = agent.clone();
                    tokio::spawn(async move { agent.finish(&pod).await });
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Bind mounts in an order that works: one whose target holds another's host path (an emptyDir
/// at /tmp, with the node's state under /tmp) would hide that path once mounted, so those come
/// after the rest; otherwise the pod's order.
fn in_mount_order(mut mounts: Vec<(PathBuf, String)>) -> Vec<(PathBuf, String)> {
    let hosts: Vec<PathBuf> = mounts.iter().map(|(host, _)| host.clone()).collect();
    let hides_a_host = |target: &str| {
        hosts
            .iter()
            .any(|host| host.starts_with(target) && host != Path::new(target))
    };
    // A stable sort: the pod's order within each group.
    mounts.sort_by_key(|(_, target)| hides_a_host(target));
    mounts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_over_the_node_state_comes_after_the_mounts_whose_host_paths_it_would_hide() {
        let volume = |name: &str| PathBuf::from(format!("/tmp/state/pod/volumes/{name}"));
        let pod_order = vec![
            (volume("tmp"), "/tmp".to_owned()),
            (volume("token"), "/run/secrets/token".to_owned()),
            (volume("config"), "/etc/app".to_owned()),
        ];
        let ordered: Vec<String> = in_mount_order(pod_order)
            .into_iter()
            .map(|(_, target)| target)
            .collect();
        assert_eq!(ordered, ["/run/secrets/token", "/etc/app", "/tmp"]);
    }

    #[test]
    fn mounts_that_hide_nothing_keep_the_pods_order() {
        let pod_order = vec![
            (PathBuf::from("/var/state/a"), "/data".to_owned()),
            (PathBuf::from("/var/state/b"), "/data/cache".to_owned()),
        ];
        assert_eq!(in_mount_order(pod_order.clone()), pod_order);
    }
}
