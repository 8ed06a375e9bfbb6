//! `livemesh ledger-export`: the gift ledger as CSV, for finance.
//!
//! Streams `SettlementService.ExportLedger` and writes one CSV row per
//! ledger entry (RFC 4180: CRLF line ends, a field holding a comma, a
//! double quote or a line break is quoted, its quotes doubled). The times
//! are parsed and printed here, without a date library: `--from`/`--to`
//! take RFC 3339 or milliseconds since the Unix epoch, and `created_at` is
//! written as RFC 3339 UTC with milliseconds.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_proto::time::{ms_from_timestamp, timestamp_from_ms};
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::{ExportLedgerRequest, ExportLedgerResponse, LedgerEntry};
use tonic::Streaming;

/// The CSV's first line.
pub const HEADER: [&str; 6] = [
    "transfer_id",
    "shard",
    "account",
    "amount",
    "kind",
    "created_at",
];

/// What `--from` and `--to` accept, for error messages and the help.
pub const TIME_FORMS: &str = "RFC 3339 like 2026-11-22T10:00:00Z or \
     2026-11-22T11:00:00.250+01:00, or milliseconds since the Unix epoch like 1795341600000";

/// `livemesh ledger-export`: writes the entries created in `[from, to)`
/// (milliseconds since the epoch; `None` is unbounded) by the server at
/// `addr` as CSV to `out`, or to stdout. A file is replaced only once the
/// whole export is written, so a failed export leaves no partial file.
pub async fn run(
    addr: &str,
    from: Option<i64>,
    to: Option<i64>,
    out: Option<&Path>,
    token_file: Option<&Path>,
) -> anyhow::Result<()> {
    if let (Some(from), Some(to)) = (from, to)
        && from > to
    {
        bail!(
            "--from ({}) is after --to ({})",
            rfc3339_ms(from),
            rfc3339_ms(to)
        );
    }
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let mut stack = ClientStack::new(&ClientConfig::default());
    if let Some(file) = token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("--token-file {}", file.display()))?;
        let credential =
            livemesh_mesh::auth::Credential::bearer(token.trim()).with_context(|| {
                format!(
                    "--token-file {}: the file must hold one token (a JWT)",
                    file.display()
                )
            })?;
        stack = stack.with_credential(credential);
    }
    let channel = stack
        .channel(&uri)
        .with_context(|| format!("--addr {addr}"))?;
    let mut entries = open(channel, from, to)
        .await
        .with_context(|| format!("exporting the ledger from {uri}"))?;
    match out {
        Some(path) => {
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            let mut file = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("creating a file in {}", dir.display()))?;
            let mut writer = io::BufWriter::new(file.as_file_mut());
            let rows = write_csv(&mut entries, &mut writer)
                .await
                .with_context(|| format!("{} is left as it was", path.display()))?;
            writer
                .flush()
                .with_context(|| format!("writing {}", path.display()))?;
            drop(writer);
            file.persist(path)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "livemesh ledger-export: {rows} entries from {uri} written to {}",
                path.display()
            );
        }
        None => {
            let mut writer = io::BufWriter::new(io::stdout().lock());
            let written = match write_csv(&mut entries, &mut writer).await {
                Ok(rows) => writer.flush().map(|()| rows).map_err(anyhow::Error::from),
                Err(err) => Err(err),
            };
            match written {
                Ok(rows) => eprintln!("livemesh ledger-export: {rows} entries from {uri}"),
                // The reader went away (`| head`): not a failure of the export.
                Err(err) if is_broken_pipe(&err) => {}
                Err(err) => return Err(err.context("the CSV on stdout is incomplete")),
            }
        }
    }
    Ok(())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Streams the ledger entries created in `[from, to)` from the
/// `SettlementService` at `channel` into `out` as CSV, header first;
/// returns how many entries it wrote.
pub async fn export(
    channel: MeshChannel,
    from: Option<i64>,
    to: Option<i64>,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let mut entries = open(channel, from, to).await?;
    write_csv(&mut entries, out).await
}

