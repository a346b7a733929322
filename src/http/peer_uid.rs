//! The uid of the process at the other end of a local TCP connection.
//!
//! Unix sockets tell the peer's uid (`SO_PEERCRED`); TCP does not. But the
//! kernel's socket table (`/proc/net/tcp`, `/proc/net/tcp6`, what `ss -e`
//! reads) lists every socket of this network namespace with its owner:
//! the client's end of a connection to us is the entry whose local address
//! is the peer's address and whose remote address is ours. Only peers in
//! this network namespace (this host, or this pod) are found; anything
//! else is `None`, which an allow-list refuses.
//!
//! [`uid_in_table`] is the pure parser; [`lookup`] reads the tables.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// Largest socket table read (a pod has a few dozen sockets; a busy host
/// some thousands of 150-byte lines).
const MAX_TABLE: u64 = 32 * 1024 * 1024;

/// The uid owning the client socket of the TCP connection from `peer` to
/// `local`, read from the kernel's socket tables.
pub fn lookup(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    use std::io::Read as _;
    // An IPv4 client of a dual-stack listener shows up in `tcp6` with
    // mapped addresses; look in both.
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let mut text = String::new();
        let read =
            std::fs::File::open(table).and_then(|f| f.take(MAX_TABLE).read_to_string(&mut text));
        if read.is_err() {
            continue;
        }
        if let Some(uid) = uid_in_table(&text, peer, local) {
            return Some(uid);
        }
    }
    None
}

/// Finds, in a `/proc/net/tcp` or `/proc/net/tcp6` table, the socket
/// whose local address is `client` and whose remote address is `server`,
/// and returns its owner's uid.
pub fn uid_in_table(table: &str, client: SocketAddr, server: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        // sl local rem st tx:rx tr:tm retrnsmt uid timeout inode
        let fields: Vec<&str> = line.split_whitespace().take(10).collect();
        let [_, local, remote, state, _, _, _, uid, _, inode] = fields[..] else {
            return None;
        };
        // Only an established socket with an inode has a real owner: the
        // kernel shows uid 0 for TIME_WAIT entries and orphaned sockets.
        if state != "01" || inode == "0" {
            return None;
        }
        let (local, remote) = (parse_addr(local)?, parse_addr(remote)?);
        (same(local, client) && same(remote, server))
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// Equal addresses, an IPv4-mapped IPv6 address being its IPv4 one.
fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    a.port() == b.port() && canon(a.ip()) == canon(b.ip())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6). The address
/// is the kernel's in-memory form: each 32-bit word in host order, which
/// on the little-endian machines this runs on reads byte-reversed.
fn parse_addr(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let ip = match (addr.len(), words.as_slice()) {
        (8, [w]) => IpAddr::from(w.to_le_bytes()),
        (32, [a, b, c, d]) => {
            let mut bytes = [0u8; 16];
            for (chunk, w) in bytes.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3A99 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:3A99 01 00000000:00000000 00:00000000 00000000  1001        0 3 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:D432 0100007F:3A99 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
   4: 0100007F:D433 0100007F:3A99 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000
";

    #[test]
    fn the_client_end_of_a_loopback_connection_names_its_owner() {
        let server: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(uid_in_table(TCP, client, server), Some(1001));
    }

    #[test]
    fn the_server_end_is_not_taken_for_the_client() {
        // Swapped: the entry with local = server, remote = client is ours.
        let server: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(uid_in_table(TCP, server, client), Some(0));
        let stranger: SocketAddr = "127.0.0.1:54322".parse().unwrap();
        assert_eq!(uid_in_table(TCP, stranger, server), None);
    }

    #[test]
    fn time_wait_and_orphaned_sockets_are_not_taken_for_root() {
        // Entries 3 (TIME_WAIT) and 4 (no inode) say uid 0.
        let server: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        for port in [54322, 54323] {
            let client = SocketAddr::new([127, 0, 0, 1].into(), port);
            assert_eq!(uid_in_table(TCP, client, server), None, "{port}");
        }
    }

    #[test]
    fn ipv6_and_mapped_addresses_are_read() {
        let table = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:D431 0000000000000000FFFF00000100007F:3A99 01 00000000:00000000 00:00000000 00000000  1002        0 4 1
   1: 00000000000000000000000001000000:D432 00000000000000000000000001000000:3A99 01 00000000:00000000 00:00000000 00000000  1003        0 5 1
";
        let server: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let mapped_client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(uid_in_table(table, mapped_client, server), Some(1002));
        let v6_server: SocketAddr = "[::1]:15001".parse().unwrap();
        let v6_client: SocketAddr = "[::1]:54322".parse().unwrap();
        assert_eq!(uid_in_table(table, v6_client, v6_server), Some(1003));
    }

    #[test]
    fn garbage_lines_find_nothing() {
        let server: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        for table in [
            "",
            "header only",
            "h\n 0: zz:zz yy:yy 01 a b c d 1001",
            "h\n 0: 0100007F:D431",
        ] {
            assert_eq!(uid_in_table(table, client, server), None, "{table:?}");
        }
    }

    #[test]
    fn a_real_connection_on_this_host_is_found_with_our_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let stream = std::net::TcpStream::connect(server).unwrap();
        let client = stream.local_addr().unwrap();
        let own = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        assert_eq!(lookup(client, server), own.ok());
    }
}
