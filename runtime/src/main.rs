//! `mekd-edge`: run and measure an ONNX student on the board.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mekd_runtime::data::preprocess::{Normalisation, to_model_input};
use mekd_runtime::engine::{Engine, argmax_rows, inspect};
use mekd_runtime::{Dataset, Split};

/// The edge side of MEKD: load an ONNX classifier with tract and measure it.
#[derive(Parser)]
#[command(name = "mekd-edge", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what an ONNX classifier says about itself (shape, classes, normalisation).
    Info {
        /// The ONNX model.
        #[arg(long)]
        model: PathBuf,
    },
    /// Top-1 accuracy of a model on a labeled dataset.
    Eval {
        /// The ONNX model.
        #[arg(long)]
        model: PathBuf,
        /// Dataset folder or archive (IDX, CIFAR-10 batches, image folders, .tar.gz).
        #[arg(long)]
        data: PathBuf,
        /// Split to evaluate.
        #[arg(long, default_value = "test")]
        split: Split,
        /// Evaluate only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        /// Per-channel mean on [0, 1] pixels, for models without normalisation metadata.
        #[arg(long, value_delimiter = ',')]
        mean: Option<Vec<f32>>,
        /// Per-channel std on [0, 1] pixels, for models without normalisation metadata.
        #[arg(long, value_delimiter = ',')]
        std: Option<Vec<f32>>,
        /// Batch size for inference.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model } => {
            let (info, _) = inspect(&model)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        Command::Eval { model, data, split, limit, mean, std, batch, json } => {
            let mut engine = Engine::load(&model, batch)?;
            let info = engine.info().clone();
            let norm = match (mean, std, &info.normalisation) {
                (Some(mean), Some(std), _) => Normalisation { mean, std },
                (None, None, Some(n)) => n.clone(),
                (None, None, None) => {
                    bail!("{} carries no normalisation metadata: give --mean and --std", model.display())
                }
                _ => bail!("give both --mean and --std"),
            };
            let [c, h, w] = info.input_shape;
            let norm = norm.for_channels(c)?;
            let dataset = Dataset::load(&data, split).with_context(|| format!("reading {}", data.display()))?;
            let dataset = dataset.take(limit.unwrap_or(usize::MAX)).prepare(c, h.max(w))?;
            if dataset.shape != [c, h, w] {
                bail!("model input {h}x{w} is not square; resize is to squares only");
            }
            let input = to_model_input(&dataset.pixels, dataset.shape, &norm);
            let logits = engine.run_many(&input)?;
            let predictions = argmax_rows(&logits, info.num_classes);
            let correct = predictions.iter().zip(&dataset.labels).filter(|(p, l)| **p == **l as usize).count();
            let accuracy = 100.0 * correct as f64 / dataset.len() as f64;
            if json {
                println!("{}", serde_json::json!({"accuracy": accuracy, "images": dataset.len(), "correct": correct}));
            } else {
                println!("accuracy {accuracy:.2}% ({correct}/{} images)", dataset.len());
            }
            Ok(())
        }
    }
}
