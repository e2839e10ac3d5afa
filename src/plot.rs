//! Pictures: the nemesis timeline (operations per second and latency percentiles per time bucket,
//! by operation, fault windows shaded, every `unknown` and `unavailable` answer marked) and the
//! bench latency percentile curve, drawn with `plotters` into SVG.
//!
//! Every part of a picture is drawn as a layer of its own (the same chart layout each time) and
//! wrapped in an SVG group with a stable `id`, a `class` and `data-*` attributes, so that a
//! program can find the series and the fault windows in the file without knowing how plotters
//! draws them:
//!
//! | group | what it holds |
//! | --- | --- |
//! | `fault-N`, class `fault-window` | the shaded window of fault N (`data-start-s`, `data-end-s`) |
//! | `rate-OP`, class `series rate` | operations per second of OP, one point per bucket |
//! | `latency-OP-p50` / `-p99`, class `series latency` | latency percentile per bucket |
//! | `marks-unknown`, `marks-unavailable`, class `marks` | one marker per such answer |
//! | `curve-OP`, class `series percentile` | (bench) latency at each percentile |
//!
//! Pictures are drawn from data already in memory: a failure here is a bug or an unwritable
//! file, never a reason to change a verdict.

use std::fmt::Write as _;

use plotters::coord::Shift;
use plotters::prelude::*;

/// What went wrong while drawing or writing a picture.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot draw {what}: {detail} (a bug in the picture code; the data are unaffected)")]
    Draw { what: &'static str, detail: String },
    #[error("cannot write the picture {path}: {source} (check the directory and its permissions)")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn draw_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> PlotError {
    move |e| PlotError::Draw {
        what,
        detail: e.to_string(),
    }
}

