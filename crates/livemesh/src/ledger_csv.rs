//! `livemesh ledger-export`: the gift ledger as CSV, for finance.
//!
//! Streams `SettlementService.ExportLedger` and writes one CSV row per
//! ledger entry with the `csv` crate (RFC 4180: CRLF line ends, a field
//! holding a comma, a double quote or a line break is quoted, its quotes
//! doubled). `--from`/`--to` take RFC 3339 or milliseconds since the Unix
//! epoch, and `created_at` is written as RFC 3339 UTC with milliseconds:
//! the `time` crate reads and prints the times, once `parse_time` has
//! checked the text part by part, so that a refusal names what is wrong
//! and where.

use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_proto::time::{ms_from_timestamp, timestamp_from_ms};
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::{ExportLedgerRequest, ExportLedgerResponse, LedgerEntry};
use time::format_description::BorrowedFormatItem;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Month, OffsetDateTime};
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
    let mut csv = writer(out);
    csv.write_record(HEADER).map_err(io_error)?;
    let mut rows = 0;
    loop {
        let reply = entries.message().await.map_err(|status| {
            anyhow!(
                "SettlementService.ExportLedger failed after {rows} entries: {}",
                describe(&status)
            )
        })?;
        let Some(reply) = reply else {
            csv.flush()?;
            return Ok(rows);
        };
        if let Some(entry) = reply.entry {
            write_fields(&mut csv, &entry).map_err(io_error)?;
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

/// A CSV writer as RFC 4180 has it: CRLF line ends, a field quoted only
/// when it holds a comma, a double quote, CR or LF, its quotes doubled.
/// Flexible: a record may have any number of fields, as `write_row`'s
/// caller chooses.
fn writer<W: Write>(out: W) -> csv::Writer<W> {
    csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .quote_style(csv::QuoteStyle::Necessary)
        .flexible(true)
        .from_writer(out)
}

/// The I/O error under a CSV writer's error. Writing text to a flexible
/// writer fails only when `out` does, and a broken pipe must stay one for
/// `is_broken_pipe`.
fn io_error(err: csv::Error) -> io::Error {
    match err.into_kind() {
        csv::ErrorKind::Io(err) => err,
        kind => io::Error::other(format!("writing CSV: {kind:?}")),
    }
}

/// One entry as a CSV row, in `HEADER`'s order.
pub fn write_entry(out: &mut impl Write, entry: &LedgerEntry) -> io::Result<()> {
    let mut csv = writer(out);
    write_fields(&mut csv, entry).map_err(io_error)?;
    csv.flush()
}

fn write_fields<W: Write>(csv: &mut csv::Writer<W>, entry: &LedgerEntry) -> csv::Result<()> {
    let created_at = entry
        .created_at
        .as_ref()
        .map_or(String::new(), |ts| rfc3339_ms(ms_from_timestamp(ts)));
    csv.write_record([
        entry.transfer_id.as_str(),
        &entry.shard.to_string(),
        &entry.account,
        &entry.amount.to_string(),
        &entry.kind,
        &created_at,
    ])
}

/// Writes `fields` as one CSV record ending in CRLF (a record of one
/// empty field as `""`, so that it is not an empty line).
pub fn write_row(out: &mut impl Write, fields: &[&str]) -> io::Result<()> {
    let mut csv = writer(out);
    csv.write_record(fields).map_err(io_error)?;
    csv.flush()
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

/// RFC 3339 read by the `time` crate, once `check_rfc3339` has let it
/// through (the crate would also take a leap second and any byte between
/// the date and the time, which `--from`/`--to` never did).
fn parse_rfc3339(text: &str) -> Result<i64, String> {
    check_rfc3339(text)?;
    let at = OffsetDateTime::parse(text, &Rfc3339).map_err(|err| err.to_string())?;
    Ok(at.unix_timestamp() * 1_000 + i64::from(at.millisecond()))
}

const DIGITS: &[u8] = b"0123456789";

/// The parts of `YYYY-MM-DDTHH:MM:SS` in order: what each is, for the
/// error message, its length and the bytes it may hold.
const DATE_TIME: [(&str, usize, &[u8]); 11] = [
    ("the year (4 digits)", 4, DIGITS),
    ("`-` after the year", 1, b"-"),
    ("the month (2 digits)", 2, DIGITS),
    ("`-` after the month", 1, b"-"),
    ("the day (2 digits)", 2, DIGITS),
    ("`T` between the date and the time", 1, b"Tt "),
    ("the hour (2 digits)", 2, DIGITS),
    ("`:` after the hour", 1, b":"),
    ("the minute (2 digits)", 2, DIGITS),
    ("`:` after the minute", 1, b":"),
    ("the second (2 digits)", 2, DIGITS),
];

/// The parts of a `±HH:MM` offset after its sign.
const OFFSET: [(&str, usize, &[u8]); 3] = [
    ("the offset hour (2 digits)", 2, DIGITS),
    ("`:` in the offset", 1, b":"),
    ("the offset minute (2 digits)", 2, DIGITS),
];

/// Checks `text` as RFC 3339 part by part, so that a refusal says what was
/// expected where, or which value is out of range.
fn check_rfc3339(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("empty time".into());
    }
    let bytes = text.as_bytes();
    let mut at = expect(bytes, 0, &DATE_TIME)?;
    if bytes.get(at) == Some(&b'.') {
        let digits = bytes[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(format!("digits expected after `.` at position {}", at + 2));
        }
        at += 1 + digits;
    }
    at = match bytes.get(at) {
        Some(b'Z' | b'z') => at + 1,
        Some(b'+' | b'-') => {
            let end = expect(bytes, at + 1, &OFFSET)?;
            let (hours, minutes) = (number(&bytes[at + 1..at + 3]), number(&bytes[at + 4..end]));
            if hours > 23 || minutes > 59 {
                return Err(format!(
                    "the offset {hours:02}:{minutes:02} is not a time zone offset"
                ));
            }
            end
        }
        _ => {
            return Err(format!(
                "a time zone (`Z` or `±HH:MM`) expected at position {}",
                at + 1
            ));
        }
    };
    if at < text.len() {
        return Err(format!(
            "unexpected {:?} at position {}",
            &text[at..],
            at + 1
        ));
    }
    let field = |start: usize, len: usize| number(&bytes[start..start + len]);
    let (year, month, day) = (field(0, 4), field(5, 2), field(8, 2));
    let Some(last_day) = u8::try_from(month)
        .ok()
        .and_then(|month| Month::try_from(month).ok())
        .map(|month| u16::from(month.length(i32::from(year))))
    else {
        return Err(format!("month {month:02} is not 01 to 12"));
    };
    if !(1..=last_day).contains(&day) {
        return Err(format!(
            "day {day:02} is not in {year:04}-{month:02} (01 to {last_day})"
        ));
    }
    let (hour, minute, second) = (field(11, 2), field(14, 2), field(17, 2));
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!(
            "{hour:02}:{minute:02}:{second:02} is not a time of day (00:00:00 to 23:59:59)"
        ));
    }
    Ok(())
}

