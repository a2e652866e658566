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
        // The summary reports what the epochs measured: the last epoch's test accuracy and the best.
        let accs: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["test_acc"].as_f64().unwrap())
            .collect();
        assert_eq!(accs.len(), 2, "{method}: one metrics row per epoch");
        assert_eq!(s["final_acc"].as_f64(), accs.last().copied(), "{method}");
        assert_eq!(s["best_acc"].as_f64(), Some(accs.iter().copied().fold(0.0, f64::max)), "{method}");
        assert!(run.join("student.onnx").is_file());
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

/// A fixed sequence of kill moments (SplitMix64 from `seed`), as fractions of an uninterrupted run.
fn kill_moments(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (z ^ (z >> 27)) as f64 / u64::MAX as f64
    }
}

/// Start runs (`spawn`) until one finishes: each of the first three is killed (SIGKILL) at
/// `moment()` after its start if it still runs; `after_first_start` runs once, right after the
/// first start. Returns the kills; panics (naming `what`) if the finishing run fails.
fn run_until_done(
    mut spawn: impl FnMut() -> std::process::Child,
    mut moment: impl FnMut() -> std::time::Duration,
    mut after_first_start: impl FnMut(),
    what: &str,
) -> usize {
    let mut kills = 0;
    for attempt in 0.. {
        let mut child = spawn();
        if attempt == 0 {
            after_first_start();
        }
        if attempt < 3 {
            std::thread::sleep(moment());
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                continue;
            }
        }
        assert!(child.wait().unwrap().success(), "{what}: the resumed run failed");
        break;
    }
    kills
}

/// How many trials each kill test runs (`MEKD_KILL_TRIALS`, default 2).
fn kill_trials() -> usize {
    std::env::var("MEKD_KILL_TRIALS").map_or(2, |v| v.parse().expect("MEKD_KILL_TRIALS: a number"))
}

/// Crash consistency (RELIABILITY.md): runs killed with SIGKILL at pseudo-random moments, resumed
/// after each kill, end exactly as an uninterrupted run: the same counts, bytes, metrics and
/// student, to the bit. `MEKD_KILL_TRIALS` trials per command (default 2; the long form runs
/// more); up to three kills per trial.
#[test]
fn runs_killed_at_random_moments_resume_to_the_uninterrupted_result() {
    let trials = kill_trials();
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
    let mut fraction = kill_moments(0x9E37_79B9_7F4A_7C15);
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
            let spawn = || {
                Command::new(env!("CARGO_BIN_EXE_mekd"))
                    .args(run_args(command, &run))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            };
            let kills =
                run_until_done(spawn, || duration.mul_f64(fraction()), || {}, &format!("{command:?} trial {trial}"));
            total_kills += kills;
            assert_eq!(outcome(&run), expected, "{command:?} trial {trial} after {kills} kills");
        }
    }
    eprintln!(
        "{} commands x {trials} trials: {total_kills} kills, every run equal to the uninterrupted one",
        commands.len()
    );
}

/// A server process, killed when dropped (also when a test fails).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mekd teacher serve` of `model` for the keys in `keys`, listening on `listen`; returns the
/// process and its URL once it serves.
fn serve(model: &std::path::Path, keys: &std::path::Path, listen: &str) -> (Server, String) {
    use std::io::BufRead;
    let mut server = Command::new(env!("CARGO_BIN_EXE_mekd"))
        .args(["teacher", "serve", "--response", "soft", "--listen", listen, "--model"])
        .arg(model)
        .arg("--keys")
        .arg(keys)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let server = Server(server);
    let line = lines.find_map(|l| l.ok().filter(|l| l.starts_with("serving "))).expect("the server's first line");
    std::thread::spawn(move || lines.for_each(drop));
    let url = line.split(" on ").nth(1).and_then(|rest| rest.split(' ').next()).expect("serving ... on URL");
    (server, url.to_string())
}

/// The server's count for `key` (`GET /v1/usage`).
fn served_queries(url: &str, key: &str) -> u64 {
    mekd_runtime::teacher_client::HttpClient::new(url, key).unwrap().usage().unwrap().used
}

