//! IDX ubyte files (MNIST, Fashion-MNIST, USPS): big-endian header, then raw bytes.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Split, file_name, list_dir, read_file};

/// Number of classes of the digit / fashion IDX datasets.
const IDX_CLASSES: usize = 10;

/// The image and label files of `split` in `dir`, if the folder holds IDX files.
pub(super) fn find(dir: &Path, split: Split) -> Result<Option<(PathBuf, PathBuf)>, DataError> {
    let files = list_dir(dir)?;
    let matches_split = |name: &str| match split {
        Split::Train => name.contains("train"),
        Split::Test => name.contains("test") || name.contains("t10k"),
    };
    let pick = |kind: &str| {
        files.iter().find(|p| {
            let name = file_name(p);
            name.contains(kind) && matches_split(&name)
        })
    };
    match (pick("images-idx3-ubyte"), pick("labels-idx1-ubyte")) {
        (Some(images), Some(labels)) => Ok(Some((images.clone(), labels.clone()))),
        (Some(images), None) => {
            Err(DataError::NotFound { path: images.with_file_name("*labels-idx1-ubyte"), split: split.name() })
        }
        _ => Ok(None),
    }
}

/// Parse an IDX header: magic (two zero bytes, type 0x08 = u8, rank) and the dimensions.
fn header(path: &Path, bytes: &[u8], rank: u8) -> Result<Vec<usize>, DataError> {
    let header_len = 4 + 4 * rank as usize;
    if bytes.len() < header_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            detail: format!("{} bytes, shorter than the {header_len}-byte IDX header", bytes.len()),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected = 0x0000_0800 | rank as u32;
    if magic != expected {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
            expected: format!("{expected:#010x} (IDX, u8, rank {rank})"),
        });
    }
    let dims: Vec<usize> = (0..rank as usize)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    // A crafted header can claim more bytes than any machine has: multiply checked, and compare
    // with the file's real size before anything is allocated from the claim.
    let body = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if body.and_then(|b| b.checked_add(header_len)) != Some(bytes.len()) {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "header {dims:?} needs {} bytes of data, file has {}",
                body.map_or_else(|| "more than this machine can address".to_string(), |b| b.to_string()),
                bytes.len() - header_len
            ),
        });
    }
    Ok(dims)
}

/// Read an IDX image file (rank 3) and its label file (rank 1).
pub(super) fn load(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let image_bytes = read_file(images)?;
    let dims = header(images, &image_bytes, 3)?;
    let label_bytes = read_file(labels)?;
    let ldims = header(labels, &label_bytes, 1)?;
    if dims[0] != ldims[0] {
        return Err(DataError::CountMismatch {
            images: images.to_path_buf(),
            n_images: dims[0],
            labels: labels.to_path_buf(),
            n_labels: ldims[0],
        });
    }
    let labels_raw = &label_bytes[8..];
    if let Some((index, &label)) = labels_raw.iter().enumerate().find(|(_, l)| **l as usize >= IDX_CLASSES) {
        return Err(DataError::LabelOutOfRange {
            path: labels.to_path_buf(),
            index,
            label: label as usize,
            classes: IDX_CLASSES,
        });
    }
    Ok(Dataset {
        pixels: image_bytes[16..].to_vec(),
        labels: labels_raw.iter().map(|&l| l as u16).collect(),
        shape: [1, dims[1], dims[2]],
        classes: (0..IDX_CLASSES).map(|c| c.to_string()).collect(),
        source: images.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(magic: u32, dims: &[u32], body: usize) -> Vec<u8> {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.resize(bytes.len() + body, 0);
        bytes
    }

    /// Three dimensions of 0xFFFFFFFF overflow a 64-bit product: a clear error, no panic (the
    /// dev profile used to panic with "attempt to multiply with overflow").
    #[test]
    fn a_header_claiming_more_than_2_pow_64_bytes_is_refused() {
        let bytes = file(0x0803, &[u32::MAX; 3], 10);
        let err = header(Path::new("x"), &bytes, 3).unwrap_err().to_string();
        assert!(err.contains("more than this machine can address") && err.contains("file has 10"), "{err}");
    }

    #[test]
    fn a_header_claiming_more_than_the_file_holds_is_refused() {
        let bytes = file(0x0803, &[2, 28, 28], 28 * 28);
        let err = header(Path::new("x"), &bytes, 3).unwrap_err().to_string();
        assert!(err.contains("needs 1568 bytes") && err.contains("file has 784"), "{err}");
        assert_eq!(header(Path::new("x"), &file(0x0803, &[1, 28, 28], 784), 3).unwrap(), vec![1, 28, 28]);
    }
}
