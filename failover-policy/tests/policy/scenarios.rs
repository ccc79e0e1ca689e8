//! One scenario per classification row and per guardrail.

use failover_policy::Classification::*;
use failover_policy::{
    Action, AgentReport, DatabaseProbe, DatabaseRole, EdgeReport, EdgeSample, InstanceProbe,
    Observation, Observer, PolicyError, SiteProbes,
};
use invoker_domain::BucketRun;

use crate::sim::*;

/// A healthy world for two seconds, so that every observer has a history.
fn warm(config: &str) -> Sim {
    let mut sim = Sim::new(config);
    let outs = sim.run(2_000, 250);
    let last = outs.last().unwrap();
    for site in SITES {
        for service in SERVICES {
            assert_eq!(class(last, site, service), Healthy, "{site} {service}");
        }
    }
    assert!(decisions(&outs).is_empty());
    sim
}

fn shifts(outs: &[failover_policy::TickOutput]) -> Vec<failover_policy::Decision> {
    decisions(outs)
        .into_iter()
        .filter(|d| matches!(d.action, Action::ShiftBuckets { .. }))
        .collect()
}

#[test]
fn start_up_without_data_is_unknown_and_does_nothing() {
    let mut sim = Sim::new(CONFIG);
    let out = sim.tick();
    assert!(out.sites.values().all(|s| s.class == Unknown));
    assert!(out.decisions.is_empty());
    // One observer alone is not enough evidence.
    sim.now_ms += 250;
    let report = sim.agent_report(0);
    sim.observe(&report).unwrap();
    let out = sim.tick();
    assert_eq!(out.sites["a"].class, Unknown);
    assert!(out.decisions.is_empty());
}

#[test]
fn site_down_shifts_stateless_services_and_proposes_the_wallet_failover() {
    let mut sim = warm(CONFIG);
    sim.net.up[0] = false;
    let outs = sim.run(5_000, 250);
    // Until agent a is silent its last reports may still be arriving: wait.
    assert_eq!(outs[0].sites["a"].class, Unknown);
    assert!(outs[0].decisions.is_empty());
    let labels = labels(&outs);
    assert_eq!(
        labels,
        ["shift_buckets gift-api", "propose_failover wallet"]
    );
    let all = decisions(&outs);
    assert_eq!(all[0].classification, SiteDown);
    assert_eq!(
        all[0].decided_at_ms, 4_000,
        "silence (750 ms) after the last report at 3000"
    );
    assert_eq!(sim.share(GIFT)["b"], 1024);
    assert_eq!(
        sim.share(WALLET)["a"],
        512,
        "a strong service's routing is never shifted"
    );
    let Action::ProposeFailover {
        from_site,
        to_site,
        writer_epoch,
        data_loss,
    } = &all[1].action
    else {
        panic!("{:?}", all[1]);
    };
    assert_eq!(
        (from_site.as_str(), to_site.as_str(), *writer_epoch),
        ("a", "b", 1)
    );
    assert_eq!(data_loss.primary_last_lsn, 30_000);
    assert_eq!(data_loss.primary_last_seen_ms, 3_000);
    assert_eq!(
        (data_loss.gap_bytes, data_loss.ledger_sequence_gap),
        (500, 5)
    );
    assert!(all[0]
        .evidence
        .iter()
        .any(|e| e.observer == "agent-witness"));
}

#[test]
fn service_failure_moves_only_that_service() {
    let mut sim = warm(CONFIG);
    sim.net.failing.insert((0, GIFT));
    let outs = sim.run(3_000, 250);
    assert_eq!(
        class(&outs[1], "a", GIFT),
        Healthy,
        "two failures do not trip"
    );
    assert_eq!(class(&outs[2], "a", GIFT), ServiceFailure);
    assert_eq!(class(&outs[2], "a", WALLET), Healthy);
    assert_eq!(outs[2].sites["a"].class, Healthy);
    assert_eq!(labels(&outs), ["shift_buckets gift-api"]);
    assert_eq!(sim.share(GIFT)["b"], 1024);
    assert_eq!(sim.share(WALLET)["a"], 512);
}

