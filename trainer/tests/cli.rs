//! The `mekd` command line.

use std::process::Command;

fn mekd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mekd")).args(args).output().expect("run mekd")
}

#[test]
fn zoo_json_lists_reference_parameter_counts() {
    let out = mekd(&["zoo", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let params = |name: &str| {
        rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} missing"))["params"].as_u64().unwrap()
    };
    for (name, count) in [
        ("resnet8", 77_754),
        ("resnet20", 272_186),
        ("resnet32", 466_618),
        ("resnet56", 855_482),
        ("generator", 312_705),
        ("discriminator", 98_113),
        ("lenet5", 61_706),
        ("lenet5-half", 15_738),
    ] {
        assert_eq!(params(name), count, "{name}");
    }
    for name in ["vgg11", "vgg11-bn", "vgg13", "vgg13-bn", "mobilenet"] {
        assert!(params(name) > 0);
    }
    assert!(rows.iter().all(|r| r["flops"].as_u64().unwrap() > 0));
}

#[test]
fn zoo_table_and_bad_arguments() {
    let out = mekd(&["zoo"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("resnet32") && text.contains("466,618"), "{text}");
    let out = mekd(&["export", "--arch", "resnet9", "--out", "/tmp/never.onnx"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown architecture `resnet9`"), "{err}");
}

#[test]
fn export_command_writes_a_verified_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lenet.onnx");
    let out = mekd(&["export", "--arch", "lenet5-half", "--out", path.to_str().unwrap(), "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("tract agrees with burn"));
    let (info, _) = mekd_runtime::engine::inspect(&path).unwrap();
    assert_eq!(info.architecture.as_deref(), Some("lenet5-half"));
}
