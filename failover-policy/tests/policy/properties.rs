//! Properties over random worlds: sites failing, isolating, partitioning and recovering at
//! random times, observers dropping reports, the policy paused and resumed.

use std::collections::BTreeMap;

use failover_policy::{Action, Classification, Observer, TickOutput};
use invoker_domain::{runs_len, BUCKETS};
use proptest::prelude::*;

use crate::sim::*;

#[derive(Debug, Clone)]
enum Event {
    Nothing,
    /// Everything back to normal, so that recoveries and failbacks happen too.
    Heal,
    Site(usize, bool),
    Agent(usize, bool),
    Isolate(usize, bool),
    ReportsLost(usize, bool),
    Partition(bool),
    Witness(bool),
    Edge(bool),
    Fail(usize, usize, bool),
    EdgeErrors(usize, u64),
    Load(u64),
    Pause(bool),
    /// Resend an agent's last sequence number: must be refused, changing nothing.
    Replay(usize),
}

fn event() -> impl Strategy<Value = Event> {
    let site = 0..2usize;
    prop_oneof![
        12 => Just(Event::Nothing),
        1 => Just(Event::Heal),
        1 => (site.clone(), any::<bool>()).prop_map(|(i, b)| Event::Site(i, b)),
        1 => (site.clone(), any::<bool>()).prop_map(|(i, b)| Event::Agent(i, b)),
        1 => (site.clone(), any::<bool>()).prop_map(|(i, b)| Event::Isolate(i, b)),
        1 => (site.clone(), any::<bool>()).prop_map(|(i, b)| Event::ReportsLost(i, b)),
        1 => any::<bool>().prop_map(Event::Partition),
        1 => any::<bool>().prop_map(Event::Witness),
        1 => any::<bool>().prop_map(Event::Edge),
        2 => (site.clone(), 0..2usize, any::<bool>()).prop_map(|(i, s, b)| Event::Fail(i, s, b)),
        1 => (site.clone(), prop_oneof![Just(0u64), 0..100u64]).prop_map(|(i, p)| Event::EdgeErrors(i, p)),
        1 => (0..3_000u64).prop_map(Event::Load),
        1 => any::<bool>().prop_map(Event::Pause),
        1 => (0..3usize).prop_map(Event::Replay),
    ]
}

/// (time to advance, what changes, which observers' reports are lost this step).
type Step = (u64, Event, u8);

fn steps(events: impl Strategy<Value = Event>) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec((0..1_500u64, events, any::<u8>()), 1..120)
}

fn dropped(mask: u8, observer: &Observer) -> bool {
    // Mostly deliver: drop an observer's report only when two of its bits are set.
    let bit = match observer {
        Observer::Agent(s) if s == "a" => 0,
        Observer::Agent(s) if s == "b" => 2,
        Observer::Agent(_) => 4,
        Observer::Edge => 6,
    };
    (mask >> bit) & 0b11 == 0b11
}