#[test]
fn inter_site_partition_does_nothing() {
    let mut sim = warm(CONFIG);
    sim.net.partition = true;
    let outs = sim.run(60_000, 250);
    let last = outs.last().unwrap();
    for site in SITES {
        assert_eq!(last.sites[site].class, InterSitePartition);
    }
    assert!(decisions(&outs).is_empty());
}

#[test]
fn a_cut_off_site_whose_agent_still_reports_is_isolated() {
    let mut sim = warm(CONFIG);
    sim.net.isolated[0] = true;
    let outs = sim.run(3_000, 250);
    assert_eq!(
        outs[0].sites["a"].class, Unknown,
        "could still be a dying site"
    );
    let shift = &shifts(&outs)[0];
    assert_eq!(shift.classification, Isolated);
    assert_eq!(
        shift.decided_at_ms, 4_000,
        "a silence window after both remotes lost it"
    );
    assert_eq!(
        labels(&outs),
        ["shift_buckets gift-api", "propose_failover wallet"]
    );
}

#[test]
fn a_silent_unreachable_site_still_serving_users_is_isolated_else_site_down() {
    let mut sim = warm(CONFIG);
    sim.net.isolated[0] = true;
    sim.net.reports_lost[0] = true;
    let outs = sim.run(3_000, 250);
    assert_eq!(shifts(&outs)[0].classification, Isolated);

    // Without the edge's view the same silence is indistinguishable from a dead site.
    let mut sim = warm(CONFIG);
    sim.net.edge_up = false;
    sim.net.isolated[0] = true;
    sim.net.reports_lost[0] = true;
    let outs = sim.run(3_000, 250);
    assert_eq!(shifts(&outs)[0].classification, SiteDown);
}

#[test]
fn gray_failure_shifts_once_sustained() {
    let mut sim = warm(CONFIG);
    sim.net.edge_error_pct[0] = 20;
    let outs = sim.run(2_000, 250);
    assert_eq!(class(outs.last().unwrap(), "a", GIFT), Healthy);
    assert!(decisions(&outs).is_empty());
    let outs = sim.run(1_000, 250);
    assert_eq!(class(&outs[0], "a", GIFT), GrayFailure);
    assert_eq!(labels(&outs), ["shift_buckets gift-api"]);
    assert_eq!(decisions(&outs)[0].classification, GrayFailure);
    // Drained, the site stays gray: no traffic means no new verdict.
    let outs = sim.run(10_000, 250);
    assert_eq!(class(outs.last().unwrap(), "a", GIFT), GrayFailure);
}

#[test]
fn a_flapping_instance_never_trips() {
    let mut sim = warm(CONFIG);
    for i in 0..80 {
        // fail, fail, ok: never three failures in a row.
        if i % 3 == 2 {
            sim.net.failing.clear();
        } else {
            sim.net.failing.insert((0, GIFT));
        }
        let outs = sim.run(250, 250);
        assert_eq!(class(&outs[0], "a", GIFT), Healthy, "step {i}");
        assert!(outs[0].decisions.is_empty());
    }
}

#[test]
fn recovery_needs_successes_to_clear() {
    let mut sim = warm(CONFIG);
    sim.apply = false;
    sim.net.failing.insert((0, GIFT));
    sim.run(750, 250);
    sim.net.failing.clear();
    let outs = sim.run(750, 250);
    let classes: Vec<_> = outs.iter().map(|o| class(o, "a", GIFT)).collect();
    assert_eq!(classes, [ServiceFailure, ServiceFailure, Healthy]);
}

#[test]
fn a_silent_witness_keeps_healthy_sites_healthy_but_blocks_acting_on_a_dead_one() {
    let mut sim = warm(CONFIG);
    sim.net.witness_up = false;
    let outs = sim.run(2_000, 250);
    assert_eq!(class(outs.last().unwrap(), "a", GIFT), Healthy);
    sim.net.up[0] = false;
    let outs = sim.run(10_000, 250);
    assert_eq!(outs.last().unwrap().sites["a"].class, Unknown);
    assert!(decisions(&outs).is_empty());
}

