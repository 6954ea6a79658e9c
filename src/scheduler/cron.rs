//! Pure time logic of the scheduler: cron expressions, time zones, daylight
//! saving time and the catch-up policy for ticks missed while no scheduler ran.
//!
//! Nothing here reads the clock or does I/O: every function takes the instants
//! it needs, so the behaviour is fully testable with fixed dates.
//!
//! # Expression syntax (POSIX / Vixie cron)
//!
//! * 5 fields `minute hour day-of-month month day-of-week`, or 6 fields with a
//!   LEADING seconds field `second minute hour day-of-month month day-of-week`.
//!   With 5 fields the second is 0.
//! * Each field is a comma-separated list of `*`, `N`, `A-B`, `*/S`, `A-B/S`
//!   and `A/S` (the last means `A-<field max>/S`, as in cronie and most modern
//!   crons). Ranges must not run backwards (`FRI-MON` is rejected, as in Vixie
//!   cron). Steps must be at least 1.
//! * Month names `JAN`..`DEC` and weekday names `SUN`..`SAT` (3 letters,
//!   case-insensitive) wherever a number is allowed in those two fields.
//! * Day-of-week: 0 and 7 are Sunday, 1 is Monday, ... 6 is Saturday. The
//!   wildcard range of the field is 0-7 (as in Vixie cron), so `5-7` is Friday
//!   to Sunday.
//! * Macros (case-insensitive, must be the whole expression): `@yearly` and
//!   `@annually` (`0 0 1 1 *`), `@monthly` (`0 0 1 * *`), `@weekly`
//!   (`0 0 * * 0`), `@daily` and `@midnight` (`0 0 * * *`), `@hourly`
//!   (`0 * * * *`). `@reboot` is not a time and is rejected.
//! * Not supported (rejected with an error): Quartz/croner extensions such as
//!   `?`, `L`, `W`, `#` and a year field.
//!
//! ## Day-of-month / day-of-week rule (Vixie cron)
//!
//! A field counts as *unrestricted* when its text starts with `*` (so `*` and
//! `*/2` both do). If either day field is unrestricted, a day must match BOTH
//! fields (the unrestricted one usually matches everything). If both are
//! restricted, a day matches when EITHER matches: `0 0 13 * FRI` runs on every
//! 13th and on every Friday, not only on Friday the 13th. `0 0 */10 * MON`
//! runs only on days 1, 11, 21, 31 that are also Mondays, because `*/10` starts
//! with `*` — exactly what Vixie cron (and cronie) do.
//!
//! # Time zones and DST
//!
//! The expression is matched against the wall clock of an IANA time zone; the
//! resulting instants are returned in UTC. The rule is:
//!
//! > Each local wall-clock time fires at most once, at its FIRST real instant.
//! > A local time that does not exist (spring-forward gap) fires at the first
//! > instant after the gap.
//!
//! Consequences:
//! * `30 2 * * *` in America/Toronto on 2026-03-08 (02:00-03:00 does not
//!   exist) fires once at 03:00 EDT = 07:00 UTC.
//! * Several gap times map to the same instant (`*/15 * * * *` has 02:00,
//!   02:15, 02:30, 02:45 in the gap, all mapping to 03:00 EDT, which is also
//!   the image of 03:00 itself): that instant is produced once.
//! * `30 1 * * *` on 2026-11-01 (01:00-02:00 happens twice) fires once, at
//!   01:30 EDT = 05:30 UTC. Every wall time of the repeated hour already fired
//!   on the first pass, so the second pass (01:00-01:59 EST) fires nothing,
//!   whatever the schedule: `*/30 * * * *` runs 01:00 EDT, 01:30 EDT, then
//!   02:00 EST.
//!
//! This deliberately differs from Vixie/ISC cron and croner, which keep
//! running wildcard (interval) jobs during the repeated hour: here every
//! schedule gets at most one run per wall-clock time, which is what a sync
//! pipeline wants (no doubled syncs), and the result is a pure function of the
//! expression, the zone and the instants, independent of when it is asked.
//!
//! # Catch-up
//!
//! See [`CatchUp`] and [`due_ticks`].

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta,
    TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

/// How far ahead (in local days) [`Schedule::next_after`] looks before giving
/// up and returning `None`.
///
/// Why 8 years and not less: `0 0 29 2 *` (Feb 29) can be 8 years apart across
/// a non-leap century year (2096 -> 2104). Why bounded at all: impossible
/// expressions such as `0 0 30 2 *` must terminate. The search walks days and
/// skips within a day by field, so the worst case is ~2,900 cheap day checks.
pub const SEARCH_HORIZON_DAYS: u64 = 366 * 8 + 2;

/// With [`CatchUp::Skip`], the latest tick still runs if `now` is at most this
/// long after it.
///
/// Why: a scheduler that is running normally polls every few seconds and is
/// never exactly on the tick; the grace makes "on time, give or take a poll
/// interval or a short restart" count as on time, while a tick missed for
/// longer (the service was down) is skipped.
pub const SKIP_GRACE: TimeDelta = TimeDelta::seconds(60);

/// Default bound for the plain string `"all"` (see [`CatchUp::from_str`]).
///
/// Why a bound at all: an every-minute pipeline whose scheduler was down for a
/// week must not enqueue ten thousand syncs.
pub const DEFAULT_CATCH_UP_MAX: usize = 100;

/// Why a schedule or a catch-up policy could not be parsed. The messages name
/// the field and the offending text so a config error is fixable from the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The expression is empty or only whitespace.
    #[error("empty cron expression")]
    Empty,
    /// Neither 5 nor 6 whitespace-separated fields.
    #[error(
        "expected 5 fields (minute hour day-of-month month day-of-week) \
         or 6 (with a leading second field), found {0}"
    )]
    FieldCount(usize),
    /// An `@name` that is not one of the supported macros.
    #[error(
        "unknown cron macro '{0}' (expected @yearly, @annually, @monthly, @weekly, \
         @daily, @midnight or @hourly)"
    )]
    UnknownMacro(String),
    /// One field is invalid, e.g. `minute field: 61 is out of range 0-59`.
    #[error("{field} field: {message}")]
    Field {
        /// `second`, `minute`, `hour`, `day-of-month`, `month` or `day-of-week`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The time zone is not an IANA name known to chrono-tz.
    #[error("unknown time zone '{0}' (expected an IANA name such as 'America/Toronto')")]
    UnknownTimeZone(String),
    /// A catch-up policy string that is not `skip`, `latest`, `all` or `all:N`.
    #[error(
        "unknown catch-up policy '{0}' (expected 'skip', 'latest', 'all' or 'all:N' with N >= 1)"
    )]
    UnknownCatchUp(String),
}

