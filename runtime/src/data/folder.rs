//! Image folders `<split>/<class>/*.png|jpg|jpeg`, as a directory or inside a tar(.gz) archive.
//!
//! Classes are the sorted folder names (as torchvision's `ImageFolder`). Images keep their
//! stored size when all agree; otherwise every image is resized to the first one's size.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Split, file_name, gunzip_if_needed, list_dir, preprocess};

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg")
}

/// Decode one image file to CHW `u8` (gray stays 1 channel, everything else becomes RGB).
pub fn decode_image(path: &Path, bytes: &[u8]) -> Result<(Vec<u8>, [usize; 3]), DataError> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| DataError::Decode { path: path.to_path_buf(), reason: e.to_string() })?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let gray = matches!(
        img.color(),
        image::ColorType::L8 | image::ColorType::L16 | image::ColorType::La8 | image::ColorType::La16
    );
    if gray {
        Ok((img.to_luma8().into_raw(), [1, h, w]))
    } else {
        let rgb = img.to_rgb8().into_raw();
        let mut chw = vec![0u8; rgb.len()];
        for (i, px) in rgb.chunks_exact(3).enumerate() {
            for c in 0..3 {
                chw[c * h * w + i] = px[c];
            }
        }
        Ok((chw, [3, h, w]))
    }
}

/// One decoded image: where it came from, its CHW pixels and their shape.
type Decoded = (PathBuf, Vec<u8>, [usize; 3]);

/// Images collected per class before they are stacked.
#[derive(Default)]
struct Collector {
    classes: BTreeMap<String, Vec<Decoded>>,
}

impl Collector {
    fn finish(self, source: &Path) -> Result<Dataset, DataError> {
        let Some(first_shape) = self.classes.values().flat_map(|v| v.iter()).map(|(_, _, s)| *s).next() else {
            return Ok(Dataset {
                pixels: vec![],
                labels: vec![],
                shape: [1, 1, 1],
                classes: vec![],
                source: source.display().to_string(),
            });
        };
        let channels = self.classes.values().flat_map(|v| v.iter()).map(|(_, _, s)| s[0]).max().unwrap_or(1);
        let target = [channels, first_shape[1], first_shape[2]];
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        let classes: Vec<String> = self.classes.keys().cloned().collect();
        for (label, images) in self.classes.into_values().enumerate() {
            for (path, data, shape) in images {
                let converted = preprocess::convert_image(&data, shape, target)
                    .map_err(|e| DataError::Inconsistent { path, detail: e.to_string() })?;
                pixels.extend(converted);
                labels.push(label as u16);
            }
        }
        Ok(Dataset { pixels, labels, shape: target, classes, source: source.display().to_string() })
    }
}

/// Read `<dir>/<split>/<class>/*` (or `<dir>/<class>/*` when `dir` itself is the split folder).
pub(super) fn load_dir(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let split_dir = dir.join(split.name());
    if !split_dir.is_dir() {
        return Err(DataError::NotFound { path: dir.to_path_buf(), split: split.name() });
    }
    let mut collector = Collector::default();
    for class_dir in list_dir(&split_dir)?.into_iter().filter(|p| p.is_dir()) {
        let images: Vec<PathBuf> = list_dir(&class_dir)?.into_iter().filter(|p| is_image(&file_name(p))).collect();
        if images.is_empty() {
            return Err(DataError::EmptyClassFolder { path: class_dir });
        }
        let entry = collector.classes.entry(file_name(&class_dir)).or_default();
        for path in images {
            let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, e))?;
            let (data, shape) = decode_image(&path, &bytes)?;
            entry.push((path, data, shape));
        }
    }
    if collector.classes.is_empty() {
        return Err(DataError::NotFound { path: dir.to_path_buf(), split: split.name() });
    }
    collector.finish(dir)
}

/// Read the `split` image folders out of a `.tar`, `.tar.gz` or `.tgz` archive.
pub(super) fn load_archive(archive: &Path, split: Split) -> Result<Dataset, DataError> {
    let name = file_name(archive).to_ascii_lowercase();
    if !(name.ends_with(".tar.gz") || name.ends_with(".tgz") || name.ends_with(".tar")) {
        return Err(DataError::NotFound { path: archive.to_path_buf(), split: split.name() });
    }
    let raw = std::fs::read(archive).map_err(|e| DataError::io(archive, e))?;
    let tar_bytes = gunzip_if_needed(archive, raw)?;
    let mut collector = Collector::default();
    let mut class_dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut tar = tar::Archive::new(&tar_bytes[..]);
    let entries = tar.entries().map_err(|e| DataError::io(archive, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| DataError::io(archive, e))?;
        let path = entry.path().map_err(|e| DataError::io(archive, e))?.into_owned();
        let parts: Vec<String> =
            path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).filter(|c| c != ".").collect();
        // `[top/]<split>/<class>[/<file>]`
        let Some(pos) = parts.iter().position(|p| p == split.name()) else { continue };
        if pos > 1 {
            continue;
        }
        let rest = &parts[pos + 1..];
        let shown = archive.join(&path);
        match rest {
            [class] if entry.header().entry_type().is_dir() => {
                class_dirs.insert(class.clone(), shown);
            }
            [class, file] if entry.header().entry_type().is_file() && is_image(file) => {
                let mut bytes = Vec::with_capacity(entry.size() as usize);
                entry.read_to_end(&mut bytes).map_err(|e| DataError::io(&shown, e))?;
                let (data, shape) = decode_image(&shown, &bytes)?;
                collector.classes.entry(class.clone()).or_default().push((shown, data, shape));
            }
            _ => {}
        }
    }
    if let Some((_, dir)) = class_dirs.iter().find(|(class, _)| !collector.classes.contains_key(*class)) {
        return Err(DataError::EmptyClassFolder { path: dir.clone() });
    }
    if collector.classes.is_empty() {
        return Err(DataError::NotFound { path: archive.to_path_buf(), split: split.name() });
    }
    collector.finish(archive)
}
