//! What `/metrics` exports: the proxy's request counters (`proxy::metrics`), this
//! generation's live gauges, the draining generations (from the state directory, with how long
//! each has been draining) and the ledger that outlives generations (handoffs, phase
//! durations, drains), read at scrape time.

use baton_handoff::Drain;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::time::SystemTime;

use crate::control::DrainingGeneration;
use crate::daemon::state_dir::{HandoffResult, Ledger, StateDir};

/// The registry `/metrics` encodes, metric names prefixed `baton_`.
pub fn registry(drain: Drain, state: StateDir, generation: u64) -> Registry {
    let mut registry = Registry::with_prefix("baton");
    crate::proxy::metrics::get().register(&mut registry);
    registry.register_collector(Box::new(Live {
        drain,
        state,
        generation,
    }));
    registry
}

/// Values read at scrape time.
struct Live {
    drain: Drain,
    state: StateDir,
    generation: u64,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").field("generation", &self.generation).finish()
    }
}

type Encoded = Result<(), std::fmt::Error>;

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Encoded {
    let g = ConstGauge::new(v);
    let e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(e)
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Encoded {
        self.encode_generation(&mut encoder)?;
        self.encode_draining(&mut encoder)?;
        encode_ledger(&mut encoder, &self.state.ledger())
    }
}

impl Live {
    fn encode_generation(&self, encoder: &mut DescriptorEncoder) -> Encoded {
        let help = "Generation number of the process answering this scrape";
        gauge(encoder, "generation", help, self.generation as i64)?;
        let help = "1 when the answering generation is draining (stopping), else 0";
        gauge(encoder, "draining", help, i64::from(self.drain.is_draining()))?;
        let help = "Open client connections of this generation";
        gauge(
            encoder,
            "client_connections",
            help,
            self.drain.active_connections() as i64,
        )?;
        let help = "Open CONNECT tunnels of this generation";
        gauge(encoder, "tunnels", help, self.drain.active_tunnels() as i64)
    }

    fn encode_draining(&self, encoder: &mut DescriptorEncoder) -> Encoded {
        let draining = self.state.draining();
        let help = "Older generations still draining";
        gauge(encoder, "draining_generations", help, draining.len() as i64)?;
        let families = [
            (
                "draining_connections",
                "Client connections an older, draining generation still serves",
                false,
            ),
            (
                "draining_tunnels",
                "CONNECT tunnels an older, draining generation still relays",
                true,
            ),
        ];
        for (name, help, tunnels) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for d in &draining {
                let v = if tunnels { d.tunnels } else { d.connections };
                ConstGauge::new(v as i64).encode(family.encode_family(&draining_labels(d))?)?;
            }
        }
        encode_draining_age(encoder, &draining)
    }
}

fn draining_labels(d: &DrainingGeneration) -> [(&'static str, String); 2] {
    [("pid", d.pid.to_string()), ("generation", d.generation.to_string())]
}

/// One series per draining generation that published when it began (all but those of older
/// versions); like the other draining series, it vanishes when the generation exits.
fn encode_draining_age(encoder: &mut DescriptorEncoder, draining: &[DrainingGeneration]) -> Encoded {
    let help = "Seconds since an older generation began draining";
    let mut family = encoder.encode_descriptor("draining_age_seconds", help, None, MetricType::Gauge)?;
    let now = SystemTime::now();
    for d in draining {
        if let Some(age) = d.draining_seconds(now) {
            ConstGauge::new(age).encode(family.encode_family(&draining_labels(d))?)?;
        }
    }
    Ok(())
}

fn encode_ledger(encoder: &mut DescriptorEncoder, ledger: &Ledger) -> Encoded {
    let help =
        "Handoffs by result (ok, child_exit, failed_after_ready, timeout, spawn_error, refused), across generations";
    let mut family = encoder.encode_descriptor("handoffs", help, None, MetricType::Counter)?;
    for result in HandoffResult::ALL {
        let v = ledger.handoffs.get(result.as_str()).copied().unwrap_or(0);
        ConstCounter::new(v).encode(family.encode_family(&[("result", result.as_str())])?)?;
    }
    let help = "Handoff phase durations: spawn_to_ready (new generation) and drain (old generation)";
    let mut family = encoder.encode_descriptor("handoff_phase_seconds", help, None, MetricType::Histogram)?;
    for (phase, h) in [("spawn_to_ready", &ledger.spawn_to_ready), ("drain", &ledger.drain)] {
        family
            .encode_family(&[("phase", phase)])?
            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.pairs(), None)?;
    }
    let help = "Connections and tunnels handed to handoff drains, by outcome (finished or cut at the drain timeout)";
    let mut family = encoder.encode_descriptor("drained_connections", help, None, MetricType::Counter)?;
    for (outcome, v) in [("finished", ledger.drain_finished), ("cut", ledger.drain_cut)] {
        ConstCounter::new(v).encode(family.encode_family(&[("outcome", outcome)])?)?;
    }
    let help = "Connections lost with successors that failed their canary window (open at their last ping)";
    let lost = ConstCounter::new(ledger.canary_lost);
    lost.encode(encoder.encode_descriptor("canary_lost_connections", help, None, lost.metric_type())?)?;
    Ok(())
}
