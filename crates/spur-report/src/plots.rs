//! Plots by training step: eval accuracy and code-reasoning frequency per
//! model and eval, clip fraction per model; one line per reward (mean over
//! seeds) with a min–max band over seeds. Drawn with plotters as PNG and
//! SVG, text in DejaVu Sans embedded in the binary (no system fonts).

use std::collections::BTreeMap;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::runs::{ProbePoint, RunView, UpdatePoint};
use crate::table::{eval_names, groups};
use crate::{ReportError, ReportInput, Result};

pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 520;

pub const BAND: &str = "Lines: mean over the seeds that have a value at that step; \
shaded band: minimum to maximum over those seeds.";

/// One point of a line: a step and the seeds' values there.
#[derive(Clone, Debug)]
pub struct Point {
    pub step: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Clone, Debug)]
pub struct Line {
    pub label: String,
    pub points: Vec<Point>,
}

#[derive(Clone, Debug)]
pub struct Figure {
    /// File name without extension, unique in the report.
    pub stem: String,
    pub title: String,
    pub y_label: String,
    /// Values are fractions drawn as percentages.
    pub percent: bool,
    pub caption: String,
    pub lines: Vec<Line>,
}

/// A drawn figure and its files (relative to the report directory).
pub struct Drawn {
    pub figure: Figure,
    pub png_file: String,
    pub svg_file: String,
    pub png: Vec<u8>,
    pub svg: String,
}

/// Lines from per-run `(step, value)` series: one line per group of seeds.
fn lines(input: &ReportInput, model: &str, values: impl Fn(usize) -> Vec<(u64, f64)>) -> Vec<Line> {
    groups(input)
        .into_iter()
        .filter(|g| g.model == model)
        .filter_map(|g| {
            let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for &i in &g.runs {
                for (step, v) in values(i) {
                    by_step.entry(step).or_default().push(v);
                }
            }
            let points: Vec<Point> = by_step
                .into_iter()
                .map(|(step, vs)| Point {
                    step,
                    mean: vs.iter().sum::<f64>() / vs.len() as f64,
                    min: vs.iter().copied().fold(f64::INFINITY, f64::min),
                    max: vs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                })
                .collect();
            (!points.is_empty()).then(|| Line {
                label: g.line_label(),
                points,
            })
        })
        .collect()
}

