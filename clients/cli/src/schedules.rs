//! `keel schedules ...`: cron schedules on the jobs server (ScheduleService):
//! create, list, get, pause, resume, delete.

use anyhow::Result;
use clap::Subcommand;
use keel_proto::jobs::v1::schedule_service_client::ScheduleServiceClient;
use keel_proto::jobs::v1::{
    CreateScheduleRequest, DeleteScheduleRequest, GetScheduleRequest, ListSchedulesRequest,
    Schedule, UpdateScheduleRequest,
};
use serde_json::{Value, json};

use crate::output::{self, Table, fields, when};
use crate::{Cli, authed, connect, current_session, next_page_hint, parse_object};

#[derive(Subcommand)]
pub(crate) enum SchedulesCommand {
    /// Create a schedule: a job of KIND on each tick of CRON.
    Create {
        /// 1..=128 characters, unique among your schedules.
        name: String,
        /// 5-field cron (`30 2 * * *`) or a shorthand (`@hourly`, `@daily`, ...).
        cron: String,
        #[arg(long)]
        kind: String,
        /// IANA time zone the cron is read in (default UTC).
        #[arg(long, default_value = "")]
        timezone: String,
        /// JSON object: each job's payload.
        #[arg(long, default_value = "{}")]
        payload: String,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        #[arg(long, default_value_t = 0)]
        max_attempts: i32,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// Your schedules, newest first.
    List {
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[arg(long, default_value = "")]
        page_token: String,
    },
    Get {
        id: String,
    },
    /// Stop its ticks.
    Pause {
        id: String,
    },
    /// Start its ticks again from the next fire time (missed ones are skipped).
    Resume {
        id: String,
    },
    /// Delete it (the jobs it created are kept).
    Delete {
        id: String,
    },
}

pub(crate) async fn run(cli: &Cli, cmd: &SchedulesCommand) -> Result<()> {
    let format = cli.output;
    let s = current_session(cli).await?;
    let mut client = ScheduleServiceClient::new(connect(&cli.tls, &cli.jobs_url).await?);
    let set_paused = |id: &str, paused: bool| UpdateScheduleRequest {
        id: id.into(),
        paused: Some(paused),
        ..Default::default()
    };
    let schedule = match cmd {
        SchedulesCommand::Create {
            name,
            cron,
            kind,
            timezone,
            payload,
            priority,
            max_attempts,
            paused,
        } => {
            let req = CreateScheduleRequest {
                name: name.clone(),
                cron: cron.clone(),
                timezone: timezone.clone(),
                kind: kind.clone(),
                payload: Some(parse_object("--payload", payload)?),
                priority: *priority,
                max_attempts: *max_attempts,
                paused: *paused,
            };
            client
                .create_schedule(authed(&s, req)?)
                .await?
                .into_inner()
                .schedule
        }
        SchedulesCommand::List {
            page_size,
            page_token,
        } => {
            let resp = client
                .list_schedules(authed(
                    &s,
                    ListSchedulesRequest {
                        page_size: *page_size,
                        page_token: page_token.clone(),
                    },
                )?)
                .await?
                .into_inner();
            format.emit(
                || {
                    json!({
                        "schedules": resp.schedules.iter().map(schedule_json).collect::<Vec<_>>(),
                        "next_page_token": resp.next_page_token,
                    })
                },
                || schedules_table(&resp.schedules),
            );
            next_page_hint(format, &resp.next_page_token);
            return Ok(());
        }
        SchedulesCommand::Get { id } => {
            client
                .get_schedule(authed(&s, GetScheduleRequest { id: id.clone() })?)
                .await?
                .into_inner()
                .schedule
        }
        SchedulesCommand::Pause { id } => {
            client
                .update_schedule(authed(&s, set_paused(id, true))?)
                .await?
                .into_inner()
                .schedule
        }
        SchedulesCommand::Resume { id } => {
            client
                .update_schedule(authed(&s, set_paused(id, false))?)
                .await?
                .into_inner()
                .schedule
        }
        SchedulesCommand::Delete { id } => {
            client
                .delete_schedule(authed(&s, DeleteScheduleRequest { id: id.clone() })?)
                .await?;
            format.emit(|| json!({"deleted": id}), || format!("deleted {id}"));
            return Ok(());
        }
    };
    let schedule = schedule.unwrap_or_default();
    format.emit(|| schedule_json(&schedule), || schedule_fields(&schedule));
    Ok(())
}

fn state(s: &Schedule) -> &'static str {
    if s.paused { "paused" } else { "active" }
}

/// A schedule for `-o json` (proto field names).
pub(crate) fn schedule_json(s: &Schedule) -> Value {
    let time = |t: &Option<prost_types::Timestamp>| match when(t).as_str() {
        "-" => Value::Null,
        text => Value::String(text.into()),
    };
    json!({
        "id": s.id, "name": s.name, "cron": s.cron, "timezone": s.timezone, "kind": s.kind,
        "payload": output::object(&s.payload), "priority": s.priority,
        "max_attempts": s.max_attempts, "paused": s.paused,
        "next_run_at": time(&s.next_run_at), "last_run_at": time(&s.last_run_at),
        "last_job_id": s.last_job_id, "created_at": time(&s.created_at),
        "updated_at": time(&s.updated_at),
    })
}

fn schedules_table(schedules: &[Schedule]) -> String {
    let mut table = Table::new(&["ID", "NAME", "CRON", "TIMEZONE", "KIND", "STATE", "NEXT"]);
    for s in schedules {
        table.row(vec![
            s.id.clone(),
            s.name.clone(),
            s.cron.clone(),
            s.timezone.clone(),
            s.kind.clone(),
            state(s).into(),
            when(&s.next_run_at),
        ]);
    }
    table.render()
}

/// One schedule in full.
fn schedule_fields(s: &Schedule) -> String {
    fields(&[
        ("ID", s.id.clone()),
        ("NAME", s.name.clone()),
        ("CRON", s.cron.clone()),
        ("TIMEZONE", s.timezone.clone()),
        ("KIND", s.kind.clone()),
        ("PAYLOAD", output::compact(&s.payload)),
        ("PRIORITY", s.priority.to_string()),
        ("MAX ATTEMPTS", s.max_attempts.to_string()),
        ("STATE", state(s).into()),
        ("NEXT RUN", when(&s.next_run_at)),
        ("LAST RUN", when(&s.last_run_at)),
        ("LAST JOB", s.last_job_id.clone()),
        ("CREATED", when(&s.created_at)),
        ("UPDATED", when(&s.updated_at)),
    ])
}