#[test]
fn bad_observations_are_rejected_and_change_nothing() {
    let mut sim = warm(CONFIG);
    let probe = |service: &str| InstanceProbe {
        service: service.into(),
        instance: "x".into(),
        ok: true,
        probed_at_ms: 1,
    };
    let report = |agent: &str, seq: u64, at: u64, site: &str, instances: Vec<InstanceProbe>| {
        Observation::Agent(AgentReport {
            agent_site: agent.into(),
            seq,
            received_at_ms: at,
            targets: vec![SiteProbes {
                site: site.into(),
                instances,
                databases: Vec::new(),
            }],
        })
    };
    let seq = sim.last_seq(&Observer::Agent("a".into())) + 1;
    let now = sim.now_ms;
    let db = DatabaseProbe {
        service: GIFT.into(),
        role: DatabaseRole::Primary,
        current_wal_lsn: 0,
        receive_lsn: 0,
        replay_lsn: 0,
        ledger_sequence: 0,
        probed_at_ms: 0,
    };
    let mut stateless_db = report("a", seq, now, "a", Vec::new());
    if let Observation::Agent(r) = &mut stateless_db {
        r.targets[0].databases.push(db);
    }
    let edge = |request_rps, error_rps| {
        Observation::Edge(EdgeReport {
            seq: sim.last_seq(&Observer::Edge) + 1,
            received_at_ms: now,
            samples: vec![EdgeSample {
                site: "a".into(),
                service: GIFT.into(),
                request_rps,
                error_rps,
            }],
        })
    };
    let bad_edge = edge(10, 11);
    let cases = [
        (report("c", 1, now, "a", vec![]), "unknown observer"),
        (report("a", seq, now, "c", vec![]), "unknown site"),
        (report("a", seq, now, "witness", vec![]), "the witness"),
        (
            report("a", seq, now, "a", vec![probe("chat")]),
            "unknown service",
        ),
        (
            report("a", seq, now, "a", vec![probe(GIFT), probe(GIFT)]),
            "twice",
        ),
        (report("a", seq - 1, now, "a", vec![]), "stale"),
        (report("a", seq, now - 1, "a", vec![]), "out-of-order"),
        (stateless_db, "not a strong service"),
        (bad_edge, "more errors than requests"),
    ];
    for (observation, expected) in cases {
        let before = sim.policy.clone();
        let err = sim.observe(&observation).unwrap_err().to_string();
        assert!(
            err.contains(expected),
            "{err:?} should mention {expected:?}"
        );
        assert_eq!(sim.policy, before, "{expected}");
    }
    let ok = report("a", seq, now, "a", vec![probe(GIFT)]);
    sim.observe(&ok).unwrap();
}

#[test]
fn ticks_with_time_going_backwards_or_bad_routing_are_rejected() {
    let mut sim = warm(CONFIG);
    let before = sim.policy.clone();
    let err = sim.policy.tick(sim.now_ms - 1, &sim.current).unwrap_err();
    assert!(matches!(err, PolicyError::TimeWentBackwards { .. }));
    let mut bad = sim.current.clone();
    bad.routing.insert(GIFT.into(), table(2, &[("a", 1000)]));
    let err = sim.policy.tick(sim.now_ms, &bad).unwrap_err();
    assert!(err.to_string().contains("1000 buckets"), "{err}");
    bad.routing
        .insert(GIFT.into(), table(2, &[("witness", 1024)]));
    assert!(sim.policy.tick(sim.now_ms, &bad).is_err());
    assert_eq!(sim.policy, before);
}

#[test]
fn guardrail_never_routes_to_zero_healthy_sites() {
    let mut sim = warm(CONFIG);
    sim.net.failing.insert((0, GIFT));
    sim.net.failing.insert((1, GIFT));
    let outs = sim.run(10_000, 250);
    let all = decisions(&outs);
    assert_eq!(
        labels(&outs),
        ["refused gift-api", "refused gift-api"],
        "once each"
    );
    let Action::Refused { reason } = &all[0].action else {
        panic!()
    };
    assert!(reason.contains("zero healthy sites"), "{reason}");
    assert_eq!(sim.share(GIFT)["a"], 512);

    // The wallet: a down, b's wallet failing: no proposal, a refusal.
    let mut sim = warm(CONFIG);
    sim.net.failing.insert((1, WALLET));
    sim.net.up[0] = false;
    let outs = sim.run(5_000, 250);
    assert!(labels(&outs).contains(&"refused wallet".to_string()));
    assert!(!labels(&outs).contains(&"propose_failover wallet".to_string()));
}

