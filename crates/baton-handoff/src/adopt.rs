//! The one rule by which every listener gets its socket: adopted from what this process was
//! handed ([`Inherited`]), or bound ([`open_listener`]); and the same rule run on data, over
//! the sockets a serving generation holds, so that `check` can say what the next handoff will
//! do ([`forecast`]). Both ask [`plan`], so the forecast cannot drift from what happens.

use std::sync::Arc;

use tracing::{info, warn};

use crate::inherit::Inherited;
use crate::listener::{ListenAddr, ListenError, Origin, Socket, bind};

/// A named listening socket of this generation.
#[derive(Debug)]
pub struct Listener {
    /// The listener's name (the configuration's, and `LISTEN_FDNAMES`' for a successor).
    pub name: String,
    /// The address the kernel reports (for a configured port 0, the real port).
    pub bound: ListenAddr,
    /// The listening socket, shared by the accept loop and the next handoff.
    pub socket: Arc<Socket>,
    /// Who bound the socket first: the service manager or a generation.
    pub origin: Origin,
    /// How [`open_listener`] got it.
    pub opened: Opened,
}

/// How [`open_listener`] got the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// Inherited, at the configured address.
    Adopted,
    /// Inherited from the service manager at another address than configured: the service
    /// manager's socket wins.
    AdoptedElsewhere {
        /// The address the configuration asked for.
        configured: ListenAddr,
    },
    /// Bound here (nothing inherited matched).
    Bound,
    /// Bound here because the configuration moved it; the inherited socket was closed.
    Moved {
        /// Where the inherited socket was bound.
        from: ListenAddr,
    },
}

impl Opened {
    /// Whether the socket was inherited (not bound here).
    pub fn is_adopted(&self) -> bool {
        matches!(self, Opened::Adopted | Opened::AdoptedElsewhere { .. })
    }
}

/// A socket held or inherited, as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Its name.
    pub name: String,
    /// The address it is bound to.
    pub addr: ListenAddr,
    /// Who bound it first.
    pub origin: Origin,
}

/// What the rule does with a configured listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forecast {
    /// The held socket of the same name and address is adopted.
    Adopt,
    /// The held socket at this address, now called `from`, is adopted under the new name.
    Rename {
        /// The held socket's name.
        from: String,
    },
    /// The service manager's socket of this name, at `passed`, wins over the configuration.
    KeptElsewhere {
        /// The address the service manager's socket is bound to.
        passed: ListenAddr,
    },
    /// The configured address changed: the held socket at `from` is closed, the new one bound.
    Move {
        /// The held socket's address.
        from: ListenAddr,
    },
    /// Nothing held matches: the address is bound.
    Bind,
}

/// The rule, for the listener `name` at `addr` among the sockets not taken yet (`free`: their
/// index and view): what happens, and which socket it takes.
///
/// 1. A socket of the same name at the configured address is adopted (unless it is a Unix
///    socket a generation bound whose file is gone: it takes no connection, so it is bound
///    anew).
/// 2. A socket of the same name elsewhere: the service manager's wins over the configuration;
///    one a generation bound is closed and the configured address bound (it moved).
/// 3. Otherwise a socket at exactly the configured address is adopted whatever its name (an
///    unnamed socket-activated fd, or a renamed listener: binding would collide).
/// 4. Otherwise the address is bound.
pub fn plan(free: &[(usize, Held)], name: &str, addr: &ListenAddr) -> (Forecast, Option<usize>) {
    if let Some((i, h)) = free.iter().find(|(_, h)| h.name == name) {
        let gone = matches!(&h.addr, ListenAddr::Unix(p) if std::fs::symlink_metadata(p).is_err());
        let f = if addr.is_served_by(&h.addr) && !(gone && h.origin == Origin::Bound) {
            Forecast::Adopt
        } else if h.origin == Origin::Supervisor {
            Forecast::KeptElsewhere { passed: h.addr.clone() }
        } else {
            Forecast::Move { from: h.addr.clone() }
        };
        return (f, Some(*i));
    }
    match free
        .iter()
        .find(|(_, h)| h.addr == *addr)
        .filter(|_| !addr.is_ephemeral())
    {
        Some((i, h)) => (Forecast::Rename { from: h.name.clone() }, Some(*i)),
        None => (Forecast::Bind, None),
    }
}

