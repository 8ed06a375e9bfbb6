//! The report's PNG charts, drawn with plotters' bitmap backend. Text is
//! drawn with an embedded font (plotters' `ab_glyph` text and the Ubuntu
//! Light typeface from `epaint_default_fonts`), so no system font library is
//! needed and a chart looks the same on every machine.
//!
//! Per run: `NAME-throughput.png` (livemesh's throughput figures beside
//! their peers', a panel each), `NAME-latency-K.png` (each latency
//! distribution the bench wrote, livemesh's series solid and the peer's
//! dashed, on a percentile axis where each nine is one step) and
//! `NAME-cpu.png` (CPU per operation beside the peer's).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context as _, anyhow};
use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use super::format::{number, ratio};
use super::model::{Distribution, Report, Run};
use super::spec::{Kind, Row, rows_for};

/// One chart written for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chart {
    pub run: String,
    /// File name inside the report's directory.
    pub file: String,
    /// What it shows, for the summary.
    pub title: String,
}

const FONT: &str = "sans-serif";
const LIVEMESH: RGBColor = RGBColor(31, 119, 180);
const PEER: RGBColor = RGBColor(214, 39, 40);
/// livemesh's series of one distribution, in turn.
const OURS: [RGBColor; 3] = [LIVEMESH, RGBColor(44, 160, 44), RGBColor(148, 103, 189)];
/// The peers' series, in turn.
const THEIRS: [RGBColor; 2] = [PEER, RGBColor(255, 127, 14)];
const GREY: RGBColor = RGBColor(90, 90, 90);

/// Registers the embedded font under the family every chart asks for (once
/// per process; plotters keeps it in a global table).
fn font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded chart font could not be read"))
    }
}

/// Whether `file` is a chart this module writes for some run (so that a
/// report drawn again into the same directory leaves no stale chart).
pub fn is_chart(file: &str, runs: &[&str]) -> bool {
    let Some(stem) = file.strip_suffix(".png") else {
        return false;
    };
    runs.iter().any(|run| {
        stem.strip_prefix(run)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|kind| {
                kind == "throughput"
                    || kind == "cpu"
                    || kind
                        .strip_prefix("latency-")
                        .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            })
    })
}

/// Draws every chart of `report` into `dir`, after removing the charts an
/// earlier report of any of `runs` left there.
pub fn render(report: &Report, dir: &Path, runs: &[&str]) -> anyhow::Result<Vec<Chart>> {
    font()?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|f| is_chart(f, runs))
        {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    let mut charts = Vec::new();
    for run in &report.runs {
        for (kind, name, what) in [
            (
                Kind::Throughput,
                "throughput",
                "throughput against the peer",
            ),
            (Kind::Cpu, "cpu", "CPU per operation against the peer"),
        ] {
            let panels = panels(run, kind);
            if panels.is_empty() {
                continue;
            }
            let file = format!("{}-{name}.png", run.name);
            let title = format!("{}: {what}", run.name);
            bars(&dir.join(&file), &title, &panels).with_context(|| format!("drawing {file}"))?;
            charts.push(Chart {
                run: run.name.clone(),
                file,
                title,
            });
        }
        for (k, distribution) in run.distributions.iter().enumerate() {
            if !distribution
                .series
                .iter()
                .any(|s| s.ms.iter().any(Option::is_some))
            {
                continue;
            }
            let file = format!("{}-latency-{}.png", run.name, k + 1);
            let title = format!("{}: {}", run.name, distribution.title);
            latency(&dir.join(&file), &title, distribution)
                .with_context(|| format!("drawing {file}"))?;
            charts.push(Chart {
                run: run.name.clone(),
                file,
                title,
            });
        }
    }
    Ok(charts)
}

/// One comparison of a bar chart.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Panel {
    pub label: String,
    pub unit: String,
    pub ours: f64,
    /// The peer's name and value.
    pub peer: Option<(String, f64)>,
}

/// The measured rows of `kind` of a run, as panels.
pub(super) fn panels(run: &Run, kind: Kind) -> Vec<Panel> {
    rows_for(&run.bench, |key| run.figure(key))
        .filter(|row| row.kind == kind)
        .filter_map(|row: &Row| {
            let ours = run.figure(row.figure).filter(|v| v.is_finite())?;
            let peer = row.peer.and_then(|(name, key)| {
                run.figure(key)
                    .filter(|v| v.is_finite())
                    .map(|v| (name.to_owned(), v))
            });
            Some(Panel {
                label: row.label.to_owned(),
                unit: row.unit.to_owned(),
                ours,
                peer,
            })
        })
        .collect()
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn bars(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let width = 80 + 330 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 20))?;
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        bar_panel(area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn bar_panel(area: &Area<'_>, panel: &Panel) -> anyhow::Result<()> {
    let mut bars = vec![("livemesh".to_owned(), panel.ours, LIVEMESH)];
    if let Some((name, value)) = &panel.peer {
        bars.push((name.clone(), *value, PEER));
    }
    let top = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    let caption = match &panel.peer {
        Some((_, peer)) => format!("{} ({})", panel.label, ratio(panel.ours / peer)),
        None => panel.label.clone(),
    };
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 13))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d((0_u32..bars.len() as u32).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| number(*y))
        .max_light_lines(1)
        .y_desc(if panel.unit == "/s" {
            "per second".to_owned()
        } else {
            panel.unit.clone()
        })
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 12))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, value, color))| {
        let i = i as u32;
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *value),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 18, 18);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, value, _))| {
        EmptyElement::at((SegmentValue::CenterOf(i as u32), *value))
            + Text::new(number(*value), (-24, -16), (FONT, 12).into_font())
    }))?;
    Ok(())
}

