//! Dataset readers for the standard formats, shared by the trainer and the edge runtime.
//!
//! A dataset is a folder (or archive) in one of these layouts, detected automatically:
//!
//! - **IDX** (MNIST, Fashion-MNIST, USPS): `*train*-images-idx3-ubyte` and
//!   `*train*-labels-idx1-ubyte` (test split: `*test*` or `*t10k*`), plain or gzip;
//! - **CIFAR-10 binary**: `data_batch_*.bin` (train) and `test_batch*.bin` (test), plain or gzip,
//!   with optional `batches.meta.txt` class names;
//! - **image folders**: `<split>/<class>/*.png|jpg|jpeg`, as a directory or inside a `.tar.gz`
//!   / `.tgz` / `.tar` archive (a single top-level folder around them is allowed).
//!
//! Images are kept as `u8` in CHW order at their stored size; [`Dataset::prepare`] converts
//! them to the model's channels and size (bilinear resize, as the reference's
//! `transforms.Resize`), and [`preprocess::to_model_input`] scales them for the model.

mod cifar;
mod error;
mod folder;
pub use folder::decode_image;
mod idx;

/// The dataset that comes with the repository (10,000 training and 2,000 test MNIST images):
/// every command's default, relative to the repository's root.
pub const EMBEDDED_DATA: &str = "data/mnist-slice";

pub mod preprocess;
mod subset;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use error::DataError;
pub use subset::edge_subset;

/// Which part of a dataset to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split.
    Train,
    /// The test split.
    Test,
}

impl Split {
    /// `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            other => Err(format!("unknown split `{other}`: use `train` or `test`")),
        }
    }
}

/// A labeled image set held in memory as `u8` pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// All pixels, image after image, each `channels x height x width` (CHW).
    pub pixels: Vec<u8>,
    /// One label per image, each `< classes.len()`.
    pub labels: Vec<u16>,
    /// `[channels, height, width]` of every image.
    pub shape: [usize; 3],
    /// Class names, indexed by label.
    pub classes: Vec<String>,
    /// Where the data came from, for messages and reports.
    pub source: String,
}

impl Dataset {
    /// Read `split` of the dataset at `path` (a folder or an archive), detecting the format.
    pub fn load(path: &Path, split: Split) -> Result<Self, DataError> {
        let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        let dataset = if meta.is_file() {
            folder::load_archive(path, split)?
        } else if let Some(files) = idx::find(path, split)? {
            idx::load(&files.0, &files.1)?
        } else if let Some(batches) = cifar::find(path, split)? {
            cifar::load(path, &batches)?
        } else {
            folder::load_dir(path, split)?
        };
        if dataset.is_empty() {
            return Err(DataError::Empty { path: path.to_path_buf(), split: split.name() });
        }
        Ok(dataset)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// How many of `predictions` (one class per image, in order) equal the labels.
    pub fn correct(&self, predictions: &[usize]) -> usize {
        predictions.iter().zip(&self.labels).filter(|(p, l)| **p == **l as usize).count()
    }

    /// Bytes of one image.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }

    /// The images at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_len());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Self {
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            shape: self.shape,
            classes: self.classes.clone(),
            source: self.source.clone(),
        }
    }

    /// The first `n` images (all of them when there are fewer).
    pub fn take(&self, n: usize) -> Self {
        let indices: Vec<usize> = (0..n.min(self.len())).collect();
        self.select(&indices)
    }

    /// Convert every image to `channels` and `size x size` pixels (bilinear), the reference's
    /// `Resize(size)` plus gray/RGB conversion.
    pub fn prepare(&self, channels: usize, size: usize) -> Result<Self, DataError> {
        let target = [channels, size, size];
        if target == self.shape {
            return Ok(self.clone());
        }
        let mut pixels = Vec::with_capacity(self.len() * target.iter().product::<usize>());
        for i in 0..self.len() {
            pixels.extend(preprocess::convert_image(self.image(i), self.shape, target)?);
        }
        Ok(Self {
            pixels,
            labels: self.labels.clone(),
            shape: target,
            classes: self.classes.clone(),
            source: self.source.clone(),
        })
    }
}

/// Read a whole file, transparently un-gzipping it when it starts with the gzip magic.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    gunzip_if_needed(path, raw)
}

/// The most bytes one gzip member of a dataset may unpack to (4 GiB: CIFAR-100's archive
/// unpacks to 180 MB, MNIST's to 47 MB). A gzip bomb stops here instead of exhausting memory.
pub const MAX_UNPACKED_BYTES: u64 = 4 << 30;

/// Un-gzip `raw` if it is gzip data; otherwise return it unchanged.
pub(crate) fn gunzip_if_needed(path: &Path, raw: Vec<u8>) -> Result<Vec<u8>, DataError> {
    gunzip_limited(path, raw, MAX_UNPACKED_BYTES)
}

fn gunzip_limited(path: &Path, raw: Vec<u8>, limit: u64) -> Result<Vec<u8>, DataError> {
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4).min(usize::try_from(limit).unwrap_or(usize::MAX)));
    let decoder = flate2::read::MultiGzDecoder::new(&raw[..]);
    std::io::Read::read_to_end(&mut std::io::Read::take(decoder, limit + 1), &mut out)
        .map_err(|e| DataError::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            detail: format!("the gzip data unpacks to more than {limit} bytes (the readers' limit)"),
        });
    }
    Ok(out)
}

/// The files in `dir`, sorted by name.
pub(crate) fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        files.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    files.sort();
    Ok(files)
}

/// The file name of `path` as text.
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

#[cfg(test)]
mod gzip_tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn gzip_data_past_the_limit_is_refused_without_unpacking_it_all() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 1 << 20]).unwrap();
        let packed = gz.finish().unwrap();
        let err = gunzip_limited(Path::new("bomb.gz"), packed.clone(), 1000).unwrap_err().to_string();
        assert!(err.contains("more than 1000 bytes"), "{err}");
        assert_eq!(gunzip_limited(Path::new("ok.gz"), packed, 1 << 20).unwrap().len(), 1 << 20);
        assert_eq!(gunzip_limited(Path::new("raw"), vec![1, 2, 3], 1).unwrap(), vec![1, 2, 3], "not gzip: unchanged");
    }
}
