//! `infergate-runtime download` from a Hugging Face Hub, against a local server of the Hub
//! endpoints it calls, as the Hub documents and answers them (huggingface_hub's `model_info`
//! with `files_metadata` and `hf_hub_download`): the revision API with LFS digests, `resolve`
//! URLs that send large files on to a CDN on another host, ranged reads, `X-Error-Code`s, and
//! 401 for a repository that does not exist as for a private one.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

mod support;
use support::{Scratch, free_port, scratch, wait_for_port};

const HUB_SERVER: &str = r#"
import hashlib, http.server, json, re, sys, urllib.parse
config = json.load(open(sys.argv[1]))
log = open(sys.argv[2], "a", buffering=1)

def blob(repo, commit, path):
    return open(config["repos"][repo]["commits"][commit][path], "rb").read()

def is_lfs(path, body):
    return path.endswith(".safetensors") or path.endswith(".bin") or len(body) > 1000

def send_body(handler, body, headers=()):
    # A Range of one span answers 206, as the Hub and its CDN do.
    status, start, end = 200, 0, len(body)
    wanted = handler.headers.get("Range")
    if wanted:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
        start = int(m.group(1))
        end = int(m.group(2)) + 1 if m.group(2) else len(body)
        status = 206
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(end - start))
    if status == 206:
        handler.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
    handler.send_header("Accept-Ranges", "bytes")
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body[start:end])