/// Checks `parts` in `bytes` from `at` on; returns where they end.
fn expect(bytes: &[u8], mut at: usize, parts: &[(&str, usize, &[u8])]) -> Result<usize, String> {
    for &(what, len, allowed) in parts {
        match bytes.get(at..at + len) {
            Some(part) if part.iter().all(|b| allowed.contains(b)) => at += len,
            _ => return Err(format!("{what} expected at position {}", at + 1)),
        }
    }
    Ok(at)
}

/// The number ASCII `digits` spell.
fn number(digits: &[u8]) -> u16 {
    digits
        .iter()
        .fold(0, |n, digit| n * 10 + u16::from(digit - b'0'))
}

/// RFC 3339 UTC with milliseconds.
const UTC_MS: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// `2026-11-22T10:00:00.000Z`: RFC 3339 UTC with milliseconds. A time
/// outside the years 0000 to 9999, which RFC 3339 cannot write, comes out
/// as its milliseconds since the epoch (which `parse_time` takes back).
pub fn rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .filter(|at| at.year() >= 0)
        .and_then(|at| at.format(UTC_MS).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// One field as `write_row` writes it: a row of it and an empty field,
    /// less the comma and the line end (a row of one empty field is `""`).
    fn csv_field(field: &str) -> String {
        let mut out = Vec::new();
        write_row(&mut out, &[field, ""]).unwrap();
        let row = String::from_utf8(out).unwrap();
        row.strip_suffix(",\r\n").unwrap().to_owned()
    }

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
