//! Human (80 columns) and JSON renderings of API replies.

use anyhow::Result;
use invoker_api::pb;
use serde_json::{json, Value};

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match pb::NodeState::try_from(state) {
        Ok(pb::NodeState::Leader) => "leader",
        Ok(pb::NodeState::Follower) => "follower",
        Ok(pb::NodeState::Candidate) => "candidate",
        Ok(pb::NodeState::Learner) => "learner",
        Ok(pb::NodeState::Shutdown) => "shutdown",
        _ => "unknown",
    }
}

fn class_name(class: i32) -> &'static str {
    match pb::ServiceClass::try_from(class) {
        Ok(pb::ServiceClass::Stateless) => "stateless",
        Ok(pb::ServiceClass::Strong) => "strong",
        _ => "unknown",
    }
}

fn member_json(m: &pb::Member, leader_id: u64) -> Value {
    json!({
        "id": m.id, "addr": m.addr, "site": m.site, "voter": m.voter,
        "leader": m.id == leader_id, "matched_index": m.matched_index,
    })
}

fn writer_json(w: &Option<pb::Writer>) -> Value {
    match w {
        None => Value::Null,
        Some(w) => json!({"site": w.site, "epoch": w.epoch, "dsn": w.dsn}),
    }
}

pub fn status(s: &pb::ClusterStatus, as_json: bool) -> Result<()> {
    if as_json {
        let routing: Vec<Value> = s
            .routing
            .iter()
            .map(|r| {
                json!({
                    "service": r.service, "class": class_name(r.class), "version": r.version,
                    "buckets_per_site": r.buckets_per_site.iter().collect::<std::collections::BTreeMap<_, _>>(),
                    "share_per_site": r.buckets_per_site.iter()
                        .map(|(site, n)| (site.clone(), json!(f64::from(*n) / 1024.0)))
                        .collect::<serde_json::Map<_, _>>(),
                    "writer": writer_json(&r.writer),
                    "synchronous_replication": r.synchronous_replication,
                    "synchronous_relaxed": r.synchronous_relaxed,
                    "synchronous_reason": r.synchronous_reason,
                    "lease": r.lease.as_ref().map(|l| json!({
                        "site": l.site, "epoch": l.epoch,
                        "granted_at_ms": l.granted_at_ms, "expires_at_ms": l.expires_at_ms,
                    })),
                })
            })
            .collect();
        return print_json(&json!({
            "node_id": s.node_id, "node_site": s.node_site, "state": state_name(s.state),
            "leader_id": s.leader_id, "leader_addr": s.leader_addr, "term": s.term,
            "commit_index": s.commit_index, "last_applied": s.last_applied,
            "last_log_index": s.last_log_index, "snapshot_index": s.snapshot_index,
            "purged_index": s.purged_index, "revision": s.revision,
            "members": s.members.iter().map(|m| member_json(m, s.leader_id)).collect::<Vec<_>>(),
            "routing": routing,
            "policy_paused": s.policy_paused,
            "publications": s.publications.iter().map(|p| json!({
                "site": p.site, "published_revision": p.published_revision,
                "target_revision": p.target_revision, "acked_at_ms": p.acked_at_ms,
                "error": p.error,
                "published_versions": p.published_versions.iter().collect::<std::collections::BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
        }));
    }
    println!(
        "leader {} ({})  term {}  commit {}  applied {}",
        s.leader_id, s.leader_addr, s.term, s.commit_index, s.last_applied
    );
    println!();
    print_members(s);
    println!();
    println!(
        "{:<16} {:<9} {:>4}  {:<28} WRITER",
        "SERVICE", "CLASS", "VER", "ROUTING"
    );
    for r in &s.routing {
        let sorted: std::collections::BTreeMap<_, _> = r.buckets_per_site.iter().collect();
        let share: Vec<String> = sorted
            .into_iter()
            .map(|(site, n)| format!("{site} {:.1}%", f64::from(*n) * 100.0 / 1024.0))
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let lease = |w: &pb::Writer| match &r.lease {
            Some(l) if l.site == w.site && l.epoch == w.epoch && l.expires_at_ms > now => {
                format!(", lease {} ms", l.expires_at_ms - now)
            }
            Some(_) => ", lease expired".to_string(),
            None => String::new(),
        };
        let sync = match (r.synchronous_replication, r.synchronous_relaxed) {
            (false, _) => "",
            (true, false) => ", sync",
            (true, true) => ", sync relaxed",
        };
        let writer = r
            .writer
            .as_ref()
            .map(|w| format!("{} epoch {}{}{sync}", w.site, w.epoch, lease(w)))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<16} {:<9} {:>4}  {:<28} {}",
            truncate(&r.service, 16),
            class_name(r.class),
            r.version,
            share.join("  "),
            writer
        );
    }
    println!();
    println!(
        "failover policy: {}",
        if s.policy_paused {
            "PAUSED (dry-run: records what it would do, acts on nothing)"
        } else {
            "active"
        }
    );
    if !s.publications.is_empty() {
        println!();
        println!(
            "{:<10} {:>9} {:>9}  {:<24} {:<20} ERROR",
            "PUBLISHED", "REVISION", "TARGET", "ACKED", "VERSIONS"
        );
        for p in &s.publications {
            let acked = if p.acked_at_ms == 0 {
                "-".to_string()
            } else {
                invoker_domain::format_utc_ms(p.acked_at_ms)
            };
            let versions: std::collections::BTreeMap<_, _> = p.published_versions.iter().collect();
            let versions: Vec<String> = versions
                .into_iter()
                .map(|(service, v)| format!("{service} v{v}"))
                .collect();
            let state = if p.published_revision >= p.target_revision && p.error.is_empty() {
                String::new()
            } else if p.error.is_empty() {
                "behind".to_string()
            } else {
                truncate(&p.error, 60)
            };
            println!(
                "{:<10} {:>9} {:>9}  {:<24} {:<20} {}",
                p.site,
                p.published_revision,
                p.target_revision,
                acked,
                versions.join(", "),
                state
            );
        }
    }
    Ok(())
}

fn decision_json(d: &pb::PolicyDecisionView) -> Value {
    json!({
        "service": d.service, "decision": d.label, "classification": d.classification,
        "decided_at_ms": d.decided_at_ms, "status": d.status, "log_index": d.log_index,
        "detail": d.detail,
        "evidence": d.evidence.iter().map(|e| json!({
            "observer": e.observer, "probe": e.probe, "detail": e.detail,
            "observed_at_ms": e.observed_at_ms,
        })).collect::<Vec<_>>(),
    })
}

pub fn policy(v: &pb::PolicyView, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&json!({
            "leader_id": v.leader_id, "running": v.running, "paused": v.paused,
            "evaluated_at_ms": v.evaluated_at_ms,
            "sites": v.sites.iter().map(|s| json!({
                "site": s.site, "classification": s.classification,
                "services": s.services.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "evidence": s.evidence.iter().map(|e| json!({
                    "observer": e.observer, "probe": e.probe, "detail": e.detail,
                    "observed_at_ms": e.observed_at_ms,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "pending": v.pending.iter().map(decision_json).collect::<Vec<_>>(),
            "recent": v.recent.iter().map(decision_json).collect::<Vec<_>>(),
            "observers_last_seen_ms": v.observers_last_seen_ms.iter().collect::<std::collections::BTreeMap<_, _>>(),
        }));
    }
    if !v.running {
        println!("the failover policy is not running on leader {} yet (no topology with two sites, a witness and services)", v.leader_id);
        return Ok(());
    }
    println!(
        "failover policy on leader {}: {}  (evaluated {})",
        v.leader_id,
        if v.paused {
            "PAUSED (dry-run)"
        } else {
            "active"
        },
        invoker_domain::format_utc_ms(v.evaluated_at_ms)
    );
    println!();
    println!("{:<10} {:<22} SERVICES", "SITE", "CLASSIFICATION");
    for s in &v.sites {
        let services: std::collections::BTreeMap<_, _> = s.services.iter().collect();
        let services: Vec<String> = services
            .into_iter()
            .map(|(name, class)| format!("{name}={class}"))
            .collect();
        println!(
            "{:<10} {:<22} {}",
            s.site,
            s.classification,
            services.join("  ")
        );
        for e in s.evidence.iter().take(6) {
            println!(
                "{:>12} {} {}: {}",
                "",
                e.observer,
                e.probe,
                truncate(&e.detail, 60)
            );
        }
    }
    let observers: std::collections::BTreeMap<_, _> = v.observers_last_seen_ms.iter().collect();
    if !observers.is_empty() {
        println!();
        let seen: Vec<String> = observers
            .into_iter()
            .map(|(o, at)| {
                let age = v
                    .evaluated_at_ms
                    .saturating_sub(i64::try_from(*at).unwrap_or(i64::MAX));
                format!("{o} {age} ms ago")
            })
            .collect();
        println!("observers: {}", seen.join(", "));
    }
    for (title, list) in [
        ("PENDING", &v.pending),
        ("RECENT DECISIONS (newest first)", &v.recent),
    ] {
        println!();
        println!("{title}");
        if list.is_empty() {
            println!("  none");
        }
        for d in list {
            println!(
                "  {}  {:<24} {:<12} {:<18} {}{}",
                invoker_domain::format_utc_ms(d.decided_at_ms),
                d.label,
                truncate(&d.service, 12),
                d.classification,
                d.status,
                if d.log_index > 0 {
                    format!(" (log {})", d.log_index)
                } else {
                    String::new()
                }
            );
            println!("      {}", truncate(&d.detail, 90));
            for e in d.evidence.iter().take(4) {
                println!(
                    "      {} {}: {}",
                    e.observer,
                    e.probe,
                    truncate(&e.detail, 70)
                );
            }
        }
    }
    Ok(())
}

pub fn policy_mode(r: &pb::SetPolicyModeResponse, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(
            &json!({"paused": r.paused, "changed": r.changed, "log_index": r.log_index}),
        );
    }
    let mode = if r.paused {
        "paused: dry-run, the policy records what it would do and acts on nothing"
    } else {
        "active: the policy acts on its decisions"
    };
    if r.changed {
        println!("failover policy now {mode}");
    } else {
        println!("failover policy already {mode}");
    }
    Ok(())
}

fn print_members(s: &pb::ClusterStatus) {
    println!(
        "{:>4}  {:<8} {:<22} {:<8} {:<8} {:>9} {:>6}",
        "ID", "SITE", "ADDRESS", "ROLE", "STATE", "MATCHED", "LAG"
    );
    for m in &s.members {
        let state = if m.id == s.leader_id {
            "leader"
        } else if m.voter {
            "follower"
        } else {
            "learner"
        };
        let lag = s.last_log_index.saturating_sub(m.matched_index);
        println!(
            "{:>4}  {:<8} {:<22} {:<8} {:<8} {:>9} {:>6}",
            m.id,
            truncate(&m.site, 8),
            truncate(&m.addr, 22),
            if m.voter { "voter" } else { "learner" },
            state,
            m.matched_index,
            lag
        );
    }
}

pub fn members(s: &pb::ClusterStatus, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&json!(s
            .members
            .iter()
            .map(|m| member_json(m, s.leader_id))
            .collect::<Vec<_>>()));
    }
    print_members(s);
    Ok(())
}

pub fn membership(r: &pb::MembershipResponse, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&json!({
            "log_index": r.log_index,
            "members": r.members.iter().map(|m| member_json(m, 0)).collect::<Vec<_>>(),
        }));
    }
    println!("membership changed at log index {}", r.log_index);
    for m in &r.members {
        println!(
            "  {:>4}  {:<8} {:<22} {}",
            m.id,
            m.site,
            m.addr,
            if m.voter { "voter" } else { "learner" }
        );
    }
    Ok(())
}

