//! Query throughput of the teacher server on loopback: images per second for given batch sizes
//! and numbers of concurrent clients (`mekd teacher bench`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mekd_runtime::Normalisation;
use mekd_runtime::protocol::ResponseMode;
use mekd_runtime::rng::SplitMix64;
use mekd_runtime::teacher_client::HttpClient;
use serde::Serialize;

use super::server::{ServeConfig, start};

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRow {
    /// Images per request.
    pub batch: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Requests completed.
    pub requests: u64,
    /// Images answered per second (all clients together).
    pub images_per_s: f64,
    /// Median request round trip (ms).
    pub p50_ms: f64,
    /// 90th percentile request round trip (ms).
    pub p90_ms: f64,
}

/// Serve `model` on loopback and measure every `(batch, clients)` pair for `seconds` each.
pub fn run(
    model: &Path,
    norm: Option<Normalisation>,
    batches: &[usize],
    clients: &[usize],
    seconds: f64,
) -> Result<Vec<ThroughputRow>> {
    let dir = tempfile::tempdir().context("creating a temporary keys folder")?;
    let keys = dir.path().join("keys.txt");
    std::fs::write(&keys, "bench-key\n")?;
    let mut config = ServeConfig::new(model.to_path_buf(), "127.0.0.1:0", ResponseMode::Soft, keys);
    config.normalisation = norm;
    config.max_batch = batches.iter().copied().max().unwrap_or(1).max(1);
    config.threads = clients.iter().copied().max().unwrap_or(1).max(1);
    let server = start(&config)?;
    let url = server.url();
    let image_bytes: usize = HttpClient::new(&url, "bench-key").info()?.input_shape.iter().product();
    let mut rows = Vec::new();
    for &batch in batches {
        for &n_clients in clients {
            let mut rng = SplitMix64::new(batch as u64);
            let body: Vec<u8> = (0..batch * image_bytes).map(|_| rng.below(256) as u8).collect();
            // Warm-up: one request per client.
            HttpClient::new(&url, "bench-key").query(&body, None)?;
            let deadline = Instant::now() + Duration::from_secs_f64(seconds);
            let started = Instant::now();
            let per_client: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..n_clients)
                    .map(|_| {
                        let (url, body) = (url.clone(), &body);
                        scope.spawn(move || -> Result<Vec<f64>> {
                            let client = HttpClient::new(&url, "bench-key");
                            let mut times = Vec::new();
                            while Instant::now() < deadline {
                                let t = Instant::now();
                                client.query(body, None)?;
                                times.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                            Ok(times)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("bench client")).collect()
            });
            let elapsed = started.elapsed().as_secs_f64();
            let mut times: Vec<f64> = Vec::new();
            for result in per_client {
                times.extend(result?);
            }
            times.sort_by(f64::total_cmp);
            let pct = |p: f64| times.get(((times.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
            rows.push(ThroughputRow {
                batch,
                clients: n_clients,
                requests: times.len() as u64,
                images_per_s: (times.len() * batch) as f64 / elapsed,
                p50_ms: pct(0.5),
                p90_ms: pct(0.9),
            });
        }
    }
    server.shutdown()?;
    Ok(rows)
}
