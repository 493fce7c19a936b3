//! Hand-written SVG bar charts for the geo benchmark report (no plotting
//! crate): grouped bars with a linear y axis starting at 0, grid lines, axis
//! labels, a legend, optional tick marks inside the bars (e.g. p50 on a p99
//! bar) and optional dashed reference lines per group.

use std::fmt::Write;

/// Colour-blind-friendly palette (Okabe-Ito), in order of use.
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
];

pub struct BarChart {
    pub title: String,
    /// A second, smaller line under the title (what the bars are).
    pub subtitle: String,
    pub y_label: String,
    pub x_label: String,
    /// One label per group of bars along the x axis.
    pub groups: Vec<String>,
    /// One name per bar within a group (the legend), coloured from PALETTE.
    pub series: Vec<String>,
    /// `values[group][series]`; `None` draws no bar (and says "n/a").
    pub values: Vec<Vec<Option<f64>>>,
    /// Optional black tick drawn across each bar at this value, with its legend text.
    pub ticks: Option<(String, Vec<Vec<Option<f64>>>)>,
    /// Optional dashed horizontal line across each group, with its legend text.
    pub ref_lines: Option<(String, Vec<Option<f64>>)>,
    /// Decimals of the value printed above each bar.
    pub decimals: usize,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis top and step (1, 2 or 5 times a power of ten) for `max`.
pub fn nice_axis(max: f64) -> (f64, f64) {
    if max.is_nan() || max <= 0.0 || !max.is_finite() {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let top = (max / step).ceil() * step;
    // Leave room above the tallest bar for its value label.
    if top - max < step * 0.15 {
        (top + step, step)
    } else {
        (top, step)
    }
}

fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl BarChart {
    pub fn render(&self) -> String {
        let n_groups = self.groups.len().max(1);
        let n_series = self.series.len().max(1);
        let bar_w = 30.0;
        let group_gap = 36.0;
        let group_w = n_series as f64 * bar_w;
        let left = 78.0;
        let right = 24.0;
        let plot_w = (n_groups as f64 * (group_w + group_gap)).max(560.0);
        let width = left + plot_w + right;
        // Legend entries: series, then tick and reference line explanations.
        let mut legend: Vec<(String, String)> = self
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), format!("bar:{}", PALETTE[i % PALETTE.len()])))
            .collect();
        if let Some((label, _)) = &self.ticks {
            legend.push((label.clone(), "tick".into()));
        }
        if let Some((label, _)) = &self.ref_lines {
            legend.push((label.clone(), "ref".into()));
        }
        // Lay the legend out in rows that fit the width (about 7 px per character).
        let mut rows: Vec<Vec<(f64, &(String, String))>> = vec![Vec::new()];
        let mut x = left;
        for e in &legend {
            let w = 30.0 + e.0.chars().count() as f64 * 6.6 + 18.0;
            if x + w > width - right && !rows.last().unwrap().is_empty() {
                rows.push(Vec::new());
                x = left;
            }
            rows.last_mut().unwrap().push((x, e));
            x += w;
        }
        // Wrap the subtitle to the width (about 6.5 px per character at 12 px).
        let per_line = ((width - 20.0) / 6.5) as usize;
        let mut sub_lines: Vec<String> = vec![String::new()];
        for word in self.subtitle.split_whitespace() {
            let cur = sub_lines.last_mut().unwrap();
            if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > per_line {
                sub_lines.push(word.to_string());
            } else {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(word);
            }
        }
        let legend_y = 62.0 + (sub_lines.len() - 1) as f64 * 16.0;
        let top = legend_y + rows.len() as f64 * 20.0 + 10.0;
        let plot_h = 300.0;
        let bottom = 64.0;
        let height = top + plot_h + bottom;

        let mut max = 0f64;
        for g in &self.values {
            for v in g.iter().flatten() {
                max = max.max(*v);
            }
        }
        if let Some((_, t)) = &self.ticks {
            for g in t {
                for v in g.iter().flatten() {
                    max = max.max(*v);
                }
            }
        }
        if let Some((_, r)) = &self.ref_lines {
            for v in r.iter().flatten() {
                max = max.max(*v);
            }
        }
        let (y_top, step) = nice_axis(max);
        let y = |v: f64| top + plot_h - (v / y_top) * plot_h;