fn simulate(config: &str, steps: &[Step]) -> Vec<TickOutput> {
    let mut sim = Sim::new(config);
    let mut outs = Vec::new();
    for (dt, event, mask) in steps {
        sim.now_ms += dt;
        let n = &mut sim.net;
        match *event {
            Event::Nothing => {}
            Event::Heal => *n = Net::default(),
            Event::Site(i, b) => n.up[i] = b,
            Event::Agent(i, b) => n.agent_up[i] = b,
            Event::Isolate(i, b) => n.isolated[i] = b,
            Event::ReportsLost(i, b) => n.reports_lost[i] = b,
            Event::Partition(b) => n.partition = b,
            Event::Witness(b) => n.witness_up = b,
            Event::Edge(b) => n.edge_up = b,
            Event::Fail(i, s, true) => {
                n.failing.insert((i, SERVICES[s]));
            }
            Event::Fail(i, s, false) => {
                n.failing.remove(&(i, SERVICES[s]));
            }
            Event::EdgeErrors(i, pct) => n.edge_error_pct[i] = pct,
            Event::Load(rps) => n.load_rps = rps,
            Event::Pause(true) => sim.policy.pause(),
            Event::Pause(false) => sim.policy.resume(),
            Event::Replay(i) => {
                let agent = ["a", "b", "witness"][i];
                let observer = Observer::Agent(agent.into());
                let seq = sim.last_seq(&observer);
                let mut replay = if i < 2 {
                    sim.agent_report(i)
                } else {
                    sim.witness_report()
                };
                if let failover_policy::Observation::Agent(r) = &mut replay {
                    r.seq = seq; // the number last sent (0 if never: then it is the first)
                }
                let before = sim.policy.clone();
                if sim.observe(&replay).is_err() {
                    assert_eq!(sim.policy, before, "a refused report changed the state");
                }
            }
        }
        sim.send_reports_except(|o| dropped(*mask, o));
        outs.push(sim.tick());
        for table in sim.current.routing.values() {
            assert_eq!(runs_len(&table.runs), BUCKETS as u64);
        }
    }
    outs
}

fn check_routing_only_to_healthy_sites(outs: &[TickOutput]) -> Result<(), TestCaseError> {
    for out in outs {
        for d in &out.decisions {
            if let Action::ShiftBuckets { new_runs, .. } | Action::Failback { new_runs, .. } =
                &d.action
            {
                prop_assert_eq!(runs_len(new_runs), BUCKETS as u64);
                for run in new_runs {
                    let class = out.sites[&run.site].services[&d.service];
                    prop_assert_eq!(class, Classification::Healthy, "{:?} at {}", d, out.now_ms);
                }
            }
        }
    }
    Ok(())
}

fn check_hold_down(config: &str, outs: &[TickOutput]) -> Result<(), TestCaseError> {
    let hold_down_ms: u64 = if config == AUTO_FAILBACK {
        5_000
    } else {
        10_000
    };
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for out in outs {
        for d in out.decisions.iter().filter(|d| !d.dry_run) {
            if matches!(
                d.action,
                Action::ShiftBuckets { .. } | Action::Failback { .. }
            ) {
                if let Some(prev) = last.insert(&d.service, d.decided_at_ms) {
                    prop_assert!(
                        d.decided_at_ms >= prev + hold_down_ms,
                        "{} changed at {} and again at {}",
                        d.service,
                        prev,
                        d.decided_at_ms
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn routing_goes_only_to_healthy_sites_and_covers_every_bucket(
        auto in any::<bool>(),
        steps in steps(event()),
    ) {
        let config = if auto { AUTO_FAILBACK } else { CONFIG };
        let outs = simulate(config, &steps);
        check_routing_only_to_healthy_sites(&outs)?;
    }

    #[test]
    fn at_most_one_automatic_shift_per_service_per_hold_down(
        auto in any::<bool>(),
        steps in steps(event()),
    ) {
        let config = if auto { AUTO_FAILBACK } else { CONFIG };
        check_hold_down(config, &simulate(config, &steps))?;
    }

    #[test]
    fn the_same_inputs_give_the_same_outputs(steps in steps(event())) {
        prop_assert_eq!(simulate(AUTO_FAILBACK, &steps), simulate(AUTO_FAILBACK, &steps));
    }

    #[test]
    fn a_pure_inter_site_partition_never_shifts(
        steps in steps(prop_oneof![
            3 => Just(Event::Nothing),
            1 => any::<bool>().prop_map(Event::Partition),
            1 => (0..2usize, any::<bool>()).prop_map(|(i, b)| Event::ReportsLost(i, b)),
        ]),
    ) {
        let outs = simulate(CONFIG, &steps);
        for out in &outs {
            prop_assert!(out.decisions.is_empty(), "{:?}", out.decisions);
        }
    }
}
