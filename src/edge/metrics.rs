//! Prometheus metrics: counters the executors bump with relaxed atomics (no
//! lock on the I/O path), encoded by the `prometheus-client` crate in the
//! text exposition format on `GET /metrics` when `metrics.listen` is set.
//! Every sample carries `volume="NAME"`; counters end in `_total`, gauges
//! never do.

use crate::core::VolumeState;
use crate::edge::control::Status;
use crate::error::{Error, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Latency bucket upper bounds in microseconds (the last bucket is +Inf).
const BUCKETS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostOp {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl HostOp {
    const ALL: [HostOp; 5] = [
        HostOp::Read,
        HostOp::Write,
        HostOp::Flush,
        HostOp::Discard,
        HostOp::WriteZeroes,
    ];
    fn name(self) -> &'static str {
        match self {
            HostOp::Read => "read",
            HostOp::Write => "write",
            HostOp::Flush => "flush",
            HostOp::Discard => "discard",
            HostOp::WriteZeroes => "write_zeroes",
        }
    }
}

#[derive(Default)]
struct OpCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_us: AtomicU64,
    /// Non-cumulative counts per bucket; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
}

/// Everything the server counts.
#[derive(Default)]
pub struct Metrics {
    ops: [OpCounters; 5],
    copied_tracks: AtomicU64,
    copied_bytes: AtomicU64,
    copy_errors: AtomicU64,
    ring_waits: AtomicU64,
}

impl Metrics {
    /// One finished host request.
    pub fn host(&self, op: HostOp, bytes: u64, latency: Duration, ok: bool) {
        let c = &self.ops[op as usize];
        c.requests.fetch_add(1, Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        c.latency_sum_us.fetch_add(us, Relaxed);
        let i = BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BUCKETS_US.len());
        c.buckets[i].fetch_add(1, Relaxed);
    }

    /// A ublk queue thread waited in its ring once. Host requests per wait
    /// say how well the queues batch their I/O.
    pub fn ring_wait(&self) {
        self.ring_waits.fetch_add(1, Relaxed);
    }

    /// Tracks the copy engine finished (restore, establish, resync).
    pub fn copied(&self, tracks: u64, bytes: u64, errors: u64) {
        self.copied_tracks.fetch_add(tracks, Relaxed);
        self.copied_bytes.fetch_add(bytes, Relaxed);
        self.copy_errors.fetch_add(errors, Relaxed);
    }

    /// The Prometheus text exposition format (version 0.0.4), every sample
    /// labelled `volume="NAME"`.
    pub fn render(self: &Arc<Self>, status: &Status) -> String {
        let mut registry = Registry::with_labels(
            [(Cow::from("volume"), Cow::from(status.name.clone()))].into_iter(),
        );
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            status: status.clone(),
        }));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// One scrape: the counters as they are now, the volume's status as it
/// was asked for this scrape.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    status: Status,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        self.encode_volume(&mut e)?;
        self.encode_copies(&mut e)?;
        self.encode_host(&mut e)
    }
}

