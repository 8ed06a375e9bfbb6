//! What the live view shows, computed from two [`Sample`]s of the mesh's
//! metrics (the same for `livemesh top` and the demo's broadcast, which
//! reads its own process's metrics) plus what only a client can see.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use crate::prom::{Sample, quantile};

/// The metric names the view reads (as the Prometheus exporter names them).
pub mod names {
    pub const STREAMS: &str = "livemesh_subscribe_streams";
    pub const LOVES: &str = "livemesh_counter_loves_total";
    pub const EVENTS: &str = "livemesh_publish_events_total";
    pub const DELIVERIES: &str = "livemesh_subscribe_deliveries_total";
    pub const QUEUE_DROPS: &str = "livemesh_subscribe_queue_drops_total";
    pub const SHED: &str = "livemesh_server_shed_total";
    pub const BREAKER_STATE: &str = "livemesh_breaker_state";
    /// publish reaching the dispatcher → its Deliver calls going out.
    pub const DELIVER_DELAY: &str = "livemesh_publish_deliver_delay_seconds";
    /// the event's server time → its Deliver reaching a node.
    pub const FANOUT_LAG: &str = "livemesh_fanout_lag_seconds";
    /// Deliver reaching a node → the last of the room's streams sending it.
    pub const WRITE_DELAY: &str = "livemesh_subscribe_write_delay_seconds";
    /// written by a node → received by a client that asked for write
    /// stamps (recorded by such clients: the demo's timed viewers).
    pub const RECEIVE_DELAY: &str = "livemesh_client_receive_delay_seconds";
}

/// The samples of the last `span`: rates and percentiles over a second or
/// so move smoothly even when the view is redrawn four times a second.
#[derive(Debug)]
pub struct Window {
    span: Duration,
    samples: VecDeque<Sample>,
}

impl Window {
    pub fn new(first: Sample, span: Duration) -> Self {
        Self {
            span,
            samples: VecDeque::from([first]),
        }
    }

    /// Adds the newest sample; the figures between it and the oldest one
    /// still within the span.
    pub fn push(&mut self, sample: Sample, elapsed: f64) -> Figures {
        self.samples.push_back(sample);
        while self.samples.len() > 2
            && self.samples[self.samples.len() - 1]
                .at
                .duration_since(self.samples[1].at)
                >= self.span
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some(oldest), Some(newest)) => Figures::between(oldest, newest, elapsed),
            _ => Figures::default(),
        }
    }
}

/// p50 and p99 in seconds over an interval; `None` when nothing was observed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl Percentiles {
    fn between(before: &Sample, after: &Sample, name: &str) -> Self {
        let (b, a) = (before.buckets(name), after.buckets(name));
        Self {
            p50: quantile(&b, &a, 0.5),
            p99: quantile(&b, &a, 0.99),
        }
    }

    fn show(&self) -> String {
        match (self.p50, self.p99) {
            (Some(p50), Some(p99)) => format!("p50 {} p99 {}", ms(p50), ms(p99)),
            _ => "-".into(),
        }
    }
}

/// Seconds as milliseconds with a precision that suits them.
fn ms(seconds: f64) -> String {
    let ms = seconds * 1_000.0;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// One refresh of the view.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Seconds since the view started.
    pub elapsed: f64,
    pub viewers: f64,
    pub loves_total: f64,
    pub loves_per_s: f64,
    pub comments_per_s: f64,
    pub gifts_per_s: f64,
    pub delivered_per_s: f64,
    pub deliver_delay: Percentiles,
    pub fanout_lag: Percentiles,
    pub write_delay: Percentiles,
    /// written → received by a client, where a client records it in the
    /// metrics read (the demo); `None` when no endpoint has it.
    pub receive_delay: Option<Percentiles>,
    /// publish → received by a client (the demo's viewers); `None` in `top`.
    pub end_to_end: Option<Percentiles>,
    pub queue_drops: f64,
    pub shed: f64,
    /// Breakers by state: closed, half-open, open; and the peers not closed.
    pub breakers: [usize; 3],
    pub breakers_not_closed: Vec<String>,
    /// Endpoints that answered, of those asked.
    pub answered: usize,
    pub asked: usize,
    /// A note under the figures (the demo's phase).
    pub note: String,
}

impl Figures {
    /// The mesh's figures between `before` and `after`.
    pub fn between(before: &Sample, after: &Sample, elapsed: f64) -> Self {
        let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let rate = |name: &str, with: &[(&str, &str)]| {
            (after.sum(name, with) - before.sum(name, with)).max(0.0) / seconds
        };
        let mut breakers = [0; 3];
        let mut not_closed = Vec::new();
        for (peer, state) in after.by_label(names::BREAKER_STATE, "peer") {
            let state = (state.max(0.0) as usize).min(2);
            breakers[state] += 1;
            if state > 0 {
                let name = if state == 1 { "half-open" } else { "open" };
                not_closed.push(format!("{peer} {name}"));
            }
        }
        Self {
            elapsed,
            viewers: after.sum(names::STREAMS, &[]),
            loves_total: after.sum(names::LOVES, &[]),
            loves_per_s: rate(names::LOVES, &[]),
            comments_per_s: rate(names::EVENTS, &[("kind", "comment")]),
            gifts_per_s: rate(names::EVENTS, &[("kind", "gift")]),
            delivered_per_s: rate(names::DELIVERIES, &[]),
            deliver_delay: Percentiles::between(before, after, names::DELIVER_DELAY),
            fanout_lag: Percentiles::between(before, after, names::FANOUT_LAG),
            write_delay: Percentiles::between(before, after, names::WRITE_DELAY),
            receive_delay: (!after.buckets(names::RECEIVE_DELAY).is_empty())
                .then(|| Percentiles::between(before, after, names::RECEIVE_DELAY)),
            end_to_end: None,
            queue_drops: after.sum(names::QUEUE_DROPS, &[]),
            shed: after.sum(names::SHED, &[]),
            breakers,
            breakers_not_closed: not_closed,
            answered: after.answered,
            asked: after.asked,
            note: String::new(),
        }
    }

