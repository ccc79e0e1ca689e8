//! `loadgen`: open-loop load against the gift-api HTTP service (see `drills::loadgen`).
//!
//! ```text
//! loadgen --url http://127.0.1.5:43210 --rate-per-sec 500 --duration-secs 30 --shadow
//! loadgen --lab /tmp/gift-lab --rate-per-sec 200 --mix send=90,read=10 --json
//! loadgen --lab /tmp/gift-lab --direct          # both gift-apis, bypassing the edge router
//! loadgen --lab /tmp/gift-lab --site b          # site b's gift-api only
//! ```
//!
//! Exit codes: 0 when there were no errors and read-back found every committed order with
//! the right amount; 1 otherwise (or when the run could not be carried out); 64 on bad
//! arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::error::ErrorKind;
use clap::{ArgGroup, Parser};
use drills::loadgen::{self, LabTarget, LoadgenConfig, LoadgenError, Mix, Spread};

/// EX_USAGE from sysexits.h.
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Open-loop load generator for the gift-api HTTP service",
    long_about = "Open-loop load generator for the gift-api HTTP service.\n\n\
        Set-up (not measured): fetch the catalog and top up every user. Then request i is sent \
        at start + i/rate whether or not earlier ones finished, and its latency is measured \
        from that scheduled time. Finally every committed send is read back.\n\n\
        Exit code: 0 when there were no errors and read-back found every committed order with \
        the right amount; 1 otherwise; 64 on bad arguments.",
    group(ArgGroup::new("target").required(true).args(["url", "lab"]))
)]
struct Args {
    /// gift-api base URL (repeatable: requests are spread over all of them).
    #[arg(long, value_name = "URL")]
    url: Vec<String>,
    /// Lab directory: send through the lab's edge router (DIR/lab.json), or to every site's
    /// gift-api when the lab has no edge.
    #[arg(long, value_name = "DIR")]
    lab: Option<PathBuf>,
    /// With --lab: every site's gift-api directly, bypassing the edge router.
    #[arg(long, requires = "lab", conflicts_with = "site")]
    direct: bool,
    /// With --lab: this site's gift-api only, directly.
    #[arg(long, requires = "lab", value_name = "SITE")]
    site: Option<String>,
    /// How requests are spread over several targets: `user` (a user always goes to the same
    /// target) or `round-robin`.
    #[arg(long, default_value = "user", value_name = "user|round-robin")]
    spread: Spread,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 100)]
    rate_per_sec: u64,
    /// Length of the timed run.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Requests in flight at most; a request due while the cap is reached is not sent and
    /// counts as an error (overload_client_cap).
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Per-request timeout.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Users 1..=N (Zipf-distributed: user 1 is the hottest).
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Streamers 1..=N (Zipf-distributed; room_id = streamer_id).
    #[arg(long, default_value_t = 1000)]
    streamers: u64,
    /// Zipf exponent for users and streamers (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    zipf_s: f64,
    /// Operation weights: send (POST /v1/gifts), read (GET /v1/wallet/{user}), topup.
    #[arg(long, default_value = "send=80,read=15,topup=5")]
    mix: Mix,
    /// Seed of every random choice of the timed run (default: random, echoed in the report).
    #[arg(long)]
    seed: Option<u64>,
    /// Prefix of every idempotency key (default: random hex).
    #[arg(long)]
    run_id: Option<String>,
    /// Send `x-shadow: 1` on every request (load-test traffic goes to shadow tables).
    #[arg(long)]
    shadow: bool,
    /// Minor units each user is topped up with during set-up (0 skips the set-up top-ups).
    #[arg(long, default_value_t = 1_000_000)]
    initial_balance: i64,
    /// Minor units of each topup of the timed run.
    #[arg(long, default_value_t = 100)]
    topup_amount: i64,
    /// Top-ups in flight at once during set-up.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// Order reads in flight at once during read-back.
    #[arg(long, default_value_t = 64)]
    readback_concurrency: usize,
    /// Do not read back the committed sends.
    #[arg(long)]
    no_readback: bool,
    /// Print one JSON object instead of the human-readable summary.
    #[arg(long)]
    json: bool,
}

fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("loadgen: {message}");
    eprintln!("Try `loadgen --help`.");
    ExitCode::from(EXIT_USAGE)
}

fn config_from(args: Args) -> Result<LoadgenConfig, LoadgenError> {
    let targets = match args.lab {
        Some(dir) => {
            let target = match (args.direct, args.site) {
                (_, Some(site)) => LabTarget::Site(site),
                (true, None) => LabTarget::Direct,
                (false, None) => LabTarget::Auto,
            };
            loadgen::targets_from_lab(&dir, &target)?
        }
        None => args.url,
    };
    let mut config = LoadgenConfig::new(targets);
    config.spread = args.spread;
    config.rate_per_sec = args.rate_per_sec;
    config.duration_secs = args.duration_secs;
    config.max_in_flight = args.max_in_flight;
    config.timeout_ms = args.timeout_ms;
    config.users = args.users;
    config.streamers = args.streamers;
    config.zipf_s = args.zipf_s;
    config.mix = args.mix;
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(run_id) = args.run_id {
        config.run_id = run_id;
    }
    config.shadow = args.shadow;
    config.initial_balance = args.initial_balance;
    config.topup_amount = args.topup_amount;
    config.setup_concurrency = args.setup_concurrency;
    config.readback = !args.no_readback;
    config.readback_concurrency = args.readback_concurrency;
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    // Printing help can only fail on a closed stdout; nothing to add then.
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                _ => {
                    let _ = e.print();
                    ExitCode::from(EXIT_USAGE)
                }
            };
        }
    };
    let json = args.json;
    let config = match config_from(args) {
        Ok(config) => config,
        Err(e) => return usage_error(e),
    };
    match run(config, json) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: LoadgenConfig, json: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let _telemetry = telemetry::init("loadgen", "loadgen").context("initialising logging")?;
        let report = loadgen::run(&config).await.context("load run failed")?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).context("encoding the report")?
            );
        } else {
            println!("{report}");
        }
        Ok(if report.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
