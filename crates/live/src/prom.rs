//! The services' Prometheus text, read back: a scrape of one or more
//! endpoints summed into one [`Sample`], and what the live view asks of two
//! samples (a counter's rate, a histogram's quantiles over the interval).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One series: its metric name, labels and value.
#[derive(Debug, Clone)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Every series of one or more scrapes, taken at `at`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    series: Vec<Series>,
    /// Endpoints that answered, of those asked.
    pub answered: usize,
    pub asked: usize,
}

impl Sample {
    /// An empty sample (nothing scraped yet).
    pub fn empty() -> Self {
        Self {
            at: Instant::now(),
            series: Vec::new(),
            answered: 0,
            asked: 0,
        }
    }

    /// Parses Prometheus text exposition (`# ` lines are comments).
    pub fn parse(text: &str) -> Self {
        let mut sample = Self::empty();
        sample.add_text(text);
        sample.asked = 1;
        sample.answered = 1;
        sample
    }

    /// Adds another endpoint's text to this sample.
    pub fn add_text(&mut self, text: &str) {
        self.series.extend(text.lines().filter_map(parse_line));
    }

    /// The sum of `name` over the series whose labels include all of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        // From +0.0: `Iterator::sum` of no floats is -0.0, which prints "-0".
        self.matching(name, with).fold(0.0, |sum, s| sum + s.value)
    }

    /// Whether any series of `name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.series.iter().any(|s| s.name == name)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }

    /// The cumulative buckets of histogram `name` (`<name>_bucket`), summed
    /// over every series, by upper bound.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut by_le: Vec<(f64, f64)> = Vec::new();
        for series in self.matching(&bucket, &[]) {
            let Some(le) = series
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .and_then(|(_, v)| parse_value(v))
            else {
                continue;
            };
            match by_le.iter_mut().find(|(bound, _)| *bound == le) {
                Some((_, count)) => *count += series.value,
                None => by_le.push((le, series.value)),
            }
        }
        by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
        by_le
    }

    /// The value of each series of `name` by the value of its label `key`.
    pub fn by_label(&self, name: &str, key: &str) -> Vec<(String, f64)> {
        self.matching(name, &[])
            .filter_map(|s| {
                let value = s.labels.iter().find(|(k, _)| k == key)?.1.clone();
                Some((value, s.value))
            })
            .collect()
    }
}

/// `name{a="b",c="d"} 1.5` (an optional timestamp after the value is ignored).
fn parse_line(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Series {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="b",c="d\"e"`: label values may hold escaped quotes and commas.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let mut value = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        labels.push((key, value));
        rest = &rest[end.min(rest.len())..];
    }
    labels
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        other => other.parse().ok(),
    }
}

/// The `q` quantile of the observations between two snapshots of one
/// histogram's cumulative buckets (Prometheus' `histogram_quantile`: linear
/// within the bucket; the highest finite bound for the `+Inf` bucket).
/// `None` when nothing was observed in between.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (count - earlier).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let within = count - below;
            let fraction = if within > 0.0 {
                (rank - below) / within
            } else {
                1.0
            };
            return Some(lower + (le - lower) * fraction);
        }
        lower = if le.is_finite() { le } else { lower };
        below = count;
    }
    Some(lower)
}

/// A metrics endpoint: `http://HOST:PORT[/PATH]` or `HOST:PORT` (the path
/// defaults to `/metrics`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub authority: String,
    pub path: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                bail!("{url:?}: only http:// metrics endpoints are read (not {scheme}://)")
            }
            None => url,
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/metrics"),
        };
        if authority.is_empty() || !authority.contains(':') {
            bail!("{url:?} is not a metrics endpoint like http://127.0.0.1:9464/metrics");
        }
        Ok(Self {
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// `GET` the endpoint's text (HTTP/1.1, one connection per scrape).
    pub async fn scrape(&self, timeout: Duration) -> anyhow::Result<String> {
        tokio::time::timeout(timeout, self.get())
            .await
            .with_context(|| format!("{} did not answer within {timeout:?}", self.authority))?
    }

    async fn get(&self) -> anyhow::Result<String> {
        let mut socket = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.authority))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.path, self.authority
        );
        socket.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        socket.read_to_end(&mut response).await?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .with_context(|| format!("{}: not an HTTP response", self.authority))?;
        let status = head.lines().next().unwrap_or_default();
        if !status.contains(" 200 ") {
            bail!("{}{}: {status}", self.authority, self.path);
        }
        Ok(body.to_owned())
    }
}

