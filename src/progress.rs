//! Progress of long commands (`mbq quantize`, `mbq eval`) on stderr.
//!
//! On a terminal: an indicatif bar per stage with the elapsed time and an
//! ETA. Anywhere else (stderr redirected to a file or a pipe, CI logs),
//! indicatif draws nothing, so plain lines are written instead: one when a
//! stage starts, one when it ends, and in between at most one every
//! [`PLAIN_INTERVAL`], each with the time since the start, the stage,
//! done/total, the rate (and in tokens/s where a unit covers a known
//! number of tokens) and the ETA:
//!
//! ```text
//! [    3.1 s] layer 2/4: 12/20 grid points (60%), 5.3/s (48.2k tok/s), eta 1.5 s
//! ```

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// At most one plain line per stage this often (besides its start and end).
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// indicatif bars (stderr is a terminal).
    Bar,
    /// One plain line per stage event (stderr is a file or a pipe).
    Plain,
}

impl Mode {
    /// [`Mode::Bar`] when stderr is a terminal, else [`Mode::Plain`].
    pub fn detect() -> Mode {
        if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Plain
        }
    }
}

/// Stage-by-stage progress on stderr.
pub struct Progress {
    mode: Mode,
    t0: Instant,
    bar: ProgressBar,
    stage: Option<Stage>,
}