/// A parsed cron expression bound to a time zone.
///
/// Why the zone is part of the schedule: the same expression means different
/// instants in different zones and across DST, so every computation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    expression: String,
    fields: Fields,
    tz: Tz,
}

impl Schedule {
    /// Parses a cron expression (see the module docs for the syntax) and an
    /// IANA time zone name such as `America/Toronto` or `UTC`.
    pub fn parse(expr: &str, timezone: &str) -> Result<Schedule, ScheduleError> {
        let fields = Fields::parse(expr)?;
        let tz = timezone
            .trim()
            .parse::<Tz>()
            .map_err(|_| ScheduleError::UnknownTimeZone(timezone.to_string()))?;
        Ok(Schedule {
            expression: expr.trim().to_string(),
            fields,
            tz,
        })
    }

    /// First occurrence strictly after `after` (UTC), or `None` if there is
    /// none within [`SEARCH_HORIZON_DAYS`] (e.g. `0 0 30 2 *`).
    ///
    /// Occurrences are whole seconds. DST follows the module-level rule, so the
    /// results of repeated calls are strictly increasing and never repeat.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = self.wall_clock(after)?.date();
        let last_date = start
            .checked_add_days(Days::new(SEARCH_HORIZON_DAYS))
            .unwrap_or(NaiveDate::MAX);
        self.next_bounded(after, last_date)
    }

    /// All occurrences in `(from, to]`, in increasing order, at most `limit`
    /// (the earliest ones are kept).
    ///
    /// Why half-open: `from` is typically the last tick already handled, which
    /// must not be returned again, while a tick exactly at `to` (= now) is due.
    pub fn occurrences_between(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut cursor = from;
        while out.len() < limit {
            match self.next_in(cursor, to) {
                Some(t) => {
                    out.push(t);
                    cursor = t;
                }
                None => break,
            }
        }
        out
    }

    /// The time zone the expression is evaluated in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The expression as given (surrounding whitespace trimmed), for logs and
    /// for storing alongside the pipeline.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Wall-clock reading of `t` in the schedule's zone, truncated to seconds.
    fn wall_clock(&self, t: DateTime<Utc>) -> Option<NaiveDateTime> {
        t.with_timezone(&self.tz).naive_local().with_nanosecond(0)
    }

    /// First occurrence strictly after `after` whose local date is at most
    /// `last_date`.
    ///
    /// Correctness: `fire` (local time -> instant) is non-decreasing in local
    /// time, and every local time up to the wall reading of `after` fires at or
    /// before `after`. So scanning matching local times upward from that
    /// reading and returning the first whose instant is later than `after`
    /// gives the next occurrence; it is only ever later than the first
    /// candidate when `after` lies in the second pass of a repeated hour.
    fn next_bounded(&self, after: DateTime<Utc>, last_date: NaiveDate) -> Option<DateTime<Utc>> {
        let mut cursor = self.wall_clock(after)?;
        loop {
            let candidate = self.fields.next_local_match(cursor, last_date)?;
            let fire = self.fire_instant(candidate)?;
            if fire > after {
                return Some(fire);
            }
            cursor = candidate;
        }
    }

    /// First occurrence in `(after, until]`, scanning no further than needed.
    fn next_in(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if until <= after {
            return None;
        }
        // An instant <= `until` fires a local time at most one repeated-hour
        // length past the wall reading of `until`; two days is ample margin.
        let last_date = self
            .wall_clock(until)?
            .date()
            .checked_add_days(Days::new(2))
            .unwrap_or(NaiveDate::MAX);
        self.next_bounded(after, last_date).filter(|t| *t <= until)
    }

    /// Latest occurrence in `(from, to]`.
    ///
    /// Searches windows ending at `to` that double in size (1 s, 2 s, 4 s, ...)
    /// and then walks forward inside the first window that holds a tick, so it
    /// reuses the forward search (one source of truth for DST) and costs about
    /// log2(distance to the tick) bounded scans, not one step per missed tick.
    fn latest_in(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if to <= from {
            return None;
        }
        let mut window = TimeDelta::seconds(1);
        loop {
            let start = to.checked_sub_signed(window).map_or(from, |s| s.max(from));
            if let Some(mut latest) = self.next_in(start, to) {
                while let Some(t) = self.next_in(latest, to) {
                    latest = t;
                }
                return Some(latest);
            }
            if start == from {
                return None;
            }
            window = window.checked_mul(2).unwrap_or(TimeDelta::MAX);
        }
    }

    /// The instant at which the local wall time `local` fires: its earliest
    /// instant if it exists (once or twice), else the first instant after the
    /// gap that swallowed it.
    fn fire_instant(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
            LocalResult::None => self.gap_end(local),
        }
    }

    /// First instant whose wall reading is later than the nonexistent `local`,
    /// i.e. the instant the clock jumped over it.
    ///
    /// Why a bisection: chrono-tz does not expose transition instants. Every
    /// instant whose wall reading is near `local` lies within one day of
    /// `local` read as UTC (offsets are under 24 h), and the wall reading is
    /// monotonic around a gap, so 18 bisection steps over whole seconds find
    /// the transition exactly, whatever the gap's size (even a skipped day).
    fn gap_end(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        let wall = local.and_utc().timestamp();
        let day = 86_400;
        let (mut lo, mut hi) = (wall - day, wall + day);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let reading = DateTime::from_timestamp(mid, 0)?
                .with_timezone(&self.tz)
                .naive_local();
            if reading > local {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        DateTime::from_timestamp(hi, 0)
    }
}

/// Catch-up policy for ticks missed while no scheduler was running.
///
/// Parsed from config strings (`FromStr`, case-insensitive): `"skip"`,
/// `"latest"`, `"all"` (= `All { max: DEFAULT_CATCH_UP_MAX }`) or `"all:N"`.
/// `Display` writes the same form back, and `TryFrom<String>` / `Into<String>`
/// make it deserialize from the config's string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum CatchUp {
    /// Run nothing that was missed: only the latest tick, and only if it is at
    /// most [`SKIP_GRACE`] old (i.e. it is "now", not a missed one).
    Skip,
    /// Run exactly one tick, the most recent one, however old.
    Latest,
    /// Run every missed tick, oldest first; if there are more than `max`, only
    /// the `max` most recent ones (the newest data matters most for a sync).
    /// A `max` of 0 is treated as 1 so a misconfiguration never silently stops
    /// a pipeline (the string form rejects `all:0`).
    All {
        /// Upper bound on the number of ticks returned.
        max: usize,
    },
}