    /// The view's lines (the terminal view draws these, in place).
    pub fn lines(&self, title: &str) -> Vec<String> {
        let mut lines = vec![format!(
            "{title}  {:>5.1} s  endpoints {}/{}",
            self.elapsed, self.answered, self.asked
        )];
        lines.push(format!(
            "  viewers {:>8.0}   loves {:>8.0}/s  total {:>10.0}",
            self.viewers, self.loves_per_s, self.loves_total
        ));
        lines.push(format!(
            "  comments {:>6.1}/s   gifts {:>6.1}/s   delivered {:>9.0}/s",
            self.comments_per_s, self.gifts_per_s, self.delivered_per_s
        ));
        if let Some(e2e) = &self.end_to_end {
            lines.push(format!("  publish → received by a viewer   {}", e2e.show()));
        }
        lines.push(format!(
            "  publish → Deliver sent           {}",
            self.deliver_delay.show()
        ));
        lines.push(format!(
            "  publish → Deliver at the node    {}",
            self.fanout_lag.show()
        ));
        lines.push(format!(
            "  Deliver → written to streams     {}",
            self.write_delay.show()
        ));
        if let Some(receive) = &self.receive_delay {
            lines.push(format!(
                "  written → received by a viewer   {}",
                receive.show()
            ));
        }
        let mut health = format!(
            "  queue drops {:.0}   shed {:.0}   breakers {} closed, {} half-open, {} open",
            self.queue_drops, self.shed, self.breakers[0], self.breakers[1], self.breakers[2]
        );
        for peer in self.breakers_not_closed.iter().take(3) {
            let _ = write!(health, "; {peer}");
        }
        lines.push(health);
        if !self.note.is_empty() {
            lines.push(format!("  {}", self.note));
        }
        lines
    }

    /// One plain line (for a pipe or a log).
    pub fn plain(&self) -> String {
        let mut line = format!(
            "t={:.1}s viewers={:.0} loves/s={:.0} loves_total={:.0} comments/s={:.1} gifts/s={:.1} \
             delivered/s={:.0}",
            self.elapsed,
            self.viewers,
            self.loves_per_s,
            self.loves_total,
            self.comments_per_s,
            self.gifts_per_s,
            self.delivered_per_s
        );
        let mut hop = |name: &str, p: &Percentiles| {
            let show = |v: Option<f64>| v.map_or("-".into(), |s| format!("{:.3}", s * 1_000.0));
            let _ = write!(
                line,
                " {name}_p50_ms={} {name}_p99_ms={}",
                show(p.p50),
                show(p.p99)
            );
        };
        if let Some(e2e) = &self.end_to_end {
            hop("publish_to_receive", e2e);
        }
        hop("publish_to_deliver", &self.deliver_delay);
        hop("fanout_lag", &self.fanout_lag);
        hop("deliver_to_written", &self.write_delay);
        if let Some(receive) = &self.receive_delay {
            hop("written_to_receive", receive);
        }
        let _ = write!(
            line,
            " queue_drops={:.0} shed={:.0} breakers_closed={} breakers_half_open={} \
             breakers_open={} endpoints={}/{}",
            self.queue_drops,
            self.shed,
            self.breakers[0],
            self.breakers[1],
            self.breakers[2],
            self.answered,
            self.asked
        );
        if !self.note.is_empty() {
            let _ = write!(line, " [{}]", self.note);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample(receive_delay: Option<[u64; 3]>) -> Sample {
        let mut text = String::from("livemesh_subscribe_streams 5\n");
        if let Some([fast, slow, all]) = receive_delay {
            text.push_str(&format!(
                "livemesh_client_receive_delay_seconds_bucket{{le=\"0.0001\"}} {fast}\n\
                 livemesh_client_receive_delay_seconds_bucket{{le=\"0.001\"}} {slow}\n\
                 livemesh_client_receive_delay_seconds_bucket{{le=\"+Inf\"}} {all}\n"
            ));
        }
        Sample::parse(&text)
    }

    #[test]
    fn the_last_hop_is_shown_only_where_a_client_records_it() {
        let figures = Figures::between(&sample(None), &sample(None), 1.0);
        assert_eq!(figures.receive_delay, None);
        assert!(
            !figures
                .lines("t")
                .iter()
                .any(|l| l.contains("written → received"))
        );
        assert!(!figures.plain().contains("written_to_receive"));

        // 100 messages in the second: 98 under 0.1 ms, 2 under 1 ms.
        let before = sample(Some([2, 2, 2]));
        let after = sample(Some([100, 102, 102]));
        let figures = Figures::between(&before, &after, 1.0);
        let receive = figures.receive_delay.unwrap();
        assert!(receive.p50.unwrap() <= 0.000_1, "{receive:?}");
        assert!(
            receive.p99.unwrap() > 0.000_1 && receive.p99.unwrap() <= 0.001,
            "{receive:?}"
        );
        assert!(
            figures
                .lines("t")
                .iter()
                .any(|l| l.starts_with("  written → received by a viewer"))
        );
        assert!(figures.plain().contains("written_to_receive_p99_ms="));

        // The longest view (every optional line) fits the terminal view.
        let longest = Figures {
            end_to_end: Some(Percentiles::default()),
            note: "the demo's phase".into(),
            ..figures
        };
        assert_eq!(longest.lines("t").len(), usize::from(crate::view::HEIGHT));
    }
}
