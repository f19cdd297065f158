//! Where `scripts/fetch-model.sh` puts the GGUF models.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The GGUF models `scripts/fetch-model.sh` fetches: name and file, under
/// `<models root>/<name>/`.
pub const GGUF_MODELS: &[(&str, &str)] = &[
    ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
];

/// The models root when `SNUG_MODELS_ROOT` is not set, relative to the
/// repository root.
pub const DEFAULT_MODELS_ROOT: &str = "models";

/// The GGUF file of model `name` (`smollm2-135m` or `gemma3-270m`, see
/// [`GGUF_MODELS`]): `<root>/<name>/<file>` where root is `SNUG_MODELS_ROOT`
/// when set (absolute, or relative to the current directory or one of its
/// ancestors) else [`DEFAULT_MODELS_ROOT`] under the current directory or its
/// nearest ancestor that has the file. Errors, naming
/// `scripts/fetch-model.sh`, when the file is not there.
pub fn gguf_path(name: &str) -> Result<PathBuf> {
    let root = std::env::var_os("SNUG_MODELS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODELS_ROOT));
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    find_gguf(name, &root, &cwd)
}

fn find_gguf(name: &str, root: &Path, from: &Path) -> Result<PathBuf> {
    let file = GGUF_MODELS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            known: "smollm2-135m, gemma3-270m",
        })?;
    let rel = root.join(name).join(file);
    if rel.is_absolute() {
        return if rel.is_file() {
            Ok(rel)
        } else {
            Err(Error::GgufMissing {
                name: name.to_string(),
                path: rel,
            })
        };
    }
    for dir in from.ancestors() {
        let cand = dir.join(&rel);
        if cand.is_file() {
            return Ok(cand);
        }
    }
    Err(Error::GgufMissing {
        name: name.to_string(),
        path: from.join(rel),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_names_the_script_and_the_model() {
        let e = find_gguf("gemma3-270m", Path::new("/nonexistent"), Path::new("/")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("scripts/fetch-model.sh gemma3-270m"), "{msg}");
        assert!(
            msg.contains("/nonexistent/gemma3-270m/gemma-3-270m-q4_k_m.gguf"),
            "{msg}"
        );
        let e = find_gguf("llama-9000", Path::new("models"), Path::new("/")).unwrap_err();
        assert!(e.to_string().contains("llama-9000"), "{e}");
    }

    #[test]
    fn finds_the_file_in_an_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m/smollm2-135m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("SmolLM2-135M-Instruct.Q4_1.gguf"), b"GGUF").unwrap();
        let deep = dir.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let p = find_gguf("smollm2-135m", Path::new("m"), &deep).unwrap();
        assert_eq!(p, model.join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    }
}