/// Where quantile `q` goes on the percentile axis: log10(1 / (1 - q)), so
/// p90 is at 1, p99 at 2, p99.9 at 3.
fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-9).log10()
}

/// "p50", "p99.9", ...: the quantile `q` as a percentile, with the
/// decimals it needs.
fn percentile_label(q: f64) -> String {
    let p = q * 100.0;
    for decimals in 0..4 {
        let text = format!("{p:.decimals$}");
        if (text.parse::<f64>().unwrap_or(f64::NAN) - p).abs() < 1e-9 {
            return format!("p{text}");
        }
    }
    format!("p{p}")
}

/// The grid values of a log axis from `low` to `high`: 1, 2 and 5 times
/// each power of ten (every integer multiple when that gives fewer than three).
fn log_ticks(low: f64, high: f64) -> Vec<f64> {
    let decades = low.log10().floor() as i32..=high.log10().ceil() as i32;
    let within = |steps: &[f64]| -> Vec<f64> {
        decades
            .clone()
            .flat_map(|k| steps.iter().map(move |m| m * 10_f64.powi(k)))
            .filter(|v| *v >= low && *v <= high)
            .collect()
    };
    let ticks = within(&[1.0, 2.0, 5.0]);
    if ticks.len() >= 3 {
        ticks
    } else {
        within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    }
}

/// A percentile plot: x is [`nines`] of each quantile, y is log10 of the
/// latency; the grid and both axes' labels are drawn here (at the
/// quantiles and at 1-2-5 steps), not by plotters' own mesh.
fn latency(path: &Path, title: &str, distribution: &Distribution) -> anyhow::Result<()> {
    let xs: Vec<f64> = distribution.quantiles.iter().map(|q| nines(*q)).collect();
    let values = distribution
        .series
        .iter()
        .flat_map(|s| s.ms.iter().flatten().copied())
        .filter(|v| *v > 0.0);
    let (low, high) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (low, high) = if low <= high {
        (low / 1.5, high * 1.5)
    } else {
        (0.001, 1.0)
    };
    let x_start = xs.iter().copied().fold(f64::MAX, f64::min).min(1.0) - 0.15;
    let x_end = xs.iter().copied().fold(f64::MIN, f64::max) + 0.15;
    let (y_low, y_high) = (low.log10(), high.log10());

    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 18))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_start..x_end, y_low..y_high)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("percentile")
        .y_desc("ms (log scale)")
        .axis_desc_style((FONT, 13))
        .draw()?;
    let grid = RGBColor(225, 225, 225);
    let label = (FONT, 12).into_font();
    for (x, q) in xs.iter().zip(&distribution.quantiles) {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(*x, y_low), (*x, y_high)],
            grid,
        )))?;
        let (px, py) = chart.backend_coord(&(*x, y_low));
        let text = percentile_label(*q);
        root.draw(&Text::new(
            text.clone(),
            (px - 4 * text.len() as i32, py + 6),
            label.clone(),
        ))?;
    }
    for tick in log_ticks(low, high) {
        let y = tick.log10();
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(x_start, y), (x_end, y)],
            grid,
        )))?;
        let (px, py) = chart.backend_coord(&(x_start, y));
        let text = number(tick);
        root.draw(&Text::new(
            text.clone(),
            (px - 10 - 7 * text.len() as i32, py - 6),
            label.clone(),
        ))?;
    }
    let (mut ours, mut theirs) = (OURS.iter().cycle(), THEIRS.iter().cycle());
    for series in &distribution.series {
        let points: Vec<(f64, f64)> = xs
            .iter()
            .zip(&series.ms)
            .filter_map(|(x, ms)| ms.filter(|v| *v > 0.0).map(|v| (*x, v.log10())))
            .collect();
        if points.is_empty() {
            continue;
        }
        let color = *if series.peer {
            theirs.next()
        } else {
            ours.next()
        }
        .unwrap_or(&GREY);
        let style = color.stroke_width(2);
        let drawn = if series.peer {
            chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(points.clone(), style))?
        };
        drawn.label(series.label.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(GREY)
        .label_font((FONT, 13))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_axis_puts_each_nine_one_step_further() {
        assert!((nines(0.9) - 1.0).abs() < 1e-9);
        assert!((nines(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(percentile_label(0.5), "p50");
        assert_eq!(percentile_label(0.995), "p99.5");
        assert_eq!(percentile_label(0.9999), "p99.99");
    }

    #[test]
    fn only_the_charts_of_known_runs_are_charts() {
        let runs = ["gifts", "gifts-durable", "rpc"];
        for file in [
            "gifts-cpu.png",
            "gifts-durable-latency-12.png",
            "rpc-throughput.png",
        ] {
            assert!(is_chart(file, &runs), "{file}");
        }
        for file in [
            "gifts.png",
            "rpc-latency-.png",
            "rpc-latency-1.jpg",
            "logo.png",
            "rooms-cpu.png",
        ] {
            assert!(!is_chart(file, &runs), "{file}");
        }
    }

    #[test]
    fn log_ticks_step_1_2_5_or_finer_on_a_narrow_range() {
        assert_eq!(log_ticks(0.3, 30.0), [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert_eq!(log_ticks(1.1, 1.9).len(), 0);
        assert_eq!(log_ticks(2.5, 4.5), [3.0, 4.0]);
    }
}