/// Scrapes every endpoint concurrently into one sample; an endpoint that
/// does not answer is left out (counted in `asked - answered`).
pub async fn scrape_all(endpoints: &[Endpoint], timeout: Duration) -> (Sample, Vec<String>) {
    let texts = futures::future::join_all(endpoints.iter().map(|e| e.scrape(timeout))).await;
    let mut sample = Sample::empty();
    sample.asked = endpoints.len();
    let mut errors = Vec::new();
    for text in texts {
        match text {
            Ok(text) => {
                sample.answered += 1;
                sample.add_text(&text);
            }
            Err(err) => errors.push(format!("{err:#}")),
        }
    }
    (sample, errors)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const TEXT: &str = r#"# HELP livemesh_publish_events_total Events
# TYPE livemesh_publish_events_total counter
livemesh_publish_events_total{kind="comment",otel_scope_name="livemesh"} 7
livemesh_publish_events_total{kind="gift",otel_scope_name="livemesh"} 2
livemesh_subscribe_streams{otel_scope_name="livemesh"} 30
h_bucket{le="0.001"} 2
h_bucket{le="0.01"} 8
h_bucket{le="+Inf"} 10
odd{peer="http://a,b\"c"} 1
"#;

    #[test]
    fn sums_series_by_label_and_reads_odd_label_values() {
        let mut sample = Sample::parse(TEXT);
        assert_eq!(sample.sum("livemesh_publish_events_total", &[]), 9.0);
        assert_eq!(
            sample.sum("livemesh_publish_events_total", &[("kind", "comment")]),
            7.0
        );
        assert_eq!(sample.sum("livemesh_subscribe_streams", &[]), 30.0);
        assert_eq!(
            sample.by_label("odd", "peer"),
            vec![("http://a,b\"c".to_owned(), 1.0)]
        );
        // A second endpoint adds to the same series.
        sample.add_text(TEXT);
        assert_eq!(sample.sum("livemesh_subscribe_streams", &[]), 60.0);
        assert_eq!(
            sample.buckets("h"),
            vec![(0.001, 4.0), (0.01, 16.0), (f64::INFINITY, 20.0)]
        );
    }

    #[test]
    fn quantiles_come_from_the_observations_between_two_samples() {
        let before = [(0.001, 2.0), (0.01, 8.0), (f64::INFINITY, 10.0)];
        // Ten more observations, all between 1 ms and 10 ms.
        let after = [(0.001, 2.0), (0.01, 18.0), (f64::INFINITY, 20.0)];
        let p50 = quantile(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(&after, &after, 0.5), None);
        // Everything past the last bound: the last bound.
        let inf = [(0.001, 2.0), (0.01, 8.0), (f64::INFINITY, 30.0)];
        assert_eq!(quantile(&before, &inf, 0.99), Some(0.01));
    }

    #[test]
    fn endpoints_default_to_the_metrics_path_and_refuse_other_schemes() {
        let e = Endpoint::parse("http://127.0.0.1:9464").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("127.0.0.1:9464", "/metrics")
        );
        let e = Endpoint::parse("10.0.0.5:9000/m").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.path.as_str()),
            ("10.0.0.5:9000", "/m")
        );
        assert!(Endpoint::parse("https://x:1").is_err());
        assert!(Endpoint::parse("localhost").is_err());
    }
}
