//! Prometheus metrics: counters the executors bump with relaxed atomics (no
//! lock on the I/O path), rendered in the text exposition format on
//! `GET /metrics` when `metrics.listen` is set.

use crate::core::VolumeState;
use crate::edge::control::Status;
use crate::error::{Error, Result};
use std::fmt::Write as _;
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
}

impl HostOp {
    const ALL: [HostOp; 3] = [HostOp::Read, HostOp::Write, HostOp::Flush];
    fn name(self) -> &'static str {
        match self {
            HostOp::Read => "read",
            HostOp::Write => "write",
            HostOp::Flush => "flush",
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
    ops: [OpCounters; 3],
    copied_tracks: AtomicU64,
    copied_bytes: AtomicU64,
    copy_errors: AtomicU64,
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

    /// Tracks the copy engine finished (restore, establish, resync).
    pub fn copied(&self, tracks: u64, bytes: u64, errors: u64) {
        self.copied_tracks.fetch_add(tracks, Relaxed);
        self.copied_bytes.fetch_add(bytes, Relaxed);
        self.copy_errors.fetch_add(errors, Relaxed);
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self, status: &Status) -> String {
        let mut out = String::new();
        self.render_volume(&mut out, status);
        self.render_copies(&mut out);
        self.render_host(&mut out);
        out
    }

    fn render_volume(&self, out: &mut String, s: &Status) {
        head(
            out,
            "splitmirror_state",
            "gauge",
            "1 for the volume's current state",
        );
        for st in VolumeState::ALL {
            let v = u8::from(s.state == st);
            let _ = writeln!(out, "splitmirror_state{{state=\"{st}\"}} {v}");
        }
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
        ];
        for (name, help, v) in gauges {
            head(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {v}");
        }
        let (total, done) = s.operation.as_ref().map_or((0, 0), |o| (o.total, o.done));
        head(
            out,
            "splitmirror_operation_tracks_total",
            "gauge",
            "Tracks the running copy operation covers",
        );
        let _ = writeln!(out, "splitmirror_operation_tracks_total {total}");
        head(
            out,
            "splitmirror_operation_tracks_done",
            "gauge",
            "Tracks the running copy operation has finished",
        );
        let _ = writeln!(out, "splitmirror_operation_tracks_done {done}");
        head(
            out,
            "splitmirror_read_repairs_total",
            "counter",
            "Primary read errors served from the secondary and rewritten on the primary",
        );
        let _ = writeln!(out, "splitmirror_read_repairs_total {}", s.read_repairs);
    }

    fn render_copies(&self, out: &mut String) {
        let counters = [
            (
                "splitmirror_copied_tracks_total",
                "Tracks copied by the engine",
                &self.copied_tracks,
            ),
            (
                "splitmirror_copied_bytes_total",
                "Bytes copied by the engine",
                &self.copied_bytes,
            ),
            (
                "splitmirror_copy_errors_total",
                "Copy errors",
                &self.copy_errors,
            ),
        ];
        for (name, help, v) in counters {
            head(out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
    }

    fn render_host(&self, out: &mut String) {
        let families = [
            (
                "splitmirror_host_requests_total",
                "Host requests by operation",
            ),
            ("splitmirror_host_bytes_total", "Host bytes by operation"),
            ("splitmirror_host_errors_total", "Host requests that failed"),
        ];
        for (k, (name, help)) in families.iter().enumerate() {
            head(out, name, "counter", help);
            for op in HostOp::ALL {
                let c = &self.ops[op as usize];
                let v = [&c.requests, &c.bytes, &c.errors][k].load(Relaxed);
                let _ = writeln!(out, "{name}{{op=\"{}\"}} {v}", op.name());
            }
        }
        let name = "splitmirror_host_latency_seconds";
        head(out, name, "histogram", "Host request latency");
        for op in HostOp::ALL {
            let c = &self.ops[op as usize];
            let mut cum = 0;
            for (i, b) in c.buckets.iter().enumerate() {
                cum += b.load(Relaxed);
                let le = BUCKETS_US
                    .get(i)
                    .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
                let _ = writeln!(
                    out,
                    "{name}_bucket{{op=\"{}\",le=\"{le}\"}} {cum}",
                    op.name()
                );
            }
            let sum = c.latency_sum_us.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{op=\"{}\"}} {sum}", op.name());
            let _ = writeln!(out, "{name}_count{{op=\"{}\"}} {cum}", op.name());
        }
    }
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
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
fn answer(mut c: TcpStream, metrics: &Metrics, status: &dyn Fn() -> Status) -> std::io::Result<()> {
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
        }
    }

    #[test]
    fn render_counts_requests_bytes_and_buckets() {
        let m = Metrics::default();
        m.host(HostOp::Write, 4096, Duration::from_micros(80), true);
        m.host(HostOp::Write, 4096, Duration::from_millis(3), false);
        m.copied(3, 3 * 131072, 0);
        let text = m.render(&status());
        assert!(text.contains("splitmirror_state{state=\"restoring\"} 1"));
        assert!(text.contains("splitmirror_state{state=\"split\"} 0"));
        assert!(text.contains("splitmirror_host_requests_total{op=\"write\"} 2"));
        assert!(text.contains("splitmirror_host_bytes_total{op=\"write\"} 4096"));
        assert!(text.contains("splitmirror_host_errors_total{op=\"write\"} 1"));
        assert!(
            text.contains("splitmirror_host_latency_seconds_bucket{op=\"write\",le=\"0.0001\"} 1")
        );
        assert!(
            text.contains("splitmirror_host_latency_seconds_bucket{op=\"write\",le=\"+Inf\"} 2")
        );
        assert!(text.contains("splitmirror_copied_tracks_total 3"));
        assert!(text.contains("splitmirror_tracks_restore_pending 7"));
        assert!(text.contains("splitmirror_read_repairs_total 3"));
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
        assert!(resp.contains("splitmirror_host_requests_total{op=\"read\"} 1"));
        srv.stop();
    }
}
