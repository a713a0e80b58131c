//! The TTFT CDF chart (`OUT/LABEL.png`), drawn into an RGB buffer and written as a PNG (zlib via
//! `miniz_oxide`): no image or font dependencies. The chart has no text;
//! the colour of each run and the axis ranges are printed and written to the result JSON.

use serde::Serialize;

use super::report::percentile;

const W: usize = 800;
const H: usize = 500;
const MARGIN: usize = 40;

/// Line colours, in run order.
pub const PALETTE: &[([u8; 3], &str)] = &[
    ([31, 119, 180], "blue"),
    ([255, 127, 14], "orange"),
    ([44, 160, 44], "green"),
    ([214, 39, 40], "red"),
    ([148, 103, 189], "purple"),
    ([140, 86, 75], "brown"),
    ([227, 119, 194], "pink"),
    ([127, 127, 127], "grey"),
];

/// What the chart shows, for the reader of the image.
#[derive(Debug, Clone, Serialize)]
pub struct Legend {
    pub title: &'static str,
    /// The x axis spans 0..x_max_ms; vertical grid lines every tenth of it.
    pub x_max_ms: f64,
    /// The y axis spans 0..1; horizontal grid lines every 0.1.
    pub series: Vec<(String, &'static str)>,
}

/// Draws one CDF line per `(label, sorted TTFTs)` and returns the PNG bytes and the legend.
pub fn ttft_cdf(runs: &[(String, Vec<f64>)]) -> (Vec<u8>, Legend) {
    let x_max = runs
        .iter()
        .map(|(_, v)| percentile(v, 99.0))
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.1;
    let mut img = Canvas::new();
    let (x0, y0, x1, y1) = (MARGIN, H - MARGIN, W - MARGIN / 2, MARGIN / 2);
    for i in 0..=10 {
        let x = x0 + (x1 - x0) * i / 10;
        let y = y0 - (y0 - y1) * i / 10;
        img.line(x, y0, x, y1, [225, 225, 225], 1);
        img.line(x0, y, x1, y, [225, 225, 225], 1);
    }
    img.line(x0, y0, x1, y0, [0, 0, 0], 2);
    img.line(x0, y0, x0, y1, [0, 0, 0], 2);
    let to_px = |v: f64, frac: f64| {
        let x = x0 as f64 + (v / x_max).min(1.0) * (x1 - x0) as f64;
        let y = y0 as f64 - frac * (y0 - y1) as f64;
        (x.round() as usize, y.round() as usize)
    };
    let mut series = Vec::new();
    for (i, (label, values)) in runs.iter().enumerate() {
        let (colour, name) = PALETTE[i % PALETTE.len()];
        series.push((label.clone(), name));
        let n = values.len() as f64;
        let mut prev = to_px(0.0, 0.0);
        for (k, &v) in values.iter().enumerate() {
            let step = to_px(v, k as f64 / n);
            let up = to_px(v, (k + 1) as f64 / n);
            img.line(prev.0, prev.1, step.0, step.1, colour, 2);
            img.line(step.0, step.1, up.0, up.1, colour, 2);
            prev = up;
        }
    }
    let legend = Legend {
        title: "TTFT CDF (x: TTFT ms, y: fraction of successful requests)",
        x_max_ms: x_max,
        series,
    };
    (img.png(), legend)
}

/// What the timeline chart shows.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineLegend {
    pub title: &'static str,
    /// The x axis spans 0..x_max_s (trace seconds); vertical grid lines every tenth of it.
    pub x_max_s: f64,
    /// Panels top to bottom: `(name, y_max, colour)`; each y axis spans 0..y_max with grid lines
    /// every quarter.
    pub panels: Vec<(String, f64, &'static str)>,
}

/// One panel of the timeline: its name, a fixed y maximum (or `None` to fit the data) and its
/// `(x, y)` points.
pub type Panel = (String, Option<f64>, Vec<(f64, f64)>);

/// Draws stacked panels sharing the x axis, one step line of `(x, y)` points each. A panel's
/// y range is `0..y_max` when given, else `0..` 1.1 x its largest value.
pub fn timeline(panels: &[Panel]) -> (Vec<u8>, TimelineLegend) {
    let x_max = panels
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0, f64::max)
        .max(1e-3);
    let mut img = Canvas::new();
    let n = panels.len().max(1);
    let band = (H - MARGIN) / n;
    let mut legend = Vec::new();
    for (k, (name, fixed, points)) in panels.iter().enumerate() {
        let (colour, cname) = PALETTE[k % PALETTE.len()];
        let y_max =
            fixed.unwrap_or_else(|| points.iter().map(|(_, y)| *y).fold(0.0, f64::max) * 1.1);
        let y_max = if y_max > 0.0 { y_max } else { 1.0 };
        legend.push((name.clone(), y_max, cname));
        let (x0, x1) = (MARGIN, W - MARGIN / 2);
        let (y1, y0) = (MARGIN / 2 + k * band, (k + 1) * band);
        for i in 0..=10 {
            let x = x0 + (x1 - x0) * i / 10;
            img.line(x, y0, x, y1, [225, 225, 225], 1);
        }
        for i in 0..=4 {
            let y = y0 - (y0 - y1) * i / 4;
            img.line(x0, y, x1, y, [225, 225, 225], 1);
        }
        img.line(x0, y0, x1, y0, [0, 0, 0], 2);
        img.line(x0, y0, x0, y1, [0, 0, 0], 2);
        let to_px = |x: f64, y: f64| {
            let px = x0 as f64 + (x / x_max).clamp(0.0, 1.0) * (x1 - x0) as f64;
            let py = y0 as f64 - (y / y_max).clamp(0.0, 1.0) * (y0 - y1) as f64;
            (px.round() as usize, py.round() as usize)
        };
        let mut prev: Option<(usize, usize)> = None;
        for &(x, y) in points {
            let here = to_px(x, y);
            if let Some(p) = prev {
                img.line(p.0, p.1, here.0, p.1, colour, 2);
                img.line(here.0, p.1, here.0, here.1, colour, 2);
            }
            prev = Some(here);
        }
    }
    let legend = TimelineLegend {
        title: "over trace time: one panel per series",
        x_max_s: x_max,
        panels: legend,
    };
    (img.png(), legend)
}

