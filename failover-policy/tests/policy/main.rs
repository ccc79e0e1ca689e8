//! Scenario and property tests of the policy, driven through a simulated two-site network.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod properties;
mod scenarios;
mod sim;