#[test]
fn guardrail_hold_down_blocks_a_second_shift() {
    let mut sim = warm(CONFIG);
    sim.net.failing.insert((0, GIFT));
    let first = shifts(&sim.run(1_000, 250));
    assert_eq!(first.len(), 1);
    let t0 = first[0].decided_at_ms;
    // a recovers, then b fails: the shift back is held down.
    sim.net.failing = [(1, GIFT)].into();
    let outs = sim.run(2_000, 250);
    let held = decisions(&outs);
    assert_eq!(labels(&outs), ["refused gift-api"]);
    let Action::Refused { reason } = &held[0].action else {
        panic!()
    };
    assert!(reason.contains("hold-down"), "{reason}");
    let outs = sim.run(10_000, 250);
    let second = shifts(&outs);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].decided_at_ms, t0 + 10_000);
    assert_eq!(sim.share(GIFT)["a"], 1024);
    // Failing back restores the routing from before both shifts.
    sim.net.failing.clear();
    sim.run(1_000, 250);
    let back = sim
        .policy
        .request_failback(GIFT, sim.now_ms, &sim.current)
        .unwrap();
    sim.apply_decision(&back[0]);
    assert_eq!(sim.share(GIFT)["b"], 512);
}

#[test]
fn applying_late_extends_the_hold_down_and_dry_runs_cannot_be_applied() {
    let mut sim = warm(CONFIG);
    sim.apply = false;
    sim.net.failing.insert((0, GIFT));
    let shift = shifts(&sim.run(1_000, 250)).remove(0);
    sim.policy
        .record_applied(&shift, shift.decided_at_ms + 4_000)
        .unwrap();
    // Not applied in the world, so the shift is still wanted; held until 4 s later.
    let outs = sim.run(14_000, 250);
    assert_eq!(shifts(&outs)[0].decided_at_ms, shift.decided_at_ms + 14_000);
    let mut dry = shift;
    dry.dry_run = true;
    assert_eq!(
        sim.policy.record_applied(&dry, 0),
        Err(PolicyError::DryRunApplied)
    );
}

#[test]
fn guardrail_capacity_throttles_and_failback_lifts_it() {
    let mut sim = warm(CONFIG);
    sim.net.load_rps = 1_600;
    sim.run(500, 250);
    sim.net.failing.insert((0, GIFT));
    let outs = sim.run(1_000, 250);
    assert_eq!(
        labels(&outs),
        ["shift_buckets gift-api", "enable_throttle gift-api"]
    );
    let throttle = &decisions(&outs)[1].action;
    assert_eq!(
        *throttle,
        Action::EnableThrottle {
            site: "b".into(),
            max_rps: 1000,
            estimated_rps: 1_600
        }
    );
    sim.net.failing.clear();
    sim.run(1_000, 250);
    let back = sim
        .policy
        .request_failback(GIFT, sim.now_ms, &sim.current)
        .unwrap();
    let kinds: Vec<_> = back.iter().map(|d| d.label()).collect();
    assert_eq!(kinds, ["failback", "disable_throttle"]);
}

#[test]
fn guardrail_pause_turns_decisions_into_dry_runs() {
    let mut sim = warm(CONFIG);
    sim.policy.pause();
    sim.net.failing.insert((0, GIFT));
    let outs = sim.run(5_000, 250);
    assert_eq!(labels(&outs), ["would_shift_buckets gift-api"], "said once");
    assert!(outs.iter().all(|o| o.paused));
    assert_eq!(sim.share(GIFT)["a"], 512);
    sim.policy.resume();
    let outs = sim.run(250, 250);
    assert_eq!(labels(&outs), ["shift_buckets gift-api"]);
    assert_eq!(sim.share(GIFT)["b"], 1024);
}

#[test]
fn failback_is_manual_by_default() {
    let mut sim = warm(CONFIG);
    sim.net.failing.insert((0, GIFT));
    sim.run(1_000, 250);
    let err = sim
        .policy
        .request_failback(GIFT, sim.now_ms, &sim.current)
        .unwrap_err();
    assert!(err.to_string().contains("a is service_failure"), "{err}");
    sim.net.failing.clear();
    let outs = sim.run(120_000, 250);
    assert!(decisions(&outs).is_empty(), "no automatic failback");
    let back = sim
        .policy
        .request_failback(GIFT, sim.now_ms, &sim.current)
        .unwrap();
    assert_eq!(back.len(), 1);
    sim.apply_decision(&back[0]);
    assert_eq!(sim.share(GIFT)["a"], 512);
    assert!(sim
        .policy
        .request_failback(GIFT, sim.now_ms, &sim.current)
        .is_err());
    assert!(sim
        .policy
        .request_failback(WALLET, sim.now_ms, &sim.current)
        .is_err());
}

