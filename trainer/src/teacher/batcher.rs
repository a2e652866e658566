//! One model, many clients: requests are queued and merged into model calls of up to
//! `max_images` images, so concurrent small requests share one ONNX Runtime run.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use mekd_runtime::onnxruntime::OrtClassifier;

/// A request waiting for the model.
struct Job {
    images: Vec<f32>,
    count: usize,
    reply: Sender<Result<Vec<f32>, String>>,
}

/// Handle to the batching thread; cloneable across request handlers.
#[derive(Clone)]
pub struct Batcher {
    jobs: Sender<Job>,
}

impl Batcher {
    /// Start the thread that owns `model`; it merges queued jobs up to `max_images` per call.
    pub fn start(
        mut model: OrtClassifier,
        shape: [usize; 3],
        num_classes: usize,
        max_images: usize,
    ) -> (Self, JoinHandle<()>) {
        let (jobs, queue): (Sender<Job>, Receiver<Job>) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("teacher-batcher".into())
            .spawn(move || {
                let mut pending: Option<Job> = None;
                loop {
                    let first = match pending.take() {
                        Some(job) => job,
                        None => match queue.recv() {
                            Ok(job) => job,
                            Err(_) => return, // every handler is gone: shut down
                        },
                    };
                    let mut batch = vec![first];
                    let mut total = batch[0].count;
                    while let Ok(job) = queue.try_recv() {
                        if total + job.count > max_images {
                            pending = Some(job);
                            break;
                        }
                        total += job.count;
                        batch.push(job);
                    }
                    let merged: Vec<f32> = if batch.len() == 1 {
                        std::mem::take(&mut batch[0].images)
                    } else {
                        batch.iter().flat_map(|j| j.images.iter().copied()).collect()
                    };
                    match model.run(&merged, shape) {
                        Ok(logits) => {
                            let mut offset = 0;
                            for job in batch {
                                let rows = &logits[offset * num_classes..(offset + job.count) * num_classes];
                                offset += job.count;
                                let _ = job.reply.send(Ok(rows.to_vec()));
                            }
                        }
                        Err(e) => {
                            for job in batch {
                                let _ = job.reply.send(Err(e.to_string()));
                            }
                        }
                    }
                }
            })
            .expect("spawn the batcher thread");
        (Self { jobs }, handle)
    }

    /// Logits for `count` images (already normalised `f32`), waiting for the model.
    pub fn infer(&self, images: Vec<f32>, count: usize) -> Result<Vec<f32>, String> {
        let (reply, answer) = mpsc::channel();
        self.jobs.send(Job { images, count, reply }).map_err(|_| "the model thread has stopped".to_string())?;
        answer.recv().map_err(|_| "the model thread has stopped".to_string())?
    }
}