/// Starts `SettlementService.ExportLedger` for the entries created in
/// `[from, to)`.
pub async fn open(
    channel: MeshChannel,
    from: Option<i64>,
    to: Option<i64>,
) -> anyhow::Result<Streaming<ExportLedgerResponse>> {
    let reply = SettlementServiceClient::new(channel)
        .export_ledger(ExportLedgerRequest {
            from: from.map(timestamp_from_ms),
            to: to.map(timestamp_from_ms),
        })
        .await
        .map_err(|status| anyhow!("SettlementService.ExportLedger: {}", describe(&status)))?;
    Ok(reply.into_inner())
}

/// Writes the streamed entries to `out` as CSV, header first; returns how
/// many entries it wrote.
pub async fn write_csv(
    entries: &mut Streaming<ExportLedgerResponse>,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    write_row(out, &HEADER)?;
    let mut rows = 0;
    loop {
        let reply = entries.message().await.map_err(|status| {
            anyhow!(
                "SettlementService.ExportLedger failed after {rows} entries: {}",
                describe(&status)
            )
        })?;
        let Some(reply) = reply else {
            return Ok(rows);
        };
        if let Some(entry) = reply.entry {
            write_entry(out, &entry)?;
            rows += 1;
        }
    }
}

/// `Unavailable: tcp connect error (Connection refused (os error 111))`.
fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut deepest = None;
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        deepest = Some(cause);
        source = cause.source();
    }
    if let Some(cause) = deepest.map(ToString::to_string)
        && !text.contains(&cause)
    {
        text.push_str(&format!(" ({cause})"));
    }
    text
}

/// One entry as a CSV row, in `HEADER`'s order.
pub fn write_entry(out: &mut impl Write, entry: &LedgerEntry) -> io::Result<()> {
    let created_at = entry
        .created_at
        .as_ref()
        .map_or(String::new(), |ts| rfc3339_ms(ms_from_timestamp(ts)));
    write_row(
        out,
        &[
            &entry.transfer_id,
            &entry.shard.to_string(),
            &entry.account,
            &entry.amount.to_string(),
            &entry.kind,
            &created_at,
        ],
    )
}

/// Writes `fields` as one CSV record ending in CRLF.
pub fn write_row(out: &mut impl Write, fields: &[&str]) -> io::Result<()> {
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            out.write_all(b",")?;
        }
        out.write_all(csv_field(field).as_bytes())?;
    }
    out.write_all(b"\r\n")
}

/// A field as RFC 4180 writes it: quoted, with its quotes doubled, when it
/// holds a comma, a double quote, CR or LF; as it is otherwise.
pub fn csv_field(field: &str) -> Cow<'_, str> {
    if field.contains([',', '"', '\r', '\n']) {
        Cow::Owned(format!("\"{}\"", field.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(field)
    }
}

/// Parses a `--from`/`--to` TIME: RFC 3339 (`2026-11-22T10:00:00Z`, a
/// fraction and a `±HH:MM` offset allowed; a fraction beyond milliseconds
/// is cut) or milliseconds since the Unix epoch (digits only). Returns
/// milliseconds since the epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let numeric = |text: &str, more: &[u8]| {
        text.bytes().any(|b| b.is_ascii_digit())
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || more.contains(&b))
    };
    let parsed = if numeric(text, b"") {
        text.parse::<i64>()
            .map_err(|_| "too many milliseconds".to_owned())
    } else if numeric(text, b".") || text.strip_prefix('-').is_some_and(|t| numeric(t, b".")) {
        Err("milliseconds since the epoch are a whole number, not negative".into())
    } else {
        parse_rfc3339(text)
    };
    parsed.map_err(|why| format!("{why}; expected {TIME_FORMS}"))
}