impl Scrape {
    fn encode_volume(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let s = &self.status;
        let mut m = e.encode_descriptor(
            "splitmirror_state",
            "1 for the volume's current state",
            None,
            MetricType::Gauge,
        )?;
        for st in VolumeState::ALL {
            let labels = [("state", st.name())];
            m.encode_family(&labels)?
                .encode_gauge(&i64::from(s.state == st))?;
        }
        let (total, done) = s.operation.as_ref().map_or((0, 0), |o| (o.total, o.done));
        let gauges = [
            ("splitmirror_tracks", "Tracks in the volume", s.tracks),
            (
                "splitmirror_track_size_bytes",
                "Bytes per track",
                s.track_size,
            ),
            (
                "splitmirror_tracks_changed_since_split",
                "Tracks written since the split",
                s.changed_since_split,
            ),
            (
                "splitmirror_tracks_restore_pending",
                "Tracks still to restore from the secondary",
                s.restore_pending,
            ),
            (
                "splitmirror_tracks_secondary_stale",
                "Tracks still to copy to the secondary",
                s.secondary_stale,
            ),
            (
                "splitmirror_errors",
                "Errors listed by status",
                s.errors.len() as u64,
            ),
            (
                "splitmirror_operation_tracks",
                "Tracks the running copy operation covers (0: none runs)",
                total,
            ),
            (
                "splitmirror_operation_tracks_done",
                "Tracks the running copy operation has finished",
                done,
            ),
            (
                "splitmirror_secondary_missing",
                "1 while the secondary is not open (degraded; see attach-secondary)",
                u64::from(s.secondary_missing),
            ),
            (
                "splitmirror_split_age_seconds",
                "Seconds since the secondary's image was frozen (0: not split)",
                s.split_age_secs.unwrap_or(0),
            ),
        ];
        for (name, help, v) in gauges {
            gauge(e, name, help, v)?;
        }
        counter(
            e,
            "splitmirror_read_repairs",
            "Primary read errors served from the secondary and rewritten on the primary",
            s.read_repairs,
        )?;
        Ok(())
    }

    fn encode_copies(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let m = &self.metrics;
        counter(
            e,
            "splitmirror_copied_tracks",
            "Tracks copied by the engine",
            m.copied_tracks.load(Relaxed),
        )?;
        counter(
            e,
            "splitmirror_copied_bytes",
            "Bytes copied by the engine",
            m.copied_bytes.load(Relaxed),
        )?;
        counter(
            e,
            "splitmirror_copy_errors",
            "Copy errors",
            m.copy_errors.load(Relaxed),
        )?;
        counter(
            e,
            "splitmirror_queue_ring_waits",
            "Waits of the ublk queue threads in their io_uring (host requests per wait: the batching)",
            m.ring_waits.load(Relaxed),
        )
    }

    fn encode_host(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let families = [
            ("splitmirror_host_requests", "Host requests by operation"),
            ("splitmirror_host_bytes", "Host bytes by operation"),
            ("splitmirror_host_errors", "Host requests that failed"),
        ];
        for (k, (name, help)) in families.iter().enumerate() {
            let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
            for op in HostOp::ALL {
                let c = &self.metrics.ops[op as usize];
                let v = [&c.requests, &c.bytes, &c.errors][k].load(Relaxed);
                let labels = [("op", op.name())];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        let mut m = e.encode_descriptor(
            "splitmirror_host_latency_seconds",
            "Host request latency",
            None,
            MetricType::Histogram,
        )?;
        for op in HostOp::ALL {
            let c = &self.metrics.ops[op as usize];
            // Per-bucket counts: the encoder makes them cumulative.
            let buckets: Vec<(f64, u64)> = c
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let le = BUCKETS_US
                        .get(i)
                        .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                    (le, b.load(Relaxed))
                })
                .collect();
            let count = buckets.iter().map(|(_, n)| n).sum();
            let sum = c.latency_sum_us.load(Relaxed) as f64 / 1e6;
            let labels = [("op", op.name())];
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// The running `/metrics` listener.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    #[cfg(test)]
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    #[cfg(test)]
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Relaxed);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves `GET /metrics` on `listen`; `status` gives the volume's state.
pub fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    status: Arc<dyn Fn() -> Status + Send + Sync>,
) -> Result<MetricsServer> {
    let listener = TcpListener::bind(listen).map_err(|e| {
        Error::runtime(format!(
            "metrics.listen {listen}: cannot listen: {e}; pick a free ADDR:PORT or leave it empty"
        ))
    })?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    let _ = answer(c, &metrics, &*status);
                }
            }
        })?;
    Ok(MetricsServer {
        stop,
        addr,
        thread: Some(thread),
    })
}

