//! Running what `infergate snippet` prints as its user would: saved to a file and run with the
//! language's own interpreter, unmodified, the token in `INFERGATE_TOKEN`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every `--lang` of `infergate snippet`.
pub const LANGUAGES: [&str; 6] = [
    "python",
    "curl",
    "javascript",
    "openai-python",
    "openai-node",
    "huggingface",
];

/// A fresh folder to run snippets in: the Whisper fixture's clip as `recording.wav` (what a
/// speech snippet uploads when given no file) and the npm clients as `node_modules`.
pub fn workdir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("infergate-snippets-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        here.join("../runtime/fixtures/whisper/clip.wav"),
        dir.join("recording.wav"),
    )
    .expect("the Whisper fixture's clip (runtime/fixtures/make_all.sh)");
    std::os::unix::fs::symlink(here.join("clients/node_modules"), dir.join("node_modules"))
        .expect("linking the npm clients");
    dir
}

/// Saves `code`, a snippet of `language`, in `dir` and runs it there.
pub fn run(language: &str, code: &str, token: &str, dir: &Path) -> Output {
    let (interpreter, extension) = match language {
        "curl" => ("bash", "sh"),
        "javascript" | "openai-node" => ("node", "mjs"),
        _ => ("python", "py"),
    };
    let file = dir.join(format!("{language}.{extension}"));
    std::fs::write(&file, code).expect("saving a snippet");
    Command::new(interpreter)
        .arg(&file)
        .current_dir(dir)
        .env("INFERGATE_TOKEN", token)
        // The test environment's offline switches, which a user's has not: huggingface_hub
        // refuses every URL, local ones included, while they are on.
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .output()
        .unwrap_or_else(|e| panic!("{interpreter}: {e} (run scripts/setup.sh)"))
}