        let mut s = String::new();
        let _ = write!(
            s,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>
<text x="{:.0}" y="24" font-size="16" font-weight="bold" text-anchor="middle">{}</text>
"##,
            width / 2.0,
            esc(&self.title),
        );
        for (i, line) in sub_lines.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{:.0}" y="{:.0}" font-size="12" fill="#444" text-anchor="middle">{}</text>"##,
                width / 2.0,
                44.0 + i as f64 * 16.0,
                esc(line)
            );
        }
        // Legend.
        for (r, row) in rows.iter().enumerate() {
            let ly = legend_y + r as f64 * 20.0;
            for (lx, (label, kind)) in row {
                if let Some(color) = kind.strip_prefix("bar:") {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{lx:.1}" y="{:.1}" width="22" height="12" fill="{color}"/>"#,
                        ly - 10.0
                    );
                } else if kind == "tick" {
                    let _ = writeln!(
                        s,
                        r##"<rect x="{lx:.1}" y="{:.1}" width="22" height="12" fill="#bbb"/><line x1="{lx:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black" stroke-width="2.5"/>"##,
                        ly - 10.0,
                        lx + 22.0,
                        ly - 4.0,
                        ly - 4.0
                    );
                } else {
                    let _ = writeln!(
                        s,
                        r##"<line x1="{lx:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#c00" stroke-width="2" stroke-dasharray="5,3"/>"##,
                        lx + 22.0,
                        ly - 4.0,
                        ly - 4.0
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{ly:.1}" font-size="12">{}</text>"#,
                    lx + 28.0,
                    esc(label)
                );
            }
        }
        // Grid and y axis.
        let mut v = 0.0;
        while v <= y_top + step * 0.01 {
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left:.1}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                left + plot_w,
                left - 6.0,
                yy + 4.0,
                fmt_tick(v, step)
            );
            v += step;
        }
        let _ = writeln!(
            s,
            r#"<line x1="{left:.1}" x2="{left:.1}" y1="{top:.1}" y2="{:.1}" stroke="black"/><line x1="{left:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
            top + plot_h,
            left + plot_w,
            top + plot_h,
            top + plot_h
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(18,{:.1}) rotate(-90)" font-size="13" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            esc(&self.y_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="13" text-anchor="middle">{}</text>"#,
            left + plot_w / 2.0,
            height - 12.0,
            esc(&self.x_label)
        );
        // Bars.
        let slot = plot_w / n_groups as f64;
        for (g, label) in self.groups.iter().enumerate() {
            let gx = left + slot * g as f64 + (slot - group_w) / 2.0;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
                gx + group_w / 2.0,
                top + plot_h + 20.0,
                esc(label)
            );
            for i in 0..self.series.len() {
                let bx = gx + i as f64 * bar_w;
                let color = PALETTE[i % PALETTE.len()];
                match self.values.get(g).and_then(|r| r.get(i)).copied().flatten() {
                    Some(val) => {
                        let yy = y(val);
                        let _ = writeln!(
                            s,
                            r#"<rect x="{:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}: {val:.3}</title></rect>"#,
                            bx + 2.0,
                            bar_w - 4.0,
                            (top + plot_h - yy).max(0.0),
                            esc(label),
                            esc(&self.series[i])
                        );
                        let _ = writeln!(
                            s,
                            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{:.*}</text>"#,
                            bx + bar_w / 2.0,
                            yy - 4.0,
                            self.decimals,
                            val
                        );
                    }
                    None => {
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#888" text-anchor="middle">n/a</text>"##,
                            bx + bar_w / 2.0,
                            top + plot_h - 4.0
                        );
                    }
                }
                if let Some((_, ticks)) = &self.ticks {
                    if let Some(t) = ticks.get(g).and_then(|r| r.get(i)).copied().flatten() {
                        let _ = writeln!(
                            s,
                            r#"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black" stroke-width="2.5"/>"#,
                            bx + 2.0,
                            bx + bar_w - 2.0,
                            y(t),
                            y(t)
                        );
                    }
                }
            }
            if let Some((_, refs)) = &self.ref_lines {
                if let Some(r) = refs.get(g).copied().flatten() {
                    let _ = writeln!(
                        s,
                        r##"<line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#c00" stroke-width="2" stroke-dasharray="5,3"/>"##,
                        gx - 6.0,
                        gx + group_w + 6.0,
                        y(r),
                        y(r)
                    );
                }
            }
        }
        s.push_str("</svg>\n");
        s
    }
}