fn parse_rfc3339(text: &str) -> Result<i64, String> {
    if text.is_empty() {
        return Err("empty time".into());
    }
    let mut at = Cursor {
        bytes: text.as_bytes(),
        at: 0,
    };
    let year = at.number(4, "year")?;
    at.expect(b"-", "`-` after the year")?;
    let month = at.number(2, "month")?;
    at.expect(b"-", "`-` after the month")?;
    let day = at.number(2, "day")?;
    at.expect(b"Tt ", "`T` between the date and the time")?;
    let hour = at.number(2, "hour")?;
    at.expect(b":", "`:` after the hour")?;
    let minute = at.number(2, "minute")?;
    at.expect(b":", "`:` after the minute")?;
    let second = at.number(2, "second")?;
    let mut millis = 0;
    if at.peek() == Some(b'.') {
        at.at += 1;
        let start = at.at;
        while at.peek().is_some_and(|b| b.is_ascii_digit()) {
            if at.at - start < 3 {
                millis = millis * 10 + i64::from(at.bytes[at.at] - b'0');
            }
            at.at += 1;
        }
        if at.at == start {
            return Err(format!(
                "digits expected after `.` at position {}",
                start + 1
            ));
        }
        for _ in (at.at - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match at.peek() {
        Some(b'Z' | b'z') => {
            at.at += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            at.at += 1;
            let hours = at.number(2, "offset hour")?;
            at.expect(b":", "`:` in the offset")?;
            let minutes = at.number(2, "offset minute")?;
            if hours > 23 || minutes > 59 {
                return Err(format!(
                    "the offset {hours:02}:{minutes:02} is not a time zone offset"
                ));
            }
            let offset = hours * 60 + minutes;
            if sign == b'-' { -offset } else { offset }
        }
        _ => {
            return Err(format!(
                "a time zone (`Z` or `±HH:MM`) expected at position {}",
                at.at + 1
            ));
        }
    };
    if at.at < at.bytes.len() {
        return Err(format!(
            "unexpected {:?} at position {}",
            &text[at.at..],
            at.at + 1
        ));
    }
    if !(1..=12).contains(&month) {
        return Err(format!("month {month:02} is not 01 to 12"));
    }
    let last_day = days_in_month(year, month);
    if !(1..=last_day).contains(&day) {
        return Err(format!(
            "day {day:02} is not in {year:04}-{month:02} (01 to {last_day})"
        ));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!(
            "{hour:02}:{minute:02}:{second:02} is not a time of day (00:00:00 to 23:59:59)"
        ));
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second
        - offset_minutes * 60;
    Ok(seconds * 1_000 + millis)
}

/// Reads an RFC 3339 text left to right.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Exactly `len` digits.
    fn number(&mut self, len: usize, what: &str) -> Result<i64, String> {
        let digits = self
            .bytes
            .get(self.at..self.at + len)
            .filter(|digits| digits.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| {
                format!(
                    "the {what} ({len} digits) expected at position {}",
                    self.at + 1
                )
            })?;
        self.at += len;
        Ok(digits
            .iter()
            .fold(0, |n, digit| n * 10 + i64::from(digit - b'0')))
    }

    /// One of `allowed`.
    fn expect(&mut self, allowed: &[u8], what: &str) -> Result<(), String> {
        match self.peek() {
            Some(b) if allowed.contains(&b) => {
                self.at += 1;
                Ok(())
            }
            _ => Err(format!("{what} expected at position {}", self.at + 1)),
        }
    }
}

/// `2026-11-22T10:00:00.000Z`: RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let day_ms = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1_000 % 60,
        day_ms % 1_000
    )
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March is 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_only_when_rfc_4180_needs_it() {
        assert_eq!(csv_field("user:77"), "user:77");
        assert_eq!(csv_field(""), "");
        assert_eq!(csv_field("-1234"), "-1234");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(csv_field("\""), "\"\"\"\"");

        let mut out = Vec::new();
        write_row(&mut out, &HEADER).unwrap();
        write_row(
            &mut out,
            &["deposit:7:k,\"1\"", "2", "user:7", "-5", "", "x"],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "transfer_id,shard,account,amount,kind,created_at\r\n\
             \"deposit:7:k,\"\"1\"\"\",2,user:7,-5,,x\r\n"
        );
    }

    #[test]
    fn an_entry_is_a_row_with_its_time_in_rfc_3339_utc() {
        let mut out = Vec::new();
        write_entry(
            &mut out,
            &LedgerEntry {
                transfer_id: "gift:501:gift-501-1".into(),
                shard: 3,
                account: "room:3:5".into(),
                amount: 300,
                created_at: Some(timestamp_from_ms(1_795_341_600_250)),
                kind: "gift".into(),
            },
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "gift:501:gift-501-1,3,room:3:5,300,gift,2026-11-22T10:00:00.250Z\r\n"
        );
    }

    #[test]
    fn times_are_rfc_3339_or_epoch_milliseconds() {
        let ten = 1_795_341_600_000;
        for (text, ms) in [
            ("2026-11-22T10:00:00Z", ten),
            ("1795341600000", ten),
            (" 1795341600000 ", ten),
            ("0", 0),
            ("2026-11-22t10:00:00z", ten),
            ("2026-11-22 10:00:00Z", ten),
            ("2026-11-22T10:00:00.250Z", ten + 250),
            ("2026-11-22T10:00:00.2Z", ten + 200),
            ("2026-11-22T10:00:00.123456789Z", ten + 123),
            ("2026-11-22T11:30:00+01:30", ten),
            ("2026-11-22T05:00:00-05:00", ten),
            ("2026-11-22T00:00:00-10:00", ten),
            ("1970-01-01T00:00:00Z", 0),
            ("1969-12-31T23:59:59.999Z", -1),
            ("2000-02-29T00:00:00Z", 951_782_400_000),
            ("2024-12-31T23:59:59.999Z", 1_735_689_599_999),
        ] {
            assert_eq!(parse_time(text), Ok(ms), "{text}");
        }
        for (text, why) in [
            ("", "empty time"),
            ("yesterday", "the year (4 digits) expected at position 1"),
            (
                "2026-11-22",
                "`T` between the date and the time expected at position 11",
            ),
            (
                "2026-11-22T10:00:00",
                "a time zone (`Z` or `±HH:MM`) expected",
            ),
            (
                "2026-11-22T10:00Z",
                "`:` after the minute expected at position 17",
            ),
            ("2026-11-22T10:00:00.Z", "digits expected after `.`"),
            (
                "2026-11-22T10:00:00Zulu",
                "unexpected \"ulu\" at position 21",
            ),
            ("2026-13-01T00:00:00Z", "month 13 is not 01 to 12"),
            (
                "2026-02-29T00:00:00Z",
                "day 29 is not in 2026-02 (01 to 28)",
            ),
            (
                "2026-04-31T00:00:00Z",
                "day 31 is not in 2026-04 (01 to 30)",
            ),
            ("2026-11-22T24:00:00Z", "24:00:00 is not a time of day"),
            ("2026-11-22T10:00:00+24:00", "not a time zone offset"),
            ("1795341600.5", "a whole number"),
            ("-5", "not negative"),
            ("2026-11", "`-` after the month expected at position 8"),
            ("99999999999999999999", "too many milliseconds"),
        ] {
            let err = parse_time(text).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
            assert!(
                err.contains("RFC 3339") && err.contains("milliseconds"),
                "{err}"
            );
        }
    }

    #[test]
    fn rfc_3339_output_round_trips() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_ms(1_795_341_600_250), "2026-11-22T10:00:00.250Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        // Every day of four centuries and then some, both ways.
        for day in -1_000..150_000_i64 {
            let ms = day * 86_400_000 + 45_296_789; // 12:34:56.789
            assert_eq!(parse_time(&rfc3339_ms(ms)), Ok(ms), "{}", rfc3339_ms(ms));
        }
    }
}
