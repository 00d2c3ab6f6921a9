//! `infergate-runtime download` from an S3-compatible store: Versity's S3 gateway, a real S3
//! server (SigV4, ListObjectsV2, ranged GETs with If-Match), built by e2e/cluster/build.sh and
//! started here over a scratch directory. Between the two sits a TCP relay that counts the bytes
//! and can cut every connection, as a broken network does.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod support;
use support::{Scratch, free_port, scratch, wait_for_port};

const ACCESS_KEY: &str = "infergate-test";
const SECRET_KEY: &str = "s3cr3t-never-printed";

/// The gateway over `root/data` (a bucket is a directory, an object a file in it).
struct Store {
    child: Child,
    port: u16,
    root: Scratch,
}

impl Store {
    fn start(tag: &str) -> Store {
        let bin = std::env::var_os("INFERGATE_CLUSTER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/infergate/cluster/bin")
            })
            .join("versitygw");
        assert!(
            bin.exists(),
            "{} is missing: scripts/setup.sh builds it (e2e/cluster/build.sh)",
            bin.display()
        );
        let root = scratch(&format!("s3-{tag}"));
        std::fs::create_dir_all(root.join("data")).unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "--access", ACCESS_KEY, "--secret", SECRET_KEY, "--quiet", "--port",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("posix")
            .arg(root.join("data"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("gateway.log")).unwrap())
            .spawn()
            .unwrap();
        wait_for_port(port, "the gateway");
        Store { child, port, root }
    }

    fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let path = self.root.join("data").join(bucket).join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }

    /// A model directory with a manifest of its digests, as `sha256sum` writes one.
    fn put_model(&self, bucket: &str, prefix: &str, files: &[(&str, Vec<u8>)]) {
        let mut manifest = String::new();
        for (name, body) in files {
            self.put(bucket, &format!("{prefix}/{name}"), body);
            manifest.push_str(&format!("{}  {name}\n", hex(&Sha256::digest(body))));
        }
        self.put(bucket, &format!("{prefix}/SHA256SUMS"), manifest.as_bytes());
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TCP relay to the store that counts the bytes sent back, cuts every open connection once
/// that count passes `cut_at`, and holds back every connection that has carried more than
/// `stall_beyond` bytes until that limit is lifted (a download stuck mid-file, while small
/// requests on fresh connections still get through).
struct Relay {
    port: u16,
    received: Arc<AtomicU64>,
    cut_at: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
    stall_beyond: Arc<AtomicU64>,
    stalled: Arc<AtomicU64>,
}

impl Relay {
    fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let relay = Relay {
            port,
            received: Arc::new(AtomicU64::new(0)),
            cut_at: Arc::new(AtomicU64::new(u64::MAX)),
            cuts: Arc::new(AtomicU64::new(0)),
            stall_beyond: Arc::new(AtomicU64::new(u64::MAX)),
            stalled: Arc::new(AtomicU64::new(0)),
        };
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (r, c, n, sb, st) = (
            relay.received.clone(),
            relay.cut_at.clone(),
            relay.cuts.clone(),
            relay.stall_beyond.clone(),
            relay.stalled.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                open.lock().unwrap().push(client.try_clone().unwrap());
                let (mut up_in, mut up_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_in, &mut up_out);
                    let _ = up_out.shutdown(Shutdown::Write);
                });
                let (mut down_in, mut down_out) = (server, client);
                let (received, cut_at, cuts, open) =
                    (r.clone(), c.clone(), n.clone(), open.clone());
                let (stall_beyond, stalled) = (sb.clone(), st.clone());
                std::thread::spawn(move || {
                    let mut buffer = vec![0u8; 64 << 10];
                    let mut carried = 0u64;
                    while let Ok(n) = down_in.read(&mut buffer) {
                        carried += n as u64;
                        if carried > stall_beyond.load(Ordering::SeqCst) {
                            stalled.fetch_add(1, Ordering::SeqCst);
                            while carried > stall_beyond.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            stalled.fetch_sub(1, Ordering::SeqCst);
                        }
                        if n == 0 || down_out.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                        let total = received.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total >= cut_at.load(Ordering::SeqCst) {
                            cut_at.store(u64::MAX, Ordering::SeqCst);
                            cuts.fetch_add(1, Ordering::SeqCst);
                            for stream in open.lock().unwrap().drain(..) {
                                let _ = stream.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    let _ = down_out.shutdown(Shutdown::Both);
                });
            }
        });
        relay
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A Secret as the kubelet mounts it: a file per key, beside its own dot-named bookkeeping.
fn mounted_secret(dir: &Path, secret_key: &str) -> PathBuf {
    let secret = dir.join("secret");
    std::fs::create_dir_all(secret.join("..2026_12_05")).unwrap();
    std::fs::write(secret.join("AWS_ACCESS_KEY_ID"), ACCESS_KEY).unwrap();
    std::fs::write(
        secret.join("AWS_SECRET_ACCESS_KEY"),
        format!("{secret_key}\n"),
    )
    .unwrap();
    secret
}

/// `infergate-runtime download` as the operator runs it, its credentials a mounted Secret.
fn download(source: &str, endpoint: &str, dest: &Path, extra: &[&str]) -> Command {
    download_with_key(source, endpoint, dest, extra, SECRET_KEY)
}

fn download_with_key(
    source: &str,
    endpoint: &str,
    dest: &Path,
    extra: &[&str],
    secret_key: &str,
) -> Command {
    let secret = mounted_secret(dest.parent().unwrap(), secret_key);
    let mut command = Command::new(env!("CARGO_BIN_EXE_infergate-runtime"));
    command
        .args([
            "download",
            "--source",
            source,
            "--endpoint",
            endpoint,
            "--path-style",
        ])
        .args([
            "--region",
            "us-east-1",
            "--credentials-secret",
            "model-store-keys",
        ])
        .arg("--credentials-dir")
        .arg(secret)
        .arg("--dest")
        .arg(dest)
        .args(extra);
    for variable in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT",
    ] {
        command.env_remove(variable);
    }
    command
}

