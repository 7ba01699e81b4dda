//! The Prometheus text endpoint (`provider run --metrics 127.0.0.1:PORT`, off by default):
//! counters and histograms kept with the `prometheus-client` crate, served as OpenMetrics
//! text on `GET /metrics`.
//!
//! The counts come from the audit log: every verdict, job start and end, and egress
//! decision is a line there already, so [`Metrics::observe`] (the log's observer) counts
//! each line as it is written and no module below the daemon knows about metrics. The
//! running jobs and the shares in use are read when scraped.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde_json::Value;

type Labels = Vec<(String, String)>;

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    demands: Family<Labels, Counter>,
    reasons: Family<Labels, Counter>,
    jobs: Family<Labels, Counter>,
    egress: Family<Labels, Counter>,
    egress_bytes: Family<Labels, Counter>,
    job_start: Histogram,
    job_boot: Histogram,
    /// Set when scraped.
    pub running_jobs: Gauge,
    pub cpu_threads_in_use: Gauge,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("provider");
        let m = Self {
            demands: Family::default(),
            reasons: Family::default(),
            jobs: Family::default(),
            egress: Family::default(),
            egress_bytes: Family::default(),
            // 0.25 s … ~128 s: a KVM boot is under a second, a TCG boot with an image
            // fetch tens of seconds.
            job_start: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            job_boot: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            running_jobs: Gauge::default(),
            cpu_threads_in_use: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "demands",
            "Demands judged, by verdict (accept, reject)",
            m.demands.clone(),
        );
        registry.register(
            "demand_reasons",
            "Reasons of rejected demands, by code",
            m.reasons.clone(),
        );
        registry.register(
            "jobs",
            "Jobs by outcome: started, start-failed (with code), ended (with why)",
            m.jobs.clone(),
        );
        registry.register(
            "egress_decisions",
            "Egress proxy decisions, by decision (allow, deny)",
            m.egress.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes through the egress proxies, by direction (up, down)",
            m.egress_bytes.clone(),
        );
        registry.register(
            "job_start_seconds",
            "From a create request to the job's guest agent ready",
            m.job_start.clone(),
        );
        registry.register(
            "job_boot_seconds",
            "From the VM's launch to its guest agent ready",
            m.job_boot.clone(),
        );
        registry.register("running_jobs", "Jobs running now", m.running_jobs.clone());
        registry.register(
            "cpu_threads_in_use",
            "CPU threads of the hardware profile agreed or running",
            m.cpu_threads_in_use.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts one audit line.
    pub fn observe(&self, line: &Value) {
        let s = |k: &str| line.get(k).and_then(Value::as_str).unwrap_or("");
        match s("event") {
            "verdict" => {
                self.demands
                    .get_or_create(&labels(&[("verdict", s("verdict"))]))
                    .inc();
                for r in line["reasons"].as_array().into_iter().flatten() {
                    let code = r["code"].as_str().unwrap_or("");
                    self.reasons.get_or_create(&labels(&[("code", code)])).inc();
                }
            }
            "activity-created" => {
                self.jobs
                    .get_or_create(&labels(&[("outcome", "started"), ("why", "")]))
                    .inc();
                if let Some(ms) = line["start_ms"].as_u64() {
                    self.job_start.observe(ms as f64 / 1000.0);
                }
            }
            "activity-failed" => {
                self.jobs
                    .get_or_create(&labels(&[("outcome", "start-failed"), ("why", s("code"))]))
                    .inc();
            }
            "activity-terminated" => {
                let why = match s("why") {
                    "terminated by the requestor" => "requestor",
                    "the agreement expired" => "agreement-expired",
                    "the provider was shut down" => "shutdown",
                    _ => "other",
                };
                self.jobs
                    .get_or_create(&labels(&[("outcome", "ended"), ("why", why)]))
                    .inc();
            }
            "job" if s("phase") == "started" => {
                if let Some(ms) = line["boot_ms"].as_u64() {
                    self.job_boot.observe(ms as f64 / 1000.0);
                }
            }
            "egress" => {
                self.egress
                    .get_or_create(&labels(&[("decision", s("decision"))]))
                    .inc();
                for (dir, key) in [("up", "bytes_up"), ("down", "bytes_down")] {
                    if let Some(n) = line[key].as_u64() {
                        self.egress_bytes
                            .get_or_create(&labels(&[("direction", dir)]))
                            .inc_by(n);
                    }
                }
            }
            _ => {}
        }
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `addr` until the task is aborted; `refresh` runs before each
/// scrape (to set the gauges).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    refresh: Arc<dyn Fn(&Metrics) + Send + Sync>,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, refresh) = (metrics.clone(), refresh.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (metrics, refresh) = (metrics.clone(), refresh.clone());
                    async move {
                        let r = if req.method() == hyper::Method::GET
                            && req.uri().path() == "/metrics"
                        {
                            refresh(&metrics);
                            Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(Full::new(Bytes::from(metrics.render())))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"only GET /metrics here\n")))
                        };
                        Ok::<_, std::convert::Infallible>(r.expect("a valid response"))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// Binds the endpoint's address (before the daemon announces itself, so a taken port is an
/// error at start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn audit_lines_become_counts() {
        let m = Metrics::new();
        m.observe(&json!({"event": "verdict", "verdict": "accept", "reasons": []}));
        m.observe(&json!({"event": "verdict", "verdict": "reject",
                          "reasons": [{"code": "busy"}, {"code": "constraints-unmet"}]}));
        m.observe(&json!({"event": "activity-created", "start_ms": 1500}));
        m.observe(&json!({"event": "activity-terminated", "why": "terminated by the requestor"}));
        m.observe(
            &json!({"event": "egress", "decision": "deny", "bytes_up": 10, "bytes_down": 20}),
        );
        let text = m.render();
        for want in [
            r#"provider_demands_total{verdict="accept"} 1"#,
            r#"provider_demands_total{verdict="reject"} 1"#,
            r#"provider_demand_reasons_total{code="busy"} 1"#,
            r#"provider_jobs_total{outcome="started",why=""} 1"#,
            r#"provider_jobs_total{outcome="ended",why="requestor"} 1"#,
            r#"provider_egress_decisions_total{decision="deny"} 1"#,
            r#"provider_egress_bytes_total{direction="down"} 20"#,
            "provider_job_start_seconds_count 1",
            "provider_job_start_seconds_sum 1.5",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
