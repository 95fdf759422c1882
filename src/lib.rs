//! shoal: one daemon per box that turns a rack of container hosts into a
//! self-service cloud of ready-to-use test environments.
//!
//! See `ARCHITECTURE.md` for the map of modules and the invariants that hold
//! across them.

pub mod admission;
pub mod api;
pub mod archive;
pub mod audit;
pub mod auth;
pub mod bootstrap;
pub mod builds;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod docker;
pub mod drain;
pub mod envs;
pub mod health;
pub mod host;
pub mod journal;
pub mod keyring;
pub mod logging;
pub mod mail;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod peer_auth;
pub mod placement;
pub mod publishing;
pub mod reaper;
pub mod revocations;
pub mod routing;
pub mod store;
pub mod transfer;
pub mod units;
pub mod watchdog;
pub mod web;
pub mod workers;