impl FromStr for CatchUp {
    type Err = ScheduleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || ScheduleError::UnknownCatchUp(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "skip" => Ok(CatchUp::Skip),
            "latest" => Ok(CatchUp::Latest),
            "all" => Ok(CatchUp::All {
                max: DEFAULT_CATCH_UP_MAX,
            }),
            other => {
                let max = other
                    .strip_prefix("all:")
                    .and_then(|n| n.trim().parse::<usize>().ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(unknown)?;
                Ok(CatchUp::All { max })
            }
        }
    }
}

impl fmt::Display for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CatchUp::Skip => f.write_str("skip"),
            CatchUp::Latest => f.write_str("latest"),
            CatchUp::All { max } => write!(f, "all:{max}"),
        }
    }
}

impl TryFrom<String> for CatchUp {
    type Error = ScheduleError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CatchUp> for String {
    fn from(policy: CatchUp) -> String {
        policy.to_string()
    }
}

/// Which ticks are due now, given the last tick already enqueued (or the time
/// the pipeline was first seen) and `now`.
///
/// The candidate ticks are the occurrences in `(last_enqueued, now]`; the
/// latest of them is "the current tick". Returned oldest first, never more
/// than the policy allows:
/// * [`CatchUp::Skip`]: the current tick if `now - tick <= SKIP_GRACE`, else
///   nothing.
/// * [`CatchUp::Latest`]: the current tick.
/// * [`CatchUp::All`]: every candidate, keeping the `max` most recent.
///
/// The caller should persist the greatest returned tick as the new
/// `last_enqueued`; when nothing is returned, keeping the old value is fine
/// (stale ticks stay out of grace, the next tick becomes current). The work
/// grows with the logarithm of the time since the latest tick (times `max` for
/// `All`), not with the number of missed ticks, so a long outage of an
/// every-minute pipeline is cheap.
pub fn due_ticks(
    schedule: &Schedule,
    last_enqueued: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: &CatchUp,
) -> Vec<DateTime<Utc>> {
    let Some(current) = schedule.latest_in(last_enqueued, now) else {
        return Vec::new();
    };
    match *policy {
        CatchUp::Skip => {
            if now - current <= SKIP_GRACE {
                vec![current]
            } else {
                Vec::new()
            }
        }
        CatchUp::Latest => vec![current],
        CatchUp::All { max } => {
            let max = max.max(1);
            let mut ticks = vec![current];
            while ticks.len() < max {
                let before = ticks[ticks.len() - 1] - TimeDelta::nanoseconds(1);
                match schedule.latest_in(last_enqueued, before) {
                    Some(t) => ticks.push(t),
                    None => break,
                }
            }
            ticks.reverse();
            ticks
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing and local-time matching.

/// A set of small integers (0..64) as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bits(u64);

impl Bits {
    fn contains(self, v: u32) -> bool {
        v < 64 && (self.0 >> v) & 1 == 1
    }

    /// Smallest member that is `>= from`.
    fn next_from(self, from: u32) -> Option<u32> {
        if from >= 64 {
            return None;
        }
        let rest = self.0 >> from;
        (rest != 0).then(|| from + rest.trailing_zeros())
    }
}

/// Static description of one field: its name in messages, its numeric range
/// and its optional names (`names[i]` stands for `name_base + i`).
struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    name_base: u32,
}

const SECOND: FieldSpec = FieldSpec {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    name_base: 0,
};
const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    name_base: 0,
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    name_base: 0,
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    name_base: 0,
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    name_base: 1,
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    name_base: 0,
};

impl FieldSpec {
    fn error(&self, message: String) -> ScheduleError {
        ScheduleError::Field {
            field: self.name,
            message,
        }
    }

    /// Parses one field (a comma-separated list) into its set of values.
    fn parse(&self, text: &str) -> Result<Bits, ScheduleError> {
        let mut bits = 0u64;
        for item in text.split(',') {
            if item.is_empty() {
                return Err(self.error(format!("empty list element in '{text}'")));
            }
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => (range, Some(self.parse_step(step)?)),
                None => (item, None),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                if a.is_empty() || b.is_empty() {
                    return Err(self.error(format!("invalid range '{range}'")));
                }
                let (a, b) = (self.parse_value(a)?, self.parse_value(b)?);
                if a > b {
                    return Err(
                        self.error(format!("range '{range}' runs backwards ({a} is after {b})"))
                    );
                }
                (a, b)
            } else {
                let v = self.parse_value(range)?;
                // `A/S` means `A-max/S`.
                (v, if step.is_some() { self.max } else { v })
            };
            let step = step.unwrap_or(1);
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok(Bits(bits))
    }

    fn parse_step(&self, text: &str) -> Result<u32, ScheduleError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error(format!("invalid step '{text}'")));
        }
        match text.parse::<u32>() {
            Ok(0) => Err(self.error("step must be at least 1, got 0".to_string())),
            Ok(step) if step <= self.max => Ok(step),
            _ => Err(self.error(format!("step {text} is out of range 1-{}", self.max))),
        }
    }

    fn parse_value(&self, text: &str) -> Result<u32, ScheduleError> {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return match text.parse::<u32>() {
                Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
                _ => Err(self.error(format!("{text} is out of range {}-{}", self.min, self.max))),
            };
        }
        if let Some(i) = self
            .names
            .iter()
            .position(|name| name.eq_ignore_ascii_case(text))
        {
            return Ok(self.name_base + i as u32);
        }
        let expected = match (self.names.first(), self.names.last()) {
            (Some(first), Some(last)) => format!(
                "a number {}-{} or a name {first}-{last}",
                self.min, self.max
            ),
            _ => format!("a number {}-{}", self.min, self.max),
        };
        Err(self.error(format!("invalid value '{text}' (expected {expected})")))
    }
}

/// The parsed fields of an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields {
    seconds: Bits,
    minutes: Bits,
    hours: Bits,
    days_of_month: Bits,
    months: Bits,
    /// 0 = Sunday .. 6 = Saturday (7 is folded into 0 at parse time).
    days_of_week: Bits,
    /// The day-of-month text starts with `*` (Vixie's DOM_STAR).
    dom_star: bool,
    /// The day-of-week text starts with `*` (Vixie's DOW_STAR).
    dow_star: bool,
}