/// Writes `svg` to `path`.
pub fn write(path: &std::path::Path, svg: &str) -> Result<(), PlotError> {
    std::fs::write(path, svg).map_err(|source| PlotError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Answered (ok, or a definite answer such as rejected).
    Ok,
    /// Answered `unavailable`: definitely not applied.
    Unavailable,
    /// No answer in time, a broken connection or another status: may or may not have happened.
    Unknown,
}

/// One operation of a nemesis run, in nanoseconds since the run started.
#[derive(Clone, Debug)]
pub struct Sample {
    pub op: &'static str,
    pub start_ns: u64,
    /// When the answer came, or when the client gave up on it.
    pub end_ns: u64,
    pub ending: Ending,
}

/// A fault window, in nanoseconds since the run started.
#[derive(Clone, Debug)]
pub struct FaultWindow {
    pub start_ns: u64,
    pub end_ns: u64,
    pub label: String,
}

/// The operations, in the order of their series (and colours).
pub const OPS: [&str; 4] = ["GET", "PUT", "POST", "DELETE"];

fn op_color(op: &str) -> RGBColor {
    match op {
        "GET" => RGBColor(31, 119, 180),
        "PUT" => RGBColor(44, 160, 44),
        "POST" => RGBColor(255, 127, 14),
        "DELETE" => RGBColor(148, 103, 189),
        _ => RGBColor(90, 90, 90),
    }
}

const FAULT_FILL: RGBColor = RGBColor(214, 39, 40);
const UNKNOWN_COLOR: RGBColor = RGBColor(200, 0, 0);
const UNAVAILABLE_COLOR: RGBColor = RGBColor(0, 0, 0);
const WIDTH: u32 = 1100;
/// At most this many buckets in a timeline (about 18 per pixel of its width): a longer run or a
/// narrower `--timeline-bucket-ms` gets wider buckets, so that memory stays bounded.
pub const MAX_BUCKETS: u64 = 20_000;
const TITLE_H: u32 = 36;

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The elements plotters drew, without its `<svg>` wrapper.
fn body_of(doc: &str) -> &str {
    let start = doc.find(">\n").map_or(0, |i| i + 2);
    let end = doc.rfind("</svg>").unwrap_or(doc.len()).max(start);
    &doc[start..end]
}

/// Puts the layers together: `(attributes of the group, the layer's SVG)`.
fn assemble(size: (u32, u32), layers: &[(String, String)]) -> String {
    let mut s = format!(
        "<svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\">\n",
        w = size.0,
        h = size.1
    );
    for (attrs, doc) in layers {
        if attrs.is_empty() {
            s.push_str(body_of(doc));
        } else {
            let _ = writeln!(s, "<g {attrs}>");
            s.push_str(body_of(doc));
            s.push_str("</g>\n");
        }
    }
    s.push_str("</svg>\n");
    s
}

fn group_attrs(id: &str, class: &str, data: &[(&str, String)]) -> String {
    let mut a = format!("id=\"{}\" class=\"{}\"", escape(id), escape(class));
    for (k, v) in data {
        let _ = write!(a, " data-{k}=\"{}\"", escape(v));
    }
    a
}

// ---------------------------------------------------------------------------------------------
// Nemesis timeline
// ---------------------------------------------------------------------------------------------

/// Per bucket and operation: completions and the sorted latencies (ms) of those that completed.
struct Buckets {
    width_s: f64,
    /// `[op][bucket]`.
    latencies: Vec<Vec<Vec<f64>>>,
}

impl Buckets {
    fn new(samples: &[Sample], n: usize, bucket_ns: u64) -> Buckets {
        let mut latencies = vec![vec![Vec::new(); n]; OPS.len()];
        for s in samples.iter().filter(|s| s.ending == Ending::Ok) {
            let Some(op) = OPS.iter().position(|o| *o == s.op) else {
                continue;
            };
            let b = ((s.end_ns / bucket_ns) as usize).min(n - 1);
            latencies[op][b].push(s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6);
        }
        for per_op in &mut latencies {
            for v in per_op.iter_mut() {
                v.sort_by(f64::total_cmp);
            }
        }
        Buckets {
            width_s: bucket_ns as f64 / 1e9,
            latencies,
        }
    }

    /// Bucket centre in seconds.
    fn x(&self, b: usize) -> f64 {
        (b as f64 + 0.5) * self.width_s
    }

    fn rate(&self, op: usize) -> Vec<(f64, f64)> {
        self.latencies[op]
            .iter()
            .enumerate()
            .map(|(b, v)| (self.x(b), v.len() as f64 / self.width_s))
            .collect()
    }

    /// Runs of consecutive buckets that have answers: the line breaks where none came.
    fn percentile(&self, op: usize, q: f64) -> Vec<Vec<(f64, f64)>> {
        let mut runs = vec![];
        let mut cur = vec![];
        for (b, v) in self.latencies[op].iter().enumerate() {
            if v.is_empty() {
                if !cur.is_empty() {
                    runs.push(std::mem::take(&mut cur));
                }
                continue;
            }
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            cur.push((self.x(b), v[i]));
        }
        if !cur.is_empty() {
            runs.push(cur);
        }
        runs
    }
}

#[derive(Clone, Copy)]
enum TimelineLayer<'a> {
    Base,
    Fault(&'a FaultWindow),
    Rate(usize),
    Latency(usize, &'static str, f64),
    Marks(Ending),
}

struct TimelineFrame<'a> {
    title: &'a str,
    x_max: f64,
    rate_max: f64,
    lat: (f64, f64),
    size: (u32, u32),
}

fn timeline_layer(
    f: &TimelineFrame,
    layer: TimelineLayer,
    buckets: &Buckets,
    samples: &[Sample],
) -> Result<String, PlotError> {
    let e = draw_err::<String>("the nemesis timeline");
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, f.size).into_drawing_area();
        let (title, rest) = root.split_vertically(TITLE_H);
        let (top, bottom) = rest.split_vertically((f.size.1 - TITLE_H) * 2 / 5);
        let mut rate = ChartBuilder::on(&top)
            .margin(8)
            .margin_right(24)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..f.x_max, 0f64..f.rate_max)
            .map_err(|x| e(x.to_string()))?;
        let mut lat = ChartBuilder::on(&bottom)
            .margin(8)
            .margin_right(24)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..f.x_max, (f.lat.0..f.lat.1).log_scale())
            .map_err(|x| e(x.to_string()))?;
        match layer {
            TimelineLayer::Base => {
                root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
                title_text(&title, f.title).map_err(|x| e(x.to_string()))?;
                rate.configure_mesh()
                    .x_desc("seconds since the start")
                    .y_desc("answered ops/s")
                    .y_label_formatter(&|v| format!("{v:.0}"))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
                lat.configure_mesh()
                    .x_desc("seconds since the start (bucket of the answer)")
                    .y_desc("latency ms (p50 solid, p99 dashed)")
                    .y_label_formatter(&|v| format!("{v}"))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
                for op in OPS {
                    let c = op_color(op);
                    rate.draw_series(LineSeries::new(std::iter::empty::<(f64, f64)>(), c))
                        .map_err(|x| e(x.to_string()))?
                        .label(op)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                        });
                }
                rate.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                    .map_err(|x| e(x.to_string()))?
                    .label("fault window")
                    .legend(|(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 20, y + 5)], FAULT_FILL.mix(0.18).filled())
                    });
                rate.configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(180, 180, 180))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
                lat.draw_series(std::iter::empty::<Cross<(f64, f64), i32>>())
                    .map_err(|x| e(x.to_string()))?
                    .label("unknown (no answer in time)")
                    .legend(|(x, y)| Cross::new((x + 10, y), 5, UNKNOWN_COLOR.stroke_width(2)));
                lat.draw_series(std::iter::empty::<TriangleMarker<(f64, f64), i32>>())
                    .map_err(|x| e(x.to_string()))?
                    .label("unavailable")
                    .legend(|(x, y)| {
                        TriangleMarker::new((x + 10, y), 5, UNAVAILABLE_COLOR.filled())
                    });
                lat.configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(180, 180, 180))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
            }
            TimelineLayer::Fault(w) => {
                let (x0, x1) = (w.start_ns as f64 / 1e9, w.end_ns as f64 / 1e9);
                let style = FAULT_FILL.mix(0.18).filled();
                rate.draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x1, f.rate_max)],
                    style,
                )))
                .map_err(|x| e(x.to_string()))?;
                lat.draw_series(std::iter::once(Rectangle::new(
                    [(x0, f.lat.0), (x1, f.lat.1)],
                    style,
                )))
                .map_err(|x| e(x.to_string()))?;
            }
            TimelineLayer::Rate(op) => {
                rate.draw_series(LineSeries::new(
                    buckets.rate(op),
                    op_color(OPS[op]).stroke_width(2),
                ))
                .map_err(|x| e(x.to_string()))?;
            }
            TimelineLayer::Latency(op, name, q) => {
                let c = op_color(OPS[op]);
                for run in buckets.percentile(op, q) {
                    if name == "p50" {
                        lat.draw_series(LineSeries::new(run, c.stroke_width(2)))
                            .map_err(|x| e(x.to_string()))?;
                    } else {
                        lat.draw_series(DashedLineSeries::new(run, 6, 4, c.stroke_width(1)))
                            .map_err(|x| e(x.to_string()))?;
                    }
                }
            }
            TimelineLayer::Marks(ending) => {
                let pts = samples.iter().filter(|s| s.ending == ending).map(|s| {
                    let ms =
                        (s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6).clamp(f.lat.0, f.lat.1);
                    (s.end_ns as f64 / 1e9, ms)
                });
                if ending == Ending::Unknown {
                    lat.draw_series(pts.map(|p| Cross::new(p, 5, UNKNOWN_COLOR.stroke_width(2))))
                        .map_err(|x| e(x.to_string()))?;
                } else {
                    lat.draw_series(
                        pts.map(|p| TriangleMarker::new(p, 5, UNAVAILABLE_COLOR.filled())),
                    )
                    .map_err(|x| e(x.to_string()))?;
                }
            }
        }
        root.present().map_err(|x| e(x.to_string()))?;
    }
    Ok(buf)
}

