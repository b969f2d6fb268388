//! Cron rules in a time zone: parsing (5-field cron, `@hourly`-style
//! shorthands, an optional leading seconds field) and the next fire time,
//! daylight-saving changes included (croner and chrono-tz do the calendar).

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Offset, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// How many upcoming fire times [`Rule::shortest_interval`] looks at.
const INTERVAL_SAMPLES: usize = 100;
/// Wider than any clock change (a few hours at most).
const SHIFT_WINDOW: chrono::TimeDelta = chrono::TimeDelta::hours(4);
/// Most fire times walked near a clock change (8 h of a per-second schedule).
const MAX_WALK: usize = 8 * 3600 + 1;
/// Longest cron expression accepted.
const MAX_CRON_CHARS: usize = 256;

/// A parsed cron expression and the time zone it is read in.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    cron: Cron,
    tz: Tz,
}

/// Why a cron expression or time zone was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RuleError {
    Cron(String),
    Timezone(String),
}

impl Rule {
    /// Parses `cron` read in the IANA time zone `timezone` ("" means UTC).
    pub(crate) fn parse(cron: &str, timezone: &str) -> Result<Self, RuleError> {
        let tz = parse_timezone(timezone)?;
        if cron.trim().is_empty() {
            return Err(RuleError::Cron("must not be empty".into()));
        }
        if cron.chars().count() > MAX_CRON_CHARS {
            return Err(RuleError::Cron("at most 256 characters".into()));
        }
        let fields = cron.split_whitespace().count();
        if !cron.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(RuleError::Cron(format!(
                "must have 5 fields (minute hour day-of-month month day-of-week), \
                 or 6 with a leading seconds field; got {fields}"
            )));
        }
        // The one common shorthand croner does not know.
        let expanded = if cron.trim().eq_ignore_ascii_case("@midnight") {
            "@daily"
        } else {
            cron
        };
        let parsed = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expanded)
            .map_err(|e| RuleError::Cron(format!("not a valid cron expression ({e})")))?;
        let rule = Self { cron: parsed, tz };
        // A valid expression that never fires (e.g. "0 0 30 2 *").
        if rule.next_after(Utc::now()).is_none() {
            return Err(RuleError::Cron("never fires".into()));
        }
        Ok(rule)
    }

    /// The first fire time strictly after `t`.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Fire times are whole seconds; the search keeps `t`'s fraction.
        let t = t.with_nanosecond(0)?;
        let offset = |at: DateTime<Utc>| at.with_timezone(&self.tz).offset().fix();
        let (before, after) = (t - SHIFT_WINDOW, t + SHIFT_WINDOW);
        if offset(before) == offset(after) {
            let local = t.with_timezone(&self.tz);
            return self
                .cron
                .find_next_occurrence(&local, false)
                .ok()
                .map(|next| next.with_timezone(&Utc));
        }
        // Near a clock change: a search from `t`'s wall-clock time would miss
        // the second pass through a repeated hour, so walk the fire times
        // (which include it, for schedules that fire on both) from before it.
        self.cron
            .iter_after(before.with_timezone(&self.tz))
            .take(MAX_WALK)
            .map(|at| at.with_timezone(&Utc))
            .find(|at| *at > t)
    }

    /// The shortest gap between consecutive fire times among the next
    /// [`INTERVAL_SAMPLES`] after `from` (None when it fires once at most).
    pub(crate) fn shortest_interval(&self, from: DateTime<Utc>) -> Option<Duration> {
        let mut shortest: Option<Duration> = None;
        let mut previous = self.next_after(from)?;
        for _ in 1..INTERVAL_SAMPLES {
            let Some(next) = self.next_after(previous) else {
                break;
            };
            let gap = (next - previous).to_std().unwrap_or_default();
            shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
            previous = next;
        }
        shortest
    }
}

