//! Devices: `--device wgpu` or `--device cuda` on a machine without a usable GPU (CI) is a clear
//! message at once, no panic, no hang (without the feature the message says how to rebuild); and
//! `mekd self-test` compares a backend's numbers with flex.

use std::process::Command;

/// `mekd bench-train --device DEVICE` on this machine: runs on a GPU that answers, else stops
/// at once with `no_gpu` (with the feature) or the hint to rebuild with `feature`, never a panic.
fn no_gpu_is_a_clear_error(device: &str, no_gpu: &str, feature: &str, compiled: bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_mekd"))
        .args(["bench-train", "--device", device, "--warmup", "0", "--steps", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if out.status.success() {
        // A GPU answered (a developer's workstation): the benchmark must then have run on it.
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("\"device\": \"{device}\"")));
        return;
    }
    if compiled {
        assert!(err.contains(&format!("{no_gpu} for `--device {device}`")) && err.contains("--device flex"), "{err}");
    } else {
        assert!(err.contains(&format!("rebuild with `--features {feature}`")), "{err}");
    }
}

#[test]
fn wgpu_without_an_adapter_is_a_clear_error() {
    no_gpu_is_a_clear_error("wgpu:0", "no usable GPU", "wgpu", cfg!(feature = "wgpu"));
    let bad = Command::new(env!("CARGO_BIN_EXE_mekd")).args(["bench-train", "--device", "tpu"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("expected flex, ndarray, wgpu, wgpu:N (N = GPU index), wgpu:cpu, cuda or cuda:N")
    );
}

#[test]
fn cuda_without_a_driver_is_a_clear_error() {
    no_gpu_is_a_clear_error("cuda:0", "no usable NVIDIA GPU", "cuda", cfg!(feature = "cuda"));
}

#[test]
fn self_test_compares_another_backend_with_flex() {
    // ndarray is an independent CPU implementation of every op involved.
    let out = Command::new(env!("CARGO_BIN_EXE_mekd")).args(["self-test", "--device", "ndarray"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for check in [
        "generator images",
        "mekd L1: d/d logits, hand VJP",
        "mixed graph: d/dx",
        "student step: logits after it",
        "graph steps: three losses",
    ] {
        assert!(stdout.lines().any(|l| l.starts_with(check) && l.ends_with("ok")), "{check}:\n{stdout}");
    }
    assert!(stdout.contains("all 16 checks agree with flex"), "{stdout}");
}

/// burn-wgpu's own code, fusion included, on a software Vulkan driver: the check that found a
/// burn-wgpu fusion bug (see `mekd_loss`) without a GPU. Runs with `--features wgpu` (not in CI:
/// that build costs as much again as the rest); needs Mesa's lavapipe.
#[cfg(feature = "wgpu")]
#[test]
fn self_test_passes_on_burn_wgpu_with_a_software_vulkan_driver() {
    let out = Command::new(env!("CARGO_BIN_EXE_mekd")).args(["self-test", "--device", "wgpu:cpu"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("no usable GPU"),
        "this test needs a software Vulkan driver: `apt-get install -y mesa-vulkan-drivers` (Mesa's lavapipe)\n{stderr}"
    );
    assert!(out.status.success() && stdout.contains("all 17 checks agree with flex"), "{stdout}{stderr}");
}

/// `mekd bench-train --graphs` on a CPU: each recorded step (teacher, GAN, MEKD) runs again per
/// step there, and its row says that no device graph replayed.
#[test]
fn bench_train_graph_rows_run_on_a_cpu() {
    let out = Command::new(env!("CARGO_BIN_EXE_mekd"))
        .args(["bench-train", "--device", "flex", "--graphs", "--warmup", "0", "--steps", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    for row in ["teacher step, graph", "gan step, graph", "mekd step, graph"] {
        assert!(stdout.contains(row), "{row}: {stdout}");
    }
    assert_eq!(stdout.matches("\"graph\": false").count(), 3, "{stdout}");
}
