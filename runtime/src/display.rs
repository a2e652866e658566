//! The results screen for a 128x64 monochrome OLED, drawn with embedded-graphics: model name,
//! accuracy, agreement with the teacher, p50 latency and a small latency bar chart. Rendered
//! into a 1 KiB framebuffer in SSD1306 page layout, then to a PNG or to a real SSD1306.

use embedded_graphics::mono_font::MonoTextStyle;
use embedded_graphics::mono_font::ascii::{FONT_4X6, FONT_6X10};
use embedded_graphics::pixelcolor::BinaryColor;
use embedded_graphics::prelude::*;
use embedded_graphics::primitives::{Line, PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};

use crate::bench::BenchReport;

/// Screen width in pixels.
pub const WIDTH: u32 = 128;
/// Screen height in pixels.
pub const HEIGHT: u32 = 64;

/// What the screen shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Screen {
    /// Model name (first line).
    pub title: String,
    /// Student top-1 accuracy (percent).
    pub accuracy: f64,
    /// Agreement with the teacher (percent), if measured.
    pub agreement: Option<f64>,
    /// Latency percentiles (ms): p50, p90, p99, and the teacher's round trip p50 if measured.
    pub bars: Vec<(&'static str, f64)>,
}

impl Screen {
    /// The screen for a benchmark report.
    pub fn from_report(report: &BenchReport) -> Self {
        let title = report.architecture.clone().unwrap_or_else(|| {
            std::path::Path::new(&report.model)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let mut bars =
            vec![("p50", report.latency_ms.p50), ("p90", report.latency_ms.p90), ("p99", report.latency_ms.p99)];
        if let Some(t) = &report.teacher {
            bars.push(("api", t.rtt_ms.p50));
        }
        Self { title, accuracy: report.accuracy, agreement: report.teacher.as_ref().map(|t| t.agreement), bars }
    }

    /// Draw onto any 128x64 binary display.
    pub fn draw<D: DrawTarget<Color = BinaryColor>>(&self, d: &mut D) -> Result<(), D::Error> {
        d.clear(BinaryColor::Off)?;
        let big = MonoTextStyle::new(&FONT_6X10, BinaryColor::On);
        let small = MonoTextStyle::new(&FONT_4X6, BinaryColor::On);
        let title: String = self.title.chars().take(21).collect();
        Text::with_baseline(&title, Point::new(0, 0), big, Baseline::Top).draw(d)?;
        Line::new(Point::new(0, 10), Point::new(127, 10))
            .into_styled(PrimitiveStyle::with_stroke(BinaryColor::On, 1))
            .draw(d)?;
        let agreement = self.agreement.map(|a| format!(" agr {a:.1}")).unwrap_or_default();
        Text::with_baseline(&format!("acc {:.1}{agreement}", self.accuracy), Point::new(0, 12), big, Baseline::Top)
            .draw(d)?;
        let p50 = self.bars.first().map_or(0.0, |b| b.1);
        Text::with_baseline(&format!("p50 {}", format_ms(p50)), Point::new(0, 22), big, Baseline::Top).draw(d)?;
        // Bar chart: y from 33 to 57, labels at 58.
        let max = self.bars.iter().map(|b| b.1).fold(f64::MIN_POSITIVE, f64::max);
        let slot = WIDTH as i32 / self.bars.len().max(1) as i32;
        for (i, (label, value)) in self.bars.iter().enumerate() {
            let x = i as i32 * slot + 2;
            let height = ((value / max) * 24.0).round().clamp(1.0, 24.0) as u32;
            Rectangle::new(Point::new(x, 57 - height as i32 + 1), Size::new((slot - 6).max(2) as u32, height))
                .into_styled(PrimitiveStyle::with_fill(BinaryColor::On))
                .draw(d)?;
            Text::with_baseline(label, Point::new(x, 58), small, Baseline::Top).draw(d)?;
        }
        Ok(())
    }

    /// Render into a framebuffer.
    pub fn render(&self) -> Framebuffer {
        let mut fb = Framebuffer::new();
        self.draw(&mut fb).expect("the framebuffer cannot fail");
        fb
    }
}

fn format_ms(ms: f64) -> String {
    if ms < 1.0 { format!("{:.0} us", ms * 1e3) } else { format!("{ms:.2} ms") }
}

/// 128x64 pixels, 1 bit each, in SSD1306 page layout (8 vertical pixels per byte).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Framebuffer {
    /// 1,024 bytes: page `p` (rows `8p..8p+8`), column `x` at index `p * 128 + x`.
    pub bytes: [u8; 1024],
}

impl Default for Framebuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framebuffer {
    /// All pixels off.
    pub fn new() -> Self {
        Self { bytes: [0; 1024] }
    }

