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

#[test]
fn distill_command_writes_a_complete_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let out = mekd(&["export", "--arch", "lenet5", "--seed", "4", "--out", teacher.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = dir.path().join("run");
    let teacher = teacher.to_str().unwrap();
    let extra = ["--epochs", "1", "--budget", "32"];
    let out = tiny_distill(teacher, &run, &extra);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for file in [
        "config.json",
        "gan.jsonl",
        "generator.bpk",
        "samples/epoch-1.png",
        "metrics.jsonl",
        "usage.json",
        "transfer.pool",
        "student.onnx",
        "summary.json",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    // 1% of 10,000 edge images, one query each while training the GAN, then a pool of 32.
    assert_eq!(summary["queries"], 132);
    assert_eq!(summary["bytes_up"], 132 * 1024);
    assert_eq!(summary["method"], "mekd");
    assert_eq!(summary["response"], "soft");
    let (info, _) = mekd_runtime::engine::inspect(&run.join("student.onnx")).unwrap();
    assert_eq!(info.architecture.as_deref(), Some("lenet5-half"));
    // The same directory is not overwritten, and a missing teacher is a clear error.
    let out = tiny_distill(teacher, &run, &extra);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a run"));
    let out = mekd(&["distill", "--out", dir.path().join("x").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("give a teacher"));
}

/// The settings of a tiny `mekd distill`: 1% of the slice as edge images, a narrow GAN of
/// `gan_epochs` epochs, batch 16, 100 test images, the local ONNX `teacher`.
fn tiny_distill_args<'a>(teacher: &'a str, gan_epochs: &'a str) -> Vec<&'a str> {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist-slice");
    vec![
        "distill",
        "--teacher-onnx",
        teacher,
        "--data",
        data,
        "--edge-fraction",
        "0.01",
        "--gan-epochs",
        gan_epochs,
        "--generator-width",
        "8",
        "--discriminator-width",
        "4",
        "--batch",
        "16",
        "--limit-test",
        "100",
    ]
}

/// A tiny distill run into `out` (one GAN epoch); MEKD runs 2 steps per epoch, the baselines
/// their reference schedule (one pass) unless `extra` says otherwise.
fn tiny_distill(teacher: &str, out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let baseline = extra.windows(2).any(|w| w[0] == "--method" && w[1] != "mekd");
    let mut args = tiny_distill_args(teacher, "1");
    args.extend_from_slice(&["--out", out.to_str().unwrap()]);
    if !baseline && !extra.contains(&"--steps") {
        args.extend_from_slice(&["--steps", "2"]);
    }
    args.extend_from_slice(extra);
    mekd(&args)
}

fn summary(run: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn baselines_resume_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let out = mekd(&["export", "--arch", "lenet5", "--seed", "4", "--out", teacher.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let teacher = teacher.to_str().unwrap();

    // Baselines query each transfer image once (KD: all 100 edge images; KN: 20%; a budget caps
    // KD at 30); scratch never asks the teacher. An epoch is one pass over the transfer set at
    // batch 16 (the reference's schedule), unless --steps says otherwise.
    for (method, extra, queries, transfer, steps) in [
        ("kd", vec![], 100, 100, 7),
        ("kd", vec!["--budget", "30"], 30, 30, 2),
        ("kd", vec!["--budget", "30", "--steps", "3"], 30, 30, 3),
        ("kn", vec![], 20, 20, 2),
        ("dkd", vec![], 100, 100, 7),
        ("ml", vec![], 100, 100, 7),
        ("scratch", vec![], 0, 100, 7),
    ] {
        let run = dir.path().join(format!("{method}-{queries}-{steps}"));
        let mut args = vec!["--method", method, "--epochs", "2"];
        args.extend(extra.iter().copied());
        let out = tiny_distill(teacher, &run, &args);
        assert!(out.status.success(), "{method}: {}", String::from_utf8_lossy(&out.stderr));
        let s = summary(&run);
        assert_eq!(s["method"], method);
        assert_eq!(s["queries"], queries, "{method}");
        assert_eq!(s["transfer_images"], transfer, "{method}");
        assert_eq!(s["steps_per_epoch"], steps, "{method} {extra:?}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
        let explicit = extra.contains(&"--steps").then_some(steps);
        assert_eq!(config["distill"]["steps_per_epoch"], serde_json::json!(explicit), "{method} {extra:?}");
        assert!(s["final_acc"].as_f64().unwrap() >= 0.0 && run.join("student.onnx").is_file());
        assert!(!run.join("gan.jsonl").exists(), "baselines train no generator");
    }
    // A cap on deprivatization's queries: with 100 edge images, batch 64 and a cap of 70, the
    // IM term asks on every 2nd generator step: 64 queries, then the pool of 32.
    let run = dir.path().join("mekd-capped");
    let out = tiny_distill(teacher, &run, &["--gan-queries", "70", "--budget", "32", "--epochs", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary(&run)["queries"], 96);
    // Hard answers with the paper's IM weight need no query during deprivatization.
    let run = dir.path().join("mekd-hard");
    let out = tiny_distill(teacher, &run, &["--response", "hard", "--budget", "32", "--epochs", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(summary(&run)["queries"], 32);
    assert_eq!(summary(&run)["response"], "hard");
    let out = tiny_distill(teacher, &dir.path().join("ml-hard"), &["--method", "ml", "--response", "hard"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a teacher answering soft"));
    // A diverging student stops with a clear error instead of exporting a broken model.
    let out = tiny_distill(teacher, &dir.path().join("ml-diverged"), &["--method", "ml", "--lr", "1e30"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("training diverged; try a lower --lr"), "{err}");

    // Interrupted by the query cap during student epoch 3 (GAN 100 + 2 x 2 x 16 = 164), then
    // resumed: the generator and the first two epochs are kept, the count continues.
    let run = dir.path().join("mekd-resumed");
    let out = tiny_distill(teacher, &run, &["--epochs", "3", "--max-queries", "170"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("query budget exhausted"));
    assert!(!run.join("summary.json").exists());
    // A teacher answering differently than the run started with is refused.
    let out = tiny_distill(teacher, &run, &["--epochs", "3", "--resume", "--response", "hard"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("was started with a teacher answering soft, this one answers hard"), "{err}");
    // Other settings are refused on resume (setting flags are ignored then: --config is the way
    // to bring others).
    let mut other: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
    other["distill"]["epochs"] = 4.into();
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, other.to_string()).unwrap();
    let out = tiny_distill(teacher, &run, &["--resume", "--config", other_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("the settings differ"), "{err}");
    // (On another backend: the device is not a setting of the run.)
    let out = tiny_distill(teacher, &run, &["--epochs", "3", "--resume", "--device", "ndarray"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("deprivatization finished earlier") && err.contains("resuming the student after epoch 2"),
        "{err}"
    );
    assert!(err.contains("continues on ndarray (it ran on flex so far)"), "{err}");
    let s = summary(&run);
    assert_eq!(s["queries"], 196);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    // A mistyped teacher run is an error, and no empty folder appears in its place.
    let missing = dir.path().join("no-such-teacher");
    let out =
        mekd(&["distill", "--teacher-run", missing.to_str().unwrap(), "--out", dir.path().join("y").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is not a run directory"), "{err}");
    assert!(!missing.exists());

    // The report: one row per method/response/budget, JSON keys the issue names.
    let report_dir = dir.path().join("report");
    let out = mekd(&["report", dir.path().to_str().unwrap(), "--json", "--out", report_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 10, "{rows:?}");
    for row in &rows {
        for key in [
            "method",
            "response",
            "dataset",
            "teacher",
            "student",
            "final_acc",
            "best_acc",
            "queries",
            "bytes_up",
            "bytes_down",
            "seeds",
            "n",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
    }
    let kd30 = rows.iter().find(|r| r["method"] == "kd" && r["budget"] == 30).unwrap();
    assert_eq!(kd30["queries"], 30);
    assert_eq!(kd30["bytes_up"], 30 * 1024);
    assert_eq!(rows[0]["method"], "mekd");
    for file in ["report.md", "report.json", "accuracy.svg"] {
        assert!(report_dir.join(file).is_file(), "{file}");
    }
    let svg = std::fs::read_to_string(report_dir.join("accuracy.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 10);
}

/// What a run's result is made of, without wall times: the summary's counts and accuracies, and
/// every epoch's row (seconds left out).
fn outcome(run: &std::path::Path) -> (Vec<serde_json::Value>, Vec<String>) {
    let s = summary(run);
    let counts = ["queries", "bytes_up", "bytes_down", "final_acc", "best_acc"].map(|k| s[k].clone()).to_vec();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let epochs = metrics
        .lines()
        .map(|line| {
            let mut row: serde_json::Value = serde_json::from_str(line).unwrap();
            row.as_object_mut().unwrap().remove("seconds");
            row.to_string()
        })
        .collect();
    (counts, epochs)
}

/// Crash consistency (RELIABILITY.md): runs killed with SIGKILL at pseudo-random moments, resumed
/// after each kill, end exactly as an uninterrupted run: the same counts, bytes, metrics and
/// student, to the bit. `MEKD_KILL_TRIALS` trials per command (default 2; the long form runs
/// more); up to three kills per trial.
#[test]
fn runs_killed_at_random_moments_resume_to_the_uninterrupted_result() {
    let trials: usize = std::env::var("MEKD_KILL_TRIALS").map_or(2, |v| v.parse().expect("MEKD_KILL_TRIALS: a number"));
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let out = mekd(&["export", "--arch", "lenet5", "--seed", "4", "--out", teacher.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let teacher = teacher.to_str().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist-slice");
    let distill = |extra: &[&str]| -> Vec<String> {
        let tiny = tiny_distill_args(teacher, "2").into_iter().chain(["--steps", "3", "--epochs", "3"]);
        tiny.chain(extra.iter().copied()).map(String::from).collect()
    };
    let teacher_train: Vec<String> = [
        "teacher",
        "train",
        "--data",
        data,
        "--epochs",
        "3",
        "--batch",
        "32",
        "--limit-train",
        "300",
        "--limit-test",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // MEKD with fresh synthetic queries every step, MEKD with a budgeted pool, MEKD on hard
    // answers, KD, and teacher training. (Without the query journal's replay, a resumption buys
    // answers again and the counts differ.)
    let commands = [
        distill(&[]),
        distill(&["--budget", "40"]),
        distill(&["--response", "hard", "--budget", "40"]),
        distill(&["--method", "kd"]),
        teacher_train,
    ];
    // A fixed sequence of kill moments (SplitMix64), as fractions of an uninterrupted run.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut fraction = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (z ^ (z >> 27)) as f64 / u64::MAX as f64
    };
    let run_args = |command: &[String], out: &std::path::Path| {
        let mut args = command.to_vec();
        args.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
        if out.join("config.json").exists() {
            args.push("--resume".into());
        }
        args
    };
    let mut total_kills = 0;
    for (c, command) in commands.iter().enumerate() {
        let reference = dir.path().join(format!("reference-{c}"));
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_mekd")).args(run_args(command, &reference)).output().unwrap();
        assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
        let duration = started.elapsed();
        let expected = outcome(&reference);
        for trial in 0..trials {
            let run = dir.path().join(format!("trial-{c}-{trial}"));
            let mut kills = 0;
            loop {
                let mut child = Command::new(env!("CARGO_BIN_EXE_mekd"))
                    .args(run_args(command, &run))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap();
                if kills < 3 {
                    std::thread::sleep(duration.mul_f64(fraction()));
                    if child.try_wait().unwrap().is_none() {
                        child.kill().unwrap();
                        child.wait().unwrap();
                        kills += 1;
                        continue;
                    }
                }
                assert!(child.wait().unwrap().success(), "{command:?} trial {trial}: the resumed run failed");
                break;
            }
            total_kills += kills;
            assert_eq!(outcome(&run), expected, "{command:?} trial {trial} after {kills} kills");
        }
    }
    eprintln!(
        "{} commands x {trials} trials: {total_kills} kills, every run equal to the uninterrupted one",
        commands.len()
    );
}
