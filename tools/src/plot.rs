//! Charts (`pnmctl model --plot DIR`, the accuracy report): each written as
//! SVG and, where a TrueType font is found for its text, PNG.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

/// One line (or set of markers) on a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Measured on this machine: drawn as markers, not a line.
    pub measured: bool,
}

/// A chart of lines over numeric axes, either of which may be logarithmic.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File name without extension.
    pub file: &'static str,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    /// The legend in the lower right corner (where the lines leave room)
    /// instead of the upper left.
    pub legend_lower_right: bool,
    pub series: Vec<Series>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Finds a TrueType font for PNG text: `PNM_FONT`, else a DejaVu or
/// Liberation sans in the usual places.
fn font() -> Option<&'static [u8]> {
    let candidates = std::env::var_os("PNM_FONT").map(PathBuf::from).into_iter().chain(
        [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        ]
        .map(PathBuf::from),
    );
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // Registered once for the process; fonts live as long as it.
            return Some(Box::leak(bytes.into_boxed_slice()));
        }
    }
    None
}

/// Writes every chart as DIR/<file>.svg and DIR/<file>.png; returns the
/// files written, and a note if PNGs were left out.
pub fn write_all(dir: &Path, charts: &[Chart]) -> Result<(Vec<PathBuf>, Option<String>), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let png = match font() {
        Some(bytes) => plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "the TrueType font found is not readable".to_string())
            .map(|()| true)?,
        None => false,
    };
    let mut written = Vec::new();
    for chart in charts {
        let svg = dir.join(format!("{}.svg", chart.file));
        draw(SVGBackend::new(&svg, (960, 600)).into_drawing_area(), chart)?;
        written.push(svg);
        if png {
            let path = dir.join(format!("{}.png", chart.file));
            draw(BitMapBackend::new(&path, (960, 600)).into_drawing_area(), chart)?;
            written.push(path);
        }
    }
    let note = (!png).then(|| {
        "no TrueType font found for PNG text (install fonts-dejavu-core or set PNM_FONT): SVG only"
            .to_string()
    });
    Ok((written, note))
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (if log { 1.0 } else { 0.0 }, 1.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-9);
        ((lo - pad).min(0.0), hi + pad)
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", chart.file);
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let points = || chart.series.iter().flat_map(|s| s.points.iter().copied());
    let (x0, x1) = bounds(points().map(|p| p.0), chart.log_x);
    let (y0, y1) = bounds(points().map(|p| p.1), chart.log_y);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(84);
    macro_rules! finish {
        ($x:expr, $y:expr) => {{
            let mut c = builder.build_cartesian_2d($x, $y).map_err(|e| err(&e))?;
            c.configure_mesh()
                .x_desc(chart.x_label.as_str())
                .y_desc(chart.y_label.as_str())
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| err(&e))?;
            for (i, s) in chart.series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| (!chart.log_x || p.0 > 0.0) && (!chart.log_y || p.1 > 0.0))
                    .collect();
                if s.measured {
                    c.draw_series(pts.iter().map(|&p| Circle::new(p, 6, color.filled())))
                        .map_err(|e| err(&e))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
                } else {
                    c.draw_series(LineSeries::new(pts, color.stroke_width(2)))
                        .map_err(|e| err(&e))?
                        .label(s.name.as_str())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                        });
                }
            }
            c.configure_series_labels()
                .position(if chart.legend_lower_right {
                    SeriesLabelPosition::LowerRight
                } else {
                    SeriesLabelPosition::UpperLeft
                })
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    match (chart.log_x, chart.log_y) {
        (true, true) => finish!((x0..x1).log_scale(), (y0..y1).log_scale()),
        (true, false) => finish!((x0..x1).log_scale(), y0..y1),
        (false, true) => finish!(x0..x1, (y0..y1).log_scale()),
        (false, false) => finish!(x0..x1, y0..y1),
    }
    root.present().map_err(|e| err(&e))
}
