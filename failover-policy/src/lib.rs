//! The pure failover policy: observations in, classifications and decisions (with evidence)
//! out.
//!
//! The invoker leader feeds every report it receives to [`Policy::observe`] and calls
//! [`Policy::tick`] on a timer with the current routing tables and writers. Each tick
//! classifies both serving sites and every service in them, and returns [`Decision`]s, each
//! carrying the observations behind it; the leader commits them to raft, then acts, then calls
//! [`Policy::record_applied`]. No I/O, no clock (time is always an argument), no randomness,
//! ordered maps only: the same inputs give the same outputs on every node.
//!
//! # Observers
//!
//! The agent of each serving site probes its own site (the *local* view: each service
//! instance and the wallet database) and the other site (the *peer* view); the witness's
//! agent probes both sites; the edge router reports request and error rates per site and
//! service. An observer is *silent* when its last report is older than
//! `observer_silence_ms`. An observer *reaches* a site when at least one of its probes of that
//! site in its latest report succeeded.
//!
//! # Classification of a serving site S
//!
//! First matching row wins. "Reporting" means S's own agent is not silent.
//!
//! | S's own agent | peer's probes of S | witness's probes of S | class |
//! |---|---|---|---|
//! | any | fail | reach | `InterSitePartition`: S is alive, only the link between the sites is down |
//! | silent | fail | fail | `SiteDown`, or `Isolated` if the edge still sees S serve users |
//! | silent | no instance of S answers (its database may) | no instance of S answers | `SiteDown` (its application tier is down), or `Isolated` as above |
//! | reporting since before both lost S, and for a whole silence window after | fail | fail | `Isolated` |
//! | reporting, but not that long | fail | fail | `Unknown`: a dying site's last reports may still be arriving |
//! | reporting | reach | any | up: classified per service, below |
//! | reporting | silent | reach | up: classified per service, below |
//! | anything else | | | `Unknown` (start-up, too few observers, a silent witness when S stops answering) |
//!
//! If the witness reaches S but not the peer's site, the peer is the one cut off: its failing
//! probes of S say nothing about S and count as silent.
//!
//! SiteDown and Isolated lead to the same actions; they differ in the evidence a human reads:
//! an isolated site may still be writing, so its writer must be fenced before a promotion.
//! Both take a silence window to decide, so a dying site is not called isolated.
//! A strong service's failover is proposed only when its writer's database does not answer a
//! remote observer as primary either: with only the application tier down, the peer's
//! instances serve against the same primary, and moving the writer could only lose data.
//!
//! Per service, in a site that is up: `ServiceFailure` if the site's own agent saw every
//! instance of the service fail `failures_to_trip` probes in a row (or, for a strong service,
//! its database unreachable that many times), until `successes_to_clear` successes in a row;
//! else `GrayFailure` if the edge's error rate for the service in that site has stayed above
//! `edge_error_rate_threshold` for `gray_failure_window_ms`; else `Healthy`; `Unknown` when
//! the agent reports nothing about the service. In a site that is not up, every service takes
//! the site's class. Cross-site probes never judge a service: they also fail when the path
//! between sites does. Edge samples below `edge_min_request_rps` carry no verdict, so a site
//! drained for gray failure stays gray until an operator fails it back; errors explained by
//! another failure class do not count towards gray failure.
//!
//! # Decisions
//!
//! A *failed* class is `ServiceFailure`, `SiteDown`, `Isolated` or `GrayFailure`.
//!
//! - Stateless service with buckets in a failed site: [`Action::ShiftBuckets`] all of them to
//!   the other site, plus [`Action::EnableThrottle`] when the edge's request rate for the
//!   service (both sites together) exceeds the other site's `capacity_rps`.
//! - Strong service whose writer's site has failed: [`Action::ProposeFailover`] with a
//!   data-loss estimate. The policy never moves a writer.
//! - [`Action::Failback`] restores the routing from before the shift: automatically only with
//!   `failback = { automatic = { stable_period_ms = .. } }` once the site has been healthy that
//!   long; otherwise when an operator calls [`Policy::request_failback`].
//! - `InterSitePartition` and `Unknown` lead to nothing.
//!
//! # Guardrails
//!
//! - Never route to zero healthy sites: a shift or proposal whose target is not `Healthy`
//!   becomes [`Action::Refused`] (an alert); new routing always covers all 1024 buckets.
//! - Hold-down: after an automatic change of a service (from when it was decided, or applied
//!   if later), no automatic shift of it for `hold_down_ms`; a blocked shift is refused.
//! - So at most one automatic shift per service per hold-down window.
//! - Capacity: a shift onto a site that cannot take the load comes with a throttle.
//! - Pause: [`Policy::pause`] turns every decision into a dry run (`would_*` labels) and
//!   nothing counts as acted upon.
//! - Say once: proposals, refusals and dry runs are emitted once while their condition holds,
//!   so the raft log does not fill with repeats.
//! - Determinism: the state is a value; the same sequence of calls gives the same outputs.

mod classify;
mod config;
mod error;
mod observation;
mod policy;

pub use classify::{Classification, SiteAssessment};
pub use config::{Failback, PolicyConfig, ServiceConfig};
pub use error::PolicyError;
pub use observation::{
    AgentReport, DatabaseProbe, DatabaseRole, EdgeReport, EdgeSample, InstanceProbe, Observation,
    Observer, SiteProbes,
};
pub use policy::{Action, Current, CurrentWriter, Decision, Policy, TickOutput};