/// One HTTP/1.0-style exchange: read the request head, answer, close.
fn answer(
    mut c: TcpStream,
    metrics: &Arc<Metrics>,
    status: &dyn Fn() -> Status,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let (code, body) = if line.starts_with("GET /metrics ") || line.starts_with("GET / ") {
        ("200 OK", metrics.render(&status()))
    } else {
        ("404 Not Found", "only GET /metrics is served\n".to_string())
    };
    write!(
        c,
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            name: "vol0".into(),
            device: None,
            primary: "/dev/a".into(),
            secondary: "/dev/b".into(),
            primary_id: "wwid:naa.5000c500a1b2c3d4".into(),
            secondary_id: "serial:S3Z9NB0K".into(),
            state: VolumeState::Restoring,
            track_size: 131072,
            tracks: 10,
            changed_since_split: 2,
            restore_pending: 7,
            secondary_stale: 0,
            operation: None,
            errors: vec![],
            read_repairs: 3,
            schema_version: 1,
            split_time: None,
            split_age_secs: None,
            secondary_missing: false,
            zero_copy: false,
        }
    }

    #[test]
    fn render_counts_requests_bytes_and_buckets() {
        let m = Arc::new(Metrics::default());
        m.host(HostOp::Write, 4096, Duration::from_micros(80), true);
        m.host(HostOp::Write, 4096, Duration::from_millis(3), false);
        m.copied(3, 3 * 131072, 0);
        m.ring_wait();
        m.ring_wait();
        let text = m.render(&status());
        assert!(text.contains("splitmirror_state{volume=\"vol0\",state=\"restoring\"} 1"));
        assert!(text.contains("splitmirror_state{volume=\"vol0\",state=\"split\"} 0"));
        assert!(text.contains("splitmirror_secondary_missing{volume=\"vol0\"} 0"));
        assert!(text.contains("splitmirror_host_requests_total{volume=\"vol0\",op=\"write\"} 2"));
        assert!(text.contains("splitmirror_host_bytes_total{volume=\"vol0\",op=\"write\"} 4096"));
        assert!(text.contains("splitmirror_host_errors_total{volume=\"vol0\",op=\"write\"} 1"));
        assert!(text.contains(
            "splitmirror_host_latency_seconds_bucket{volume=\"vol0\",op=\"write\",le=\"0.0001\"} 1"
        ));
        assert!(text.contains(
            "splitmirror_host_latency_seconds_bucket{volume=\"vol0\",op=\"write\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains("splitmirror_copied_tracks_total{volume=\"vol0\"} 3"));
        assert!(text.contains("splitmirror_read_repairs_total{volume=\"vol0\"} 3"));
        assert!(text.contains("splitmirror_queue_ring_waits_total{volume=\"vol0\"} 2"));
        assert!(text.contains("splitmirror_tracks_restore_pending{volume=\"vol0\"} 7"));
    }

    /// Prometheus naming: counters end in `_total`, nothing else does; every
    /// sample names its volume.
    #[test]
    fn names_follow_prometheus_conventions() {
        let text = Arc::new(Metrics::default()).render(&status());
        let mut types = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                types += 1;
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
            } else if !line.starts_with('#') && !line.is_empty() {
                assert!(line.contains("volume=\"vol0\""), "{line}");
            }
        }
        assert!(types >= 15, "{text}");
    }

    #[test]
    fn a_taken_port_is_one_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = serve(&addr, Arc::new(Metrics::default()), Arc::new(status))
            .err()
            .expect("binding a taken port must fail");
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 1);
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.starts_with(&format!("metrics.listen {addr}: cannot listen")),
            "{msg}"
        );
    }

    #[test]
    fn serves_metrics_over_http() {
        let m = Arc::new(Metrics::default());
        m.host(HostOp::Read, 512, Duration::from_micros(10), true);
        let srv = serve("127.0.0.1:0", m, Arc::new(status)).unwrap();
        let mut c = TcpStream::connect(srv.local_addr()).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(resp.contains("splitmirror_host_requests_total{volume=\"vol0\",op=\"read\"} 1"));
        srv.stop();
    }
}
