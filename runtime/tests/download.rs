//! `infergate-runtime download`, the init container of https:// ModelDeployments, against a
//! local HTTP server: what it places, what it checks, and what it refuses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod support;
use support::wait_for_port;

/// A file server that also answers /redirect/PATH with a 302 to /PATH, as hubs and object
/// stores send clients on to signed URLs.
const REDIRECTING_FILE_SERVER: &str = r#"
import http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect"):])
            self.end_headers()
            return
        super().do_GET()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"#;

struct FileServer {
    child: Child,
    url: String,
    root: PathBuf,
}

impl FileServer {
    /// Serves a fresh directory, filled by `fill` (Python, given the directory as `root`).
    fn start(tag: &str, fill: &str) -> FileServer {
        let root =
            std::env::temp_dir().join(format!("infergate-download-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let filled = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import io, os, tarfile\nroot = {:?}\n{fill}",
                    root.display().to_string()
                ),
            ])
            .output()
            .unwrap();
        assert!(
            filled.status.success(),
            "{}",
            String::from_utf8_lossy(&filled.stderr)
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args(["-c", REDIRECTING_FILE_SERVER, &port.to_string()])
            .current_dir(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port, "the file server");
        FileServer {
            child,
            url: format!("http://127.0.0.1:{port}"),
            root,
        }
    }

