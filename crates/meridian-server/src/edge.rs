//! The public edge: what one sender may hold of the node before anything it sends is trusted.
//!
//! Ingest faces anyone (browser write keys are public), so every resource a request can hold is
//! bounded per sender, not only per node:
//! - connections and requests in flight (HTTP/2 streams included) per client address
//!   ([`AddressCounters`]); IPv6 addresses count by their /64, which one subscriber usually has;
//! - request bodies in memory ([`BodyBudgets`]): a node-wide budget, of which each project may hold
//!   a share and requests that carry no key in their headers share a small pool of their own.
//!   Bodies of unknown length are charged as their bytes arrive, so a slow upload costs what it
//!   sent, not the request limit.
//!
//! Behind a load balancer every connection comes from the balancer: its address is listed in
//! `server.trusted_proxies`, and the client is then the last address in `X-Forwarded-For` that is
//! not a trusted proxy.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The TCP peer of a connection, put on each of its requests by the listener.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddress(pub IpAddr);

pub use meridian_node::config::{Network, canonical_address as canonical};

/// What limits count by: an IPv4 address, or the /64 of an IPv6 address.
pub fn limit_key(address: IpAddr) -> IpAddr {
    match canonical(address) {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The client a request comes from: its TCP peer, or, when the peer is a trusted proxy, the last
/// address of `X-Forwarded-For` that is not a trusted proxy (addresses a client wrote itself sit
/// to the left of those its proxies appended, and are ignored).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[Network]) -> IpAddr {
    let is_trusted = |address: IpAddr| {
        trusted_proxies
            .iter()
            .any(|network| network.contains(address))
    };
    if !is_trusted(peer) {
        return canonical(peer);
    }
    let mut client = canonical(peer);
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for part in text.rsplit(',') {
            let Ok(address) = part.trim().parse::<IpAddr>() else {
                return client;
            };
            client = canonical(address);
            if !is_trusted(client) {
                return client;
            }
        }
    }
    client
}

const ADDRESS_SHARDS: usize = 16;

/// How many connections (or requests) each client address holds, each bounded.
pub struct AddressCounters {
    limit: u32,
    shards: Vec<Mutex<HashMap<IpAddr, u32>>>,
}

