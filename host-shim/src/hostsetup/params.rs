//! The node-specific values host setup writes into its files: the bridge's name and the
//! sandbox subnet, validated, with the addresses derived from them.

use std::net::Ipv4Addr;

use super::HostSetupError;

/// Linux's IFNAMSIZ less the terminating NUL.
const MAX_IFNAME: usize = 15;

/// The sandbox network of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxNet {
    pub bridge: String,
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl SandboxNet {
    /// Validates the bridge name (it ends up in nftables, dnsmasq and ifupdown files, so
    /// only the characters an interface name needs are allowed) and the subnet.
    pub fn new(bridge: &str, subnet: &str) -> Result<Self, HostSetupError> {
        let valid_name = !bridge.is_empty()
            && bridge.len() <= MAX_IFNAME
            && bridge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && bridge != "."
            && bridge != "..";
        if !valid_name {
            return Err(HostSetupError::BadBridge { bridge: bridge.to_owned() });
        }
        let bad_subnet = || HostSetupError::BadSubnet { subnet: subnet.to_owned() };
        let (addr, prefix) = subnet.split_once('/').ok_or_else(bad_subnet)?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad_subnet())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad_subnet())?;
        if !(8..=28).contains(&prefix) {
            return Err(bad_subnet());
        }
        let net = SandboxNet { bridge: bridge.to_owned(), network, prefix };
        if net.network != Ipv4Addr::from(u32::from(network) & net.mask()) {
            return Err(HostSetupError::SubnetNotNetwork {
                subnet: subnet.to_owned(),
                network: format!("{}/{prefix}", Ipv4Addr::from(u32::from(network) & net.mask())),
            });
        }
        Ok(net)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    pub fn subnet(&self) -> String {
        format!("{}/{}", self.network, self.prefix)
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    /// The node's address on the bridge: the subnet's first address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The DHCP pool: everything from the tenth address to the last before broadcast,
    /// leaving the first few for the node and static use.
    pub fn dhcp_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.network);
        let broadcast = base | !self.mask();
        (Ipv4Addr::from(base + 10), Ipv4Addr::from(broadcast - 1))
    }

    /// The `@KEY@` substitutions the repo's file templates use.
    pub fn substitutions(&self) -> Vec<(&'static str, String)> {
        let (start, end) = self.dhcp_range();
        vec![
            ("@BRIDGE@", self.bridge.clone()),
            ("@SUBNET@", self.subnet()),
            ("@PREFIX@", self.prefix.to_string()),
            ("@GATEWAY@", self.gateway().to_string()),
            ("@NETMASK@", self.netmask().to_string()),
            ("@RANGE_START@", start.to_string()),
            ("@RANGE_END@", end.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_network_derives_the_expected_addresses() {
        let net = SandboxNet::new("vmbr1", "10.77.0.0/16").unwrap();
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(net.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(net.dhcp_range(), (Ipv4Addr::new(10, 77, 0, 10), Ipv4Addr::new(10, 77, 255, 254)));
    }

    #[test]
    fn names_that_could_inject_into_config_files_are_refused() {
        for bad in ["", "vmbr1\"; flush ruleset", "a b", "averyverylongname0", "..", "br/1", "br\n1"] {
            let err = SandboxNet::new(bad, "10.77.0.0/16").unwrap_err();
            assert!(matches!(err, HostSetupError::BadBridge { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_subnet_must_be_an_ipv4_network_of_a_sane_size() {
        for bad in ["10.77.0.0", "10.77.0.0/33", "10.77.0.0/30", "10.77.0.0/4", "fd00::/64", "x/16"] {
            assert!(matches!(SandboxNet::new("vmbr1", bad), Err(HostSetupError::BadSubnet { .. })), "{bad}");
        }
        let err = SandboxNet::new("vmbr1", "10.77.3.0/16").unwrap_err();
        assert_eq!(err.to_string(), "--subnet 10.77.3.0/16 has host bits set: did you mean 10.77.0.0/16?");
    }
}
