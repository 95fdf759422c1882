//! The check of a peer's gossiped `http` address before any node calls it:
//! a bare `host:port`, an IP only if it is the one the peer gossips from,
//! a DNS name only if well-formed.

use super::short_text;

/// Checks a gossiped `http` value before any node connects to it: a bare
/// `host:port` (the caller adds `http://`), no scheme, path, query or user
/// info, a port 1-65535. An IP must be a unicast address and the very IP
/// the node gossips from (`gossip_ip`), so a member cannot point others'
/// forwards at a third host. A DNS name (1-253 of `A-Z a-z 0-9 - .`, labels
/// of 1-63 not starting or ending with `-`, not all digits) is accepted as
/// named: it cannot be matched without resolving it.
pub fn check_http_addr(value: &str, gossip_ip: std::net::IpAddr) -> Result<(), String> {
    if value.is_empty() {
        return Err("the http address is empty".into());
    }
    for (bad, what) in [
        ("://", "a scheme"),
        ("@", "user info"),
        ("/", "a path"),
        ("?", "a query"),
        ("#", "a fragment"),
    ] {
        if value.contains(bad) {
            return Err(format!(
                "the http address has {what}; only host:port is allowed"
            ));
        }
    }
    if let Ok(sa) = value.parse::<std::net::SocketAddr>() {
        let ip = sa.ip();
        if sa.port() == 0 {
            return Err("the http address has port 0".into());
        }
        let broadcast = ip == std::net::IpAddr::from([255, 255, 255, 255]);
        if ip.is_unspecified() || ip.is_multicast() || broadcast {
            return Err(format!("the http address {ip} is not a unicast address"));
        }
        if ip != gossip_ip {
            return Err(format!(
                "the http address {ip} is not the address the node gossips from ({gossip_ip})"
            ));
        }
        return Ok(());
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err("the http address has no port".into());
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => {
            return Err(format!(
                "the http address has a bad port `{}`",
                short_text(port)
            ))
        }
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let host_ok = (1..=253).contains(&host.len())
        && host.split('.').all(label_ok)
        && !host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if !host_ok {
        return Err(format!(
            "the http address has a bad host `{}`",
            short_text(host)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn gossiped_http_addresses_are_checked() {
        let from: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let cases: &[(&str, Result<(), &str>)] = &[
            ("10.0.0.1:7070", Ok(())),
            ("node-1.lab.example:7070", Ok(())),
            ("localhost:1", Ok(())),
            (
                "10.0.0.2:7070",
                Err("not the address the node gossips from (10.0.0.1)"),
            ),
            (
                "127.0.0.1:7070",
                Err("not the address the node gossips from"),
            ),
            ("10.0.0.1:0", Err("port 0")),
            ("0.0.0.0:7070", Err("not a unicast")),
            ("224.0.0.1:7070", Err("not a unicast")),
            ("255.255.255.255:7070", Err("not a unicast")),
            ("http://10.0.0.1:7070", Err("a scheme")),
            ("evil@10.0.0.1:7070", Err("user info")),
            ("10.0.0.1:7070/admin", Err("a path")),
            ("10.0.0.1:7070?x", Err("a query")),
            ("10.0.0.1:7070#x", Err("a fragment")),
            ("10.0.0.1", Err("no port")),
            ("node-1", Err("no port")),
            ("node-1:", Err("bad port")),
            ("node-1:70000", Err("bad port")),
            ("node-1:+80", Err("bad port")),
            ("node-1:0", Err("bad port")),
            (":7070", Err("bad host")),
            ("-node:7070", Err("bad host")),
            ("node..lab:7070", Err("bad host")),
            ("no de:7070", Err("bad host")),
            ("nœud:7070", Err("bad host")),
            ("10.1:7070", Err("bad host")),
            ("::1:7070", Err("bad host")),
            ("", Err("empty")),
        ];
        for (value, want) in cases {
            let got = check_http_addr(value, from);
            match (want, &got) {
                (Ok(()), Ok(())) => {}
                (Err(w), Err(e)) if e.contains(w) => {}
                _ => panic!("{value:?}: got {got:?}, want {want:?}"),
            }
        }
        let v6: std::net::IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(check_http_addr("[fd00::1]:7070", v6), Ok(()));
        assert!(check_http_addr("[fd00::2]:7070", v6).is_err());
    }

    proptest! {
        #[test]
        fn an_accepted_http_address_is_a_plain_authority(
            v in prop_oneof![".{0,40}", "[a-z0-9.:@/-]{1,24}", "10\\.0\\.0\\.[0-9]{1,3}:[0-9]{1,6}"],
            ip in prop_oneof![Just([10u8, 0, 0, 1]), any::<[u8; 4]>()],
        ) {
            let ip = std::net::IpAddr::from(ip);
            if check_http_addr(&v, ip).is_ok() {
                prop_assert!(v.is_ascii());
                prop_assert!(!v.contains(['/', '@', '?', '#', ' ']));
                let url = format!("http://{v}/x");
                let uri: hyper::Uri = url.parse().unwrap();
                prop_assert_eq!(uri.authority().map(|a| a.as_str()), Some(v.as_str()));
                if let Ok(sa) = v.parse::<std::net::SocketAddr>() {
                    prop_assert_eq!(sa.ip(), ip);
                }
            }
        }
    }
}
