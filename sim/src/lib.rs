//! usernet's deterministic simulator.
//!
//! One seed drives a whole world: the daemon (the production driver loop,
//! `usernet::Driver::run`, over turmoil's sockets through [`hostnet::TurmoilNet`]),
//! upstream hosts ([`upstream`]), simulated guests ([`guest`], smoltcp with a DHCP client)
//! and the faulty guest link between them ([`link`]). Scenarios are data files in
//! `scenarios/` ([`scenario`]); [`world::run`] runs one and checks the oracles.

pub mod client;
pub mod dnsmsg;
pub mod guest;
pub mod hostnet;
pub mod link;
pub mod rng;
pub mod scenario;
pub mod trace;
pub mod upstream;
pub mod watchdog;
pub mod world;

pub use scenario::Scenario;
pub use world::{run, Mutation, RunOptions, RunReport};
