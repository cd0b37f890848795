//! The job's seccomp filter: allow by default, refuse a few syscalls with EPERM.
//!
//! Refused: `socket(AF_VSOCK)` (the host channel is the agent's alone), `ptrace`,
//! `process_vm_readv`/`writev`, io_uring (its requests bypass these argument checks)
//! and, with the network off, `socket(AF_INET)`/`socket(AF_INET6)`. A syscall of
//! another architecture (e.g. the 32-bit `int 0x80` ABI) kills the process.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// Builds the filter for this machine's architecture.
pub fn build(network_off: bool) -> Result<BpfProgram, seccompiler::Error> {
    let domain_is = |family: libc::c_int| -> Result<SeccompRule, seccompiler::Error> {
        let family = u64::try_from(family).unwrap_or(u64::MAX);
        Ok(SeccompRule::new(vec![SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family)?])?)
    };
    let mut socket_rules = vec![domain_is(libc::AF_VSOCK)?];
    if network_off {
        socket_rules.push(domain_is(libc::AF_INET)?);
        socket_rules.push(domain_is(libc::AF_INET6)?);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_socket, socket_rules);
    for always in [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ] {
        rules.insert(always, Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let errno = u32::try_from(libc::EPERM).unwrap_or(1);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno), arch)?;
    Ok(BpfProgram::try_from(filter)?)
}

/// Installs the filter on this thread; `no_new_privs` must already be set.
pub fn install(network_off: bool) -> Result<(), seccompiler::Error> {
    let program = build(network_off)?;
    seccompiler::apply_filter(&program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_with_and_without_network() {
        assert!(build(true).unwrap().len() > build(false).unwrap().len());
    }
}