fn title_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    area.draw_text(
        text,
        &("sans-serif", 18).into_font().color(&BLACK),
        (12, 10),
    )
}

/// The nemesis timeline: answered operations per second and p50/p99 latency per bucket of
/// `bucket_ns` (widened if the run would have more than [`MAX_BUCKETS`]; buckets by the time of
/// the answer), by operation; each fault window shaded; every
/// `unknown` and `unavailable` operation marked at the time it ended, at its latency.
pub fn timeline_svg(
    title: &str,
    samples: &[Sample],
    faults: &[FaultWindow],
    duration_ns: u64,
    bucket_ns: u64,
) -> Result<String, PlotError> {
    let end_ns = samples
        .iter()
        .map(|s| s.end_ns)
        .chain(faults.iter().map(|w| w.end_ns))
        .fold(duration_ns, u64::max)
        .max(1);
    let bucket_ns = bucket_ns.max(end_ns.div_ceil(MAX_BUCKETS)).max(1);
    let n = end_ns.div_ceil(bucket_ns) as usize;
    let buckets = Buckets::new(samples, n, bucket_ns);
    let rate_max = (0..OPS.len())
        .flat_map(|op| buckets.rate(op))
        .map(|(_, r)| r)
        .fold(1.0, f64::max)
        * 1.3;
    let lats = samples
        .iter()
        .map(|s| s.end_ns.saturating_sub(s.start_ns) as f64 / 1e6)
        .filter(|v| *v > 0.0);
    let (lo, hi) = lats.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lat = if hi <= 0.0 {
        (0.1, 10.0)
    } else {
        (lo.max(0.001) / 2.0, hi * 4.0)
    };
    let frame = TimelineFrame {
        title,
        x_max: n as f64 * bucket_ns as f64 / 1e9,
        rate_max,
        lat,
        size: (WIDTH, 720),
    };
    let mut layers = vec![(
        String::new(),
        timeline_layer(&frame, TimelineLayer::Base, &buckets, samples)?,
    )];
    for (i, w) in faults.iter().enumerate() {
        layers.push((
            group_attrs(
                &format!("fault-{i}"),
                "fault-window",
                &[
                    ("start-s", format!("{:.3}", w.start_ns as f64 / 1e9)),
                    ("end-s", format!("{:.3}", w.end_ns as f64 / 1e9)),
                    ("label", w.label.clone()),
                ],
            ),
            timeline_layer(&frame, TimelineLayer::Fault(w), &buckets, samples)?,
        ));
    }
    for (op, name) in OPS.iter().enumerate() {
        let answered: usize = buckets.latencies[op].iter().map(Vec::len).sum();
        if answered == 0 {
            continue;
        }
        layers.push((
            group_attrs(
                &format!("rate-{name}"),
                "series rate",
                &[("op", name.to_string()), ("answered", answered.to_string())],
            ),
            timeline_layer(&frame, TimelineLayer::Rate(op), &buckets, samples)?,
        ));
        for (pct, q) in [("p50", 0.5), ("p99", 0.99)] {
            layers.push((
                group_attrs(
                    &format!("latency-{name}-{pct}"),
                    "series latency",
                    &[("op", name.to_string()), ("percentile", pct.into())],
                ),
                timeline_layer(
                    &frame,
                    TimelineLayer::Latency(op, pct, q),
                    &buckets,
                    samples,
                )?,
            ));
        }
    }
    for (ending, name) in [
        (Ending::Unavailable, "unavailable"),
        (Ending::Unknown, "unknown"),
    ] {
        let count = samples.iter().filter(|s| s.ending == ending).count();
        layers.push((
            group_attrs(
                &format!("marks-{name}"),
                "marks",
                &[("count", count.to_string())],
            ),
            timeline_layer(&frame, TimelineLayer::Marks(ending), &buckets, samples)?,
        ));
    }
    Ok(assemble(frame.size, &layers))
}

