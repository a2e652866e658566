//! Helpers for the workspace-level end-to-end tests: locating the built binaries and the
//! repository's data.

use std::path::{Path, PathBuf};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of a workspace binary (`mekd`, `mekd-edge`) built in the same profile as the tests.
///
/// `cargo test --workspace` builds them (they are the binaries of the trainer's and runtime's
/// own tests); run alone, this crate needs `cargo build --workspace` first.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run the tests with `cargo test --workspace` (or scripts/test.sh), or `cargo build --workspace` first",
        path.display()
    );
    path
}
