//! Byte-stream transports for the channel: real AF_VSOCK inside guests and on
//! Proxmox nodes, and "hybrid vsock" over Unix sockets (the Firecracker / Cloud
//! Hypervisor / vhost-device-vsock convention) for the local microVM backend and tests.

pub mod hybrid;
pub mod vsock;
