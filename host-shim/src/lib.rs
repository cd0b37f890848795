//! agentlabd, the host shim, and the library behind `agentlab`, its CLI.

pub mod api;
pub mod backend;
pub mod channel;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod hostsetup;
pub mod ids;
pub mod joblog;
pub mod profile;
mod runner;
pub mod server;
pub mod state;
pub mod store;
