//! ONNX Runtime through `ort` (feature `load-dynamic`; this crate's feature `ort`): finding the
//! shared library without ceremony, and running an image classifier with it. The trainer serves
//! teachers and compares engines with it; `mekd-edge bench --engine ort` times a student with it
//! on the board.
//!
//! The library comes from the PyPI `onnxruntime` wheel (version [`PINNED_VERSION`]);
//! `scripts/fetch-onnxruntime.sh` puts it in `.cache/onnxruntime/`; in a checkout of this
//! repository, mekd runs that script itself when it finds no library (PyPI only, once).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mekd_contract::NormalisationError;

use crate::engine::inspect;
use crate::{EngineError, ModelInfo};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

/// The ONNX Runtime release this project pins (ort 2.0.0-rc.15 speaks its 1.31 API).
pub const PINNED_VERSION: &str = "1.31.1";

/// Environment variable naming the library explicitly (ort's own convention).
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// ONNX Runtime cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    /// No library was found anywhere.
    #[error(
        "ONNX Runtime library not found (looked at: {looked}). Get it with `scripts/fetch-onnxruntime.sh` \
         (downloads the pinned onnxruntime=={PINNED_VERSION} wheel from PyPI into .cache/onnxruntime/), \
         or `pip install onnxruntime=={PINNED_VERSION}`, or point {DYLIB_ENV} at a libonnxruntime.so"
    )]
    NotFound {
        /// The places tried.
        looked: String,
    },
    /// The library was found but could not be loaded.
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load {
        /// The library.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// A session could not be created or run.
    #[error("ONNX Runtime: {0}")]
    Session(String),
    /// The file is not an image classifier this project can read.
    #[error(transparent)]
    Model(#[from] EngineError),
    /// The normalisation cannot apply to the model.
    #[error(transparent)]
    Normalisation(#[from] NormalisationError),
    /// The model does not answer a score per class.
    #[error("{path} answers {values} values per image; not a classifier")]
    NotAClassifier {
        /// The model.
        path: PathBuf,
        /// Values per image.
        values: usize,
    },
}

fn library_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so")))
        .collect();
    found.sort();
    found.pop()
}

/// Find the library: `explicit`, else `$ORT_DYLIB_PATH`, else `.cache/onnxruntime/` in the
/// current directory or any parent, else the Python `onnxruntime` package, else (in a checkout
/// of this repository) what `scripts/fetch-onnxruntime.sh` fetches from PyPI.
pub fn locate_library(explicit: Option<&Path>) -> Result<PathBuf, OrtError> {
    let mut looked = Vec::new();
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(OrtError::NotFound { looked: format!("{} (given explicitly, does not exist)", path.display()) })
        };
    }
    if let Some(path) = std::env::var_os(DYLIB_ENV).map(PathBuf::from) {
        if path.is_file() {
            return Ok(path);
        }
        looked.push(format!("{DYLIB_ENV}={} (missing)", path.display()));
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        candidates.extend(cwd.ancestors().map(|d| d.join(".cache/onnxruntime")));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/onnxruntime"));
    for dir in &candidates {
        if let Some(lib) = library_in(dir) {
            return Ok(lib);
        }
    }
    looked.push(".cache/onnxruntime/ in this directory and its parents".into());
    let python = std::process::Command::new("python3")
        .args(["-c", "import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'))"])
        .output();
    if let Ok(out) = python {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Some(lib) = out.status.success().then(|| library_in(&dir)).flatten() {
            return Ok(lib);
        }
    }
    looked.push("the python3 `onnxruntime` package".into());
    // Last, in a checkout of this repository: fetch the pinned wheel from PyPI, once.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-onnxruntime.sh");
    if script.is_file() {
        eprintln!(
            "ONNX Runtime not found: fetching the pinned onnxruntime=={PINNED_VERSION} wheel from PyPI into \
             .cache/onnxruntime/ (once; {})",
            script.display()
        );
        match fetch_with_script(&script) {
            Ok(lib) => return Ok(lib),
            Err(reason) => looked.push(format!("{} ({reason})", script.display())),
        }
    }
    Err(OrtError::NotFound { looked: looked.join("; ") })
}

