//! Admission: the bounds on client connections a generation holds at once, in total
//! (`limits.max_connections`) and per client (`limits.max_connections_per_client`). A
//! connection holds a [`Slot`] from accept (or adoption at a handoff) until it closes; a
//! CONNECT tunnel keeps its connection's slot until the tunnel ends, so tunnels count.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};

use baton_handoff::Peer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::proxy::policy::{self, Rule};

/// Who a client is for `max_connections_per_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(Ipv4Addr),
    /// The /64 an IPv6 client is in: one host usually holds a whole /64 (SLAAC, privacy
    /// addresses), so its addresses are one client.
    V6Net(u64),
    /// Every client of a Unix-socket listener: they share one host.
    Local,
}

impl ClientKey {
    pub fn of(peer: &Peer) -> ClientKey {
        let Peer::Ip(addr) = peer else {
            return ClientKey::Local;
        };
        match policy::normalise(addr.ip()) {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => ClientKey::V6Net((u128::from(v6) >> 64) as u64),
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientKey::V4(v4) => write!(f, "{v4}"),
            ClientKey::V6Net(net) => {
                let prefix = std::net::Ipv6Addr::from(u128::from(*net) << 64);
                write!(f, "{prefix}/64")
            }
            ClientKey::Local => f.write_str("unix-socket clients"),
        }
    }
}

/// Why a connection was not admitted: the rule (its key is logged as `rule=`) and a reason
/// for the client and the log that names the key.
#[derive(Debug, Clone)]
pub struct Refused {
    pub rule: Rule,
    pub reason: String,
}

/// The slots of one generation.
pub struct Admission {
    total: Arc<Semaphore>,
    max_total: usize,
    /// `None`: no bound per client.
    per_client: Option<usize>,
    /// Connections held per client; a client holding none has no entry.
    clients: Mutex<HashMap<ClientKey, usize>>,
}

impl Admission {
    pub fn new(max_connections: usize, per_client: Option<usize>) -> Arc<Admission> {
        Arc::new(Admission {
            total: Arc::new(Semaphore::new(max_connections)),
            max_total: max_connections,
            per_client,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `peer`, if both bounds have room.
    pub fn admit(self: &Arc<Self>, peer: &Peer) -> Result<Slot, Refused> {
        let Ok(permit) = self.total.clone().try_acquire_owned() else {
            return Err(Refused {
                rule: Rule::MaxConnections,
                reason: format!(
                    "connection limit reached (max_connections = {}), try again later",
                    self.max_total
                ),
            });
        };
        let client = match self.per_client {
            None => None,
            Some(bound) => Some(self.count_client(ClientKey::of(peer), bound)?),
        };
        let held = Held {
            _permit: permit,
            client,
        };
        Ok(Slot { _held: Arc::new(held) })
    }

    fn count_client(self: &Arc<Self>, key: ClientKey, bound: usize) -> Result<ClientCount, Refused> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        let held = clients.entry(key).or_default();
        if *held >= bound {
            return Err(Refused {
                rule: Rule::MaxConnectionsPerClient,
                reason: format!(
                    "client {key} holds {held} connections (max_connections_per_client = {bound}), try again later"
                ),
            });
        }
        *held += 1;
        Ok(ClientCount {
            admission: self.clone(),
            key,
        })
    }

    /// Connections held by the client `peer` is (for tests and the status).
    pub fn held_by(&self, peer: &Peer) -> usize {
        let clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.get(&ClientKey::of(peer)).copied().unwrap_or(0)
    }
}

/// One connection's place under the bounds, shared by its task and, once it becomes one,
/// its tunnel: given back when the last holder drops it.
#[derive(Clone, Debug)]
pub struct Slot {
    _held: Arc<Held>,
}

struct Held {
    _permit: OwnedSemaphorePermit,
    client: Option<ClientCount>,
}

/// One connection in its client's count, while it lives.
struct ClientCount {
    admission: Arc<Admission>,
    key: ClientKey,
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        let mut clients = self.admission.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = clients.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                clients.remove(&self.key);
            }
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("client", &self.client.as_ref().map(|c| c.key))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> Peer {
        Peer::Ip(text.parse().unwrap())
    }

    #[test]
    fn clients_are_addresses_v6_slash_64s_and_one_for_unix_sockets() {
        assert_eq!(
            ClientKey::of(&peer("[::ffff:10.0.0.1]:5")),
            ClientKey::of(&peer("10.0.0.1:6"))
        );
        assert_ne!(ClientKey::of(&peer("10.0.0.1:5")), ClientKey::of(&peer("10.0.0.2:5")));
        let a = ClientKey::of(&peer("[2001:db8:1:2:aaaa::1]:5"));
        assert_eq!(a, ClientKey::of(&peer("[2001:db8:1:2:bbbb::9]:5")), "same /64");
        assert_ne!(a, ClientKey::of(&peer("[2001:db8:1:3::1]:5")), "another /64");
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        assert_eq!(ClientKey::of(&Peer::Local), ClientKey::Local);
    }

    #[test]
    fn the_bounds_hold_and_a_slot_is_freed_by_its_last_holder() {
        let admission = Admission::new(3, Some(2));
        let (a, b) = (peer("127.0.0.1:1"), peer("127.0.0.2:1"));
        let first = admission.admit(&a).expect("a's first");
        let tunnel = first.clone();
        let _second = admission.admit(&a).expect("a's second");
        let refused = admission.admit(&a).expect_err("a's third is over the per-client bound");
        assert_eq!(refused.rule, Rule::MaxConnectionsPerClient);
        assert!(
            refused.reason.contains("max_connections_per_client = 2"),
            "{}",
            refused.reason
        );
        let _b = admission.admit(&b).expect("another client still has room");
        let refused = admission.admit(&b).expect_err("over the total");
        assert_eq!(refused.rule, Rule::MaxConnections);
        drop(first);
        assert_eq!(admission.held_by(&a), 2, "the tunnel still holds the connection's slot");
        assert!(admission.admit(&b).is_err(), "the tunnel still counts in the total");
        drop(tunnel);
        assert_eq!(admission.held_by(&a), 1);
        assert!(admission.admit(&a).is_ok(), "a slot is free once the tunnel ended");
    }

    #[test]
    fn no_per_client_bound_leaves_the_total() {
        let admission = Admission::new(2, None);
        let a = peer("127.0.0.1:1");
        let _held = (admission.admit(&a).unwrap(), admission.admit(&a).unwrap());
        assert_eq!(admission.admit(&a).unwrap_err().rule, Rule::MaxConnections);
    }
}
