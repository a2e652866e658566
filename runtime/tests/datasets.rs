//! Dataset readers on real data (the embedded slice and ../shared/data) and on corrupt input.

use std::io::Write;
use std::path::{Path, PathBuf};

use mekd_runtime::data::edge_subset;
use mekd_runtime::{DataError, Dataset, Split};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared_data(name: &str) -> PathBuf {
    let path = repo().join("../shared/data").join(name);
    assert!(
        path.exists(),
        "{} is missing: these tests read the shared datasets; check out the project next to `shared/` (see README, 'Data')",
        path.display()
    );
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn idx_images(n: u32, rows: u32, cols: u32, body_len: usize) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend(std::iter::repeat_n(7u8, body_len));
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

/// Write an IDX train split into a fresh folder and try to load it.
fn load_idx(images: &[u8], labels: &[u8]) -> (tempfile::TempDir, Result<Dataset, DataError>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), images).unwrap();
    std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gzip(labels)).unwrap();
    let result = Dataset::load(dir.path(), Split::Train);
    (dir, result)
}

fn message(result: Result<Dataset, DataError>) -> String {
    result.expect_err("corrupt input must be an error").to_string()
}

#[test]
fn embedded_mnist_slice() {
    let dir = repo().join("data/mnist-slice");
    let train = Dataset::load(&dir, Split::Train).unwrap();
    let test = Dataset::load(&dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (10_000, 2_000));
    assert_eq!(train.shape, [1, 28, 28]);
    // The first MNIST training digit is a 5, the first test digit a 7.
    assert_eq!((train.labels[0], test.labels[0]), (5, 7));
    let full = Dataset::load(&shared_data("mnist"), Split::Test).unwrap();
    assert_eq!(full.len(), 10_000);
    let head = full.take(2_000);
    assert_eq!((head.pixels, head.labels), (test.pixels, test.labels));
}

#[test]
fn fashion_mnist_and_usps_idx() {
    let fashion = Dataset::load(&shared_data("fashion-mnist"), Split::Test).unwrap();
    assert_eq!((fashion.len(), fashion.shape), (10_000, [1, 28, 28]));
    let usps = Dataset::load(&shared_data("usps"), Split::Train).unwrap();
    assert_eq!((usps.len(), usps.shape), (7_291, [1, 16, 16]));
    let usps_test = Dataset::load(&shared_data("usps"), Split::Test).unwrap();
    assert_eq!(usps_test.len(), 2_007);
    assert!(usps.labels.iter().all(|&l| l < 10));
}

#[test]
fn cifar10_binary_batches() {
    let dir = shared_data("cifar10-exact-subset");
    let train = Dataset::load(&dir, Split::Train).unwrap();
    let test = Dataset::load(&dir, Split::Test).unwrap();
    assert_eq!((train.len(), test.len()), (4_000, 1_000));
    assert_eq!(train.shape, [3, 32, 32]);
    assert_eq!(train.classes.len(), 10);
    // CIFAR-10: the first training image is a frog (6), the first test image a cat (3).
    assert_eq!((train.labels[0], test.labels[0]), (6, 3));
    assert_eq!(train.classes[6], "frog");
}

#[test]
fn cifar10_jpeg_folders_inside_tar_gz() {
    let archive = shared_data("cifar10-jpeg/cifar10-jpeg.tar.gz");
    let test = Dataset::load(&archive, Split::Test).unwrap();
    assert_eq!((test.len(), test.shape), (10_000, [3, 32, 32]));
    assert_eq!(test.classes.len(), 10);
    assert_eq!(test.classes[0], "airplane");
    // Test images are grouped by class, 1,000 each.
    for c in 0..10u16 {
        assert_eq!(test.labels.iter().filter(|&&l| l == c).count(), 1_000);
    }
}

#[test]
fn image_folder_directory_and_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    for (class, value) in [("cat", 10u8), ("dog", 200u8)] {
        let folder = dir.path().join("train").join(class);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..3 {
            let img = image::RgbImage::from_pixel(20, 20, image::Rgb([value, value, value]));
            img.save(folder.join(format!("{i}.png"))).unwrap();
        }
    }
    let data = Dataset::load(dir.path(), Split::Train).unwrap();
    assert_eq!(data.len(), 6);
    assert_eq!(data.classes, vec!["cat", "dog"]);
    assert_eq!(data.shape, [3, 20, 20]);
    let gray = data.prepare(1, 32).unwrap();
    assert_eq!(gray.shape, [1, 32, 32]);
    assert!(gray.image(0).iter().all(|&p| p == 10));
    assert!(gray.image(5).iter().all(|&p| p == 200));
    // An MNIST image resized 28 -> 32 keeps its size, its range (interpolation makes no value
    // outside the original's, and the strokes stay near full ink) and its mean brightness.
    let original = Dataset::load(&repo().join("data/mnist-slice"), Split::Test).unwrap().take(3);
    let mnist = original.clone().prepare(1, 32).unwrap();
    assert_eq!(mnist.pixels.len(), 3 * 32 * 32);
    for i in 0..3 {
        let stats = |p: &[u8]| {
            let mean = p.iter().map(|&v| v as f64).sum::<f64>() / p.len() as f64;
            (*p.iter().min().unwrap(), *p.iter().max().unwrap(), mean)
        };
        let (lo, hi, mean) = stats(original.image(i));
        let (rlo, rhi, rmean) = stats(mnist.image(i));
        assert!(rlo >= lo && rhi <= hi && rhi as f64 >= 0.8 * hi as f64, "image {i}: {rlo}..{rhi} vs {lo}..{hi}");
        assert!((rmean - mean).abs() < 0.05 * 255.0, "image {i}: mean {rmean} vs {mean}");
    }
}

