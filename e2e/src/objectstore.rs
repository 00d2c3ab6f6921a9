//! Versity's S3 gateway (built by e2e/cluster/build.sh), a real S3 server, over a scratch
//! directory: a bucket is a directory of it, an object a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::eventually;

/// The files of all-MiniLM-L6-v2 a runtime loads.
pub const MINILM_FILES: [&str; 9] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "model.safetensors",
];

#[derive(Debug)]
pub struct ObjectStore {
    child: Child,
    /// `http://HOST:PORT`.
    pub endpoint: String,
    data: PathBuf,
}

impl ObjectStore {
    /// Listens on `host` (an address of this machine) with one access key.
    pub fn start(dir: &Path, host: &str, access_key: &str, secret_key: &str) -> ObjectStore {
        let port = std::net::TcpListener::bind((host, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let bin = std::env::var("INFERGATE_CLUSTER_BIN").unwrap_or_else(|_| {
            format!(
                "{}/.cache/infergate/cluster/bin",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let data = dir.join("store");
        std::fs::create_dir_all(&data).expect("the store's directory");
        let child = Command::new(format!("{bin}/versitygw"))
            .args([
                "--access", access_key, "--secret", secret_key, "--quiet", "--port",
            ])
            .arg(format!("{host}:{port}"))
            .arg("posix")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("versitygw: scripts/setup.sh builds it");
        eventually(
            "the object store listening",
            Duration::from_secs(20),
            || std::net::TcpStream::connect((host, port)).ok(),
        );
        ObjectStore {
            child,
            endpoint: format!("http://{host}:{port}"),
            data,
        }
    }

    /// Uploads `files` of a model directory under `bucket/prefix`, with their SHA256SUMS.
    pub fn put_model(&self, bucket: &str, prefix: &str, from: &Path, files: &[&str]) {
        let target = self.data.join(bucket).join(prefix);
        let mut manifest = String::new();
        for file in files {
            std::fs::create_dir_all(target.join(file).parent().expect("a parent"))
                .expect("the object's directory");
            std::fs::copy(from.join(file), target.join(file)).expect("copying a model file");
            let sum = Command::new("sha256sum")
                .arg(target.join(file))
                .output()
                .expect("sha256sum");
            manifest.push_str(&format!(
                "{}  {file}\n",
                &String::from_utf8_lossy(&sum.stdout)[..64]
            ));
        }
        std::fs::write(target.join("SHA256SUMS"), manifest).expect("writing SHA256SUMS");
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