struct Stage {
    name: String,
    unit: String,
    total: usize,
    done: usize,
    start: Instant,
    last_line: Instant,
    /// `done` when the last plain line was written.
    last_done: Option<usize>,
    /// Tokens a unit covers (0: not a token stage).
    tokens_per_unit: usize,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new(Mode::detect())
    }
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        Progress {
            mode,
            t0: Instant::now(),
            bar: ProgressBar::hidden(),
            stage: None,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Makes `name` the current stage (a no-op if it already is): the
    /// previous one ends, a new bar (or a plain start line) begins.
    pub fn stage(&mut self, name: &str, total: usize, unit: &str) {
        if self.stage.as_ref().is_some_and(|s| s.name == name) {
            return;
        }
        self.end_stage();
        let now = Instant::now();
        self.stage = Some(Stage {
            name: name.to_string(),
            unit: unit.to_string(),
            total,
            done: 0,
            start: now,
            last_line: now,
            last_done: None,
            tokens_per_unit: 0,
        });
        match self.mode {
            Mode::Bar => {
                self.bar =
                    ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
                let tpl =
                    format!("{{bar:40}} {{pos}}/{{len}} {unit} {{elapsed}} eta {{eta}} {{msg}}");
                self.bar.set_style(
                    ProgressStyle::with_template(&tpl)
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                self.bar.set_message(name.to_string());
            }
            Mode::Plain => self.plain_line(),
        }
    }

    /// Each unit of the current stage covers `tokens` tokens: its rate is
    /// also shown in tokens/s.
    pub fn tokens_per_unit(&mut self, tokens: usize) {
        if let Some(s) = self.stage.as_mut() {
            s.tokens_per_unit = tokens;
        }
    }

    /// `done` of the current stage's total are done.
    pub fn set(&mut self, done: usize) {
        let Some(s) = self.stage.as_mut() else {
            return;
        };
        s.done = done;
        match self.mode {
            Mode::Bar => {
                self.bar.set_position(done as u64);
                let secs = s.start.elapsed().as_secs_f64();
                if s.tokens_per_unit > 0 && done > 0 && secs > 0.0 {
                    let tps = (done * s.tokens_per_unit) as f64 / secs;
                    self.bar
                        .set_message(format!("{} ({} tok/s)", s.name, tokens_text(tps)));
                }
            }
            Mode::Plain => {
                let due = s.last_line.elapsed() >= PLAIN_INTERVAL;
                if (due || done >= s.total) && s.last_done != Some(done) {
                    self.plain_line();
                }
            }
        }
    }

    /// A message beside the bar; a line of its own in plain mode.
    pub fn message(&mut self, msg: &str) {
        match self.mode {
            Mode::Bar => self.bar.set_message(msg.to_string()),
            Mode::Plain => eprintln!("{} {msg}", self.stamp()),
        }
    }

    /// A line for the user, above the bar.
    pub fn note(&self, msg: &str) {
        match self.mode {
            Mode::Bar => self.bar.suspend(|| eprintln!("{msg}")),
            Mode::Plain => eprintln!("{msg}"),
        }
    }

    /// Ends the current stage (plain: its last line, if not yet written).
    pub fn end_stage(&mut self) {
        if let Some(s) = &self.stage {
            if self.mode == Mode::Plain && s.last_done != Some(s.done) {
                self.plain_line();
            }
        }
        self.bar.finish_and_clear();
        self.bar = ProgressBar::hidden();
        self.stage = None;
    }

    /// Ends the run's progress display.
    pub fn finish(&mut self) {
        self.end_stage();
    }

    fn stamp(&self) -> String {
        format!("[{:>7.1} s]", self.t0.elapsed().as_secs_f64())
    }

    fn plain_line(&mut self) {
        let stamp = self.stamp();
        let Some(s) = self.stage.as_mut() else {
            return;
        };
        eprintln!("{stamp} {}", plain_text(s));
        s.last_line = Instant::now();
        s.last_done = Some(s.done);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn plain_text(s: &Stage) -> String {
    let secs = s.start.elapsed().as_secs_f64();
    let pct = if s.total > 0 {
        format!(" ({:.0}%)", 100.0 * s.done as f64 / s.total as f64)
    } else {
        String::new()
    };
    let mut t = format!("{}: {}/{} {}{pct}", s.name, s.done, s.total, s.unit);
    let rate = s.done as f64 / secs.max(1e-9);
    let tokens = if s.tokens_per_unit > 0 {
        format!(" ({} tok/s)", tokens_text(rate * s.tokens_per_unit as f64))
    } else {
        String::new()
    };
    if s.done >= s.total && s.done > 0 {
        t += &format!(", done in {}{tokens}", duration(secs));
    } else if s.done > 0 && secs > 0.0 {
        let eta = (s.total - s.done) as f64 / rate;
        t += &format!(", {}/s{tokens}, eta {}", rate_text(rate), duration(eta));
    }
    t
}

/// "950", "48.2k", "1.25M".
fn tokens_text(t: f64) -> String {
    if t >= 1e6 {
        format!("{:.2}M", t / 1e6)
    } else if t >= 1e3 {
        format!("{:.1}k", t / 1e3)
    } else {
        format!("{t:.0}")
    }
}

fn rate_text(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.3}")
    }
}

/// "4.2 s", "3 min 05 s", "1 h 02 min".
pub fn duration(secs: f64) -> String {
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        let s = secs.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (secs / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(4.24), "4.2 s");
        assert_eq!(duration(185.0), "3 min 05 s");
        assert_eq!(duration(3720.0), "1 h 02 min");
    }

    #[test]
    fn plain_text_has_rate_and_eta_then_done() {
        let mut s = Stage {
            name: "layer 1/4".into(),
            unit: "grid points".into(),
            total: 20,
            done: 0,
            start: Instant::now() - Duration::from_secs(2),
            last_line: Instant::now(),
            last_done: None,
            tokens_per_unit: 0,
        };
        assert_eq!(plain_text(&s), "layer 1/4: 0/20 grid points (0%)");
        s.done = 10;
        let t = plain_text(&s);
        assert!(
            t.starts_with("layer 1/4: 10/20 grid points (50%), 5."),
            "{t}"
        );
        assert!(t.contains("/s, eta 2.0 s"), "{t}");
        // 10 grid points of 9,600 tokens in about 2 s: about 48k tokens/s.
        s.tokens_per_unit = 9600;
        let t = plain_text(&s);
        assert!(
            t.contains("/s (4") && t.contains("k tok/s), eta 2.0 s"),
            "{t}"
        );
        s.done = 20;
        assert!(plain_text(&s).contains("done in 2.0 s"));
    }

    #[test]
    fn token_rates_read_well() {
        assert_eq!(tokens_text(950.4), "950");
        assert_eq!(tokens_text(48_213.0), "48.2k");
        assert_eq!(tokens_text(1_254_000.0), "1.25M");
    }
}