class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass

    def error(self, status, code, message):
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def repo_for(self, repo):
        auth = self.headers.get("Authorization")
        log.write(f"hub {self.command} {self.path} auth={'yes' if auth else 'no'}\n")
        known = config["repos"].get(repo)
        if auth and auth != f"Bearer {config['token']}":
            self.error(401, None, "Invalid credentials in Authorization header")
            return None
        if known is None or (known["private"] and not auth):
            self.error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        return known

    def do_GET(self):
        path = urllib.parse.urlparse(self.path).path
        m = re.fullmatch(r"/api/models/(.+)/revision/([^/]+)", path)
        if m:
            repo, revision = m.group(1), urllib.parse.unquote(m.group(2))
            known = self.repo_for(repo)
            if known is None:
                return
            commit = known["refs"].get(revision, revision if revision in known["commits"] else None)
            if commit is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            siblings = []
            for name in sorted(known["commits"][commit]):
                body = blob(repo, commit, name)
                sibling = {"rfilename": name, "size": len(body),
                           "blobId": hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()}
                if is_lfs(name, body):
                    digest = hashlib.sha256(body).hexdigest()
                    if name in known.get("wrong_digests", []):
                        digest = hashlib.sha256(body + b"x").hexdigest()
                    sibling["lfs"] = {"sha256": digest, "size": len(body), "pointerSize": 134}
                siblings.append(sibling)
            reply = json.dumps({"_id": "0" * 24, "id": repo, "sha": commit, "private": known["private"],
                                "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        m = re.fullmatch(r"/(.+)/resolve/([0-9a-f]{40})/(.+)", path)
        if m:
            repo, commit, name = m.group(1), m.group(2), urllib.parse.unquote(m.group(3))
            known = self.repo_for(repo)
            if known is None:
                return
            if name not in known["commits"].get(commit, {}):
                return self.error(404, "EntryNotFound", f"{name} does not exist on {commit}")
            body = blob(repo, commit, name)
            headers = [("X-Repo-Commit", commit)]
            if is_lfs(name, body):
                digest = hashlib.sha256(body).hexdigest()
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{config['cdn_port']}/cdn/{repo}/{commit}/{name}?sig={digest[:16]}")
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(len(body)))
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            send_body(self, body, headers + [("ETag", '"%s"' % hashlib.sha1(body).hexdigest())])
            return
        self.error(404, None, "Not Found")
    do_HEAD = do_GET

class Cdn(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        auth = self.headers.get("Authorization")
        log.write(f"cdn {self.command} {self.path} auth={'yes' if auth else 'no'}\n")
        if auth:
            # A signed URL needs no token; one that arrives here has leaked.
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        m = re.fullmatch(r"/cdn/(.+)/([0-9a-f]{40})/(.+)", urllib.parse.urlparse(self.path).path)
        send_body(self, blob(m.group(1), m.group(2), urllib.parse.unquote(m.group(3))))

import threading
cdn = http.server.ThreadingHTTPServer(("127.0.0.1", config["cdn_port"]), Cdn)
threading.Thread(target=cdn.serve_forever, daemon=True).start()
http.server.ThreadingHTTPServer(("127.0.0.1", config["port"]), Hub).serve_forever()
"#;

const TOKEN: &str = "hf_never_printed_0123456789";

/// The local Hub, its files in a scratch directory; removed with it.
struct Hub {
    child: Child,
    port: u16,
    root: Scratch,
}

const MAIN: &str = "1111111111111111111111111111111111111111";
const NEXT: &str = "2222222222222222222222222222222222222222";

impl Hub {
    /// Repositories: `org/tiny` (private, `main` at MAIN, `v2` at NEXT), `org/pickles` (only
    /// a pytorch_model.bin) and `org/tampered` (an LFS digest that does not match its file).
    fn start(tag: &str) -> Hub {
        let root = scratch(&format!("hub-{tag}"));
        let write = |name: &str, body: &[u8]| {
            let path = root.join("blobs").join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, body).unwrap();
            path.display().to_string()
        };
        let weights: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let tiny = serde_json::json!({
            "config.json": write("config.json", br#"{"model_type": "bert"}"#),
            "tokenizer.json": write("tokenizer.json", br#"{"version": "1.0"}"#),
            "model.safetensors": write("model.safetensors", &weights),
            "1_Pooling/config.json": write("pooling.json", br#"{"pooling_mode_mean_tokens": true}"#),
            "pytorch_model.bin": write("pytorch_model.bin", b"pickled weights"),
            "onnx/model.onnx": write("model.onnx", b"onnx"),
            "README.md": write("README.md", b"# tiny"),
        });
        let mut next = tiny.clone();
        next["config.json"] = write("config-v2.json", br#"{"model_type": "bert", "v": 2}"#).into();
        let port = free_port();
        let config = serde_json::json!({
            "port": port,
            "cdn_port": free_port(),
            "token": TOKEN,
            "repos": {
                "org/tiny": {"private": true, "refs": {"main": MAIN, "v2": NEXT},
                             "commits": {MAIN: tiny, NEXT: next}},
                "org/pickles": {"private": false, "refs": {"main": MAIN},
                                "commits": {MAIN: {"pytorch_model.bin": write("p.bin", b"pickle")}}},
                "org/tampered": {"private": false, "refs": {"main": MAIN}, "commits": {MAIN: tiny},
                                 "wrong_digests": ["model.safetensors"]},
            }
        });
        std::fs::write(root.join("hub.json"), config.to_string()).unwrap();
        let child = Command::new("python3")
            .args(["-c", HUB_SERVER])
            .arg(root.join("hub.json"))
            .arg(root.join("requests.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "the Hub");
        Hub { child, port, root }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> String {
        std::fs::read_to_string(self.root.join("requests.log")).unwrap_or_default()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The download container's run, with HF_TOKEN as a mounted Secret when `token` is given.
fn download(hub: &Hub, source: &str, dest: &Path, token: Option<&str>, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_infergate-runtime"));
    command
        .args([
            "download",
            "--source",
            source,
            "--endpoint",
            &hub.endpoint(),
            "--dest",
        ])
        .arg(dest)
        .args(extra)
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT");
    if let Some(token) = token {
        let secret = dest.with_extension("secret");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("HF_TOKEN"), token).unwrap();
        command
            .args(["--credentials-dir"])
            .arg(&secret)
            .args(["--credentials-secret", "hub-token"]);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains(TOKEN),
        "the token leaked into the output: {stderr}"
    );
    output
}

fn outcome(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn a_repository_is_fetched_at_the_commit_its_revision_names_with_only_what_a_runtime_loads() {
    let hub = Hub::start("fetch");
    let cache = hub.root.join("node-cache");
    let cache_args = ["--cache", cache.to_str().unwrap()];
    let dest = hub.root.join("pod-1");

    let first = download(&hub, "hf://org/tiny", &dest, Some(TOKEN), &cache_args);
    let line = outcome(&first);
    assert!(first.status.success(), "{line}");
    assert!(
        line.starts_with("Downloaded: hf://org/tiny@main: 4 files"),
        "{line}"
    );
    assert!(line.contains(&format!("commit {MAIN}")), "{line}");
    assert!(
        line.contains("checked against the Hub's LFS sha256"),
        "{line}"
    );
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "1_Pooling/config.json",
    ] {
        assert!(dest.join(file).is_file(), "{file}");
    }
    for skipped in ["pytorch_model.bin", "onnx/model.onnx", "README.md"] {
        assert!(
            !dest.join(skipped).exists(),
            "{skipped} is not what a runtime loads"
        );
        assert!(!hub.requests().contains(skipped), "{skipped} was requested");
    }
    let requests = hub.requests();
    assert!(
        requests.contains("cdn GET /cdn/org/tiny/"),
        "the large file came from the CDN: {requests}"
    );
    assert!(
        requests
            .lines()
            .filter(|l| l.starts_with("cdn"))
            .all(|l| l.ends_with("auth=no")),
        "the token never reaches the CDN: {requests}"
    );

    let second = download(
        &hub,
        "hf://org/tiny@main",
        &hub.root.join("pod-2"),
        Some(TOKEN),
        &cache_args,
    );
    assert!(
        outcome(&second).starts_with("CacheHit: hf://org/tiny@main"),
        "{}",
        outcome(&second)
    );

    // Another revision is another commit, so another cache entry.
    let next = download(
        &hub,
        "hf://org/tiny@v2",
        &hub.root.join("pod-3"),
        Some(TOKEN),
        &cache_args,
    );
    let line = outcome(&next);
    assert!(line.starts_with("Downloaded: hf://org/tiny@v2"), "{line}");
    assert!(line.contains(&format!("commit {NEXT}")), "{line}");
    assert_eq!(
        std::fs::read_to_string(hub.root.join("pod-3/config.json")).unwrap(),
        r#"{"model_type": "bert", "v": 2}"#
    );
}

#[test]
fn hub_failures_name_the_repository_the_revision_and_the_fix() {
    let hub = Hub::start("failures");
    let run = |source: &str, token: Option<&str>| {
        let output = download(&hub, source, &hub.root.join("dest"), token, &[]);
        assert!(!output.status.success(), "{source} should fail");
        outcome(&output)
    };

    let revision = run("hf://org/tiny@no-such-branch", Some(TOKEN));
    assert!(
        revision.starts_with("RevisionNotFound: hf://org/tiny@no-such-branch"),
        "{revision}"
    );
    assert!(
        revision.contains("RevisionNotFound: Invalid rev id: no-such-branch"),
        "{revision}"
    );

    let private = run("hf://org/tiny", None);
    assert!(
        private.starts_with("ModelNotFound: hf://org/tiny@main"),
        "{private}"
    );
    assert!(private.contains("private and needs HF_TOKEN"), "{private}");

    let wrong = run("hf://org/tiny", Some("hf_wrong"));
    assert!(
        wrong.starts_with("CredentialsRefused: hf://org/tiny@main"),
        "{wrong}"
    );
    assert!(wrong.contains("Secret hub-token"), "{wrong}");

    let pickles = run("hf://org/pickles", None);
    assert!(
        pickles.starts_with("ModelNotFound: hf://org/pickles@main"),
        "{pickles}"
    );
    assert!(pickles.contains("has no safetensors weights"), "{pickles}");

    let tampered = run("hf://org/tampered", None);
    assert!(
        tampered.starts_with(&format!(
            "DigestMismatch: hf://org/tampered@{MAIN}: model.safetensors has sha256"
        )),
        "{tampered}"
    );
    assert!(tampered.contains("the Hub's LFS sha256"), "{tampered}");
}
