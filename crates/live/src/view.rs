//! Where the figures go: on a terminal, a few lines redrawn in place (a
//! ratatui inline viewport: no alternate screen, so the last view stays in
//! the scrollback); otherwise one plain line per refresh.

use std::io::{IsTerminal as _, Stdout};

use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Widget as _};
use ratatui::{TerminalOptions, Viewport};

use crate::figures::Figures;

/// The lines the terminal view keeps for the figures (the longest view).
pub(crate) const HEIGHT: u16 = 10;

/// The live view of a run.
pub struct View {
    title: String,
    terminal: Option<Terminal<CrosstermBackend<Stdout>>>,
    /// Lines of the last refresh drawn.
    drawn: u16,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("title", &self.title)
            .field("terminal", &self.terminal.is_some())
            .finish()
    }
}

impl View {
    /// Redrawn in place when stdout is a terminal (and `plain` is not
    /// asked for), plain lines otherwise.
    pub fn new(title: impl Into<String>, plain: bool) -> Self {
        let terminal = if plain || !std::io::stdout().is_terminal() {
            None
        } else {
            Terminal::with_options(
                CrosstermBackend::new(std::io::stdout()),
                TerminalOptions {
                    viewport: Viewport::Inline(HEIGHT),
                },
            )
            .ok()
        };
        Self {
            title: title.into(),
            terminal,
            drawn: 0,
        }
    }

    /// A line above the figures (scrolled up with the terminal's output),
    /// or a plain line.
    pub fn say(&mut self, text: &str) {
        let Some(terminal) = &mut self.terminal else {
            println!("{text}");
            return;
        };
        let lines = u16::try_from(text.lines().count().max(1)).unwrap_or(1);
        let text = text.to_owned();
        let inserted = terminal.insert_before(lines, |buf| {
            Paragraph::new(text).render(buf.area, buf);
        });
        if inserted.is_err() {
            self.terminal = None;
        }
    }

    /// Whether the figures are redrawn in place.
    pub fn in_place(&self) -> bool {
        self.terminal.is_some()
    }

    /// Shows one refresh.
    pub fn show(&mut self, figures: &Figures) {
        let Some(terminal) = &mut self.terminal else {
            println!("{}", figures.plain());
            return;
        };
        let lines: Vec<Line> = figures
            .lines(&self.title)
            .into_iter()
            .map(Line::from)
            .collect();
        self.drawn = u16::try_from(lines.len()).unwrap_or(HEIGHT).min(HEIGHT);
        let drawn = terminal.draw(|frame| {
            frame.render_widget(Paragraph::new(lines), frame.area());
        });
        if drawn.is_err() {
            // The terminal went away (closed, resized to nothing): go on
            // with plain lines.
            self.terminal = None;
            println!("{}", figures.plain());
        }
    }

    /// Leaves the last view on screen and moves below it, so what is
    /// printed next follows it.
    pub fn close(mut self) {
        if let Some(mut terminal) = self.terminal.take() {
            // Below the last line drawn: what follows overwrites the
            // viewport's unused lines, not the figures.
            let top = terminal.get_frame().area().top();
            let _ = terminal.set_cursor_position((0, top + self.drawn));
            let _ = terminal.show_cursor();
        }
    }
}