impl Fields {
    fn parse(expr: &str) -> Result<Fields, ScheduleError> {
        let expr = expr.trim();
        if expr.is_empty() {
            return Err(ScheduleError::Empty);
        }
        if expr.starts_with('@') {
            let expansion = match expr.to_ascii_lowercase().as_str() {
                "@yearly" | "@annually" => "0 0 1 1 *",
                "@monthly" => "0 0 1 * *",
                "@weekly" => "0 0 * * 0",
                "@daily" | "@midnight" => "0 0 * * *",
                "@hourly" => "0 * * * *",
                _ => return Err(ScheduleError::UnknownMacro(expr.to_string())),
            };
            return Fields::parse(expansion);
        }
        let parts: Vec<&str> = expr.split_whitespace().collect();
        let (second, rest) = match parts.len() {
            5 => ("0", &parts[..]),
            6 => (parts[0], &parts[1..]),
            n => return Err(ScheduleError::FieldCount(n)),
        };
        let (dom, dow) = (rest[2], rest[4]);
        let mut days_of_week = DAY_OF_WEEK.parse(dow)?;
        if days_of_week.contains(7) {
            days_of_week = Bits((days_of_week.0 | 1) & !(1 << 7));
        }
        Ok(Fields {
            seconds: SECOND.parse(second)?,
            minutes: MINUTE.parse(rest[0])?,
            hours: HOUR.parse(rest[1])?,
            days_of_month: DAY_OF_MONTH.parse(dom)?,
            months: MONTH.parse(rest[3])?,
            days_of_week,
            dom_star: dom.starts_with('*'),
            dow_star: dow.starts_with('*'),
        })
    }