/// One connection or request of an address; dropping it gives the place back.
pub struct AddressSlot {
    counters: Arc<AddressCounters>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut shard = self.counters.shard(self.key);
        if let Some(count) = shard.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

impl AddressCounters {
    pub fn new(limit: u32) -> Arc<AddressCounters> {
        Arc::new(AddressCounters {
            limit: limit.max(1),
            shards: (0..ADDRESS_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        })
    }

    fn shard(&self, key: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let index = match key {
            IpAddr::V4(v4) => u32::from(v4) as usize,
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as usize,
        };
        self.shards[index.wrapping_mul(0x9E37_79B9) % ADDRESS_SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A place for `address`, or `None` when it holds its limit already.
    pub fn try_acquire(self: &Arc<Self>, address: IpAddr) -> Option<AddressSlot> {
        let key = limit_key(address);
        let mut shard = self.shard(key);
        let count = shard.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        drop(shard);
        Some(AddressSlot {
            counters: Arc::clone(self),
            key,
        })
    }

    /// Places `address` holds now.
    pub fn held_by(&self, address: IpAddr) -> u32 {
        let key = limit_key(address);
        self.shard(key).get(&key).copied().unwrap_or(0)
    }

    /// Addresses holding at least one place.
    pub fn addresses(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map(|shard| shard.len()).unwrap_or(0))
            .sum()
    }
}

/// Whose share of the body budget a request's body is charged to.
#[derive(Clone, Debug)]
pub enum BodyOwner {
    /// A request whose headers carry a valid key of this project.
    Project(Arc<str>),
    /// A request that carries no key in its headers (`writeKey` in the body, client metrics).
    Anonymous,
}

/// The node's budget of request bytes in memory, and the shares of it one sender may hold.
pub struct BodyBudgets {
    node: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
    project_share_bytes: usize,
    projects: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

/// Why a body could not be charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// The node holds as many bodies as its budget allows.
    Node,
    /// This sender (its project, or the keyless pool) holds its share already.
    Share,
}

/// Bytes of one body charged so far: its permits on the node's budget and on its owner's share.
pub struct BodyCharge {
    node: Option<OwnedSemaphorePermit>,
    share: Option<OwnedSemaphorePermit>,
    node_budget: Arc<Semaphore>,
    share_budget: Arc<Semaphore>,
}

/// A project's share map is swept of idle shares once it holds this many.
const PROJECT_SHARES_SWEPT_ABOVE: usize = 1024;

impl BodyBudgets {
    pub fn new(
        node_bytes: usize,
        anonymous_bytes: usize,
        project_share_bytes: usize,
    ) -> BodyBudgets {
        let permits = |bytes: usize| bytes.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudgets {
            node: Arc::new(Semaphore::new(permits(node_bytes))),
            anonymous: Arc::new(Semaphore::new(permits(anonymous_bytes))),
            project_share_bytes: permits(project_share_bytes),
            projects: Mutex::new(HashMap::new()),
        }
    }

    /// Bytes of the node's budget not held by any body now.
    pub fn node_available(&self) -> usize {
        self.node.available_permits()
    }

    /// Bytes of the keyless pool not held now.
    pub fn anonymous_available(&self) -> usize {
        self.anonymous.available_permits()
    }

    fn share_of(&self, owner: &BodyOwner) -> Arc<Semaphore> {
        let project_id = match owner {
            BodyOwner::Anonymous => return Arc::clone(&self.anonymous),
            BodyOwner::Project(project_id) => project_id,
        };
        let mut projects = self
            .projects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(share) = projects.get(project_id) {
            return Arc::clone(share);
        }
        if projects.len() >= PROJECT_SHARES_SWEPT_ABOVE {
            // A share nobody holds a permit of is the same as a fresh one.
            let full = self.project_share_bytes;
            projects.retain(|_, share| {
                Arc::strong_count(share) > 1 || share.available_permits() < full
            });
        }
        let share = Arc::new(Semaphore::new(self.project_share_bytes));
        projects.insert(Arc::clone(project_id), Arc::clone(&share));
        share
    }

    /// An empty charge for a body of `owner`; grow it with [`BodyCharge::add`].
    pub fn charge_for(&self, owner: &BodyOwner) -> BodyCharge {
        BodyCharge {
            node: None,
            share: None,
            node_budget: Arc::clone(&self.node),
            share_budget: self.share_of(owner),
        }
    }
}

impl BodyCharge {
    /// Charges `bytes` more to the node's budget and the owner's share, or neither.
    pub fn add(&mut self, bytes: usize) -> Result<(), BudgetRefusal> {
        if bytes == 0 {
            return Ok(());
        }
        let bytes = u32::try_from(bytes).map_err(|_| BudgetRefusal::Node)?;
        let share = Arc::clone(&self.share_budget)
            .try_acquire_many_owned(bytes)
            .map_err(|_| BudgetRefusal::Share)?;
        let node = Arc::clone(&self.node_budget)
            .try_acquire_many_owned(bytes)
            .map_err(|_| BudgetRefusal::Node)?;
        merge_permit(&mut self.share, share);
        merge_permit(&mut self.node, node);
        Ok(())
    }

    /// Bytes charged so far.
    pub fn bytes(&self) -> usize {
        self.node.as_ref().map_or(0, |permit| permit.num_permits())
    }
}

fn merge_permit(held: &mut Option<OwnedSemaphorePermit>, more: OwnedSemaphorePermit) {
    match held {
        Some(permit) => permit.merge(more),
        None => *held = Some(more),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_match_by_prefix_and_mapped_ipv4_is_ipv4() {
        let private = Network::parse("10.0.0.0/8").unwrap();
        assert!(private.contains(address("10.1.2.3")));
        assert!(private.contains(address("::ffff:10.9.9.9")));
        assert!(!private.contains(address("11.0.0.1")));
        let single = Network::parse("192.0.2.7").unwrap();
        assert!(single.contains(address("192.0.2.7")));
        assert!(!single.contains(address("192.0.2.8")));
        let everything = Network::parse("0.0.0.0/0").unwrap();
        assert!(everything.contains(address("203.0.113.1")));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains(address("fd12::1")));
        assert!(!v6.contains(address("fe80::1")));
        assert!(Network::parse("10.0.0.0/33").is_none());
        assert!(Network::parse("not an address").is_none());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(
            limit_key(address("2001:db8:1:2:aaaa::1")),
            limit_key(address("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            limit_key(address("2001:db8:1:2::1")),
            limit_key(address("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(address("::ffff:192.0.2.1")), address("192.0.2.1"));
    }

    #[test]
    fn the_client_behind_trusted_proxies_is_the_last_untrusted_forwarded_address() {
        let proxies = [Network::parse("10.0.0.0/8").unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.9, 10.0.0.2".parse().unwrap(),
        );
        assert_eq!(
            client_address(address("10.0.0.1"), &headers, &proxies),
            address("203.0.113.9"),
            "what the client wrote itself (6.6.6.6) is ignored"
        );
        assert_eq!(
            client_address(address("198.51.100.1"), &headers, &proxies),
            address("198.51.100.1"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_address(address("10.0.0.1"), &HeaderMap::new(), &proxies),
            address("10.0.0.1")
        );
        headers.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(
            client_address(address("10.0.0.1"), &headers, &proxies),
            address("10.0.0.1")
        );
    }

    #[test]
    fn an_address_holds_at_most_its_limit_and_gives_places_back() {
        let counters = AddressCounters::new(2);
        let attacker = address("127.0.0.2");
        let first = counters.try_acquire(attacker).expect("first");
        let _second = counters.try_acquire(attacker).expect("second");
        assert!(
            counters.try_acquire(attacker).is_none(),
            "a third is refused"
        );
        assert!(
            counters.try_acquire(address("127.0.0.1")).is_some(),
            "another address is apart"
        );
        drop(first);
        assert_eq!(counters.held_by(attacker), 1);
        assert!(counters.try_acquire(attacker).is_some());
    }

    #[test]
    fn a_project_or_the_keyless_pool_holds_at_most_its_share_of_the_node_budget() {
        let budgets = BodyBudgets::new(100, 10, 40);
        let noisy = BodyOwner::Project(Arc::from("noisy"));
        let mut held = budgets.charge_for(&noisy);
        held.add(40).unwrap();
        assert_eq!(held.bytes(), 40);
        let mut more = budgets.charge_for(&noisy);
        assert_eq!(more.add(1), Err(BudgetRefusal::Share));
        let mut quiet = budgets.charge_for(&BodyOwner::Project(Arc::from("quiet")));
        quiet.add(40).unwrap();
        let mut keyless = budgets.charge_for(&BodyOwner::Anonymous);
        keyless.add(10).unwrap();
        assert_eq!(
            budgets.charge_for(&BodyOwner::Anonymous).add(1),
            Err(BudgetRefusal::Share)
        );
        let mut third = budgets.charge_for(&BodyOwner::Project(Arc::from("third")));
        assert_eq!(third.add(20), Err(BudgetRefusal::Node), "10 bytes left");
        assert_eq!(budgets.node_available(), 10);
        drop(held);
        assert_eq!(budgets.node_available(), 50);
        third.add(20).unwrap();
        drop((quiet, keyless, third));
        assert_eq!(budgets.node_available(), 100);
        assert_eq!(budgets.anonymous_available(), 10);
    }
}