// ---------------------------------------------------------------------------------------------
// Bench percentile curve
// ---------------------------------------------------------------------------------------------

/// One operation's latency at increasing percentiles: `(quantile in [0, 1], microseconds)`.
#[derive(Clone, Debug, Default)]
pub struct Curve {
    pub op: String,
    pub points: Vec<(f64, u64)>,
}

/// `-log10(1 - q)`: 0 at 0 %, 1 at 90 %, 2 at 99 %, 3 at 99.9 % ...
pub fn nines(q: f64) -> f64 {
    -(1.0 - q).max(1e-9).log10()
}

fn pct_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

enum CurveLayer<'a> {
    Base,
    Curve(&'a Curve),
}

fn curve_layer(
    title: &str,
    size: (u32, u32),
    x_max: f64,
    y: (f64, f64),
    curves: &[Curve],
    layer: CurveLayer,
) -> Result<String, PlotError> {
    let e = draw_err::<String>("the latency percentile curve");
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, size).into_drawing_area();
        let (title_area, rest) = root.split_vertically(TITLE_H);
        let mut chart = ChartBuilder::on(&rest)
            .margin(8)
            .margin_right(24)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..x_max, (y.0..y.1).log_scale())
            .map_err(|x| e(x.to_string()))?;
        match layer {
            CurveLayer::Base => {
                root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
                title_text(&title_area, title).map_err(|x| e(x.to_string()))?;
                chart
                    .configure_mesh()
                    .x_desc("percentile")
                    .y_desc("latency ms")
                    .x_labels(x_max.round() as usize + 1)
                    .x_label_formatter(&|x| pct_label(*x))
                    .y_label_formatter(&|v| format!("{v}"))
                    .light_line_style(RGBColor(235, 235, 235))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
                for c in curves {
                    let col = op_color(&c.op);
                    chart
                        .draw_series(LineSeries::new(std::iter::empty::<(f64, f64)>(), col))
                        .map_err(|x| e(x.to_string()))?
                        .label(c.op.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                        });
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(180, 180, 180))
                    .draw()
                    .map_err(|x| e(x.to_string()))?;
            }
            CurveLayer::Curve(c) => {
                chart
                    .draw_series(LineSeries::new(
                        c.points
                            .iter()
                            .map(|(q, us)| (nines(*q).min(x_max), (*us as f64 / 1e3).max(y.0))),
                        op_color(&c.op).stroke_width(2),
                    ))
                    .map_err(|x| e(x.to_string()))?;
            }
        }
        root.present().map_err(|x| e(x.to_string()))?;
    }
    Ok(buf)
}