#[test]
fn automatic_failback_waits_for_the_stable_period_and_the_hold_down() {
    let mut sim = warm(AUTO_FAILBACK);
    sim.net.failing.insert((0, GIFT));
    let t0 = shifts(&sim.run(1_000, 250))[0].decided_at_ms;
    sim.net.failing.clear();
    let outs = sim.run(10_000, 250);
    let back = decisions(&outs);
    assert_eq!(labels(&outs), ["failback gift-api"]);
    // Healthy again after three successes; hold-down (5 s) ends later than stable (3 s).
    assert_eq!(back[0].decided_at_ms, t0 + 5_000);
    assert_eq!(
        back[0].action,
        Action::Failback {
            site: "a".into(),
            new_runs: vec![BucketRun::new("a", 512), BucketRun::new("b", 512)]
        }
    );
    assert_eq!(sim.share(GIFT)["a"], 512);
}

#[test]
fn an_operator_routing_change_cancels_automatic_failback() {
    let mut sim = warm(AUTO_FAILBACK);
    sim.net.failing.insert((0, GIFT));
    sim.run(1_000, 250);
    sim.net.failing.clear();
    sim.run(1_000, 250);
    sim.current
        .routing
        .insert(GIFT.into(), table(9, &[("a", 100), ("b", 924)]));
    let outs = sim.run(20_000, 250);
    assert!(decisions(&outs).is_empty(), "{:?}", labels(&outs));
}

#[test]
fn the_same_inputs_give_the_same_outputs() {
    let script = |sim: &mut Sim| {
        let mut outs = sim.run(2_000, 250);
        sim.net.failing.insert((0, GIFT));
        outs.extend(sim.run(2_000, 250));
        sim.net.up[1] = false;
        outs.extend(sim.run(5_000, 333));
        outs
    };
    let first = script(&mut Sim::new(CONFIG));
    let second = script(&mut Sim::new(CONFIG));
    assert!(!decisions(&first).is_empty());
    assert_eq!(first, second);
}

#[test]
fn application_tier_down_with_the_database_up_is_site_down() {
    // The agent alone going silent proves nothing: its instances still answer the others.
    let mut sim = warm(CONFIG);
    sim.net.agent_up[0] = false;
    let outs = sim.run(3_000, 250);
    assert!(decisions(&outs).is_empty(), "{:?}", labels(&outs));
    assert_eq!(outs.last().unwrap().sites["a"].class, Unknown);

    // Agent and every instance of site a gone, its database still answering everyone.
    let mut sim = warm(CONFIG);
    sim.net.agent_up[0] = false;
    for service in SERVICES {
        sim.net.failing.insert((0, service));
    }
    let outs = sim.run(3_000, 250);
    let shift = shifts(&outs);
    assert_eq!(shift.len(), 1, "{:?}", labels(&outs));
    assert_eq!(shift[0].service, GIFT);
    assert_eq!(shift[0].classification, SiteDown);
    assert!(
        shift[0]
            .evidence
            .iter()
            .any(|e| e.detail.contains("application tier down")),
        "{:?}",
        shift[0].evidence
    );
    assert_eq!(sim.share(GIFT)["b"], 1024);
    // The wallet's primary still answers the peer and the witness: wallet-b serves against
    // it, and moving the writer could only lose data, so no failover is proposed.
    assert!(
        !labels(&outs)
            .iter()
            .any(|l| l.starts_with("propose_failover")),
        "{:?}",
        labels(&outs)
    );

    // The same with the witness still reaching site a's instances: only the peer lost them
    // (a partition seen from b), so nothing moves.
    let mut sim = warm(CONFIG);
    sim.net.agent_up[0] = false;
    sim.net.partition = true;
    let outs = sim.run(3_000, 250);
    assert!(shifts(&outs).is_empty(), "{:?}", labels(&outs));
}