/// Against a remote teacher, a run whose client is killed at random moments (and whose server is
/// killed and restarted once, mid-run) ends exactly as an uninterrupted run, and the client's
/// count equals the server's: a request the server charged but whose answer the client never
/// journaled is sent again under the same idempotency key and not charged twice.
#[test]
fn remote_runs_killed_on_both_sides_count_the_same_as_their_server() {
    let trials = kill_trials();
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let out = mekd(&["export", "--arch", "lenet5", "--seed", "4", "--out", teacher.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Both query modes: fresh synthetic queries every step, and a budgeted pool.
    let modes: [&[&str]; 2] = [&[], &["--budget", "40"]];
    let keys = dir.path().join("keys.txt");
    let names: Vec<String> = (0..modes.len())
        .flat_map(|m| {
            std::iter::once(format!("reference-{m}")).chain((0..trials).map(move |t| format!("trial-{m}-{t}")))
        })
        .collect();
    std::fs::write(&keys, names.join("\n")).unwrap();
    let (server, url) = serve(&teacher, &keys, "127.0.0.1:0");
    let mut server = Some(server);
    let listen = url.trim_start_matches("http://").to_string();
    let args = |run: &std::path::Path, mode: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = tiny_distill_args("-", "2").into_iter().map(String::from).collect();
        let at = args.iter().position(|a| a == "--teacher-onnx").unwrap();
        args.splice(at..at + 2, ["--teacher".to_string(), url.clone()]);
        args.extend(["--steps", "3", "--epochs", "3", "--out", run.to_str().unwrap()].map(String::from));
        args.extend(mode.iter().map(|a| a.to_string()));
        if run.join("config.json").exists() {
            args.push("--resume".into());
        }
        args
    };
    let client = |run: &std::path::Path, mode: &[&str], key: &str| {
        Command::new(env!("CARGO_BIN_EXE_mekd"))
            .args(args(run, mode))
            .env("MEKD_API_KEY", key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut fraction = kill_moments(0x2545_F491_4F6C_DD1D);
    let mut kills = 0;
    for (m, mode) in modes.iter().enumerate() {
        let reference = dir.path().join(format!("reference-{m}"));
        let started = std::time::Instant::now();
        assert!(client(&reference, mode, &format!("reference-{m}")).wait().unwrap().success());
        let duration = started.elapsed();
        let expected = outcome(&reference);
        assert_eq!(summary(&reference)["queries"], served_queries(&url, &format!("reference-{m}")));
        for trial in 0..trials {
            let run = dir.path().join(format!("trial-{m}-{trial}"));
            let key = format!("trial-{m}-{trial}");
            // The server dies mid-run and comes back on the same address; the client retries.
            let server_dies = duration.mul_f64(fraction());
            let restart = || {
                std::thread::sleep(server_dies);
                server = None;
                server = Some(serve(&teacher, &keys, &listen).0);
            };
            let what = format!("{mode:?} trial {trial}");
            kills += run_until_done(|| client(&run, mode, &key), || duration.mul_f64(fraction()), restart, &what);
            assert_eq!(outcome(&run), expected, "{what}");
            assert_eq!(summary(&run)["queries"], served_queries(&url, &key), "{what}: client and server disagree");
        }
    }
    drop(server);
    let runs = modes.len() * trials;
    eprintln!("{runs} trials, {kills} client kills and {runs} server kills: counts equal on both sides");
}

/// A loopback proxy in front of the teacher at `upstream` that forwards every request but
/// swallows the answers to the query requests numbered in `swallow` (1-based, counting every
/// query that reaches it): the server charged them, the client never hears back, its connection
/// closes. Each swallowed number is sent on the returned channel. Returns the proxy's URL.
fn lossy_proxy(upstream: String, swallow: Vec<usize>) -> (String, std::sync::mpsc::Receiver<usize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// One HTTP/1.1 message (head and Content-Length body), or `None` at the end of the stream.
    fn message(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
        let mut bytes = Vec::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().ok()?;
            }
            bytes.extend_from_slice(line.as_bytes());
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        bytes.extend(body);
        Some(bytes)
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = upstream.trim_start_matches("http://").to_string();
    let (tell, told) = std::sync::mpsc::channel();
    let queries = std::sync::Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (upstream, swallow, tell, queries) = (upstream.clone(), swallow.clone(), tell.clone(), queries.clone());
            std::thread::spawn(move || {
                let mut from_client = BufReader::new(client.try_clone().unwrap());
                let mut to_client = client;
                let Ok(server) = TcpStream::connect(&upstream) else { return };
                let mut to_server = server.try_clone().unwrap();
                let mut from_server = BufReader::new(server);
                while let Some(request) = message(&mut from_client) {
                    let number =
                        request.starts_with(b"POST /v1/query").then(|| queries.fetch_add(1, Ordering::SeqCst) + 1);
                    if to_server.write_all(&request).is_err() {
                        return;
                    }
                    let Some(answer) = message(&mut from_server) else { return };
                    if let Some(number) = number.filter(|n| swallow.contains(n)) {
                        let _ = tell.send(number);
                        return; // the client's connection closes unanswered
                    }
                    if to_client.write_all(&answer).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, told)
}

/// The window the random kills rarely hit, forced: the server charges a query and the answer is
/// lost on the way (the client retries it), and later the server charges one and the client is
/// killed before the answer reaches its journal (the resumption sends it again). Both go again
/// under the same idempotency key, so the server charges each once: its count equals the
/// client's and an uninterrupted run's. (Without the journal's key, the resumption's resend is
/// charged again: 312 queries on the server, 296 in the run.)
#[test]
fn an_answer_lost_on_the_way_or_to_a_kill_is_not_charged_twice() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let out = mekd(&["export", "--arch", "lenet5", "--seed", "4", "--out", teacher.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "reference\nlossy\n").unwrap();
    let (_server, url) = serve(&teacher, &keys, "127.0.0.1:0");
    let distill = |teacher_url: &str, run: &std::path::Path, key: &str| {
        let mut args: Vec<String> = tiny_distill_args("-", "2").into_iter().map(String::from).collect();
        let at = args.iter().position(|a| a == "--teacher-onnx").unwrap();
        args.splice(at..at + 2, ["--teacher".to_string(), teacher_url.to_string()]);
        args.extend(["--steps", "3", "--epochs", "2", "--out", run.to_str().unwrap()].map(String::from));
        if run.join("config.json").exists() {
            args.push("--resume".into());
        }
        Command::new(env!("CARGO_BIN_EXE_mekd"))
            .args(args)
            .env("MEKD_API_KEY", key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let reference = dir.path().join("reference");
    assert!(distill(&url, &reference, "reference").wait().unwrap().success());
    let lossy = dir.path().join("lossy");
    // Query 3's answer is lost (the client retries); query 6's too, and the client is killed
    // while it waits to retry.
    let (proxy, lost) = lossy_proxy(url.clone(), vec![3, 6]);
    let mut child = distill(&proxy, &lossy, "lossy");
    assert_eq!(lost.recv_timeout(std::time::Duration::from_secs(120)), Ok(3));
    assert_eq!(lost.recv_timeout(std::time::Duration::from_secs(120)), Ok(6));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(distill(&url, &lossy, "lossy").wait().unwrap().success(), "the resumed run failed");
    assert_eq!(outcome(&lossy), outcome(&reference));
    assert_eq!(summary(&lossy)["queries"], served_queries(&url, "lossy"), "client and server disagree");
}

/// The teacher's accounts under SIGKILL (RELIABILITY.md): 10 clients (8 on four unlimited keys,
/// one on a key with a budget of 40, one with a wrong key) send batches of 1 to 8 images while the
/// server is killed at pseudo-random moments and restarted on the same address and usage file,
/// `MEKD_SERVER_KILL_ROUNDS` times (default 5). Checked at every kill: the usage file parses and
/// no key's persisted count is below the images its clients were answered. At the end: each
/// key's count equals the images its clients were answered, exactly (a request cut by a kill is
/// sent again under its idempotency key and charged once); the budgeted key never got an answer
/// past its budget; the wrong key was never counted.
#[test]
fn the_teacher_killed_under_load_loses_and_double_counts_nothing() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let rounds: usize =
        std::env::var("MEKD_SERVER_KILL_ROUNDS").map_or(5, |v| v.parse().expect("MEKD_SERVER_KILL_ROUNDS: a number"));
    let dir = tempfile::tempdir().unwrap();
    let teacher = dir.path().join("teacher.onnx");
    let out = mekd(&["export", "--arch", "lenet5", "--seed", "4", "--out", teacher.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "k0 unlimited\nk1 unlimited\nk2 unlimited\nk3 unlimited\nsmall 40\n").unwrap();
    let usage_file = dir.path().join("keys.txt.usage.json");
    let (mut server, url) = serve(&teacher, &keys, "127.0.0.1:0");
    let listen = url.trim_start_matches("http://").to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<(&str, usize)> = vec![
        ("k0", 0),
        ("k0", 1),
        ("k1", 2),
        ("k1", 3),
        ("k2", 4),
        ("k2", 5),
        ("k3", 6),
        ("k3", 7),
        ("small", 8),
        ("wrong", 9),
    ];
    // Images answered per client, published as they come.
    let answered: Vec<Arc<AtomicU64>> = clients.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let requests = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = clients
        .iter()
        .zip(&answered)
        .map(|(&(key, id), answered)| {
            let (url, stop, answered, requests) = (url.clone(), stop.clone(), answered.clone(), requests.clone());
            std::thread::spawn(move || {
                let client = mekd_runtime::teacher_client::HttpClient::new(&url, key).unwrap();
                let mut moments = kill_moments(id as u64);
                while !stop.load(Ordering::SeqCst) {
                    let n = 1 + (moments() * 8.0) as usize;
                    requests.fetch_add(1, Ordering::SeqCst);
                    match client.query(&vec![id as u8 * 20; n * 1024], None) {
                        Ok((answer, _)) => {
                            assert_eq!(answer.count, n);
                            answered.fetch_add(n as u64, Ordering::SeqCst);
                        }
                        Err(mekd_runtime::teacher_client::ClientError::BudgetExhausted { .. }) if key == "small" => {
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        Err(mekd_runtime::teacher_client::ClientError::Status { status: 401, .. })
                            if key == "wrong" => {}
                        Err(e) => panic!("{key}: {e}"),
                    }
                }
            })
        })
        .collect();
    let per_key = |answered: &[Arc<AtomicU64>]| {
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for (&(key, _), a) in clients.iter().zip(answered) {
            *sums.entry(key.to_string()).or_default() += a.load(Ordering::SeqCst);
        }
        sums
    };
    let persisted = || -> BTreeMap<String, u64> {
        let ledger: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&usage_file).unwrap()).expect("the usage file parses");
        serde_json::from_value(ledger["used"].clone()).unwrap()
    };
    let mut moments = kill_moments(0xD1B5_4A32_D192_ED03);
    for round in 0..rounds {
        std::thread::sleep(std::time::Duration::from_millis(50 + (moments() * 400.0) as u64));
        let before = per_key(&answered);
        drop(server); // SIGKILL
        let counts = persisted();
        for (key, got) in &before {
            let count = counts.get(key).copied().unwrap_or(0);
            assert!(count >= *got, "round {round}: {key} persisted {count}, its clients had {got} answers");
        }
        server = serve(&teacher, &keys, &listen).0;
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for thread in threads {
        thread.join().expect("a client failed");
    }
    let answered = per_key(&answered);
    let counts = persisted();
    for (key, got) in &answered {
        assert_eq!(counts.get(key).copied().unwrap_or(0), *got, "{key}: persisted vs answered");
    }
    assert!(answered["small"] <= 40 && !counts.contains_key("wrong"), "{counts:?}");
    let images: u64 = answered.values().sum();
    eprintln!(
        "{rounds} server kills under load: {} requests, {images} images answered, every key's count equal to its answers",
        requests.load(Ordering::SeqCst)
    );
    drop(server);
}

/// `mekd teacher bench --attackers`: honest clients are measured (p99 included) while hostile
/// connections hold the server.
#[test]
fn teacher_bench_measures_under_attack() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("teacher.onnx");
    assert!(mekd(&["export", "--arch", "lenet5", "--out", model.to_str().unwrap()]).status.success());
    let out = mekd(&[
        "teacher",
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        "1",
        "--clients",
        "2",
        "--seconds",
        "0.5",
        "--attackers",
        "6",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &rows[0];
    assert_eq!((row["attackers"].as_u64(), row["clients"].as_u64()), (Some(6), Some(2)), "{rows}");
    assert!(row["requests"].as_u64().unwrap() > 0, "{rows}");
    let (p50, p99) = (row["p50_ms"].as_f64().unwrap(), row["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p99 >= p50, "{rows}");
}

#[test]
fn an_experiment_trains_its_teacher_once_runs_every_job_and_finishes_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist-slice");
    let schedule = dir.path().join("tiny.toml");
    std::fs::write(
        &schedule,
        format!(
            r#"description = "a tiny experiment"
data = "{data}"
seeds = [0, 1]
[teacher]
args = ["--arch", "lenet5-half", "--epochs", "1", "--limit-train", "300", "--limit-test", "100"]
[distill]
args = ["--student", "lenet5-half", "--edge-fraction", "0.01", "--epochs", "1", "--batch", "16",
        "--limit-test", "100", "--method", "kd"]
[[run]]
name = "kd"
[[run]]
name = "scratch"
args = ["--method", "scratch", "--epochs", "2"]
seeds = [3]
"#
        ),
    )
    .unwrap();
    let out = dir.path().join("exp");
    let (schedule, out_str) = (schedule.to_str().unwrap(), out.to_str().unwrap());
    // A dry run prints the commands with the shared flags replaced by the run's own.
    let dry = mekd(&["experiment", schedule, "--out", out_str, "--dry-run"]);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let commands = String::from_utf8_lossy(&dry.stdout).to_string();
    assert_eq!(commands.lines().count(), 4, "{commands}");
    assert!(!out.exists(), "a dry run writes nothing");
    let scratch = commands.lines().last().unwrap();
    assert!(scratch.contains("--epochs 2") && !scratch.contains("--epochs 1") && scratch.contains("--seed 3"));

    let first = mekd(&["experiment", schedule, "--out", out_str, "--jobs", "2", "--threads", "1", "--prune"]);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{err}");
    assert!(err.contains("3 runs, 0 finished already, 3 to run"), "{err}");
    for run in ["kd-seed-0", "kd-seed-1", "scratch-seed-3"] {
        let s = summary(&out.join(run));
        assert_eq!(s["seed"], run.rsplit('-').next().unwrap().parse::<u64>().unwrap(), "{run}");
        assert!(out.join(format!("{run}.log")).is_file());
        assert!(!out.join(run).join("student.onnx").exists(), "--prune keeps no model");
    }
    let table = String::from_utf8_lossy(&first.stdout);
    assert!(table.contains("| kd |") && table.contains("| scratch |"), "{table}");
    assert!(out.join("report/report.md").is_file() && out.join("schedule.toml").is_file());
    // The second time finds everything done: the teacher is not trained again, no run repeats.
    let teacher_summary = std::fs::read(out.join("teacher/summary.json")).unwrap();
    let again = mekd(&["experiment", schedule, "--out", out_str]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success() && err.contains("3 runs, 3 finished already, 0 to run"), "{err}");
    assert_eq!(std::fs::read(out.join("teacher/summary.json")).unwrap(), teacher_summary);
    // An unknown run name is refused before anything runs.
    let wrong = mekd(&["experiment", schedule, "--out", out_str, "--only", "kdd"]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("--only kdd"));
}
