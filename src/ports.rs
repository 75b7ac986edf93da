//! Loopback ports for the private processes Tether starts itself (the embedded PostgreSQL, the
//! chaos suite's replicas and nginx).
//!
//! A port chosen by binding port 0 comes from the kernel's ephemeral range, the same range every
//! outgoing connection takes its local port from. Released and bound again later (a process
//! started a moment after, or restarted on the same port after a kill), it can meanwhile be in
//! use by some outgoing connection, and the process fails with "Address already in use" (seen in a
//! CI run of the chaos suite). Ports below that range are never given to outgoing connections, so
//! one found free there stays free unless another program binds it on purpose.

use rand::Rng;

/// The lowest port this module picks from.
const LOWEST: u16 = 10_000;

/// Tries to pick from below the ephemeral range this many times before falling back to port 0.
const TRIES: usize = 100;

/// A loopback port that is free now and lies below the kernel's ephemeral range when possible.
pub fn free_loopback_port() -> std::io::Result<u16> {
    let below = ephemeral_range_start().unwrap_or(32_768);
    if below > LOWEST {
        let mut rng = rand::thread_rng();
        for _ in 0..TRIES {
            let port = rng.gen_range(LOWEST..below);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range (Linux: `net.ipv4.ip_local_port_range`).
fn ephemeral_range_start() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_free_and_below_the_ephemeral_range() {
        let port = free_loopback_port().unwrap();
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        if let Some(start) = ephemeral_range_start().filter(|s| *s > LOWEST) {
            assert!((LOWEST..start).contains(&port), "{port} not below {start}");
        }
    }
}