/// The latency percentile curve of each operation (x: percentile on a "nines" scale, y:
/// latency on a log scale).
pub fn percentile_svg(title: &str, curves: &[Curve]) -> Result<String, PlotError> {
    let size = (WIDTH, 560);
    let x_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|(q, _)| nines(*q)))
        .fold(1.0, f64::max)
        .ceil();
    let (lo, hi) = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|(_, us)| *us as f64 / 1e3))
        .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let y = if hi <= 0.0 {
        (0.01, 10.0)
    } else {
        (lo.max(0.001) / 1.5, hi * 1.5)
    };
    let mut layers = vec![(
        String::new(),
        curve_layer(title, size, x_max, y, curves, CurveLayer::Base)?,
    )];
    for c in curves {
        layers.push((
            group_attrs(
                &format!("curve-{}", c.op),
                "series percentile",
                &[("op", c.op.clone())],
            ),
            curve_layer(title, size, x_max, y, curves, CurveLayer::Curve(c))?,
        ));
    }
    Ok(assemble(size, &layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(op: &'static str, start_ms: u64, end_ms: u64, ending: Ending) -> Sample {
        Sample {
            op,
            start_ns: start_ms * 1_000_000,
            end_ns: end_ms * 1_000_000,
            ending,
        }
    }

    #[test]
    fn timeline_has_a_group_per_series_and_fault() {
        let mut s = vec![];
        for i in 0..50u64 {
            s.push(sample("GET", i * 20, i * 20 + 2, Ending::Ok));
            s.push(sample("PUT", i * 20, i * 20 + 5, Ending::Ok));
        }
        s.push(sample("PUT", 400, 900, Ending::Unknown));
        s.push(sample("POST", 450, 460, Ending::Unavailable));
        let w = FaultWindow {
            start_ns: 400_000_000,
            end_ns: 600_000_000,
            label: "kill <primary> & \"more\"".into(),
        };
        let svg = timeline_svg("t", &s, &[w], 1_000_000_000, 100_000_000).expect("drawn");
        for id in [
            "id=\"fault-0\"",
            "id=\"rate-GET\"",
            "id=\"rate-PUT\"",
            "id=\"latency-PUT-p99\"",
            "id=\"marks-unknown\" class=\"marks\" data-count=\"1\"",
            "id=\"marks-unavailable\" class=\"marks\" data-count=\"1\"",
            "&lt;primary&gt; &amp; &quot;more&quot;",
        ] {
            assert!(svg.contains(id), "{id} missing");
        }
        assert!(!svg.contains("rate-DELETE"), "no DELETE was answered");
        assert_eq!(svg.matches("<svg").count(), 1);
        assert_eq!(svg.matches("</svg>").count(), 1);
    }

    #[test]
    fn percentiles_break_where_no_answer_came() {
        let s = vec![
            sample("GET", 0, 10, Ending::Ok),
            sample("GET", 300, 320, Ending::Ok),
            sample("GET", 310, 330, Ending::Ok),
        ];
        let b = Buckets::new(&s, 4, 100_000_000);
        let runs = b.percentile(0, 0.5);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0], vec![(0.05, 10.0)]);
        assert_eq!(runs[1].len(), 1);
        let rate = b.rate(0);
        assert_eq!(rate[1].1, 0.0);
        assert!((rate[3].1 - 20.0).abs() < 1e-9);
    }

    #[test]
    fn buckets_are_bounded() {
        // One hour in 1 ns buckets: widened to MAX_BUCKETS buckets.
        let hour = 3_600_000_000_000u64;
        let s = vec![sample("GET", 0, 1, Ending::Ok)];
        let svg = timeline_svg("t", &s, &[], hour, 1).expect("drawn");
        let doc_points = svg
            .split("id=\"rate-GET\"")
            .nth(1)
            .and_then(|r| r.split("points=\"").nth(1))
            .and_then(|r| r.split('"').next())
            .expect("rate-GET points");
        assert_eq!(doc_points.split_whitespace().count() as u64, MAX_BUCKETS);
    }

    #[test]
    fn percentile_labels() {
        assert_eq!(pct_label(0.0), "0%");
        assert_eq!(pct_label(1.0), "90%");
        assert_eq!(pct_label(3.0), "99.9%");
        assert!((nines(0.99) - 2.0).abs() < 1e-9);
    }
}
