//! Datagram sockets under the sealing transport ([`super::seal`]): real
//! UDP, and an in-process network of byte datagrams for tests and benches
//! that refuses datagrams over the UDP payload limit, like UDP, and can tap
//! and inject datagrams (captures, replays, forgeries).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;

use super::seal::MAX_DATAGRAM;

/// A datagram socket: what the sealing transport sends bytes on.
#[async_trait]
pub trait WireSocket: Send + Sync + 'static {
    async fn send_to(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()>;
    /// One datagram into `buf`; its length and sender. Cancel-safe.
    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)>;
}

/// Opens datagram sockets: UDP ([`UdpWire`]) or in-process ([`MemWire`]).
#[async_trait]
pub trait Wire: Send + Sync + 'static {
    async fn bind(&self, addr: SocketAddr) -> std::io::Result<Box<dyn WireSocket>>;
}

/// Real UDP.
pub struct UdpWire;

struct UdpWireSocket(tokio::net::UdpSocket);

#[async_trait]
impl Wire for UdpWire {
    async fn bind(&self, addr: SocketAddr) -> std::io::Result<Box<dyn WireSocket>> {
        Ok(Box::new(UdpWireSocket(
            tokio::net::UdpSocket::bind(addr).await?,
        )))
    }
}

#[async_trait]
impl WireSocket for UdpWireSocket {
    async fn send_to(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
        self.0.send_to(bytes, to).await.map(|_| ())
    }
    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        self.0.recv_from(buf).await
    }
}

/// Datagrams between sockets of one process (tests, benches), as bytes:
/// it refuses any datagram larger than [`MAX_DATAGRAM`], like UDP, and can
/// tap (copy) and inject datagrams.
#[derive(Clone, Default)]
pub struct MemWire {
    inner: Arc<std::sync::Mutex<MemNet>>,
}

type Datagram = (SocketAddr, SocketAddr, Vec<u8>);

#[derive(Default)]
struct MemNet {
    sockets: HashMap<SocketAddr, tokio::sync::mpsc::UnboundedSender<(SocketAddr, Vec<u8>)>>,
    tap: Option<tokio::sync::mpsc::UnboundedSender<Datagram>>,
    oversized: u64,
    largest: usize,
    bytes: u64,
}

impl MemWire {
    pub fn new() -> MemWire {
        MemWire::default()
    }

    /// Every datagram sent from now on, copied: (from, to, bytes).
    pub fn tap(&self) -> tokio::sync::mpsc::UnboundedReceiver<Datagram> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.inner.lock().expect("mem wire lock").tap = Some(tx);
        rx
    }

    /// Delivers `bytes` to `to` as if sent from `from`.
    pub fn inject(&self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let net = self.inner.lock().expect("mem wire lock");
        if let Some(s) = net.sockets.get(&to) {
            let _ = s.send((from, bytes));
        }
    }

    /// The largest datagram sent, datagrams refused as too large, and the
    /// bytes of all datagrams sent.
    pub fn stats(&self) -> (usize, u64, u64) {
        let net = self.inner.lock().expect("mem wire lock");
        (net.largest, net.oversized, net.bytes)
    }
}

struct MemSocket {
    addr: SocketAddr,
    net: Arc<std::sync::Mutex<MemNet>>,
    rx: tokio::sync::mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
}

#[async_trait]
impl Wire for MemWire {
    async fn bind(&self, addr: SocketAddr) -> std::io::Result<Box<dyn WireSocket>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut net = self.inner.lock().expect("mem wire lock");
        if net.sockets.get(&addr).is_some_and(|s| !s.is_closed()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{addr} is bound"),
            ));
        }
        net.sockets.insert(addr, tx);
        Ok(Box::new(MemSocket {
            addr,
            net: self.inner.clone(),
            rx,
        }))
    }
}

#[async_trait]
impl WireSocket for MemSocket {
    async fn send_to(&mut self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
        let mut net = self.net.lock().expect("mem wire lock");
        if bytes.len() > MAX_DATAGRAM {
            net.oversized += 1;
            return Err(std::io::Error::other("message too long"));
        }
        net.largest = net.largest.max(bytes.len());
        net.bytes += bytes.len() as u64;
        if let Some(tap) = &net.tap {
            let _ = tap.send((self.addr, to, bytes.to_vec()));
        }
        if let Some(s) = net.sockets.get(&to) {
            let _ = s.send((self.addr, bytes.to_vec()));
        }
        Ok(())
    }

    async fn recv_from(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        let (from, bytes) = self
            .rx
            .recv()
            .await
            .ok_or_else(|| std::io::Error::other("mem wire closed"))?;
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok((n, from))
    }
}