/// Every figure that has data, in a stable order.
pub fn figures(input: &ReportInput, views: &[RunView]) -> Vec<Figure> {
    let mut models: Vec<&str> = Vec::new();
    for r in &input.runs {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    let evals = eval_names(views);
    let mut stems = Stems::default();
    let mut figs = Vec::new();
    for model in models {
        for eval in &evals {
            let series = |metric: &'static str| {
                move |i: usize| -> Vec<(u64, f64)> {
                    views[i]
                        .evals
                        .iter()
                        .filter(|e| &e.eval == eval)
                        .filter_map(|e| Some((e.step, e.metric(metric)?)))
                        .collect()
                }
            };
            let acc = lines(input, model, series("accuracy"));
            if !acc.is_empty() {
                figs.push(Figure {
                    stem: stems.unique(&format!("accuracy-{model}-{eval}")),
                    title: format!("{model}: {eval} accuracy"),
                    y_label: "accuracy (%)".into(),
                    percent: true,
                    caption: format!(
                        "{eval} accuracy of {model} by training step (step 0: the model \
                         before training). {BAND}"
                    ),
                    lines: acc,
                });
            }
            let code = lines(input, model, series("code_frequency"));
            if !code.is_empty() {
                figs.push(Figure {
                    stem: stems.unique(&format!("code-{model}-{eval}")),
                    title: format!("{model}: code reasoning on {eval}"),
                    y_label: "responses mentioning python (%)".into(),
                    percent: true,
                    caption: format!(
                        "Code-reasoning frequency of {model} on {eval} (share of eval \
                         responses containing \"python\") by training step. {BAND}"
                    ),
                    lines: code,
                });
            }
        }
        let clip_sides: [(&str, &str, fn(&UpdatePoint) -> f64); 2] = [
            ("high", "above 1 + ε_high with a positive advantage", |u| {
                u.clip_fraction_high
            }),
            ("low", "below 1 − ε_low with a negative advantage", |u| {
                u.clip_fraction_low
            }),
        ];
        for (side, rule, value) in clip_sides {
            let clip = lines(input, model, |i| {
                views[i]
                    .updates
                    .iter()
                    .map(|u| (u.step, value(u)))
                    .collect()
            });
            if !clip.is_empty() {
                figs.push(Figure {
                    stem: stems.unique(&format!("clip-{side}-{model}")),
                    title: format!("{model}: clip fraction ({side})"),
                    y_label: "clipped tokens (%)".into(),
                    percent: true,
                    caption: format!(
                        "Share of the tokens of {model}'s GRPO updates whose gradient the \
                         {side} clip removed (ratio {rule}), by step. {BAND}"
                    ),
                    lines: clip,
                });
            }
        }
        for probe in PROBE_FIGURES {
            let probed = lines(input, model, |i| {
                let v = &views[i];
                let base = v.probe_baseline.as_ref().map(|p| (0, (probe.value)(p)));
                base.into_iter()
                    .chain(
                        v.updates
                            .iter()
                            .filter_map(|u| Some((u.step, (probe.value)(u.probe.as_ref()?)))),
                    )
                    .collect()
            });
            if !probed.is_empty() {
                figs.push(Figure {
                    stem: stems.unique(&format!("{}-{model}", probe.stem)),
                    title: format!("{model}: {}", probe.title),
                    y_label: probe.y_label.into(),
                    percent: probe.percent,
                    caption: format!(
                        "{} Measured on the probe's fixed prompts after each update (step 0: \
                         the model before training). {BAND}",
                        probe.caption
                    ),
                    lines: probed,
                });
            }
        }
    }
    figs
}

/// A per-step plot of one probe metric.
struct ProbeFigure {
    stem: &'static str,
    title: &'static str,
    y_label: &'static str,
    percent: bool,
    caption: &'static str,
    value: fn(&ProbePoint) -> f64,
}

const PROBE_FIGURES: [ProbeFigure; 4] = [
    ProbeFigure {
        stem: "entropy",
        title: "policy entropy",
        y_label: "entropy (nats per token)",
        percent: false,
        caption: "The policy's entropy: mean over the tokens of its own samples.",
        value: |p| p.entropy,
    },
    ProbeFigure {
        stem: "mode-logprob",
        title: "log-prob of the base model's greedy response",
        y_label: "log-prob per token",
        percent: false,
        caption: "Mean log-prob per token the policy gives the base model's greedy responses \
                  (its prior mode): rising means the mode gains probability.",
        value: |p| p.greedy_logprob,
    },
    ProbeFigure {
        stem: "mode-opening",
        title: "samples that open like the greedy response",
        y_label: "samples (%)",
        percent: true,
        caption: "Share of the policy's samples whose first tokens are those of the base \
                  model's greedy response.",
        value: |p| p.opening_repeat,
    },
    ProbeFigure {
        stem: "length",
        title: "probe response length",
        y_label: "tokens",
        percent: false,
        caption: "Mean length of the policy's sampled responses.",
        value: |p| p.response_length,
    },
];

/// File stems made safe by [`crate::safe_file_name`] and unique by a
/// counter.
#[derive(Default)]
struct Stems(Vec<String>);

impl Stems {
    fn unique(&mut self, name: &str) -> String {
        let base = crate::safe_file_name(name);
        let mut stem = base.clone();
        let mut n = 2;
        while self.0.contains(&stem) {
            stem = format!("{base}-{n}");
            n += 1;
        }
        self.0.push(stem.clone());
        stem
    }
}

static FONTS: Once = Once::new();