fn runs_json(runs: &[pb::BucketRun]) -> Value {
    json!(runs
        .iter()
        .map(|r| json!({"site": r.site, "count": r.count}))
        .collect::<Vec<_>>())
}

fn share_line(runs: &[pb::BucketRun]) -> String {
    let mut share = std::collections::BTreeMap::new();
    for r in runs {
        *share.entry(r.site.as_str()).or_insert(0u32) += r.count;
    }
    share
        .iter()
        .map(|(site, n)| format!("{site} {n} ({:.1}%)", f64::from(*n) * 100.0 / 1024.0))
        .collect::<Vec<_>>()
        .join("  ")
}

pub fn routing(t: &pb::RoutingTable, as_json: bool, buckets: bool) -> Result<()> {
    if as_json {
        return print_json(&json!({
            "service": t.service, "version": t.version, "runs": runs_json(&t.runs),
        }));
    }
    println!(
        "{}  version {}  {}",
        t.service,
        t.version,
        share_line(&t.runs)
    );
    if buckets {
        // Ranges of consecutive buckets on one site, e.g. "0-511 a".
        let mut start = 0u32;
        for run in &t.runs {
            println!(
                "  {:>4}-{:<4} {}",
                start,
                start + run.count.saturating_sub(1),
                run.site
            );
            start += run.count;
        }
    }
    Ok(())
}