/// Opens the listener `name` at `addr` by [`plan`]'s rule over what `inherited` still holds.
pub async fn open_listener(inherited: &mut Inherited, name: &str, addr: &ListenAddr) -> Result<Listener, ListenError> {
    let adopt_err = |source| ListenError::Adopt {
        name: name.to_string(),
        source,
    };
    let untaken = inherited.untaken();
    // An fd passed under this name that is no listening socket: taking it refuses it, naming
    // the fd (one under another name is closed with the rest, unused).
    if let Some((i, ..)) = untaken.iter().find(|(_, n, addr, _)| n == name && addr.is_none()) {
        inherited.take(*i).map_err(adopt_err)?;
    }
    let free: Vec<(usize, Held)> = untaken
        .into_iter()
        .filter_map(|(i, name, addr, origin)| {
            Some((
                i,
                Held {
                    name,
                    addr: addr?,
                    origin,
                },
            ))
        })
        .collect();
    let (forecast, index) = plan(&free, name, addr);
    let taken = index.map(|i| inherited.take(i)).transpose().map_err(adopt_err)?;
    let actual = match &taken {
        Some((socket, _)) => Some(socket.local_addr().map_err(adopt_err)?),
        None => None,
    };
    match (forecast, taken, actual) {
        (Forecast::Adopt | Forecast::Rename { .. }, Some((socket, origin)), Some(actual)) => {
            Ok(listener(name, socket, actual, origin, Opened::Adopted))
        }
        (Forecast::KeptElsewhere { .. }, Some((socket, origin)), Some(actual)) => {
            warn!(listener = name, configured = %addr, passed = %actual, "the service manager passed this listener at another address than the configuration: serving on the passed one");
            let opened = Opened::AdoptedElsewhere {
                configured: addr.clone(),
            };
            Ok(listener(name, socket, actual, origin, opened))
        }
        (Forecast::Move { from }, taken, _) => {
            info!(listener = name, from = %from, to = %addr, "listener moved: binding the new address, closing the old one");
            drop(taken);
            let socket = bind(name, addr).await?;
            let bound = socket.local_addr().map_err(adopt_err)?;
            Ok(listener(name, socket, bound, Origin::Bound, Opened::Moved { from }))
        }
        (_, taken, _) => {
            drop(taken);
            let socket = bind(name, addr).await?;
            let bound = socket.local_addr().map_err(adopt_err)?;
            Ok(listener(name, socket, bound, Origin::Bound, Opened::Bound))
        }
    }
}

/// Forecasts [`plan`]'s rule for each of `wanted` (name and address, in the order they are
/// opened) against the sockets a serving generation holds: `check` says what the next
/// handoff will do. Returns the forecasts and the held sockets nothing takes, which the next
/// generation closes (dropped).
pub fn forecast<'h>(held: &'h [Held], wanted: &[(&str, &ListenAddr)]) -> (Vec<Forecast>, Vec<&'h Held>) {
    let mut free: Vec<(usize, Held)> = held.iter().cloned().enumerate().collect();
    let mut forecasts = Vec::with_capacity(wanted.len());
    for (name, addr) in wanted {
        let (f, taken) = plan(&free, name, addr);
        free.retain(|(i, _)| Some(*i) != taken);
        forecasts.push(f);
    }
    let dropped = free.iter().map(|(i, _)| &held[*i]).collect();
    (forecasts, dropped)
}