fn register_fonts() {
    FONTS.call_once(|| {
        // The embedded DejaVu files are valid fonts; failure here is a bug.
        for (style, bytes) in [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
        ] {
            if plotters::style::register_font("sans-serif", style, bytes).is_err() {
                panic!("the embedded DejaVu Sans font does not parse");
            }
        }
    });
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    fig: &Figure,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let scale = if fig.percent { 100.0 } else { 1.0 };
    let points = || fig.lines.iter().flat_map(|l| &l.points);
    let max_step = points().map(|p| p.step).max().unwrap_or(0).max(1);
    let top = points().map(|p| p.max * scale).fold(0.0, f64::max);
    let (y_min, y_max) = if fig.percent {
        // From zero, with room above the highest band; fractions never go past 100%.
        let y_max = if top > 0.0 { top * 1.15 } else { 1.0 };
        (0.0, y_max.min(100.0).max(top))
    } else {
        // Quantities such as log-probs and entropies: the range of the bands, padded, so
        // that small differences between lines stay visible.
        let high = points().map(|p| p.max).fold(f64::NEG_INFINITY, f64::max);
        let low = points().map(|p| p.min).fold(f64::INFINITY, f64::min);
        let pad = ((high - low) * 0.1)
            .max(high.abs().max(low.abs()) * 1e-3)
            .max(1e-9);
        (low - pad, high + pad)
    };
    let mut c = ChartBuilder::on(root)
        .caption(&fig.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_step as f64, y_min..y_max)?;
    c.configure_mesh()
        .x_desc("training step")
        .y_desc(fig.y_label.as_str())
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE.mix(0.0))
        .x_labels((max_step as usize + 1).min(11))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (k, line) in fig.lines.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let mut band: Vec<(f64, f64)> = line
            .points
            .iter()
            .map(|p| (p.step as f64, p.max * scale))
            .collect();
        band.extend(
            line.points
                .iter()
                .rev()
                .map(|p| (p.step as f64, p.min * scale)),
        );
        c.draw_series(std::iter::once(Polygon::new(band, color.mix(0.18))))?;
        let xy = |p: &Point| (p.step as f64, p.mean * scale);
        c.draw_series(LineSeries::new(
            line.points.iter().map(xy),
            color.stroke_width(2),
        ))?
        .label(line.label.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
        c.draw_series(
            line.points
                .iter()
                .map(|p| Circle::new(xy(p), 3, color.filled())),
        )?;
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

pub fn draw(fig: &Figure) -> Result<Drawn> {
    register_fonts();
    let png_file = format!("plots/{}.png", fig.stem);
    let svg_file = format!("plots/{}.svg", fig.stem);
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        chart(&root, fig).map_err(|e| ReportError::Plot {
            file: png_file.clone(),
            problem: e.to_string(),
        })?;
    }
    let png = encode_png(&rgb).map_err(|e| ReportError::Plot {
        file: png_file.clone(),
        problem: e.to_string(),
    })?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        chart(&root, fig).map_err(|e| ReportError::Plot {
            file: svg_file.clone(),
            problem: e.to_string(),
        })?;
    }
    Ok(Drawn {
        figure: fig.clone(),
        png_file,
        svg_file,
        png,
        svg,
    })
}