    /// Whether the pixel at `(x, y)` is on.
    pub fn pixel(&self, x: u32, y: u32) -> bool {
        self.bytes[(y as usize / 8) * WIDTH as usize + x as usize] & (1 << (y % 8)) != 0
    }

    /// Pixels that are on.
    pub fn lit(&self) -> usize {
        self.bytes.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// PNG bytes: white on black, each pixel `scale x scale`.
    pub fn to_png(&self, scale: u32) -> Vec<u8> {
        let scale = scale.max(1);
        let img = image::GrayImage::from_fn(WIDTH * scale, HEIGHT * scale, |x, y| {
            image::Luma([if self.pixel(x / scale, y / scale) { 255 } else { 0 }])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).expect("PNG encoding to memory");
        out.into_inner()
    }
}

impl OriginDimensions for Framebuffer {
    fn size(&self) -> Size {
        Size::new(WIDTH, HEIGHT)
    }
}

impl DrawTarget for Framebuffer {
    type Color = BinaryColor;
    type Error = core::convert::Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<BinaryColor>>>(&mut self, pixels: I) -> Result<(), Self::Error> {
        for Pixel(p, color) in pixels {
            if (0..WIDTH as i32).contains(&p.x) && (0..HEIGHT as i32).contains(&p.y) {
                let index = (p.y as usize / 8) * WIDTH as usize + p.x as usize;
                let bit = 1u8 << (p.y % 8);
                if color.is_on() { self.bytes[index] |= bit } else { self.bytes[index] &= !bit }
            }
        }
        Ok(())
    }
}

/// Show the screen on an SSD1306 (128x64, I2C address 0x3C) at `i2c_device`, e.g. `/dev/i2c-1`.
#[cfg(feature = "ssd1306")]
pub fn show_on_ssd1306(screen: &Screen, i2c_device: &str) -> Result<(), String> {
    use ssd1306::prelude::*;
    use ssd1306::{I2CDisplayInterface, Ssd1306};
    let i2c = linux_embedded_hal::I2cdev::new(i2c_device).map_err(|e| format!("{i2c_device}: {e}"))?;
    let interface = I2CDisplayInterface::new(i2c);
    let mut display =
        Ssd1306::new(interface, DisplaySize128x64, DisplayRotation::Rotate0).into_buffered_graphics_mode();
    display.init().map_err(|e| format!("initialising the SSD1306 on {i2c_device}: {e:?}"))?;
    screen.draw(&mut display).map_err(|e| format!("drawing: {e:?}"))?;
    display.flush().map_err(|e| format!("sending the frame to {i2c_device}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen() -> Screen {
        Screen {
            title: "lenet5-half".into(),
            accuracy: 97.25,
            agreement: Some(98.5),
            bars: vec![("p50", 0.05), ("p90", 0.07), ("p99", 0.1), ("api", 0.6)],
        }
    }

    #[test]
    fn draws_text_rule_and_bars() {
        let fb = screen().render();
        assert!(fb.lit() > 200, "too few pixels lit: {}", fb.lit());
        // The title occupies the top text row, the rule is a full line at y = 10.
        assert!((0..60).any(|x| (0..10).any(|y| fb.pixel(x, y))));
        assert!((0..128).all(|x| fb.pixel(x, 10)));
        // The tallest bar (api, the 4th) reaches the top of the chart area; the p50 bar is short.
        assert!(fb.pixel(3 * 32 + 4, 34));
        assert!(!fb.pixel(4, 40));
        assert!(fb.pixel(4, 57));
        // Nothing is drawn between the rule and the first text line's top.
        assert!((0..128).all(|x| !fb.pixel(x, 11)));
    }

    #[test]
    fn png_has_the_screen_size_and_content() {
        let png = screen().render().to_png(4);
        let img = image::load_from_memory(&png).unwrap().to_luma8();
        assert_eq!(img.dimensions(), (512, 256));
        assert!(img.pixels().any(|p| p.0[0] == 255) && img.pixels().any(|p| p.0[0] == 0));
    }
}
