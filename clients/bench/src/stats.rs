//! Latency samples, percentiles, and the printed result table.

use std::time::Duration;

pub(crate) struct Stats {
    pub name: String,
    pub ops: usize,
    pub errors: usize,
    pub elapsed: Duration,
    /// Microseconds per successful operation.
    pub latencies_us: Vec<u64>,
    /// Raw-SQL baseline throughput (ops/s) at the same concurrency, when there is one.
    pub baseline_ops_per_sec: Option<f64>,
    pub note: String,
    /// CPU microseconds per job of each process (end-to-end scenarios only).
    pub cpu_us_per_job: Vec<(String, f64)>,
    /// The local Postgres and Redis servers' work per job (end-to-end
    /// scenarios only).
    pub servers_per_job: Option<ServerCost>,
}

/// What the Postgres and Redis servers spent per job (`None`: not seen,
/// e.g. a server on another machine).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ServerCost {
    /// CPU microseconds of the Postgres processes.
    pub postgres_us: Option<f64>,
    /// CPU microseconds of the Redis server.
    pub redis_us: Option<f64>,
    /// Bytes of write-ahead log.
    pub wal_bytes: Option<f64>,
}

impl std::fmt::Display for ServerCost {
    /// "Postgres 181 us, Redis 22 us, WAL 1904 B".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            self.postgres_us.map(|us| format!("Postgres {us:.0} us")),
            self.redis_us.map(|us| format!("Redis {us:.0} us")),
            self.wal_bytes.map(|b| format!("WAL {b:.0} B")),
        ]
        .into_iter()
        .flatten()
        .collect();
        f.write_str(&parts.join(", "))
    }
}

impl Stats {
    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// `p` in 0..=100 over unsorted samples.
pub(crate) fn percentile(samples: &[u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// "jobs 75, worker x2 52, bench 30": CPU microseconds per job by process.
pub(crate) fn cpu_list(per_process: &[(String, f64)]) -> String {
    per_process
        .iter()
        .map(|(name, us)| format!("{name} {us:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn print_header() {
    let columns = [
        "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "svc/raw",
    ];
    let widths = [9, 10, 8, 8, 8, 8, 7, 11];
    let mut line = format!("{:<16}", "scenario");
    for (c, w) in columns.iter().zip(widths) {
        line.push_str(&format!(" {c:>w$}"));
    }
    println!("{line}  note");
}

pub(crate) fn print_row(s: &Stats) {
    let ratio = match s.baseline_ops_per_sec {
        Some(raw) if raw > 0.0 => format!("{:.0}%", 100.0 * s.ops_per_sec() / raw),
        _ => "-".to_string(),
    };
    println!(
        "{:<16} {:>9} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>11}  {}",
        s.name,
        s.ops,
        s.ops_per_sec(),
        s.percentile_ms(50.0),
        s.percentile_ms(90.0),
        s.percentile_ms(99.0),
        s.percentile_ms(100.0),
        s.errors,
        ratio,
        s.note
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(super::percentile(&s, 50.0), 51);
        assert_eq!(super::percentile(&s, 100.0), 100);
        assert_eq!(super::percentile(&[], 99.0), 0);
    }
}