fn encode_png(rgb: &[u8]) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{self, accuracy, STEPS};

    fn figs() -> Vec<Figure> {
        let input = testdata::input();
        let views = testdata::views(&input);
        figures(&input, &views)
    }

    #[test]
    fn accuracy_code_and_clip_per_model() {
        let stems: Vec<String> = figs().into_iter().map(|f| f.stem).collect();
        assert_eq!(
            stems,
            [
                "accuracy-alpha-aime",
                "code-alpha-aime",
                "accuracy-alpha-math500",
                "code-alpha-math500",
                "clip-high-alpha",
                "clip-low-alpha",
                "entropy-alpha",
                "mode-logprob-alpha",
                "mode-opening-alpha",
                "length-alpha",
                "accuracy-beta-aime",
                "code-beta-aime",
                "accuracy-beta-math500",
                "code-beta-math500",
                "clip-high-beta",
                "clip-low-beta",
                "entropy-beta",
                "mode-logprob-beta",
                "mode-opening-beta",
                "length-beta",
            ]
        );
    }

    #[test]
    fn lines_are_means_over_the_seeds_present_with_min_max_bands() {
        let figs = figs();
        let fig = figs
            .iter()
            .find(|f| f.stem == "accuracy-alpha-math500")
            .unwrap();
        let random = fig.lines.iter().find(|l| l.label == "random").unwrap();
        let steps: Vec<u64> = random.points.iter().map(|p| p.step).collect();
        assert_eq!(steps, [0, 2, 4]);
        // Step 2: all three seeds; step 4: seed 3 stopped before it.
        let at2 = &random.points[1];
        assert!((at2.mean - accuracy("alpha", "random", 2, 2)).abs() < 1e-12);
        assert!((at2.min - accuracy("alpha", "random", 1, 2)).abs() < 1e-12);
        assert!((at2.max - accuracy("alpha", "random", 3, 2)).abs() < 1e-12);
        let at4 = &random.points[2];
        let m =
            (accuracy("alpha", "random", 1, STEPS) + accuracy("alpha", "random", 2, STEPS)) / 2.0;
        assert!((at4.mean - m).abs() < 1e-12);
    }

    #[test]
    fn probe_lines_start_from_the_base_model_at_step_0() {
        let figs = figs();
        let fig = figs
            .iter()
            .find(|f| f.stem == "mode-logprob-alpha")
            .unwrap();
        assert!(!fig.percent);
        let random = fig.lines.iter().find(|l| l.label == "random").unwrap();
        let steps: Vec<u64> = random.points.iter().map(|p| p.step).collect();
        assert_eq!(steps, (0..=STEPS).collect::<Vec<_>>());
        let value = |seed, step| {
            testdata::probe_metrics(seed, step)["greedy_logprob"]
                .as_f64()
                .unwrap()
        };
        assert_eq!(random.points[0].mean, value(1, 0));
        // Step 1: all three seeds reached it; the band spans them.
        let at1 = &random.points[1];
        assert!((at1.min - value(1, 1)).abs() < 1e-12);
        assert!((at1.max - value(3, 1)).abs() < 1e-12);
        let high = figs.iter().find(|f| f.stem == "clip-high-alpha").unwrap();
        let low = figs.iter().find(|f| f.stem == "clip-low-alpha").unwrap();
        let seeds = |f: &Figure| f.lines[0].points[0].max;
        assert!(seeds(high) > seeds(low), "the two sides are plotted apart");
    }

    #[test]
    fn stems_are_safe_and_unique() {
        let mut s = Stems::default();
        assert_eq!(s.unique("accuracy-../x y-m"), "accuracy-.._x_y-m");
        assert_eq!(s.unique("../up"), "_up");
        assert_eq!(s.unique(".."), "_");
        assert_eq!(s.unique("a/b"), "a_b");
        assert_eq!(s.unique("a?b"), "a_b-2");
    }

    #[test]
    fn png_and_svg_contain_text() {
        let fig = figs().remove(2);
        let d = draw(&fig).unwrap();
        assert!(d.svg.contains("<text"), "no text in the SVG");
        assert!(d.svg.contains("alpha: math500 accuracy"));
        assert!(d.svg.contains("training step"));
        let decoder = png::Decoder::new(d.png.as_slice());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        // The title band (above the plot area) is white but for the title's
        // glyphs: dark pixels there mean the font drew.
        let dark = (0..40)
            .flat_map(|y| (0..WIDTH).map(move |x| ((y * WIDTH + x) * 3) as usize))
            .filter(|&i| buf[i] < 100 && buf[i + 1] < 100 && buf[i + 2] < 100)
            .count();
        assert!(dark > 200, "only {dark} dark pixels in the title band");
    }
}