    fn sha256(&self, file: &str) -> String {
        let out = Command::new("sha256sum")
            .arg(self.root.join(file))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn download(url: &str, sha256: Option<&str>, dest: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_infergate-runtime"));
    command.args(["download", "--url", url, "--dest"]).arg(dest);
    if let Some(sha256) = sha256 {
        command.args(["--sha256", sha256]);
    }
    command.output().unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with(".infergate-download-complete"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const MODEL_ARCHIVE: &str = r#"
with tarfile.open(os.path.join(root, "minilm.tar.gz"), "w:gz") as tar:
    for name, body in [("minilm/config.json", b"{}"), ("minilm/tokenizer.json", b"{\"v\": 1}")]:
        info = tarfile.TarInfo(name)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
open(os.path.join(root, "model.safetensors"), "wb").write(b"weights")
"#;

#[test]
fn an_archive_is_checked_and_unpacked_into_the_model_directory() {
    let server = FileServer::start("archive", MODEL_ARCHIVE);
    let dest = server.root.join("dest-archive");
    let digest = server.sha256("minilm.tar.gz");
    let done = download(
        &format!("{}/minilm.tar.gz", server.url),
        Some(&digest),
        &dest,
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(files(&dest), ["minilm"]);
    assert_eq!(
        std::fs::read(dest.join("minilm/tokenizer.json")).unwrap(),
        b"{\"v\": 1}"
    );

    // A restarted init container in the same pod finds the download complete.
    std::fs::remove_file(server.root.join("minilm.tar.gz")).unwrap();
    let again = download(
        &format!("{}/minilm.tar.gz", server.url),
        Some(&digest),
        &dest,
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn a_single_file_is_stored_under_its_name_after_redirects() {
    let server = FileServer::start("file", MODEL_ARCHIVE);
    let dest = server.root.join("dest-file");
    let done = download(
        &format!("{}/redirect/redirect/model.safetensors", server.url),
        None,
        &dest,
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(files(&dest), ["model.safetensors"]);
    assert_eq!(
        std::fs::read(dest.join("model.safetensors")).unwrap(),
        b"weights"
    );
}

#[test]
fn a_wrong_digest_fails_and_leaves_nothing() {
    let server = FileServer::start("digest", MODEL_ARCHIVE);
    let dest = server.root.join("dest-digest");
    let wrong = "0".repeat(64);
    let failed = download(
        &format!("{}/minilm.tar.gz", server.url),
        Some(&wrong),
        &dest,
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("sha256 mismatch"), "{stderr}");
    assert!(
        stderr.contains(&server.sha256("minilm.tar.gz")),
        "the error shows the actual digest: {stderr}"
    );
    assert!(files(&dest).is_empty(), "{:?}", files(&dest));
}

#[test]
fn archive_entries_that_escape_or_link_are_refused() {
    let escaping = r#"
for tag, kind in [("escape", "file"), ("link", "symlink"), ("absolute", "abs")]:
    with tarfile.open(os.path.join(root, f"{tag}.tar"), "w") as tar:
        ok = tarfile.TarInfo("model/config.json"); ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        if kind == "file":
            bad = tarfile.TarInfo("../outside.txt"); bad.size = 1
            tar.addfile(bad, io.BytesIO(b"x"))
        elif kind == "symlink":
            bad = tarfile.TarInfo("model/passwd"); bad.type = tarfile.SYMTYPE; bad.linkname = "/etc/passwd"
            tar.addfile(bad)
        else:
            bad = tarfile.TarInfo("/tmp/infergate-absolute.txt"); bad.size = 1
            tar.addfile(bad, io.BytesIO(b"x"))
"#;
    let server = FileServer::start("escape", escaping);
    for tag in ["escape", "link", "absolute"] {
        let dest = server.root.join(format!("dest-{tag}"));
        let failed = download(&format!("{}/{tag}.tar", server.url), None, &dest);
        assert!(!failed.status.success(), "{tag} was accepted");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(
            stderr.contains("is not a plain file or directory inside"),
            "{tag}: {stderr}"
        );
        assert!(files(&dest).is_empty(), "{tag} left {:?}", files(&dest));
    }
    assert!(!server.root.join("outside.txt").exists());
}

#[test]
fn a_missing_file_names_the_status() {
    let server = FileServer::start("missing", MODEL_ARCHIVE);
    let failed = download(
        &format!("{}/nope.tar", server.url),
        None,
        &server.root.join("dest-missing"),
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("404"), "{stderr}");
}

#[test]
fn https_is_spoken_and_an_untrusted_certificate_is_refused() {
    let server = FileServer::start("tls", MODEL_ARCHIVE);
    let (key, cert) = (server.root.join("key.pem"), server.root.join("cert.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let serve = format!(
        "import http.server, ssl\n\
         s = http.server.HTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain({:?}, {:?})\n\
         s.socket = c.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()",
        cert.display().to_string(),
        key.display().to_string()
    );
    let mut tls = Command::new("python3")
        .args(["-c", &serve])
        .current_dir(&server.root)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, "the TLS server");
    let failed = download(
        &format!("https://127.0.0.1:{port}/model.safetensors"),
        None,
        &server.root.join("dest-tls"),
    );
    let _ = tls.kill();
    let _ = tls.wait();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("GET https://127.0.0.1"), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_archive_with_a_digest_is_shared_by_the_pods_of_a_node_through_its_cache() {
    let server = FileServer::start("cached", MODEL_ARCHIVE);
    let cache = server.root.join("node-cache");
    let url = format!("{}/minilm.tar.gz", server.url);
    let digest = server.sha256("minilm.tar.gz");
    let pod = |name: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_infergate-runtime"))
            .args(["download", "--url", &url, "--sha256", &digest, "--dest"])
            .arg(server.root.join(name))
            .arg("--cache")
            .arg(&cache)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{log}");
        log
    };
    assert!(pod("pod-1").contains("Downloaded: "));
    // The second pod needs nothing from the server any more.
    std::fs::remove_file(server.root.join("minilm.tar.gz")).unwrap();
    let second = pod("pod-2");
    assert!(second.contains("CacheHit: "), "{second}");
    let inode = |pod: &str| {
        std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(server.root.join(pod).join("minilm/tokenizer.json")).unwrap(),
        )
    };
    assert_eq!(
        inode("pod-1"),
        inode("pod-2"),
        "both hold links to the cached file"
    );
}
