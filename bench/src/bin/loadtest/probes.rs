//! The probes that run beside the load: event-to-visible latency (`/analyze`) and
//! anomaly-to-SSE latency (`/anomalies/stream`).

use crate::worker::{connect, send, target_of, Payload, Plan, Target};
use anyhow::{bail, Context};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Event-to-visible latency: from the 200 of a marked event until /analyze shows it.
/// Probe k posts to target k mod n and reads /analyze from target (k + 1) mod n, so with
/// several replicas the event is read from another node than the one that took it.
pub async fn probe_visibility(
    targets: Vec<Arc<Target>>,
    probes: u64,
    plan: Arc<Plan>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut senders = Vec::with_capacity(targets.len());
    for target in &targets {
        senders.push(connect(target).await?);
    }
    let gap = plan.deadline.saturating_duration_since(Instant::now()) / (probes as u32 + 1);
    for k in 0..probes {
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        let post = target_of(k as usize, targets.len());
        let read = target_of(k as usize + 1, targets.len());
        let (post_target, read_target) = (&*targets[post], &*targets[read]);
        let marker = 1_000_000.0 + k as f64;
        let device = format!("visibility-{}", k % 16);
        let body = format!(r#"{{"device_id":"{device}","cpu":0.5,"rps":{marker}}}"#);
        let (status, _) = send(
            &mut senders[post],
            post_target,
            Method::POST,
            &post_target.path,
            Some(Payload::json(body)),
        )
        .await?;
        if status != 200 {
            continue;
        }
        let accepted = Instant::now();
        let analyze_base = read_target
            .path
            .trim_end_matches("/batch")
            .trim_end_matches("/metric");
        let path = format!("{analyze_base}/analyze?device_id={device}");
        loop {
            let (status, bytes) =
                send(&mut senders[read], read_target, Method::GET, &path, None).await?;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                if v["last_rps"].as_f64() == Some(marker) {
                    break;
                }
            }
            if accepted.elapsed() > Duration::from_secs(10) {
                bail!("event never became visible within 10s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let _ = hist.record(accepted.elapsed().as_micros().max(1) as u64);
        tokio::time::sleep(gap.min(Duration::from_millis(50))).await;
    }
    Ok(hist)
}

/// Anomaly-to-SSE latency: from the 200 of a spike (after steady readings of its own
/// probe device) until the frame with that device arrives on `/anomalies/stream`.
pub async fn probe_sse(
    targets: Vec<Arc<Target>>,
    probes: u64,
    plan: Arc<Plan>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (post_target, read_target) = (&*targets[0], &*targets[targets.len() - 1]);
    let base = read_target
        .path
        .trim_end_matches("/batch")
        .trim_end_matches("/metric");
    let mut listener = connect(read_target).await?;
    listener.ready().await?;
    let req = Request::builder()
        .uri(format!("{base}/anomalies/stream"))
        .header(hyper::header::HOST, &read_target.host)
        .body(Full::new(Bytes::new()))?;
    let response = listener.send_request(req).await?;
    if response.status() != 200 {
        bail!("/anomalies/stream answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut poster = connect(post_target).await?;
    let post_path = post_target.path.trim_end_matches("/batch").to_string();
    let gap = plan.deadline.saturating_duration_since(Instant::now()) / (probes as u32 + 1);
    let mut seen = String::new();
    for k in 0..probes {
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        let device = format!("sse-probe-{k}");
        for rps in [
            100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0, 101.0, 99.0, 100.0, 5000.0,
        ] {
            let body = format!(r#"{{"device_id":"{device}","cpu":0.5,"rps":{rps}}}"#);
            let (status, _) = send(
                &mut poster,
                post_target,
                Method::POST,
                &post_path,
                Some(Payload::json(body)),
            )
            .await?;
            if status != 200 {
                bail!("probe event answered {status}");
            }
        }
        let accepted = Instant::now();
        let marker = format!(r#""device_id":"{device}""#);
        loop {
            if let Some(at) = seen.find(&marker) {
                seen.drain(..at + marker.len());
                break;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .context("no anomaly on the stream within 10s")?
                .context("the stream ended")??;
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        let _ = hist.record(accepted.elapsed().as_micros().max(1) as u64);
        tokio::time::sleep(gap.min(Duration::from_millis(50))).await;
    }
    Ok(hist)
}
