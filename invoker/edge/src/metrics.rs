//! Prometheus metrics of the edge, served on the admin port's `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::routing::Source;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The site that answered, or that the edge answered for (throttled, unavailable);
    /// `none` when no site was chosen (no routing table, bad request).
    pub site: String,
    /// `2xx` .. `5xx`.
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub site: String,
    /// refused, connect_timeout, connect, reset, timeout, other, no_instance.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub from_site: String,
    pub to_site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateLabels {
    /// installed, confirmed, unchanged, stale, invalid.
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Family<SiteLabels, Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub retries: Family<MoveLabels, Counter>,
    pub rerouted: Family<MoveLabels, Counter>,
    pub throttled: Family<SiteLabels, Counter>,
    pub routing_version: Gauge,
    pub routing_source: Family<SourceLabels, Gauge>,
    pub routing_updates: Family<UpdateLabels, Counter>,
    pub watch_connected: Gauge,
    pub instances: Family<SiteLabels, Gauge>,
    pub registry_errors: Family<SiteLabels, Counter>,
    pub state_file_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edge_router");
        let requests = Family::<RequestLabels, Counter>::default();
        // 250 us .. ~8 s
        let request_seconds = Family::<SiteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00025, 2.0, 16))
        });
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        let retries = Family::<MoveLabels, Counter>::default();
        let rerouted = Family::<MoveLabels, Counter>::default();
        let throttled = Family::<SiteLabels, Counter>::default();
        let routing_version = Gauge::default();
        let routing_source = Family::<SourceLabels, Gauge>::default();
        let routing_updates = Family::<UpdateLabels, Counter>::default();
        let watch_connected = Gauge::default();
        let instances = Family::<SiteLabels, Gauge>::default();
        let registry_errors = Family::<SiteLabels, Counter>::default();
        let state_file_errors = Counter::default();
        registry.register(
            "requests",
            "Requests answered, by site and status class (edge answers included: throttled, unavailable)",
            requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time from receiving a request to sending the response's head, by site",
            request_seconds.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream attempts, by site and kind (refused, connect_timeout, connect, reset, timeout, other, no_instance)",
            upstream_errors.clone(),
        );
        registry.register(
            "retries",
            "Requests re-sent to another site after a connection failure",
            retries.clone(),
        );
        registry.register(
            "rerouted",
            "Requests sent to another site because the chosen one had no usable instance (nothing was sent to it)",
            rerouted.clone(),
        );
        registry.register(
            "throttled",
            "Requests refused with 429 by the site's throttle",
            throttled.clone(),
        );
        registry.register(
            "routing_version",
            "Version of the routing table in use (0: none)",
            routing_version.clone(),
        );
        registry.register(
            "routing_source",
            "1 for where the table in use came from (watch or disk)",
            routing_source.clone(),
        );
        registry.register(
            "routing_updates",
            "Tables received from the watch, by what was done with them",
            routing_updates.clone(),
        );
        registry.register(
            "watch_connected",
            "1 while a routing watch stream is open",
            watch_connected.clone(),
        );
        registry.register(
            "instances",
            "Instances known per site (the last list read from its registry)",
            instances.clone(),
        );
        registry.register(
            "registry_errors",
            "Failed reads of a site's registry (the last known list is kept)",
            registry_errors.clone(),
        );
        registry.register(
            "state_file_errors",
            "Failed writes of the state file",
            state_file_errors.clone(),
        );
        Metrics {
            registry,
            requests,
            request_seconds,
            upstream_errors,
            retries,
            rerouted,
            throttled,
            routing_version,
            routing_source,
            routing_updates,
            watch_connected,
            instances,
            registry_errors,
            state_file_errors,
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub fn answered(&self, site: &str, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .get_or_create(&RequestLabels {
                site: site.to_string(),
                class,
            })
            .inc();
        self.request_seconds
            .get_or_create(&SiteLabels {
                site: site.to_string(),
            })
            .observe(seconds);
    }

    pub fn upstream_error(&self, site: &str, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                site: site.to_string(),
                kind,
            })
            .inc();
    }

    pub fn moved(family: &Family<MoveLabels, Counter>, from: &str, to: &str) {
        family
            .get_or_create(&MoveLabels {
                from_site: from.to_string(),
                to_site: to.to_string(),
            })
            .inc();
    }

    pub fn throttled(&self, site: &str) {
        self.throttled
            .get_or_create(&SiteLabels {
                site: site.to_string(),
            })
            .inc();
    }

    pub fn table_in_use(&self, version: u64, source: Source) {
        self.routing_version
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        for s in [Source::Watch, Source::Disk] {
            self.routing_source
                .get_or_create(&SourceLabels { source: s.label() })
                .set(i64::from(s == source));
        }
    }

    pub fn routing_update(&self, result: &'static str) {
        self.routing_updates
            .get_or_create(&UpdateLabels { result })
            .inc();
    }

    pub fn set_instances(&self, site: &str, n: usize) {
        self.instances
            .get_or_create(&SiteLabels {
                site: site.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn registry_errors(&self, site: &str) {
        self.registry_errors
            .get_or_create(&SiteLabels {
                site: site.to_string(),
            })
            .inc();
    }
}