/// An IANA time zone name; "" means UTC.
pub(crate) fn parse_timezone(name: &str) -> Result<Tz, RuleError> {
    if name.is_empty() {
        return Ok(Tz::UTC);
    }
    Tz::from_str(name).map_err(|_| RuleError::Timezone(format!("unknown time zone {name:?}")))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn next(rule: &Rule, t: DateTime<Utc>) -> DateTime<Utc> {
        rule.next_after(t).expect("fires")
    }

    #[test]
    fn daily_local_time_follows_berlin_across_both_dst_changes() {
        let rule = Rule::parse("0 9 * * *", "Europe/Berlin").unwrap();
        // Winter (CET, UTC+1): 09:00 local is 08:00 UTC.
        assert_eq!(next(&rule, utc(2026, 3, 27, 12, 0)), utc(2026, 3, 28, 8, 0));
        // Clocks go forward on 2026-03-29: from then on 09:00 is 07:00 UTC.
        assert_eq!(next(&rule, utc(2026, 3, 28, 8, 0)), utc(2026, 3, 29, 7, 0));
        // Clocks go back on 2026-10-25: 09:00 is 08:00 UTC again.
        assert_eq!(
            next(&rule, utc(2026, 10, 24, 12, 0)),
            utc(2026, 10, 25, 8, 0)
        );
    }

    #[test]
    fn a_local_time_skipped_by_spring_forward_fires_right_after_the_gap() {
        // 2026-03-29 02:30 does not exist in Berlin (02:00 CET -> 03:00 CEST).
        let rule = Rule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let fired = next(&rule, utc(2026, 3, 28, 12, 0));
        // 03:00 CEST = 01:00 UTC: the same day, once.
        assert_eq!(fired, utc(2026, 3, 29, 1, 0));
        // The day after, the usual 02:30 CEST (00:30 UTC).
        assert_eq!(next(&rule, fired), utc(2026, 3, 30, 0, 30));
    }

    #[test]
    fn a_local_time_repeated_by_fall_back_fires_once() {
        // 2026-10-25 02:30 happens twice in Berlin (CEST, then CET).
        let rule = Rule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let first = next(&rule, utc(2026, 10, 24, 12, 0));
        // The first occurrence: 02:30 CEST = 00:30 UTC.
        assert_eq!(first, utc(2026, 10, 25, 0, 30));
        // Not again at 02:30 CET (01:30 UTC): next is the day after, 02:30 CET.
        assert_eq!(next(&rule, first), utc(2026, 10, 26, 1, 30));
    }

    #[test]
    fn hourly_steps_keep_real_hours_across_fall_back() {
        let rule = Rule::parse("@hourly", "Europe/Berlin").unwrap();
        // 00:00 UTC (02:00 CEST) then 01:00 UTC (02:00 CET): an hour apart.
        let a = next(&rule, utc(2026, 10, 24, 23, 30));
        let b = next(&rule, a);
        let c = next(&rule, b);
        assert_eq!(a, utc(2026, 10, 25, 0, 0));
        assert_eq!(b, utc(2026, 10, 25, 1, 0));
        assert_eq!(c, utc(2026, 10, 25, 2, 0));
    }

    #[test]
    fn shorthands_and_names_parse() {
        for ok in [
            "@hourly",
            "@daily",
            "@midnight",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "*/15 * * * *",
            "0 9 * * MON-FRI",
            "0 0 1 JAN *",
            "*/5 * * * * *",
        ] {
            Rule::parse(ok, "UTC").unwrap_or_else(|e| panic!("{ok}: {e:?}"));
        }
        let daily = Rule::parse("@daily", "").unwrap();
        assert_eq!(next(&daily, utc(2026, 1, 1, 12, 0)), utc(2026, 1, 2, 0, 0));
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        for bad in [
            "",
            "   ",
            "* * * *",
            "61 * * * *",
            "* 25 * * *",
            "* * * * * * *",
            "@sometimes",
            "a b c d e",
            "0 0 30 2 *",
        ] {
            assert!(
                matches!(Rule::parse(bad, "UTC"), Err(RuleError::Cron(_))),
                "{bad:?} should be refused"
            );
        }
        for bad in ["Mars/Olympus", "utc+1", "Europe/Berlin "] {
            assert!(
                matches!(Rule::parse("* * * * *", bad), Err(RuleError::Timezone(_))),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn shortest_interval_sees_the_tightest_gap() {
        let every_minute = Rule::parse("* * * * *", "UTC").unwrap();
        assert_eq!(
            every_minute.shortest_interval(utc(2026, 1, 1, 0, 0)),
            Some(Duration::from_secs(60))
        );
        let twice_an_hour = Rule::parse("0,5 * * * *", "UTC").unwrap();
        assert_eq!(
            twice_an_hour.shortest_interval(utc(2026, 1, 1, 0, 0)),
            Some(Duration::from_secs(300))
        );
        let seconds = Rule::parse("*/10 * * * * *", "UTC").unwrap();
        let mid_second = utc(2026, 1, 1, 0, 0) + chrono::TimeDelta::milliseconds(10_250);
        assert_eq!(
            seconds.next_after(mid_second),
            Some(utc(2026, 1, 1, 0, 0) + chrono::TimeDelta::seconds(20)),
            "fire times are whole seconds"
        );
        assert_eq!(
            seconds.shortest_interval(utc(2026, 1, 1, 0, 0)),
            Some(Duration::from_secs(10))
        );
    }
}
