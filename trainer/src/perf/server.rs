//! Query throughput of the teacher server on loopback: images per second for given batch sizes
//! and numbers of concurrent clients (`mekd teacher bench`), optionally while hostile
//! connections attack the server (the latency its honest clients see then).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mekd_contract::Normalisation;
use mekd_contract::Percentiles;
use mekd_contract::protocol::ResponseMode;
use mekd_runtime::rng::SplitMix64;
use mekd_runtime::teacher_client::HttpClient;
use serde::Serialize;

use crate::teacher::server::{ServeConfig, start};

/// One measured configuration.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRow {
    /// Images per request.
    pub batch: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Hostile connections held open meanwhile.
    pub attackers: usize,
    /// Requests completed.
    pub requests: u64,
    /// Images answered per second (all clients together).
    pub images_per_s: f64,
    /// Median request round trip (ms).
    pub p50_ms: f64,
    /// 90th percentile request round trip (ms).
    pub p90_ms: f64,
    /// 99th percentile request round trip (ms).
    pub p99_ms: f64,
}

/// One hostile connection until `stop`: slow-loris (odd `id`s: a request head sent one byte every
/// 100 ms, never finished) or idle (even: connected, silent); reconnects whenever the server
/// closes it.
fn attack(addr: SocketAddr, id: usize, stop: &AtomicBool) {
    let head = b"POST /v1/query HTTP/1.1\r\nHost: x\r\nX-Api-Key: bench-key\r\nContent-Length: 1024\r\n";
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let mut sent = 0;
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if id % 2 == 1 && stream.write_all(&head[sent % head.len()..sent % head.len() + 1]).is_err() {
                break;
            }
            sent += 1;
            // The server closing the connection (timeout, cap) ends this round.
            match stream.read(&mut buf) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                _ => break,
            }
        }
    }
}

/// Serve `model` on loopback and measure every `(batch, clients)` pair for `seconds` each, with
/// `attackers` hostile connections held open meanwhile (half slow-loris, half idle; the server
/// runs with its default connection cap and read timeout).
pub fn run(
    model: &Path,
    norm: Option<Normalisation>,
    batches: &[usize],
    clients: &[usize],
    seconds: f64,
    attackers: usize,
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
    let image_bytes: usize = HttpClient::new(&url, "bench-key")?.info()?.input_shape.iter().product();
    let stop = AtomicBool::new(false);
    std::thread::scope(|attacks| -> Result<Vec<ThroughputRow>> {
        for id in 0..attackers {
            let (addr, stop) = (server.addr(), &stop);
            attacks.spawn(move || attack(addr, id, stop));
        }
        let rows = measure(&url, image_bytes, batches, clients, seconds, attackers);
        stop.store(true, Ordering::Relaxed);
        rows
    })
    .and_then(|rows| {
        server.shutdown()?;
        Ok(rows)
    })
}

/// The measurements of [`run`] against the server at `url`.
fn measure(
    url: &str,
    image_bytes: usize,
    batches: &[usize],
    clients: &[usize],
    seconds: f64,
    attackers: usize,
) -> Result<Vec<ThroughputRow>> {
    let url = url.to_string();
    let mut rows = Vec::new();
    for &batch in batches {
        for &n_clients in clients {
            let mut rng = SplitMix64::new(batch as u64);
            let body: Vec<u8> = (0..batch * image_bytes).map(|_| rng.below(256) as u8).collect();
            // Warm-up: one request per client.
            HttpClient::new(&url, "bench-key")?.query(&body, None)?;
            let deadline = Instant::now() + Duration::from_secs_f64(seconds);
            let started = Instant::now();
            let per_client: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..n_clients)
                    .map(|_| {
                        let (url, body) = (url.clone(), &body);
                        scope.spawn(move || -> Result<Vec<f64>> {
                            let client = HttpClient::new(&url, "bench-key")?;
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
            let requests = times.len();
            let latency = Percentiles::of(times);
            rows.push(ThroughputRow {
                batch,
                clients: n_clients,
                attackers,
                requests: requests as u64,
                images_per_s: (requests * batch) as f64 / elapsed,
                p50_ms: latency.p50,
                p90_ms: latency.p90,
                p99_ms: latency.p99,
            });
        }
    }
    Ok(rows)
}
