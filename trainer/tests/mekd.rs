//! MEKD end to end on a tiny configuration: deprivatization and distillation query the teacher
//! only through the black-box trait, with exact query accounting, and no gradient reaches the
//! generator's (or anything but the student's) weights.

use std::path::Path;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Tensor};
use mekd_contract::protocol::ResponseMode;
use mekd_models::{Architecture, ClassifierSpec};
use mekd_runtime::{Dataset, Split};
use mekd_trainer::blackbox::{BurnTeacher, Teacher};
use mekd_trainer::methods::config::{DistillConfig, QueryMode};
use mekd_trainer::methods::deprivatize::{GanConfig, deprivatize, freeze};
use mekd_trainer::methods::mekd::{MekdObjective, mekd_loss};
use mekd_trainer::methods::student::{EpochLength, Pool, StudentJob, Transfer, train_student};
use mekd_trainer::rundir::RunDir;
use mekd_trainer::schedule::Sgd;
use mekd_trainer::teacher::train::{TrainConfig, train};

#[test]
fn mekd_queries_only_through_the_trait_and_trains_only_the_student() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let data = root.join("data/mnist-slice");
    let dir = tempfile::tempdir().unwrap();
    let mut config = TrainConfig::reference(Architecture::LeNet5, data.clone(), 1);
    config.limit_train = Some(1500);
    config.limit_test = Some(200);
    config.batch = 64;
    config.sgd.lr = 0.05;
    train(dir.path(), &config, false).unwrap();
    let device = Device::flex().autodiff();
    let mut teacher = BurnTeacher::from_run(dir.path(), &Device::flex(), ResponseMode::Soft, None).unwrap();

    let train_split = Dataset::load(&data, Split::Train).unwrap();
    let edge = train_split
        .select(&mekd_runtime::data::edge_subset(train_split.len(), 0.0256, 3).unwrap())
        .prepare(1, 32)
        .unwrap();
    assert_eq!(edge.len(), 256);
    let gan = GanConfig {
        epochs: 1,
        batch: 64,
        generator_width: 16,
        discriminator_width: 8,
        seed: 1,
        ..GanConfig::default()
    };
    let mut epochs = Vec::new();
    let generator = deprivatize(&edge, &mut teacher, &gan, &device, false, |row, _, _| {
        epochs.push(row.clone());
        Ok(())
    })
    .unwrap();
    assert_eq!(teacher.usage().queries, 256, "one query per synthetic image");
    assert_eq!(epochs.len(), 1);
    assert!(epochs[0].d_loss.is_finite() && epochs[0].g_loss.is_finite() && epochs[0].im_loss > 0.0);
    assert!(epochs[0].seconds > 0.0, "the epoch's wall time is recorded");
    let labels = &epochs[0].teacher_labels;
    assert_eq!((labels.len(), labels.iter().sum::<u64>()), (10, 256), "every answer counted once: {labels:?}");

    // The frozen generator gets no gradient, though the loss flows through it into the student.
    let generator = freeze(&generator);
    let spec = ClassifierSpec { architecture: Architecture::LeNet5Half, in_channels: 1, num_classes: 10 };
    let student = spec.init(&device).unwrap();
    let x = Tensor::<4>::random([4, 1, 32, 32], Distribution::Uniform(-1.0, 1.0), &device);
    let t = Tensor::<2>::random([4, 10], Distribution::Normal(0.0, 3.0), &device);
    let loss = mekd_loss(&generator, student.forward(x), t, &DistillConfig::default());
    let grads = loss.differentiable.backward();
    let student_grads = GradientsParams::from_grads(grads, &student);
    assert!(!student_grads.is_empty(), "the student must receive gradients");
    let loss = mekd_loss(
        &generator,
        student.forward(Tensor::<4>::random([4, 1, 32, 32], Distribution::Uniform(-1.0, 1.0), &device)),
        Tensor::<2>::random([4, 10], Distribution::Normal(0.0, 3.0), &device),
        &DistillConfig::default(),
    );
    let grads = loss.differentiable.backward();
    assert!(GradientsParams::from_grads(grads, &generator).is_empty(), "no gradient may reach the generator");

    // Budgeted mode: a pool of 96 images, each queried once, then only the cache.
    let z = Tensor::<2>::random([8, 10], Distribution::Normal(0.0, 1.0), &device);
    let before: Vec<f32> = generator.forward(z.clone()).into_data().try_to_vec().unwrap();
    let test = Dataset::load(&data, Split::Test).unwrap().take(200).prepare(1, 32).unwrap();
    let budgeted = DistillConfig {
        epochs: 2,
        steps_per_epoch: Some(5),
        batch: 32,
        sgd: Sgd { milestones: vec![1], ..Sgd::reference(2) },
        queries: QueryMode::Budget(96),
        ..DistillConfig::default()
    };
    let start = teacher.usage().queries;
    let pool_images = {
        let z = Tensor::<2>::random([96, 10], Distribution::Normal(0.0, 1.0), &device);
        mekd_trainer::methods::deprivatize::to_pixels(generator.forward(z))
    };
    let pool = Pool::query(pool_images, &mut teacher, 32, |_| ()).unwrap();
    assert_eq!(teacher.usage().queries - start, 96);
    let objective = MekdObjective { generator: generator.clone(), config: &budgeted };
    let runs = tempfile::tempdir().unwrap();
    let run = RunDir::create(&runs.path().join("budgeted")).unwrap();
    let job = StudentJob {
        spec: &spec,
        config: &budgeted,
        epoch_length: EpochLength::Steps(5),
        test: &test,
        device: &device,
        run: &run,
        graphs: false,
    };
    let (_, rows) = train_student(&objective, &Transfer::Pool(pool), &mut teacher, &job, |_, _| Ok(())).unwrap();
    assert_eq!(teacher.usage().queries - start, 96, "a pool is queried once, then only the cache");
    assert_eq!(rows.iter().map(|r| (r.epoch, r.lr)).collect::<Vec<_>>(), vec![(1, 0.1), (2, 0.010000000000000002)]);
    assert!(rows.iter().all(|r| r.loss.is_finite() && r.terms["image"] >= 0.0 && r.terms["kl"] >= 0.0));
    // Fresh mode: a new batch of queries every step.
    let fresh = DistillConfig {
        epochs: 1,
        steps_per_epoch: Some(3),
        batch: 16,
        queries: QueryMode::Fresh,
        ..DistillConfig::default()
    };
    let fresh_job = |run, graphs| StudentJob {
        spec: &spec,
        config: &fresh,
        epoch_length: EpochLength::Steps(3),
        test: &test,
        device: &device,
        run,
        graphs,
    };
    let start = teacher.usage().queries;
    let run = RunDir::create(&runs.path().join("fresh")).unwrap();
    let job = fresh_job(&run, false);
    let objective = MekdObjective { generator: generator.clone(), config: &fresh };
    let (_, first) =
        train_student(&objective, &Transfer::Fresh(Box::new(generator.clone())), &mut teacher, &job, |_, _| Ok(()))
            .unwrap();
    assert_eq!(teacher.usage().queries - start, 48);
    // The teacher answers the next batch on a thread during each step: still deterministic.
    let run = RunDir::create(&runs.path().join("fresh-again")).unwrap();
    let job = fresh_job(&run, false);
    let (_, again) =
        train_student(&objective, &Transfer::Fresh(Box::new(generator.clone())), &mut teacher, &job, |_, _| Ok(()))
            .unwrap();
    assert_eq!(teacher.usage().queries - start, 96);
    let values = |rows: &[mekd_trainer::methods::student::StudentEpoch]| {
        rows.iter().map(|r| (r.loss, r.test_acc, r.terms.clone())).collect::<Vec<_>>()
    };
    assert_eq!(values(&first), values(&again));
    // The same run through the recorded step (on flex it runs again each step): the same
    // queries, and the same losses within f32 rounding (the in-place SGD is burn's, term for term).
    let run = RunDir::create(&runs.path().join("fresh-graph")).unwrap();
    let job = fresh_job(&run, true);
    let (_, graph) =
        train_student(&objective, &Transfer::Fresh(Box::new(generator.clone())), &mut teacher, &job, |_, _| Ok(()))
            .unwrap();
    assert_eq!(teacher.usage().queries - start, 144);
    let (ours, theirs) = (graph[0].loss, first[0].loss);
    assert!((ours - theirs).abs() <= 1e-5 * theirs.abs(), "{ours} vs {theirs}");
    // Distillation left the generator untouched.
    let after: Vec<f32> = generator.forward(z).into_data().try_to_vec().unwrap();
    assert_eq!(before, after);
    // A client-side budget turns into a clean error, not a crash.
    let mut limited = BurnTeacher::from_run(dir.path(), &Device::flex(), ResponseMode::Hard, Some(20)).unwrap();
    let run = RunDir::create(&runs.path().join("limited")).unwrap();
    let job = fresh_job(&run, false);
    let err =
        train_student(&objective, &Transfer::Fresh(Box::new(generator.clone())), &mut limited, &job, |_, _| Ok(()))
            .err()
            .unwrap();
    assert!(err.to_string().contains("query budget exhausted"), "{err}");
}
