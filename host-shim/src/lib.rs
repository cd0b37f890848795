//! agentlabd, the host shim, and the library behind `agentlab`, its CLI.

pub mod admission;
pub mod agent_listener;
pub mod api;
pub mod artifacts;
pub mod backend;
pub mod channel;
pub mod cli;
pub mod config;
pub mod crashpoint;
pub mod daemon;
pub mod doctor;
pub mod hostsetup;
pub mod ids;
pub mod joblog;
pub mod leases;
pub mod metrics;
pub mod profile;
pub mod recovery;
mod runner;
pub mod secrets;
pub mod server;
pub mod state;
pub mod store;
pub mod vsock_hub;