struct Canvas {
    rgb: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            rgb: vec![255; W * H * 3],
        }
    }

    fn dot(&mut self, x: usize, y: usize, c: [u8; 3], size: usize) {
        for dy in 0..size {
            for dx in 0..size {
                let (x, y) = (x + dx, y + dy);
                if x < W && y < H {
                    let i = (y * W + x) * 3;
                    self.rgb[i..i + 3].copy_from_slice(&c);
                }
            }
        }
    }

    /// Bresenham's line.
    fn line(&mut self, x0: usize, y0: usize, x1: usize, y1: usize, c: [u8; 3], size: usize) {
        let (mut x, mut y) = (x0 as i64, y0 as i64);
        let (x1, y1) = (x1 as i64, y1 as i64);
        let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
        let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.dot(x as usize, y as usize, c, size);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(H * (W * 3 + 1));
        for row in self.rgb.chunks(W * 3) {
            raw.push(0); // filter: none
            raw.extend_from_slice(row);
        }
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(W as u32).to_be_bytes());
        ihdr.extend_from_slice(&(H as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(
            &mut out,
            b"IDAT",
            &miniz_oxide::deflate::compress_to_vec_zlib(&raw, 6),
        );
        chunk(&mut out, b"IEND", &[]);
        out
    }
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_has_one_panel_per_series() {
        let (png, legend) = timeline(&[
            ("load".into(), None, vec![(0.0, 1.0), (60.0, 4.0)]),
            (
                "attainment".into(),
                Some(1.0),
                vec![(0.0, 1.0), (60.0, 0.5)],
            ),
        ]);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(legend.panels.len(), 2);
        assert!((legend.panels[0].1 - 4.4).abs() < 1e-9);
        assert_eq!(legend.x_max_s, 60.0);
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn chart_is_a_png_with_one_series_per_run() {
        let (png, legend) = ttft_cdf(&[
            ("a".into(), vec![1.0, 2.0, 3.0]),
            ("b".into(), vec![2.0, 4.0]),
        ]);
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.ends_with(&[0xAE, 0x42, 0x60, 0x82]), "IEND crc");
        assert_eq!(legend.series.len(), 2);
        // IHDR (8 + 25 bytes), then IDAT: its zlib stream holds every row, and compresses well.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().expect("4 bytes")) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&png[41..41 + idat_len])
            .expect("a valid zlib stream");
        assert_eq!(raw.len(), H * (W * 3 + 1));
        assert!(png.len() < 50_000, "{} bytes", png.len());
    }
}