/// The run's outcome line (what the termination message holds).
fn outcome(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains(SECRET_KEY),
        "the secret key leaked into the output: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    // A line without a reason is a crash, not an outcome: show all of it.
    if last
        .split_once(": ")
        .is_some_and(|(reason, _)| reason.chars().all(char::is_alphabetic))
    {
        last.to_owned()
    } else {
        stderr.into_owned()
    }
}

/// Bytes no compression or deduplication could shorten, quickly (xorshift, 8 bytes a step).
fn pseudo_random(bytes: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(bytes + 8);
    while out.len() < bytes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(bytes);
    out
}

/// coreutils' sha256sum: tests are built without optimisation, it is not.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn model_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("config.json", br#"{"model_type": "bert"}"#.to_vec()),
        ("tokenizer.json", br#"{"version": "1.0"}"#.to_vec()),
        ("model.safetensors", pseudo_random(40 << 20, 7)),
        (
            "1_Pooling/config.json",
            br#"{"pooling_mode_mean_tokens": true}"#.to_vec(),
        ),
    ]
}

#[test]
fn a_prefix_is_downloaded_checked_against_its_manifest_and_a_second_pod_hits_the_node_cache() {
    let store = Store::start("cache");
    store.put_model("models", "team/minilm", &model_files());
    let relay = Relay::start(store.port);
    let work = scratch("cache-work");
    let cache = work.join("node-cache");
    let cache_args = [
        "--cache",
        cache.to_str().unwrap(),
        "--chunk-bytes",
        "4194304",
    ];

    let first = download(
        "s3://models/team/minilm",
        &relay.endpoint(),
        &work.join("pod-1"),
        &cache_args,
    )
    .output()
    .unwrap();
    let line = outcome(&first);
    assert!(first.status.success(), "{line}");
    assert!(
        line.starts_with("Downloaded: s3://models/team/minilm: 5 files"),
        "{line}"
    );
    assert!(line.contains("checked against SHA256SUMS"), "{line}");
    for (name, body) in model_files() {
        assert_eq!(
            std::fs::read(work.join("pod-1").join(name)).unwrap(),
            body,
            "{name}"
        );
    }
    let over_the_network = relay.received.load(Ordering::SeqCst);
    assert!(over_the_network > 40 << 20);

    let second = download(
        "s3://models/team/minilm",
        &relay.endpoint(),
        &work.join("pod-2"),
        &cache_args,
    )
    .output()
    .unwrap();
    let line = outcome(&second);
    assert!(second.status.success(), "{line}");
    assert!(
        line.starts_with("CacheHit: s3://models/team/minilm: 5 files"),
        "{line}"
    );
    let listing_only = relay.received.load(Ordering::SeqCst) - over_the_network;
    assert!(
        listing_only < 64 << 10,
        "a hit lists the prefix and reads the manifest only: {listing_only} bytes"
    );
    let inode = |pod: &str| {
        std::fs::metadata(work.join(pod).join("model.safetensors"))
            .unwrap()
            .ino()
    };
    assert_eq!(
        inode("pod-1"),
        inode("pod-2"),
        "both pods hold hard links to the cached file"
    );
}