/// Run a fetch script that prints the library's path as its last line of output.
fn fetch_with_script(script: &Path) -> Result<PathBuf, String> {
    let out = std::process::Command::new("bash").arg(script).output().map_err(|e| format!("cannot run it: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        return Err(format!("failed ({}): {}", out.status, lines[lines.len().saturating_sub(3)..].join(" / ")));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lib = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if lib.is_file() { Ok(lib) } else { Err(format!("it printed `{}`, which is not a file", lib.display())) }
}

/// The process's ONNX Runtime and the library it was loaded from.
static ENVIRONMENT: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Load ONNX Runtime once per process (later calls reuse the first library).
pub fn environment(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment, OrtError> {
    let env = ENVIRONMENT.get_or_init(|| {
        let path = locate_library(explicit).map_err(|e| e.to_string())?;
        let environment = ort::init_from(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .with_name("mekd")
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((environment, path))
    });
    match env {
        Ok((environment, _)) => Ok(environment),
        Err(reason) => {
            Err(OrtError::Load { path: explicit.map(Path::to_path_buf).unwrap_or_default(), reason: reason.clone() })
        }
    }
}

/// The library this process loaded (after the first session), e.g.
/// `.cache/onnxruntime/libonnxruntime.so.1.31.1`: its name carries the release.
pub fn loaded_library() -> Option<&'static Path> {
    ENVIRONMENT.get()?.as_ref().ok().map(|(_, path)| path.as_path())
}

/// An image classifier session: `[N, C, H, W]` f32 in, `[N, classes]` logits out.
pub struct OrtClassifier {
    session: Session,
    input_name: String,
}

impl OrtClassifier {
    /// Open `model` with ONNX Runtime (single intra-op thread, all graph optimisations).
    pub fn open(model: &Path, library: Option<&Path>) -> Result<Self, OrtError> {
        let env = environment(library)?;
        let session_error = |e: ort::Error| OrtError::Session(format!("{}: {e}", model.display()));
        let session = Session::builder(env)
            .map_err(session_error)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| OrtError::Session(e.to_string()))?
            .with_intra_threads(1)
            .map_err(|e| OrtError::Session(e.to_string()))?
            .commit_from_file(model)
            .map_err(session_error)?;
        let input_name = session
            .inputs()
            .first()
            .map(|i| i.name().to_string())
            .ok_or_else(|| OrtError::Session(format!("{} has no input", model.display())))?;
        Ok(Self { session, input_name })
    }

    /// Open `path` and learn what it is: its interface and metadata from the file
    /// ([`inspect`]), its class count from its answer to a blank image (a model may leave it
    /// dynamic), checked against the metadata.
    pub fn open_classifier(path: &Path, library: Option<&Path>) -> Result<(Self, ModelInfo), OrtError> {
        let (mut info, _) = inspect(path)?;
        let [c, h, w] = info.input_shape;
        let mut session = Self::open(path, library)?;
        let num_classes = session.run(&vec![0.0; c * h * w], [c, h, w])?.len();
        if num_classes < 2 || (info.num_classes != 0 && info.num_classes != num_classes) {
            return Err(OrtError::NotAClassifier { path: path.to_path_buf(), values: num_classes });
        }
        info.num_classes = num_classes;
        Ok((session, info))
    }

    /// Logits for `images` (`n` images of `shape`).
    pub fn run(&mut self, images: &[f32], shape: [usize; 3]) -> Result<Vec<f32>, OrtError> {
        let [c, h, w] = shape;
        let n = images.len() / (c * h * w);
        let run_error = |e: ort::Error| OrtError::Session(e.to_string());
        let input = TensorRef::from_array_view(([n, c, h, w], images)).map_err(run_error)?;
        let outputs = self.session.run(ort::inputs![self.input_name.as_str() => input]).map_err(run_error)?;
        let (_, logits) = outputs[0].try_extract_tensor::<f32>().map_err(run_error)?;
        Ok(logits.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fetch.sh");
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn a_fetch_script_gives_the_path_it_prints_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libonnxruntime.so.1");
        std::fs::write(&lib, b"not really").unwrap();
        let ok = script(dir.path(), &format!("echo downloading >&2\necho {}\n", lib.display()));
        assert_eq!(fetch_with_script(&ok).unwrap(), lib);
        let failing = script(dir.path(), "echo 'pip: no network' >&2\nexit 3\n");
        let err = fetch_with_script(&failing).unwrap_err();
        assert!(err.contains("pip: no network") && err.contains('3'), "{err}");
        let wrong = script(dir.path(), "echo /nonexistent/libonnxruntime.so\n");
        assert!(fetch_with_script(&wrong).unwrap_err().contains("not a file"));
    }
}
