//! Which addresses the node agent fetches sources from. The agent fetches what any pod names,
//! from the node's network position: without a limit a tenant could make it read the cloud's
//! metadata service, the node's own ports or in-cluster services its own pods may not reach.
//! Internal addresses (loopback, private, link-local, shared, unspecified, multicast) are
//! therefore refused unless a network the administrator lists holds them. The check is made on
//! each address a host resolves to, at every connection (redirects and DNS answers that change
//! between lookups included), by the HTTP client's resolver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use anyhow::{Context, Result};
use ipnet::IpNet;
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// The internal networks a source may be fetched from besides public addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceNetworks {
    allowed: Vec<IpNet>,
}

impl SourceNetworks {
    /// From a comma-separated list of networks (`10.20.0.0/16, fd00::/8`); an address alone
    /// is a network of one. Empty: internal addresses are all refused.
    pub fn parse(list: &str) -> Result<Self> {
        let allowed = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .with_context(|| format!("{n:?} is no network (a.b.c.d/len) or address"))
            })
            .collect::<Result<_>>()?;
        Ok(SourceNetworks { allowed })
    }

    /// Whether a source may be fetched from `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        !is_internal(ip) || self.allowed.iter().any(|net| net.contains(&ip))
    }
}

/// Addresses that are not on the public internet, or that mean this host.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => {
            let shared = Ipv4Addr::new(100, 64, 0, 0); // 100.64.0.0/10, carrier-grade NAT
            ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast()
                || (u32::from(ip) & 0xffc0_0000) == u32::from(shared)
                || ip.octets()[0] == 0
        }
        IpAddr::V6(ip) => {
            let segment = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (segment & 0xfe00) == 0xfc00 // unique local
                || (segment & 0xffc0) == 0xfe80 // link-local
                || ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) // AWS's IMDS
        }
    }
}

/// Why a connection was not made: every address the host resolved to is refused. Carried as
/// the source of an io error through the HTTP client, so that a download tells it apart.
#[derive(Debug, thiserror::Error)]
#[error(
    "the source's host resolves to no address the node agent may fetch from (internal \
     addresses are refused unless the chart's nodeStore.sourceNetworks lists their network)"
)]
pub struct AddressRefused;

/// The HTTP client's resolver, keeping only the addresses `networks` allows.
#[derive(Debug)]
pub(crate) struct GuardedResolver {
    pub networks: Arc<SourceNetworks>,
    pub inner: DefaultResolver,
}

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = self.inner.resolve(uri, config, timeout)?;
        let mut allowed = self.empty();
        for address in resolved.iter() {
            if self.networks.allows(address.ip()) {
                allowed.push(*address);
            } else {
                // The address stays in the agent's log: what a pod is told says only that
                // the source was refused.
                tracing::warn!(host = ?uri.host(), %address, "refused to fetch a source from an internal address");
            }
        }
        if allowed.is_empty() {
            return Err(ureq::Error::Io(std::io::Error::other(AddressRefused)));
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(networks: &str, ip: &str) -> bool {
        SourceNetworks::parse(networks)
            .unwrap()
            .allows(ip.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_refused_unless_their_network_is_listed() {
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "fc00::1",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            assert!(!allows("", internal), "{internal}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "172.32.0.1"] {
            assert!(allows("", public), "{public}");
        }
        assert!(allows("10.20.0.0/16", "10.20.3.4"));
        assert!(!allows("10.20.0.0/16", "10.21.0.1"));
        assert!(allows("127.0.0.1, fd00::/8", "127.0.0.1"));
        assert!(allows("127.0.0.1, fd00::/8", "fd12::1"));
        assert!(!allows("127.0.0.1", "127.0.0.2"));
    }

    #[test]
    fn a_list_that_is_no_network_is_refused_in_words() {
        let err = SourceNetworks::parse("10.0.0.0/8, intranet").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"intranet\" is no network (a.b.c.d/len) or address"
        );
    }
}
