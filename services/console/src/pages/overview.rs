//! The overview: each kind's queue, the last hour's throughput as an SVG
//! chart, and the most recent failures.

use askama::Template;
use axum::extract::State;
use keel_proto::admin::v1::{GetQueueStatsRequest, KindStats, ListJobsRequest};
use keel_proto::jobs::v1::JobStatus;

use super::jobs::JobRow;
use super::render;
use crate::App;
use crate::backend::authed;
use crate::error::PageResult;
use crate::session::Session;
use crate::view::{self, Nav};

struct KindRow {
    kind: String,
    queued: i64,
    due: i64,
    running: i64,
    oldest_due_age: String,
    started: i64,
    finished: i64,
    failed: i64,
}

impl From<&KindStats> for KindRow {
    fn from(k: &KindStats) -> Self {
        Self {
            kind: k.kind.clone(),
            queued: k.queued,
            due: k.due,
            running: k.running,
            oldest_due_age: view::duration(k.oldest_due_age.as_ref()),
            started: k.started_per_minute.iter().sum(),
            finished: k.finished_per_minute.iter().sum(),
            failed: k.failed_per_minute.iter().sum(),
        }
    }
}

/// The throughput chart's geometry, computed here so the template only
/// places numbers.
pub(crate) struct Chart {
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) max: i64,
    pub(crate) started: String,
    pub(crate) finished: String,
    pub(crate) failed: String,
}

const MINUTES: usize = 60;
const CHART_W: u32 = 720;
const CHART_H: u32 = 180;
const PAD_X: u32 = 40;
const PAD_Y: u32 = 12;

impl Chart {
    fn new(kinds: &[KindStats]) -> Self {
        let sum = |pick: fn(&KindStats) -> &Vec<i64>| {
            let mut total = [0i64; MINUTES];
            for k in kinds {
                let values = pick(k);
                // Align on the newest minute whatever the length.
                let skip = values.len().saturating_sub(MINUTES);
                let offset = MINUTES - (values.len() - skip);
                for (i, v) in values.iter().skip(skip).enumerate() {
                    total[offset + i] += v;
                }
            }
            total
        };
        let started = sum(|k| &k.started_per_minute);
        let finished = sum(|k| &k.finished_per_minute);
        let failed = sum(|k| &k.failed_per_minute);
        let max = started
            .iter()
            .chain(&finished)
            .chain(&failed)
            .copied()
            .max()
            .unwrap_or(0)
            .max(1);
        let points = |values: &[i64; MINUTES]| {
            let inner_w = f64::from(CHART_W - 2 * PAD_X);
            let inner_h = f64::from(CHART_H - 2 * PAD_Y);
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let x = f64::from(PAD_X) + inner_w * i as f64 / (MINUTES - 1) as f64;
                    let y = f64::from(PAD_Y) + inner_h * (1.0 - *v as f64 / max as f64);
                    format!("{x:.1},{y:.1}")
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        Self {
            width: CHART_W,
            height: CHART_H,
            max,
            started: points(&started),
            finished: points(&finished),
            failed: points(&failed),
        }
    }

    pub(crate) fn left(&self) -> u32 {
        PAD_X
    }

    pub(crate) fn right(&self) -> u32 {
        self.width - PAD_X
    }

    pub(crate) fn top(&self) -> u32 {
        PAD_Y
    }

    pub(crate) fn bottom(&self) -> u32 {
        self.height - PAD_Y
    }

    pub(crate) fn middle(&self) -> u32 {
        self.width / 2
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    nav: Nav,
    as_of: String,
    kinds: Vec<KindRow>,
    chart: Chart,
    failed: Vec<JobRow>,
}

pub(crate) async fn page(State(app): State<App>, session: Session) -> PageResult {
    let token = &session.tokens.access_token;
    let stats = app
        .backends
        .admin()
        .get_queue_stats(authed(GetQueueStatsRequest {}, token))
        .await?
        .into_inner();
    let failed = app
        .backends
        .admin()
        .list_jobs(authed(
            ListJobsRequest {
                page_size: 10,
                status: JobStatus::Failed as i32,
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner()
        .jobs;
    render(&OverviewPage {
        nav: Nav::new(&app, &session, "overview"),
        as_of: view::time(stats.as_of.as_ref()),
        kinds: stats.kinds.iter().map(KindRow::from).collect(),
        chart: Chart::new(&stats.kinds),
        failed: failed.iter().map(JobRow::from).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_sums_kinds_minute_by_minute() {
        let kind = |started: Vec<i64>| KindStats {
            started_per_minute: started,
            finished_per_minute: vec![0; 60],
            failed_per_minute: vec![0; 60],
            ..Default::default()
        };
        let mut a = vec![0; 60];
        a[59] = 3;
        let mut b = vec![0; 60];
        b[59] = 1;
        let chart = Chart::new(&[kind(a), kind(b)]);
        assert_eq!(chart.max, 4);
        let last = chart.started.split(' ').next_back().unwrap();
        assert_eq!(
            last,
            format!("{:.1},{:.1}", f64::from(CHART_W - PAD_X), f64::from(PAD_Y))
        );
        let first = chart.started.split(' ').next().unwrap();
        assert_eq!(
            first,
            format!("{:.1},{:.1}", f64::from(PAD_X), f64::from(CHART_H - PAD_Y))
        );
    }

    #[test]
    fn an_empty_hour_is_a_flat_line() {
        let chart = Chart::new(&[]);
        assert_eq!(chart.max, 1);
        assert_eq!(chart.failed.split(' ').count(), 60);
    }
}
