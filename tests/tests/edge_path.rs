//! A model goes from the trainer to the edge runtime through an ONNX file.

use std::process::Command;

use mekd_e2e::{binary, repo};

#[test]
fn exported_student_runs_in_the_edge_cli() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("student.onnx");
    let out = Command::new(binary("mekd"))
        .args(["export", "--arch", "lenet5-half", "--seed", "1", "--out"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let out = Command::new(binary("mekd-edge")).args(["info", "--model"]).arg(&model).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "lenet5-half");
    assert_eq!(info["input_shape"], serde_json::json!([1, 32, 32]));

    let out = Command::new(binary("mekd-edge"))
        .args(["eval", "--json", "--limit", "300", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(repo().join("data/mnist-slice"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["images"], 300);
    let (acc, correct) = (result["accuracy"].as_f64().unwrap(), result["correct"].as_f64().unwrap());
    assert!((acc - 100.0 * correct / 300.0).abs() < 1e-9);

    // A file that is not ONNX is a clear error, not a panic.
    std::fs::write(dir.path().join("junk.onnx"), b"junk").unwrap();
    let out =
        Command::new(binary("mekd-edge")).args(["info", "--model"]).arg(dir.path().join("junk.onnx")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read ONNX model"));
}