#[test]
fn edge_subset_of_real_training_split() {
    let train = Dataset::load(&repo().join("data/mnist-slice"), Split::Train).unwrap();
    let idx = edge_subset(train.len(), 0.1, 7).unwrap();
    assert_eq!(idx.len(), 1_000);
    let edge = train.select(&idx);
    assert_eq!(edge.len(), 1_000);
    assert_eq!(idx, edge_subset(train.len(), 0.1, 7).unwrap());
}

#[test]
fn idx_wrong_magic() {
    let mut images = idx_images(2, 2, 2, 8);
    images[2] = 0x0d; // float type instead of u8
    let (_d, r) = load_idx(&images, &idx_labels(&[1, 2]));
    let m = message(r);
    assert!(m.contains("wrong magic number") && m.contains("train-images-idx3-ubyte"), "{m}");
}

#[test]
fn idx_truncated_file() {
    let (_d, r) = load_idx(&idx_images(3, 2, 2, 10), &idx_labels(&[1, 2, 3]));
    let m = message(r);
    assert!(m.contains("truncated") && m.contains("needs 12 bytes") && m.contains("train-images-idx3-ubyte"), "{m}");
}

#[test]
fn idx_truncated_gzip_stream() {
    let dir = tempfile::tempdir().unwrap();
    let gz = gzip(&idx_images(50, 28, 28, 50 * 784));
    std::fs::write(dir.path().join("train-images-idx3-ubyte.gz"), &gz[..gz.len() / 2]).unwrap();
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx_labels(&[0; 50])).unwrap();
    let m = message(Dataset::load(dir.path(), Split::Train));
    assert!(m.contains("truncated") && m.contains("train-images-idx3-ubyte.gz"), "{m}");
}

#[test]
fn idx_label_image_count_mismatch() {
    let (_d, r) = load_idx(&idx_images(2, 2, 2, 8), &idx_labels(&[1, 2, 3]));
    let m = message(r);
    assert!(m.contains("holds 2 images") && m.contains("holds 3 labels"), "{m}");
}

#[test]
fn idx_label_out_of_range() {
    let (_d, r) = load_idx(&idx_images(2, 2, 2, 8), &idx_labels(&[1, 12]));
    let m = message(r);
    assert!(m.contains("label 12 of sample 1 is out of range") && m.contains("train-labels-idx1-ubyte.gz"), "{m}");
}

#[test]
fn cifar_truncated_and_bad_label() {
    let dir = tempfile::tempdir().unwrap();
    let mut record = vec![3u8];
    record.extend(vec![0u8; 3072]);
    let mut two = record.clone();
    two.extend_from_slice(&record[..100]);
    std::fs::write(dir.path().join("data_batch_1.bin"), &two).unwrap();
    let m = message(Dataset::load(dir.path(), Split::Train));
    assert!(m.contains("data_batch_1.bin") && m.contains("not a whole number of 3073-byte"), "{m}");
    record[0] = 10;
    std::fs::write(dir.path().join("data_batch_1.bin"), gzip(&record)).unwrap();
    let m = message(Dataset::load(dir.path(), Split::Train));
    assert!(m.contains("label 10 of sample 0 is out of range"), "{m}");
}

#[test]
fn empty_class_folder_in_directory_and_archive() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("train/cat");
    std::fs::create_dir_all(&cat).unwrap();
    image::GrayImage::new(4, 4).save(cat.join("a.png")).unwrap();
    std::fs::create_dir_all(dir.path().join("train/dog")).unwrap();
    let m = message(Dataset::load(dir.path(), Split::Train));
    assert!(m.contains("class folder") && m.contains("train/dog") && m.contains("holds no image"), "{m}");

    let archive = dir.path().join("data.tar.gz");
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    builder.append_dir_all("set/train", dir.path().join("train")).unwrap();
    std::fs::write(&archive, builder.into_inner().unwrap().finish().unwrap()).unwrap();
    let m = message(Dataset::load(&archive, Split::Train));
    assert!(m.contains("class folder") && m.contains("dog") && m.contains("holds no image"), "{m}");
}

#[test]
fn undecodable_image_and_missing_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("test/cat");
    std::fs::create_dir_all(&cat).unwrap();
    std::fs::write(cat.join("broken.png"), b"not a png").unwrap();
    let m = message(Dataset::load(dir.path(), Split::Test));
    assert!(m.contains("cannot decode image") && m.contains("broken.png"), "{m}");
    let m = message(Dataset::load(dir.path(), Split::Train));
    assert!(m.contains("no dataset found for split `train`"), "{m}");
    let m = message(Dataset::load(&dir.path().join("nope"), Split::Train));
    assert!(m.contains("cannot read") && m.contains("nope"), "{m}");
}