pub fn routing_set(r: &pb::SetRoutingResponse, as_json: bool) -> Result<()> {
    let table = r.table.clone().unwrap_or_default();
    if as_json {
        return print_json(&json!({
            "service": table.service, "version": table.version, "changed": r.changed,
            "log_index": r.log_index, "runs": runs_json(&table.runs),
        }));
    }
    let throttles: std::collections::BTreeMap<_, _> = table.throttle_max_rps.iter().collect();
    let throttles: String = throttles
        .into_iter()
        .map(|(site, rps)| format!("  throttle {site} <= {rps}/s"))
        .collect();
    if r.changed {
        println!(
            "{} now at version {}: {}{throttles}",
            table.service,
            table.version,
            share_line(&table.runs)
        );
    } else {
        println!(
            "{} unchanged (already at version {}: {})",
            table.service,
            table.version,
            share_line(&table.runs)
        );
    }
    Ok(())
}

pub fn audit(entries: &[pb::AuditEntry], as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&json!(entries
            .iter()
            .map(|a| json!({
                "seq": a.seq, "log_index": a.log_index, "at_ms": a.at_ms, "actor": a.actor,
                "reason": a.reason, "action": a.action, "before": a.before, "after": a.after,
            }))
            .collect::<Vec<_>>()));
    }
    for a in entries {
        println!(
            "#{:<5} {}  {}  by {}",
            a.seq,
            invoker_domain::format_utc_ms(a.at_ms),
            a.action,
            truncate(&a.actor, 30)
        );
        println!("       why:    {}", truncate(&a.reason, 70));
        if !a.before.is_empty() {
            println!("       before: {}", truncate(&a.before, 70));
        }
        println!("       after:  {}", truncate(&a.after, 70));
    }
    Ok(())
}