#[test]
fn a_pod_starting_while_another_fetches_the_model_waits_for_it_instead_of_downloading_again() {
    let store = Store::start("together");
    store.put_model("models", "minilm", &model_files());
    let relay = Relay::start(store.port);
    let work = scratch("together-work");
    let cache = work.join("node-cache");
    let cache_args = ["--cache", cache.to_str().unwrap()];
    let start_pod = |pod: &str| {
        download(
            "s3://models/minilm",
            &relay.endpoint(),
            &work.join(pod),
            &cache_args,
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };

    // The first pod gets 1 MiB into the weights and is held there, owning the model's lock.
    relay.stall_beyond.store(1 << 20, Ordering::SeqCst);
    let mut first = start_pod("pod-1");
    wait_until("the first pod is mid-download", &mut first, || {
        relay.stalled.load(Ordering::SeqCst) > 0
    });
    let mut second = start_pod("pod-2");
    let second_pid = second.id();
    wait_until("the second pod waits on the lock", &mut second, || {
        blocked_on_a_lock(second_pid)
    });
    relay.stall_beyond.store(u64::MAX, Ordering::SeqCst);

    let first = first.wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", outcome(&first));
    assert!(second.status.success(), "{}", outcome(&second));
    assert!(
        outcome(&first).starts_with("Downloaded: "),
        "{}",
        outcome(&first)
    );
    assert!(
        outcome(&second).starts_with("CacheHitAfterWait: "),
        "{}",
        outcome(&second)
    );
    let received = relay.received.load(Ordering::SeqCst);
    assert!(
        received < (40 << 20) + (1 << 20),
        "one copy of the 40 MiB model crossed the network, not two: {received} bytes"
    );
}

/// Polls `done` for up to a minute, failing at once if `pod` exits first.
fn wait_until(what: &str, pod: &mut Child, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if let Some(status) = pod.try_wait().unwrap() {
            panic!("waiting until {what}, the pod exited: {status}");
        }
        assert!(Instant::now() < deadline, "{what}: not within a minute");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` sleeps in flock(2): the kernel lists such a waiter in /proc/locks after `->`.
fn blocked_on_a_lock(pid: u32) -> bool {
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&"->") && fields.get(5) == Some(&pid.to_string().as_str())
        })
}

#[test]
fn each_failure_names_the_object_and_the_fix() {
    let store = Store::start("failures");
    let files = model_files();
    store.put_model("models", "minilm", &files);
    // The same model whose weights changed by one bit after the manifest was written.
    store.put_model("models", "corrupt", &files);
    let mut flipped = files[2].1.clone();
    flipped[12345] ^= 1;
    store.put("models", "corrupt/model.safetensors", &flipped);
    store.put_model("models", "good", &model_files()[..2]);
    let work = scratch("failures-work");
    let endpoint = format!("http://127.0.0.1:{}", store.port);
    let run_with_key = |source: &str, endpoint: &str, extra: &[&str], key: &str| {
        let output = download_with_key(source, endpoint, &work.join("dest"), extra, key)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{source} should fail");
        outcome(&output)
    };
    let run = |source: &str, endpoint: &str, extra: &[&str]| {
        run_with_key(source, endpoint, extra, SECRET_KEY)
    };

    let wrong_key = run_with_key("s3://models/minilm", &endpoint, &[], "not-the-key");
    assert!(
        wrong_key.starts_with("CredentialsRefused: s3://models/minilm"),
        "{wrong_key}"
    );
    assert!(wrong_key.contains("Secret model-store-keys"), "{wrong_key}");

    let no_bucket = run("s3://no-such-bucket/minilm", &endpoint, &[]);
    assert!(
        no_bucket.starts_with("ModelNotFound: s3://no-such-bucket/minilm"),
        "{no_bucket}"
    );
    assert!(no_bucket.contains("NoSuchBucket"), "{no_bucket}");

    let no_prefix = run("s3://models/no-such-model", &endpoint, &[]);
    assert!(
        no_prefix
            .starts_with("ModelNotFound: s3://models/no-such-model: no object under the prefix"),
        "{no_prefix}"
    );

    let corrupt = run("s3://models/corrupt", &endpoint, &[]);
    assert!(
        corrupt.starts_with("DigestMismatch: s3://models/corrupt: model.safetensors has sha256"),
        "{corrupt}"
    );
    assert!(corrupt.contains("but SHA256SUMS says"), "{corrupt}");

    let cache = work.join("small-cache");
    let too_big = run(
        "s3://models/minilm",
        &endpoint,
        &[
            "--cache",
            cache.to_str().unwrap(),
            "--cache-max-bytes",
            "1000000",
        ],
    );
    assert!(
        too_big.starts_with("DiskFull: s3://models/minilm: 41943"),
        "{too_big}"
    );
    assert!(too_big.contains("raise modelCache.maxBytes"), "{too_big}");

    let closed = format!("http://127.0.0.1:{}", free_port());
    let unreachable = run("s3://models/good", &closed, &[]);
    assert!(
        unreachable.starts_with("StoreUnreachable: s3://models/good"),
        "{unreachable}"
    );
    assert!(unreachable.contains("spec.model.endpoint"), "{unreachable}");
}

/// The issue's case: 2 GB over a network that breaks mid-transfer, then an init container
/// killed halfway and started again. Ranges resume at the byte they stopped at, and the journal
/// carries the finished ranges across the restart: far fewer than 2 x 2 GB cross the network.
#[test]
fn a_two_gigabyte_file_survives_a_cut_transfer_and_a_killed_init_container() {
    const SIZE: usize = 2 << 30;
    let store = Store::start("big");
    // A block of prime length repeated: quick to write unoptimised, and no 32 MiB range
    // lines up with another, so a range written at the wrong offset changes the digest.
    let block = pseudo_random(1_000_003, 11);
    let big = store.root.join("data/models/big/model.safetensors");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(&big).unwrap());
    let mut written = 0;
    while written < SIZE {
        let n = block.len().min(SIZE - written);
        out.write_all(&block[..n]).unwrap();
        written += n;
    }
    out.flush().unwrap();
    drop(out);
    let digest = sha256sum(&store.root.join("data/models/big/model.safetensors"));
    store.put(
        "models",
        "big/SHA256SUMS",
        format!("{digest}  model.safetensors\n").as_bytes(),
    );
    let relay = Relay::start(store.port);
    let work = scratch("big-work");
    let dest = work.join("pod");
    let args = ["--concurrency", "8", "--chunk-bytes", "33554432"];

    relay.cut_at.store(600 << 20, Ordering::SeqCst);
    let first_log = work.join("first.log");
    let mut first = download("s3://models/big", &relay.endpoint(), &dest, &args)
        .stderr(std::fs::File::create(&first_log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while relay.received.load(Ordering::SeqCst) < 1300 << 20 {
        if let Some(status) = first.try_wait().unwrap() {
            panic!(
                "the download ended ({status}) before it was killed: {}",
                std::fs::read_to_string(&first_log).unwrap()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the download stalled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(
        relay.cuts.load(Ordering::SeqCst),
        1,
        "the connections were cut once"
    );
    let before_restart = relay.received.load(Ordering::SeqCst);

    let second = download("s3://models/big", &relay.endpoint(), &dest, &args)
        .output()
        .unwrap();
    let line = outcome(&second);
    assert!(second.status.success(), "{line}");
    assert!(line.contains("resumed from an earlier attempt"), "{line}");
    assert!(line.contains("checked against SHA256SUMS"), "{line}");
    let total = relay.received.load(Ordering::SeqCst);
    let after_restart = total - before_restart;
    // What was in flight when the process died or the connections were cut (at most one
    // range per request, and what sat in the sockets' buffers) is fetched again; the rest is not.
    let slack = 8 * ((32 << 20) + (8 << 20)) + (1 << 20);
    assert!(
        total < SIZE as u64 + slack,
        "{total} bytes crossed the network for a {SIZE}-byte file"
    );
    assert!(
        after_restart < SIZE as u64 - before_restart + slack,
        "{after_restart} after the restart"
    );
    assert_eq!(sha256sum(&dest.join("model.safetensors")), digest);
    eprintln!(
        "2 GiB: {before_restart} bytes before the kill (1 cut), {after_restart} after the restart; {line}"
    );
}
