//! CIFAR-10 binary batches: records of one label byte and 3x32x32 pixel bytes (CHW).

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Split, file_name, list_dir, read_file};

const SIDE: usize = 32;
const RECORD: usize = 1 + 3 * SIDE * SIDE;

/// The batch files of `split` in `dir`, if it holds CIFAR-10 batches.
pub(super) fn find(dir: &Path, split: Split) -> Result<Option<Vec<PathBuf>>, DataError> {
    let prefix = match split {
        Split::Train => "data_batch",
        Split::Test => "test_batch",
    };
    let batches: Vec<PathBuf> = list_dir(dir)?
        .into_iter()
        .filter(|p| {
            let name = file_name(p);
            name.starts_with(prefix) && (name.ends_with(".bin") || name.ends_with(".bin.gz"))
        })
        .collect();
    Ok((!batches.is_empty()).then_some(batches))
}

/// Class names from `batches.meta.txt` (one per line), or the standard CIFAR-10 names.
fn class_names(dir: &Path) -> Result<Vec<String>, DataError> {
    let meta = dir.join("batches.meta.txt");
    if meta.exists() {
        let text = std::fs::read_to_string(&meta).map_err(|e| DataError::io(&meta, e))?;
        let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        if !names.is_empty() {
            return Ok(names);
        }
    }
    Ok(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        .map(String::from)
        .to_vec())
}

/// Read and concatenate CIFAR-10 batches.
pub(super) fn load(dir: &Path, batches: &[PathBuf]) -> Result<Dataset, DataError> {
    let classes = class_names(dir)?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in batches {
        let bytes = read_file(path)?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
            return Err(DataError::Truncated {
                path: path.clone(),
                detail: format!("{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records", bytes.len()),
            });
        }
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            let label = record[0] as usize;
            if label >= classes.len() {
                return Err(DataError::LabelOutOfRange { path: path.clone(), index: i, label, classes: classes.len() });
            }
            labels.push(label as u16);
            pixels.extend_from_slice(&record[1..]);
        }
    }
    Ok(Dataset { pixels, labels, shape: [3, SIDE, SIDE], classes, source: dir.display().to_string() })
}