pub fn applied(r: &pb::ApplyTopologyResponse, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&json!({
            "changed": !r.changes.is_empty(), "changes": r.changes, "notes": r.notes,
            "log_index": r.log_index,
        }));
    }
    if r.changes.is_empty() {
        println!("unchanged");
    }
    for c in &r.changes {
        println!("+ {c}");
    }
    for n in &r.notes {
        println!("! {n}");
    }
    Ok(())
}

pub fn proposals(r: &pb::ListProposalsResponse, as_json: bool) -> Result<()> {
    if as_json {
        return print_json(&json!({
            "term": r.term,
            "proposals": r.proposals.iter().map(|p| json!({
                "id": p.id, "kind": p.kind, "service": p.service, "status": proposal_status(p.status),
                "created_at_ms": p.created_at_ms, "expires_at_ms": p.expires_at_ms,
                "digest": p.digest, "term": p.term,
                "data_loss": p.data_loss.as_ref().map(|l| json!({
                    "gap_bytes": l.gap_bytes, "ledger_sequence_gap": l.ledger_sequence_gap,
                    "primary_last_seen_ms": l.primary_last_seen_ms,
                    "primary_last_lsn": l.primary_last_lsn,
                    "replica_receive_lsn": l.replica_receive_lsn,
                    "replica_replay_lsn": l.replica_replay_lsn,
                })),
                "evidence": p.evidence.iter().map(|e| json!({
                    "observer": e.observer, "probe": e.probe, "detail": e.detail,
                    "observed_at_ms": e.observed_at_ms,
                })).collect::<Vec<_>>(),
                "reason": p.reason, "actor": p.actor,
                "plan": p.plan.as_ref().map(|plan| json!({
                    "planned": plan.planned, "from_site": plan.from_site,
                    "from_epoch": plan.from_epoch, "to_site": plan.to_site,
                    "new_epoch": plan.new_epoch, "steps": plan.steps,
                })),
                "execution": p.execution.as_ref().map(execution_json),
            })).collect::<Vec<_>>(),
        }));
    }
    if r.proposals.is_empty() {
        println!("no proposals");
    }
    for p in &r.proposals {
        let status = proposal_status(p.status);
        println!(
            "#{:<4} {:<18} {:<10} {:<9} created {}  expires {}",
            p.id,
            p.kind,
            p.service,
            status,
            invoker_domain::format_utc_ms(p.created_at_ms),
            invoker_domain::format_utc_ms(p.expires_at_ms)
        );
        let planned = p.plan.as_ref().is_some_and(|plan| plan.planned);
        let estimated = p
            .data_loss
            .as_ref()
            .is_some_and(|l| l.primary_last_lsn > 0 || l.primary_last_seen_ms > 0);
        if planned {
            println!("      could lose: nothing (planned: fence first, then catch up)");
        } else if !estimated {
            println!("      could lose: unknown (opened by hand); see wallet lost-report after");
        } else if let Some(l) = &p.data_loss {
            println!(
                "      could lose: {} bytes of WAL (primary at {}, replica received {}, replayed {}), {} ledger entries; primary last seen {}",
                l.gap_bytes,
                l.primary_last_lsn,
                l.replica_receive_lsn,
                l.replica_replay_lsn,
                l.ledger_sequence_gap,
                if l.primary_last_seen_ms > 0 {
                    invoker_domain::format_utc_ms(l.primary_last_seen_ms)
                } else {
                    "never".into()
                }
            );
        }
        println!("      why: {}", truncate(&p.reason, 90));
        for e in p.evidence.iter().take(6) {
            println!(
                "      {} {}: {}",
                e.observer,
                e.probe,
                truncate(&e.detail, 70)
            );
        }
        if let Some(plan) = &p.plan {
            println!("      plan:");
            for (i, step) in plan.steps.iter().enumerate() {
                println!("        {}. {}", i + 1, step);
            }
        }
        if let Some(e) = &p.execution {
            print_execution(e);
        }
        println!("      digest {} (term {})", p.digest, p.term);
    }
    Ok(())
}

