//! Run directories: the resolved config, per-epoch metrics (JSON lines), and crash-safe
//! checkpoints that a later `--resume` continues from.
//!
//! Layout: `config.json`, `metrics.jsonl`, `checkpoints/epoch-N/{model,optimizer}.bpk`, and
//! `checkpoints/latest.json` naming the last complete checkpoint. A checkpoint is written in
//! full before `latest.json` points at it, so a crash at any moment leaves the previous one
//! valid.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::Serialize;
use serde::de::DeserializeOwned;

use mekd_runtime::fsutil::write_atomic;

/// A loaded checkpoint.
pub struct Checkpoint<M, T> {
    /// Epochs it completed.
    pub epochs_done: usize,
    /// The model's weights.
    pub model: M,
    /// The optimiser's state.
    pub optim: ModuleOptimizer,
    /// `metrics.jsonl` up to it.
    pub rows: Vec<T>,
}

/// A run directory.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

/// A JSON file read and parsed, with its path in the error.
pub fn read_json_file<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

/// What `checkpoints/latest.json` records.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Latest {
    /// Epochs completed by this checkpoint.
    pub epochs_done: usize,
    /// Folder of the checkpoint, relative to the run directory.
    pub folder: String,
}

impl RunDir {
    /// Open (and create) a run directory.
    pub fn create(root: &Path) -> Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("creating run directory {}", root.display()))?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// An existing run directory (to read it): a path that is not a directory is an error, not
    /// a new empty folder.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            anyhow::bail!("{} is not a run directory (no such folder)", root.display());
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// A file inside the run directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Write `value` as pretty JSON to `name`, atomically.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let text = serde_json::to_vec_pretty(value)?;
        write_atomic(&self.file(name), &text).with_context(|| format!("writing {}", self.file(name).display()))
    }

    /// Read JSON from `name`.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        read_json_file(&self.file(name))
    }

    /// Rewrite the JSON-lines file `name` with exactly `rows` (atomically), so a resumed run
    /// never holds duplicate or half-written lines.
    pub fn write_jsonl<T: Serialize>(&self, name: &str, rows: &[T]) -> Result<()> {
        let mut text = Vec::new();
        for row in rows {
            serde_json::to_writer(&mut text, row)?;
            text.write_all(b"\n")?;
        }
        write_atomic(&self.file(name), &text).with_context(|| format!("writing {name}"))
    }

    /// Rewrite `metrics.jsonl` with exactly `rows`.
    pub fn write_metrics<T: Serialize>(&self, rows: &[T]) -> Result<()> {
        self.write_jsonl("metrics.jsonl", rows)
    }

    /// Rows of `metrics.jsonl` (empty when absent).
    pub fn read_metrics<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        self.read_jsonl("metrics.jsonl")
    }

    /// Rows of the JSON-lines file `name` (empty when absent).
    pub fn read_jsonl<T: DeserializeOwned>(&self, name: &str) -> Result<Vec<T>> {
        let path = self.file(name);
        if !path.exists() {
            return Ok(vec![]);
        }
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {}", path.display())))
            .collect()
    }

    /// The folder a checkpoint after `epochs_done` epochs is written into (created empty).
    pub fn new_checkpoint(&self, epochs_done: usize) -> Result<PathBuf> {
        let dir = self.root.join("checkpoints").join(format!("epoch-{epochs_done}"));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Mark the checkpoint in `folder` as the latest, then delete older checkpoints.
    pub fn commit_checkpoint(&self, epochs_done: usize, folder: &Path) -> Result<()> {
        let rel = folder.strip_prefix(&self.root).unwrap_or(folder).to_string_lossy().into_owned();
        self.write_json("checkpoints/latest.json", &Latest { epochs_done, folder: rel.clone() })?;
        for entry in fs::read_dir(self.root.join("checkpoints"))? {
            let path = entry?.path();
            if path.is_dir() && path != self.root.join(&rel) {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(())
    }

    /// Save `model` and `optim` after `epochs_done` epochs, rewrite `metrics.jsonl` with `rows`,
    /// then mark the checkpoint as the latest (in that order, so a crash leaves the previous one).
    pub fn save_checkpoint<M: Module, T: Serialize>(
        &self,
        epochs_done: usize,
        model: &M,
        optim: &ModuleOptimizer,
        rows: &[T],
    ) -> Result<()> {
        let folder = self.new_checkpoint(epochs_done)?;
        model.clone().save_file(folder.join("model.bpk")).map_err(|e| anyhow::anyhow!("saving the model: {e:?}"))?;
        optim.save(folder.join("optimizer.bpk")).map_err(|e| anyhow::anyhow!("saving the optimizer: {e:?}"))?;
        self.write_metrics(rows)?;
        self.commit_checkpoint(epochs_done, &folder)
    }

    /// The latest checkpoint loaded into `model` and `optim` (fresh ones of the same kind), with
    /// the epochs it completed and its metric rows; `None` when the run has none.
    pub fn load_checkpoint<M: Module, T: DeserializeOwned>(
        &self,
        model: M,
        optim: ModuleOptimizer,
    ) -> Result<Option<Checkpoint<M, T>>> {
        let Some((latest, folder)) = self.latest_checkpoint()? else {
            return Ok(None);
        };
        let model = model
            .try_load_file(folder.join("model.bpk"))
            .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", folder.join("model.bpk").display()))?;
        let optim = optim
            .load(folder.join("optimizer.bpk"))
            .map_err(|e| anyhow::anyhow!("loading {}: {e:?}", folder.join("optimizer.bpk").display()))?;
        let mut rows: Vec<T> = self.read_metrics()?;
        rows.truncate(latest.epochs_done);
        Ok(Some(Checkpoint { epochs_done: latest.epochs_done, model, optim, rows }))
    }

    /// The latest complete checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<(Latest, PathBuf)>> {
        if !self.file("checkpoints/latest.json").exists() {
            return Ok(None);
        }
        let latest: Latest = self.read_json("checkpoints/latest.json")?;
        let folder = self.root.join(&latest.folder);
        if !folder.is_dir() {
            bail!("checkpoint {} named by checkpoints/latest.json is missing", folder.display());
        }
        Ok(Some((latest, folder)))
    }
}