fn listener(name: &str, socket: Socket, bound: ListenAddr, origin: Origin, opened: Opened) -> Listener {
    Listener {
        name: name.to_string(),
        bound,
        socket: Arc::new(socket),
        origin,
        opened,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forecast_follows_the_rule() {
        let tcp = |s: &str| ListenAddr::Tcp(s.parse().unwrap());
        let held = |name: &str, addr: &str, origin| Held {
            name: name.into(),
            addr: tcp(addr),
            origin,
        };
        let held = [
            held("proxy", "127.0.0.1:8080", Origin::Supervisor),
            held("side", "127.0.0.1:8081", Origin::Bound),
            held("eph", "127.0.0.2:40000", Origin::Bound),
            held("old", "127.0.0.1:8082", Origin::Bound),
            held("was", "127.0.0.1:8083", Origin::Bound),
            held("sd", "127.0.0.1:8084", Origin::Supervisor),
        ];
        let (a, b, c, d, e, f) = (
            tcp("127.0.0.1:8080"),
            tcp("127.0.0.1:9081"),
            tcp("127.0.0.2:0"),
            tcp("127.0.0.1:8083"),
            tcp("127.0.0.1:9000"),
            tcp("127.0.0.1:9084"),
        );
        let wanted = [
            ("proxy", &a),
            ("side", &b),
            ("eph", &c),
            ("renamed", &d),
            ("new", &e),
            ("sd", &f),
        ];
        let (forecasts, dropped) = forecast(&held, &wanted);
        assert_eq!(
            forecasts,
            vec![
                Forecast::Adopt,
                Forecast::Move {
                    from: tcp("127.0.0.1:8081")
                },
                Forecast::Adopt,
                Forecast::Rename { from: "was".into() },
                Forecast::Bind,
                Forecast::KeptElsewhere {
                    passed: tcp("127.0.0.1:8084")
                },
            ]
        );
        assert_eq!(dropped.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["old"]);
    }
    #[test]
    fn only_a_socket_taken_from_what_was_handed_is_adopted() {
        let from = ListenAddr::Tcp("127.0.0.1:1".parse().unwrap());
        assert!(Opened::Adopted.is_adopted());
        assert!(
            Opened::AdoptedElsewhere {
                configured: from.clone()
            }
            .is_adopted()
        );
        assert!(!Opened::Bound.is_adopted());
        assert!(!Opened::Moved { from }.is_adopted());
    }

    #[test]
    fn a_unix_socket_whose_file_is_gone_is_bound_anew_unless_the_service_manager_owns_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = ListenAddr::Unix(dir.path().join("gone.sock"));
        let here = dir.path().join("here.sock");
        std::fs::write(&here, b"").expect("a file at the path");
        let here = ListenAddr::Unix(here);
        let held = |addr: &ListenAddr, origin| {
            [(
                0,
                Held {
                    name: "local".into(),
                    addr: addr.clone(),
                    origin,
                },
            )]
        };
        let moved = Forecast::Move { from: gone.clone() };
        assert_eq!(
            plan(&held(&gone, Origin::Bound), "local", &gone),
            (moved, Some(0)),
            "takes no connection"
        );
        assert_eq!(
            plan(&held(&gone, Origin::Supervisor), "local", &gone),
            (Forecast::Adopt, Some(0)),
            "the service manager's"
        );
        assert_eq!(
            plan(&held(&here, Origin::Bound), "local", &here),
            (Forecast::Adopt, Some(0)),
            "its file is there"
        );
    }

    /// What a process was handed: a pipe (no listening socket) passed under `name`.
    fn handed_a_pipe(name: &str) -> (Inherited, std::os::fd::OwnedFd) {
        use std::os::fd::IntoRawFd;
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let names = std::ffi::OsString::from(name);
        let env = move |v: &str| (v == "LISTEN_FDNAMES").then(|| names.clone());
        (Inherited::read(&env, false, vec![r.into_raw_fd()]).expect("read"), w)
    }

    #[tokio::test]
    async fn an_fd_passed_under_the_name_that_is_no_listener_is_refused() {
        let addr = ListenAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let (mut inherited, _w) = handed_a_pipe("web");
        let e = open_listener(&mut inherited, "web", &addr)
            .await
            .expect_err("a pipe named web");
        assert!(matches!(&e, ListenError::Adopt { name, .. } if name == "web"), "{e}");
        // Under another name it is none of this listener's business: the address is bound.
        let (mut inherited, _w) = handed_a_pipe("other");
        let listener = open_listener(&mut inherited, "web", &addr).await.expect("bound");
        assert_eq!(listener.opened, Opened::Bound);
        assert_eq!(inherited.untaken().len(), 1, "the pipe is left for the rest");
    }
}