fn execution_json(e: &pb::FailoverExecution) -> serde_json::Value {
    let step = |s: &Option<pb::FailoverStepResult>| {
        s.as_ref().map(|s| {
            json!({"ok": s.ok, "lsn": s.lsn, "ledger_sequence": s.ledger_sequence,
                   "detail": s.detail, "at_ms": s.at_ms})
        })
    };
    json!({
        "started_at_ms": e.started_at_ms, "term": e.term,
        "old_lease_expires_at_ms": e.old_lease_expires_at_ms,
        "fence": step(&e.fence), "promote": step(&e.promote),
        "finished_at_ms": e.finished_at_ms, "error": e.error,
    })
}

fn print_execution(e: &pb::FailoverExecution) {
    println!(
        "      execution: begun {} (term {}), old lease ends {}",
        invoker_domain::format_utc_ms(e.started_at_ms),
        e.term,
        invoker_domain::format_utc_ms(e.old_lease_expires_at_ms)
    );
    let step = |name: &str, s: &Option<pb::FailoverStepResult>| match s {
        None => println!("        {name}: not yet"),
        Some(s) => println!(
            "        {name}: {} at lsn {} (ledger seq {}) {}",
            if s.ok { "done" } else { "skipped" },
            s.lsn,
            s.ledger_sequence,
            truncate(&s.detail, 50)
        ),
    };
    step("fence", &e.fence);
    step("promote", &e.promote);
    if e.finished_at_ms > 0 {
        println!(
            "        finished {} ({} ms after begin){}",
            invoker_domain::format_utc_ms(e.finished_at_ms),
            e.finished_at_ms - e.started_at_ms,
            if e.error.is_empty() {
                String::new()
            } else {
                format!(": {}", truncate(&e.error, 60))
            }
        );
    }
}

/// `pending`, `approved`, ... from the protobuf enum.
fn proposal_status(status: i32) -> String {
    pb::ProposalStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("PROPOSAL_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

pub fn proposal_decided(r: &pb::ProposalResponse, as_json: bool) -> Result<()> {
    let p = r.proposal.clone().unwrap_or_default();
    let status = proposal_status(p.status);
    if as_json {
        return print_json(&json!({
            "id": p.id, "status": status,
            "approvals": p.approvals.iter().map(|a| json!({
                "approver": a.approver, "at_ms": a.at_ms, "term": a.term,
            })).collect::<Vec<_>>(),
        }));
    }
    let who: Vec<&str> = p.approvals.iter().map(|a| a.approver.as_str()).collect();
    println!(
        "proposal #{} is {status} (approved by: {})",
        p.id,
        if who.is_empty() {
            "nobody".to_string()
        } else {
            who.join(", ")
        }
    );
    Ok(())
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_to_width() {
        assert_eq!(truncate("abcdef", 4), "abc~");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
