//! `--device wgpu` on a machine without a usable GPU adapter (CI): a clear message at once, no
//! panic, no hang. Without the `wgpu` feature the message says how to rebuild.

use std::process::Command;

#[test]
fn wgpu_without_an_adapter_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_mekd"))
        .args(["bench-train", "--device", "wgpu", "--warmup", "0", "--steps", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        // A GPU answered (a developer's workstation): the benchmark must then have run on it.
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"device\": \"wgpu:0\""));
        return;
    }
    if cfg!(feature = "wgpu") {
        assert!(err.contains("no usable GPU for `--device wgpu:0`") && err.contains("--device flex"), "{err}");
    } else {
        assert!(err.contains("rebuild with `--features wgpu`"), "{err}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_mekd")).args(["bench-train", "--device", "tpu"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected flex, ndarray, wgpu or wgpu:N"));
}