    /// Whether the date matches month, day-of-month and day-of-week, with the
    /// Vixie OR/AND rule described in the module docs.
    fn day_matches(&self, date: NaiveDate) -> bool {
        if !self.months.contains(date.month()) {
            return false;
        }
        let dom = self.days_of_month.contains(date.day());
        let dow = self
            .days_of_week
            .contains(date.weekday().num_days_from_sunday());
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// Earliest matching time of day at or after `from`.
    fn first_time_from(&self, from: NaiveTime) -> Option<NaiveTime> {
        let (h0, m0, s0) = (from.hour(), from.minute(), from.second());
        let mut hour = self.hours.next_from(h0)?;
        loop {
            let mut minute = self.minutes.next_from(if hour == h0 { m0 } else { 0 });
            while let Some(m) = minute {
                let second_from = if hour == h0 && m == m0 { s0 } else { 0 };
                if let Some(s) = self.seconds.next_from(second_from) {
                    return NaiveTime::from_hms_opt(hour, m, s);
                }
                minute = self.minutes.next_from(m + 1);
            }
            hour = self.hours.next_from(hour + 1)?;
        }
    }

    /// Earliest matching local wall time strictly after `after` (a whole
    /// second) whose date is at most `last_date`. Walks days, skipping
    /// non-matching hours/minutes/seconds inside a day by bit search.
    fn next_local_match(
        &self,
        after: NaiveDateTime,
        last_date: NaiveDate,
    ) -> Option<NaiveDateTime> {
        let start = after.checked_add_signed(TimeDelta::seconds(1))?;
        let mut date = start.date();
        let mut from = start.time();
        while date <= last_date {
            if self.day_matches(date)
                && let Some(time) = self.first_time_from(from)
            {
                return Some(date.and_time(time));
            }
            date = date.succ_opt()?;
            from = NaiveTime::MIN;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse()
            .unwrap_or_else(|e| panic!("bad test instant {s}: {e}"))
    }

    fn sched(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr} in {tz}: {e}"))
    }

    fn iso(ts: &[DateTime<Utc>]) -> Vec<String> {
        ts.iter()
            .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect()
    }

    /// The first `n` occurrences after `after`, via repeated `next_after`.
    fn next_n(s: &Schedule, after: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor = utc(after);
        for _ in 0..n {
            match s.next_after(cursor) {
                Some(t) => {
                    out.push(t);
                    cursor = t;
                }
                None => break,
            }
        }
        iso(&out)
    }

    fn parse_err(expr: &str) -> String {
        match Schedule::parse(expr, "UTC") {
            Ok(_) => panic!("{expr:?} should not parse"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn expression_semantics_table() {
        // 2026-01-01 is a Thursday; all in UTC, after 2026-01-01T00:00:00Z.
        let sun = ["2026-01-04T12:00:00Z", "2026-01-11T12:00:00Z"];
        let mon = ["2026-01-05T12:00:00Z", "2026-01-12T12:00:00Z"];
        let cases: &[(&str, &[&str])] = &[
            // Weekday numbering: 0, 7, SUN (any case) are Sunday; 1 is Monday.
            ("0 12 * * 0", &sun),
            ("0 12 * * 7", &sun),
            ("0 12 * * SUN", &sun),
            ("0 12 * * sun", &sun),
            ("0 12 * * Sun", &sun),
            ("0 12 * * 1", &mon),
            ("0 12 * * mon", &mon),
            (
                "0 12 * * 6",
                &["2026-01-03T12:00:00Z", "2026-01-10T12:00:00Z"],
            ),
            (
                "0 12 * * 5-7",
                &[
                    "2026-01-02T12:00:00Z",
                    "2026-01-03T12:00:00Z",
                    "2026-01-04T12:00:00Z",
                    "2026-01-09T12:00:00Z",
                ],
            ),
            (
                "0 12 * * MON-FRI",
                &[
                    "2026-01-01T12:00:00Z",
                    "2026-01-02T12:00:00Z",
                    "2026-01-05T12:00:00Z",
                ],
            ),
            // Month names, case-insensitive, in lists and ranges.
            (
                "0 0 1 jan,Jul *",
                &["2026-07-01T00:00:00Z", "2027-01-01T00:00:00Z"],
            ),
            (
                "0 0 1 JAN-MAR *",
                &[
                    "2026-02-01T00:00:00Z",
                    "2026-03-01T00:00:00Z",
                    "2027-01-01T00:00:00Z",
                ],
            ),
            // Steps.
            (
                "*/20 * * * *",
                &[
                    "2026-01-01T00:20:00Z",
                    "2026-01-01T00:40:00Z",
                    "2026-01-01T01:00:00Z",
                ],
            ),
            (
                "1-10/3 * * * *",
                &[
                    "2026-01-01T00:01:00Z",
                    "2026-01-01T00:04:00Z",
                    "2026-01-01T00:07:00Z",
                    "2026-01-01T00:10:00Z",
                    "2026-01-01T01:01:00Z",
                ],
            ),
            (
                "5/20 * * * *",
                &[
                    "2026-01-01T00:05:00Z",
                    "2026-01-01T00:25:00Z",
                    "2026-01-01T00:45:00Z",
                    "2026-01-01T01:05:00Z",
                ],
            ),
            (
                "0 */6 * * *",
                &[
                    "2026-01-01T06:00:00Z",
                    "2026-01-01T12:00:00Z",
                    "2026-01-01T18:00:00Z",
                    "2026-01-02T00:00:00Z",
                ],
            ),
            // Ranges and lists.
            (
                "0 9-11 * * *",
                &[
                    "2026-01-01T09:00:00Z",
                    "2026-01-01T10:00:00Z",
                    "2026-01-01T11:00:00Z",
                    "2026-01-02T09:00:00Z",
                ],
            ),
            (
                "0,30 8,20 * * *",
                &[
                    "2026-01-01T08:00:00Z",
                    "2026-01-01T08:30:00Z",
                    "2026-01-01T20:00:00Z",
                    "2026-01-01T20:30:00Z",
                    "2026-01-02T08:00:00Z",
                ],
            ),
            (
                "0 1,5-6,*/12 * * *",
                &[
                    "2026-01-01T01:00:00Z",
                    "2026-01-01T05:00:00Z",
                    "2026-01-01T06:00:00Z",
                    "2026-01-01T12:00:00Z",
                    "2026-01-02T00:00:00Z",
                ],
            ),
            // Macros.
            ("@hourly", &["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"]),
            ("@daily", &["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"]),
            ("@DAILY", &["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"]),
            (
                "@midnight",
                &["2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"],
            ),
            ("@weekly", &["2026-01-04T00:00:00Z", "2026-01-11T00:00:00Z"]),
            (
                "@monthly",
                &["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"],
            ),
            ("@yearly", &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"]),
            (
                "@annually",
                &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
            ),
            // 5 vs 6 fields: the 6th field is a LEADING seconds field.
            (
                "30 9 * * *",
                &["2026-01-01T09:30:00Z", "2026-01-02T09:30:00Z"],
            ),
            (
                "0 30 9 * * *",
                &["2026-01-01T09:30:00Z", "2026-01-02T09:30:00Z"],
            ),
            (
                "30 * * * * *",
                &["2026-01-01T00:00:30Z", "2026-01-01T00:01:30Z"],
            ),
            (
                "*/15 * * * * *",
                &[
                    "2026-01-01T00:00:15Z",
                    "2026-01-01T00:00:30Z",
                    "2026-01-01T00:00:45Z",
                    "2026-01-01T00:01:00Z",
                ],
            ),
            // dom/dow: both restricted -> OR (13th or any Friday).
            (
                "0 0 13 * FRI",
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-09T00:00:00Z",
                    "2026-01-13T00:00:00Z",
                    "2026-01-16T00:00:00Z",
                ],
            ),
            (
                "0 0 1-7 * MON",
                &[
                    "2026-01-02T00:00:00Z",
                    "2026-01-03T00:00:00Z",
                    "2026-01-04T00:00:00Z",
                    "2026-01-05T00:00:00Z",
                    "2026-01-06T00:00:00Z",
                    "2026-01-07T00:00:00Z",
                    "2026-01-12T00:00:00Z",
                ],
            ),
            // Only one restricted -> only that one counts.
            (
                "0 0 13 * *",
                &["2026-01-13T00:00:00Z", "2026-02-13T00:00:00Z"],
            ),
            (
                "0 0 * * FRI",
                &["2026-01-02T00:00:00Z", "2026-01-09T00:00:00Z"],
            ),
            // Vixie: a field starting with `*` (even `*/10`) is unrestricted,
            // so this is AND: days 1, 11, 21, 31 that are Mondays.
            ("0 0 */10 * MON", &["2026-05-11T00:00:00Z"]),
            // Leap day and impossible dates.
            (
                "0 0 29 2 *",
                &["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"],
            ),
            ("0 0 30 2 *", &[]),
            ("0 0 31 4,6,9,11 *", &[]),
        ];
        for (expr, expected) in cases {
            let s = sched(expr, "UTC");
            assert_eq!(
                next_n(&s, "2026-01-01T00:00:00Z", expected.len().max(1)),
                *expected,
                "expression {expr:?}"
            );
        }
    }

    #[test]
    fn leap_day_across_a_non_leap_century_is_within_the_horizon() {
        let s = sched("0 0 29 2 *", "UTC");
        assert_eq!(
            next_n(&s, "2097-01-01T00:00:00Z", 1),
            ["2104-02-29T00:00:00Z"]
        );
    }

    #[test]
    fn impossible_expression_terminates_with_none() {
        let s = sched("0 0 30 2 *", "America/Toronto");
        assert_eq!(s.next_after(utc("2026-01-01T00:00:00Z")), None);
        assert!(
            s.occurrences_between(utc("2000-01-01T00:00:00Z"), utc("2030-01-01T00:00:00Z"), 10)
                .is_empty()
        );
    }

    #[test]
    fn invalid_expressions_name_the_problem() {
        let cases = [
            ("61 * * * *", "minute field: 61 is out of range 0-59"),
            ("* 24 * * *", "hour field: 24 is out of range 0-23"),
            ("* * 0 * *", "day-of-month field: 0 is out of range 1-31"),
            ("* * 32 * *", "day-of-month field: 32 is out of range 1-31"),
            ("* * * 13 *", "month field: 13 is out of range 1-12"),
            ("* * * * 8", "day-of-week field: 8 is out of range 0-7"),
            ("60 * * * * *", "second field: 60 is out of range 0-59"),
            (
                "99999999999 * * * *",
                "minute field: 99999999999 is out of range 0-59",
            ),
            ("", "empty cron expression"),
            ("   ", "empty cron expression"),
            (
                "* * * *",
                "expected 5 fields (minute hour day-of-month month day-of-week) \
                 or 6 (with a leading second field), found 4",
            ),
            (
                "0 0 0 * * * 2026",
                "expected 5 fields (minute hour day-of-month month day-of-week) \
                 or 6 (with a leading second field), found 7",
            ),
            (
                "*/0 * * * *",
                "minute field: step must be at least 1, got 0",
            ),
            ("*/61 * * * *", "minute field: step 61 is out of range 1-59"),
            ("*/x * * * *", "minute field: invalid step 'x'"),
            (
                "10-5 * * * *",
                "minute field: range '10-5' runs backwards (10 is after 5)",
            ),
            (
                "0 0 * * FRI-MON",
                "day-of-week field: range 'FRI-MON' runs backwards (5 is after 1)",
            ),
            ("-5 * * * *", "minute field: invalid range '-5'"),
            ("1,,2 * * * *", "minute field: empty list element in '1,,2'"),
            (
                "a * * * *",
                "minute field: invalid value 'a' (expected a number 0-59)",
            ),
            (
                "MON * * * *",
                "minute field: invalid value 'MON' (expected a number 0-59)",
            ),
            (
                "* * * * FOO",
                "day-of-week field: invalid value 'FOO' (expected a number 0-7 or a name SUN-SAT)",
            ),
            (
                "* * * JANUARY *",
                "month field: invalid value 'JANUARY' (expected a number 1-12 or a name JAN-DEC)",
            ),
            (
                "0 0 L * *",
                "day-of-month field: invalid value 'L' (expected a number 1-31)",
            ),
            (
                "0 0 ? * MON",
                "day-of-month field: invalid value '?' (expected a number 1-31)",
            ),
            (
                "0 0 * * 1#2",
                "day-of-week field: invalid value '1#2' (expected a number 0-7 or a name SUN-SAT)",
            ),
            (
                "@reboot",
                "unknown cron macro '@reboot' (expected @yearly, @annually, @monthly, \
                 @weekly, @daily, @midnight or @hourly)",
            ),
            (
                "@daily *",
                "unknown cron macro '@daily *' (expected @yearly, @annually, @monthly, \
                 @weekly, @daily, @midnight or @hourly)",
            ),
        ];
        for (expr, message) in cases {
            assert_eq!(parse_err(expr), message, "expression {expr:?}");
        }
        assert_eq!(
            Schedule::parse("61 * * * *", "UTC").unwrap_err(),
            ScheduleError::Field {
                field: "minute",
                message: "61 is out of range 0-59".to_string()
            }
        );
    }

    #[test]
    fn unknown_time_zone_is_named() {
        let err = Schedule::parse("0 1 * * *", "Mars/Olympus_Mons").unwrap_err();
        assert_eq!(
            err,
            ScheduleError::UnknownTimeZone("Mars/Olympus_Mons".to_string())
        );
        assert_eq!(
            err.to_string(),
            "unknown time zone 'Mars/Olympus_Mons' (expected an IANA name such as 'America/Toronto')"
        );
        assert!(Schedule::parse("0 1 * * *", "").is_err());
        // Expression errors are reported before zone errors.
        assert_eq!(
            parse_err("61 * * * *"),
            "minute field: 61 is out of range 0-59"
        );
    }

    #[test]
    fn accessors_return_what_was_parsed() {
        let s = sched("  0 1 * * *  ", "America/Toronto");
        assert_eq!(s.expression(), "0 1 * * *");
        assert_eq!(s.timezone(), chrono_tz::America::Toronto);
        assert_eq!(sched("@daily", "UTC").timezone(), chrono_tz::UTC);
    }

    #[test]
    fn occurrences_between_is_half_open_and_limited() {
        let s = sched("0 * * * *", "UTC");
        let all =
            s.occurrences_between(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T03:00:00Z"), 10);
        assert_eq!(
            iso(&all),
            [
                "2026-01-01T01:00:00Z",
                "2026-01-01T02:00:00Z",
                "2026-01-01T03:00:00Z"
            ]
        );
        let two =
            s.occurrences_between(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T03:00:00Z"), 2);
        assert_eq!(iso(&two), ["2026-01-01T01:00:00Z", "2026-01-01T02:00:00Z"]);
        assert!(
            s.occurrences_between(utc("2026-01-01T03:00:00Z"), utc("2026-01-01T01:00:00Z"), 10)
                .is_empty()
        );
        assert!(
            s.occurrences_between(utc("2026-01-01T00:00:00Z"), utc("2026-01-01T03:00:00Z"), 0)
                .is_empty()
        );
        // Sub-second `after` is handled: next is still strictly after.
        let after = utc("2026-01-01T00:59:59.999Z");
        assert_eq!(s.next_after(after), Some(utc("2026-01-01T01:00:00Z")));
        assert_eq!(
            s.next_after(utc("2026-01-01T01:00:00.001Z")),
            Some(utc("2026-01-01T02:00:00Z"))
        );
    }

    const TORONTO: &str = "America/Toronto";

    /// Occurrences of `expr` in Toronto whose instant falls in (from, to].
    fn toronto(expr: &str, from: &str, to: &str) -> Vec<String> {
        iso(&sched(expr, TORONTO).occurrences_between(utc(from), utc(to), 1000))
    }

    #[test]
    fn dst_gap_daily_time_inside_the_gap_fires_once_after_it() {
        // 2026-03-08: 02:00 EST -> 03:00 EDT (07:00 UTC).
        assert_eq!(
            toronto("30 2 * * *", "2026-03-07T00:00:00Z", "2026-03-10T00:00:00Z"),
            [
                "2026-03-07T07:30:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-09T06:30:00Z"
            ]
        );
        assert_eq!(
            toronto("0 2 * * *", "2026-03-07T00:00:00Z", "2026-03-10T00:00:00Z"),
            [
                "2026-03-07T07:00:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-09T06:00:00Z"
            ]
        );
        // Just before / exactly at the end of the gap.
        let s = sched("30 2 * * *", TORONTO);
        assert_eq!(
            s.next_after(utc("2026-03-08T06:59:59Z")),
            Some(utc("2026-03-08T07:00:00Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-03-08T07:00:00Z")),
            Some(utc("2026-03-09T06:30:00Z"))
        );
    }

    #[test]
    fn dst_fold_daily_time_inside_the_fold_fires_once_at_first_occurrence() {
        // 2026-11-01: 02:00 EDT -> 01:00 EST (06:00 UTC); 01:30 happens at 05:30 and 06:30 UTC.
        assert_eq!(
            toronto("30 1 * * *", "2026-10-31T00:00:00Z", "2026-11-03T00:00:00Z"),
            [
                "2026-10-31T05:30:00Z",
                "2026-11-01T05:30:00Z",
                "2026-11-02T06:30:00Z"
            ]
        );
        let s = sched("30 1 * * *", TORONTO);
        assert_eq!(
            s.next_after(utc("2026-11-01T05:30:00Z")),
            Some(utc("2026-11-02T06:30:00Z"))
        );
        // From inside the second pass, the repeated 01:30 is not produced again.
        assert_eq!(
            s.next_after(utc("2026-11-01T06:10:00Z")),
            Some(utc("2026-11-02T06:30:00Z"))
        );
    }

    #[test]
    fn dst_one_am_runs_exactly_once_on_both_transition_days() {
        assert_eq!(
            toronto("0 1 * * *", "2026-03-07T00:00:00Z", "2026-03-10T00:00:00Z"),
            // 01:00 EST exists on the gap day (the gap is 02:00-03:00).
            [
                "2026-03-07T06:00:00Z",
                "2026-03-08T06:00:00Z",
                "2026-03-09T05:00:00Z"
            ]
        );
        assert_eq!(
            toronto("0 1 * * *", "2026-10-31T00:00:00Z", "2026-11-03T00:00:00Z"),
            // 01:00 EDT (first pass) only, not 01:00 EST = 06:00 UTC.
            [
                "2026-10-31T05:00:00Z",
                "2026-11-01T05:00:00Z",
                "2026-11-02T06:00:00Z"
            ]
        );
    }

    #[test]
    fn dst_every_30_minutes_across_the_gap_deduplicates() {
        // 01:30 EST, then 02:00 and 02:30 (gap) and 03:00 all map to 07:00 UTC: once.
        assert_eq!(
            toronto(
                "*/30 * * * *",
                "2026-03-08T06:00:00Z",
                "2026-03-08T08:00:00Z"
            ),
            [
                "2026-03-08T06:30:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T07:30:00Z",
                "2026-03-08T08:00:00Z"
            ]
        );
        assert_eq!(
            toronto(
                "*/15 * * * *",
                "2026-03-08T06:30:00Z",
                "2026-03-08T07:30:00Z"
            ),
            [
                "2026-03-08T06:45:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T07:15:00Z",
                "2026-03-08T07:30:00Z"
            ]
        );
        let s = sched("*/15 * * * *", TORONTO);
        assert_eq!(
            s.next_after(utc("2026-03-08T06:50:00Z")),
            Some(utc("2026-03-08T07:00:00Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-03-08T07:00:00Z")),
            Some(utc("2026-03-08T07:15:00Z"))
        );
    }

    #[test]
    fn dst_every_30_minutes_across_the_fold_skips_the_second_pass() {
        assert_eq!(
            toronto(
                "*/30 * * * *",
                "2026-11-01T04:00:00Z",
                "2026-11-01T08:00:00Z"
            ),
            [
                "2026-11-01T04:30:00Z", // 00:30 EDT
                "2026-11-01T05:00:00Z", // 01:00 EDT
                "2026-11-01T05:30:00Z", // 01:30 EDT
                // 01:00 EST (06:00Z) and 01:30 EST (06:30Z) already fired.
                "2026-11-01T07:00:00Z", // 02:00 EST
                "2026-11-01T07:30:00Z",
                "2026-11-01T08:00:00Z",
            ]
        );
        let s = sched("*/30 * * * *", TORONTO);
        assert_eq!(
            s.next_after(utc("2026-11-01T06:10:00Z")),
            Some(utc("2026-11-01T07:00:00Z"))
        );
        // Every second, from inside the second pass: the next one is 02:00:00 EST.
        let s = sched("* * * * * *", TORONTO);
        assert_eq!(
            s.next_after(utc("2026-11-01T06:00:00Z")),
            Some(utc("2026-11-01T07:00:00Z"))
        );
        assert_eq!(
            s.next_after(utc("2026-11-01T05:59:58Z")),
            Some(utc("2026-11-01T05:59:59Z"))
        );
    }

    #[test]
    fn dst_one_run_per_local_day_on_transition_days() {
        for expr in [
            "30 2 * * *",
            "30 1 * * *",
            "0 1 * * *",
            "0 2 * * *",
            "59 1 * * *",
        ] {
            let s = sched(expr, TORONTO);
            for (from, to) in [
                ("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"), // local day 2026-03-08
                ("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z"), // local day 2026-11-01
            ] {
                let runs = s.occurrences_between(utc(from), utc(to), 10);
                assert_eq!(runs.len(), 1, "{expr} between {from} and {to}: {runs:?}");
            }
        }
    }

    #[test]
    fn gap_end_handles_a_skipped_whole_day() {
        // Pacific/Apia skipped 2011-12-30 entirely (UTC-10 -> UTC+14 at 10:00 UTC on the 30th).
        let s = sched("0 12 * * *", "Pacific/Apia");
        assert_eq!(
            iso(&s.occurrences_between(
                utc("2011-12-28T00:00:00Z"),
                utc("2011-12-31T12:00:00Z"),
                10
            )),
            // 28th and 29th 12:00 (-10); the 30th's 12:00 does not exist, so it
            // fires when the clock lands on the 31st 00:00 (+14); then 31st 12:00 (+14).
            [
                "2011-12-28T22:00:00Z",
                "2011-12-29T22:00:00Z",
                "2011-12-30T10:00:00Z",
                "2011-12-30T22:00:00Z"
            ]
        );
    }

    #[test]
    fn seed_schedules_over_2026() {
        use chrono::Offset;
        // Toronto 01:00 local, local year 2026 = (2026-01-01T05:00Z, 2027-01-01T05:00Z].
        let s = sched("0 1 * * *", TORONTO);
        let runs = s.occurrences_between(
            utc("2026-01-01T04:59:59Z"),
            utc("2027-01-01T04:59:59Z"),
            1000,
        );
        assert_eq!(runs.len(), 365);
        let mut edt = 0;
        let mut dates = std::collections::BTreeSet::new();
        for t in &runs {
            let local = t.with_timezone(&chrono_tz::America::Toronto);
            assert_eq!(
                (local.hour(), local.minute(), local.second()),
                (1, 0, 0),
                "{t}"
            );
            assert_eq!(local.year(), 2026);
            let offset_h = local.offset().fix().local_minus_utc() / 3600;
            match offset_h {
                -5 => assert_eq!(t.hour(), 6, "EST run {t}"),
                -4 => {
                    assert_eq!(t.hour(), 5, "EDT run {t}");
                    edt += 1;
                }
                other => panic!("unexpected offset {other} at {t}"),
            }
            dates.insert(local.date_naive());
        }
        assert_eq!(dates.len(), 365);
        // EDT at 01:00 from Mar 9 to Nov 1 inclusive (Nov 1 01:00 is the first, EDT, pass).
        assert_eq!(edt, 238);

        // Bangkok 02:00 local (UTC+7, no DST) = 19:00 UTC the previous day.
        let s = sched("0 2 * * *", "Asia/Bangkok");
        let runs = s.occurrences_between(
            utc("2025-12-31T17:00:00Z"),
            utc("2026-12-31T17:00:00Z"),
            1000,
        );
        assert_eq!(runs.len(), 365);
        assert_eq!(runs[0], utc("2025-12-31T19:00:00Z"));
        assert_eq!(runs[364], utc("2026-12-30T19:00:00Z"));
        for t in &runs {
            assert_eq!((t.hour(), t.minute(), t.second()), (19, 0, 0), "{t}");
            let local = t.with_timezone(&chrono_tz::Asia::Bangkok);
            assert_eq!(local.date_naive(), t.date_naive().succ_opt().unwrap());
            assert_eq!((local.year(), local.hour()), (2026, 2));
        }
    }

    #[test]
    fn due_ticks_after_missing_three_hourly_ticks() {
        let s = sched("0 * * * *", "UTC");
        let last = utc("2026-01-01T10:00:00Z");
        // Down across 11:00, 12:00, 13:00; back at 13:05 (current tick 5 min old).
        let now = utc("2026-01-01T13:05:00Z");
        assert!(due_ticks(&s, last, now, &CatchUp::Skip).is_empty());
        assert_eq!(
            iso(&due_ticks(&s, last, now, &CatchUp::Latest)),
            ["2026-01-01T13:00:00Z"]
        );
        assert_eq!(
            iso(&due_ticks(&s, last, now, &CatchUp::All { max: 10 })),
            [
                "2026-01-01T11:00:00Z",
                "2026-01-01T12:00:00Z",
                "2026-01-01T13:00:00Z"
            ]
        );
        // Over the bound: the most recent ones are kept, oldest first.
        assert_eq!(
            iso(&due_ticks(&s, last, now, &CatchUp::All { max: 2 })),
            ["2026-01-01T12:00:00Z", "2026-01-01T13:00:00Z"]
        );
        assert_eq!(
            iso(&due_ticks(&s, last, now, &CatchUp::All { max: 0 })),
            ["2026-01-01T13:00:00Z"]
        );
    }

    #[test]
    fn due_ticks_skip_grace_both_sides() {
        let s = sched("0 * * * *", "UTC");
        let last = utc("2026-01-01T10:00:00Z");
        let tick = ["2026-01-01T13:00:00Z"];
        for (now, due) in [
            ("2026-01-01T13:00:00Z", true),
            ("2026-01-01T13:00:45Z", true),
            ("2026-01-01T13:01:00Z", true), // exactly SKIP_GRACE
            ("2026-01-01T13:01:00.001Z", false),
            ("2026-01-01T13:01:01Z", false),
        ] {
            let got = iso(&due_ticks(&s, last, utc(now), &CatchUp::Skip));
            if due {
                assert_eq!(got, tick, "now {now}");
            } else {
                assert!(got.is_empty(), "now {now}: {got:?}");
            }
        }
        // Normal operation: previous tick enqueued, next one just arrived.
        let got = due_ticks(
            &s,
            utc("2026-01-01T12:00:00Z"),
            utc("2026-01-01T13:00:02Z"),
            &CatchUp::Skip,
        );
        assert_eq!(iso(&got), tick);
    }

    #[test]
    fn due_ticks_nothing_due() {
        let s = sched("0 * * * *", "UTC");
        let last = utc("2026-01-01T13:00:00Z");
        for policy in [CatchUp::Skip, CatchUp::Latest, CatchUp::All { max: 5 }] {
            assert!(due_ticks(&s, last, last, &policy).is_empty());
            assert!(due_ticks(&s, last, utc("2026-01-01T13:59:59Z"), &policy).is_empty());
            assert!(due_ticks(&s, last, utc("2026-01-01T12:00:00Z"), &policy).is_empty());
        }
        let never = sched("0 0 30 2 *", "UTC");
        assert!(
            due_ticks(
                &never,
                utc("1990-01-01T00:00:00Z"),
                utc("2026-01-01T00:00:00Z"),
                &CatchUp::Latest
            )
            .is_empty()
        );
    }

    #[test]
    fn due_ticks_backward_search_agrees_with_forward_search() {
        let cases = [
            (
                "*/30 * * * *",
                TORONTO,
                "2026-11-01T03:10:00Z",
                "2026-11-01T08:20:00Z",
            ),
            (
                "*/15 * * * *",
                TORONTO,
                "2026-03-08T05:00:00Z",
                "2026-03-08T08:00:00Z",
            ),
            (
                "30 2 * * *",
                TORONTO,
                "2026-03-01T00:00:00Z",
                "2026-03-20T00:00:00Z",
            ),
            (
                "30 1 * * *",
                TORONTO,
                "2026-10-20T00:00:00Z",
                "2026-11-10T00:00:00Z",
            ),
            (
                "*/20 * * * * *",
                TORONTO,
                "2026-11-01T05:50:00Z",
                "2026-11-01T07:10:00Z",
            ),
            (
                "0 0 13 * FRI",
                "UTC",
                "2026-01-01T00:00:00Z",
                "2026-06-01T00:00:00Z",
            ),
            (
                "0 2 * * *",
                "Asia/Bangkok",
                "2025-06-01T00:00:00Z",
                "2026-06-01T00:00:00Z",
            ),
        ];
        for (expr, tz, from, to) in cases {
            let s = sched(expr, tz);
            let forward = s.occurrences_between(utc(from), utc(to), 10_000);
            assert!(!forward.is_empty(), "{expr}");
            let all = due_ticks(&s, utc(from), utc(to), &CatchUp::All { max: 10_000 });
            assert_eq!(all, forward, "{expr} in {tz}");
            let latest = due_ticks(&s, utc(from), utc(to), &CatchUp::Latest);
            assert_eq!(latest, [*forward.last().unwrap()], "{expr} in {tz}");
            let recent = due_ticks(&s, utc(from), utc(to), &CatchUp::All { max: 3 });
            assert_eq!(
                recent,
                forward[forward.len().saturating_sub(3)..],
                "{expr} in {tz}"
            );
        }
    }

    #[test]
    fn catch_up_parses_from_config_strings() {
        assert_eq!("skip".parse::<CatchUp>(), Ok(CatchUp::Skip));
        assert_eq!(" Latest ".parse::<CatchUp>(), Ok(CatchUp::Latest));
        assert_eq!(
            "ALL".parse::<CatchUp>(),
            Ok(CatchUp::All {
                max: DEFAULT_CATCH_UP_MAX
            })
        );
        assert_eq!("all:5".parse::<CatchUp>(), Ok(CatchUp::All { max: 5 }));
        assert_eq!(
            CatchUp::try_from("all:7".to_string()),
            Ok(CatchUp::All { max: 7 })
        );
        for bad in [
            "",
            "sometimes",
            "all:0",
            "all:",
            "all:-1",
            "all:x",
            "skip:3",
        ] {
            assert_eq!(
                bad.parse::<CatchUp>(),
                Err(ScheduleError::UnknownCatchUp(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(
            "never".parse::<CatchUp>().unwrap_err().to_string(),
            "unknown catch-up policy 'never' (expected 'skip', 'latest', 'all' or 'all:N' with N >= 1)"
        );
        for policy in [CatchUp::Skip, CatchUp::Latest, CatchUp::All { max: 12 }] {
            let text: String = policy.into();
            assert_eq!(text.parse::<CatchUp>(), Ok(policy));
        }
    }
}
