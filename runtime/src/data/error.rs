//! Typed errors of the dataset readers: each names the file and the problem.

use std::path::{Path, PathBuf};

/// A dataset that cannot be read, and why.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file starts with the wrong magic number.
    #[error("{path}: wrong magic number {found:#010x}, expected {expected} (is this the right file?)")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What was found.
        found: u32,
        /// What was expected, in words.
        expected: String,
    },
    /// The file is shorter (or longer) than its header says.
    #[error("{path}: truncated or wrong size: {detail}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Expected versus actual sizes.
        detail: String,
    },
    /// The image and label files disagree on the number of samples.
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        /// The image file.
        images: PathBuf,
        /// Images in it.
        n_images: usize,
        /// The label file.
        labels: PathBuf,
        /// Labels in it.
        n_labels: usize,
    },
    /// A label is not a valid class index.
    #[error("{path}: label {label} of sample {index} is out of range (dataset has {classes} classes)")]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// Sample index.
        index: usize,
        /// The bad label.
        label: usize,
        /// Number of classes.
        classes: usize,
    },
    /// A class folder holds no image.
    #[error("class folder {path} holds no image (.png, .jpg, .jpeg)")]
    EmptyClassFolder {
        /// The folder.
        path: PathBuf,
    },
    /// An image file could not be decoded.
    #[error("cannot decode image {path}: {reason}")]
    Decode {
        /// The image.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },
    /// The images of one dataset differ in size or channels in a way that cannot be unified.
    #[error("{path}: {detail}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// No known layout was found.
    #[error(
        "{path}: no dataset found for split `{split}`: expected IDX files (*{split}*-images-idx3-ubyte[.gz]), \
         CIFAR-10 batches (data_batch_*.bin / test_batch*.bin), or image folders ({split}/<class>/*.png|jpg), \
         as a folder or a .tar.gz"
    )]
    NotFound {
        /// The path given.
        path: PathBuf,
        /// The split asked for.
        split: &'static str,
    },
    /// The split holds no sample.
    #[error("{path}: split `{split}` holds no image")]
    Empty {
        /// The path given.
        path: PathBuf,
        /// The split.
        split: &'static str,
    },
    /// A conversion that the preprocessing cannot do.
    #[error("cannot convert images: {0}")]
    Convert(String),
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            return DataError::Truncated {
                path: path.to_path_buf(),
                detail: "unexpected end of data (truncated gzip stream?)".into(),
            };
        }
        DataError::Io { path: path.to_path_buf(), source }
    }
}
