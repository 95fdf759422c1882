//! The sealing transport: every gossip datagram authenticated and encrypted
//! with the cluster's gossip key (XChaCha20-Poly1305), replays dropped.
//!
//! chitchat 0.11.1 hands its [`Transport`] whole [`ChitchatMessage`]s and
//! exports their (de)serialization, so this transport turns each message
//! into bytes, seals them, and sends them on a [`Wire`] (real UDP, or the
//! in-process [`MemWire`] of tests and benches). What arrives is opened
//! before chitchat's parser ever sees a byte: a datagram that does not open
//! is dropped and counted, never parsed.
//!
//! A sealed datagram (format version 1):
//!
//! ```text
//! magic "shg1" | key id (4) | unix ms (8, LE) | nonce (24)     header, 40 bytes
//! XChaCha20-Poly1305(key, nonce, aad = header ‖ cluster id,
//!     message id (8) | fragment index (1) | fragment count (1) | chunk)
//! ```
//!
//! chitchat fills a message up to 65,507 bytes (its hard-coded UDP budget),
//! so 66 bytes of header, fragment header and tag could push it past the
//! UDP payload limit: a message that does not fit one datagram is cut into
//! fragments, each sealed on its own, and reassembled on arrival (at most
//! [`MAX_FRAGMENTS`] per message, [`MAX_PENDING`] messages in reassembly,
//! each given up after [`REASSEMBLY_TIMEOUT`]). No datagram ever exceeds
//! [`MAX_DATAGRAM`].
//!
//! Replays: a datagram whose timestamp is more than [`MAX_SKEW`] away from
//! this host's clock is dropped (so hosts' clocks may differ by up to
//! ±120 s); within that window every nonce is remembered ([`ReplayGuard`],
//! bounded in size) and a second datagram with the same nonce is dropped.
//!
//! Modes ([`SealMode`]): `required` sends and accepts sealed datagrams only;
//! `transitional` seals everything it sends, also sends an unsealed copy to
//! peers it has not yet heard sealed (so nodes still unsealed keep hearing
//! it), and accepts unsealed datagrams; `off` is unsealed gossip. An
//! unsealed message is accepted only if every key it carries starts with
//! an ASCII byte (chitchat panics on any other: `listener.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub use super::wire::{MemWire, UdpWire, Wire, WireSocket};
pub use crate::config::SealMode;
use crate::keyring::{KeyId, Subkey};

/// The UDP payload limit (IPv4: 65,535 − 20 − 8): no datagram is larger.
pub const MAX_DATAGRAM: usize = 65_507;
/// Clock difference between hosts tolerated, each way.
pub const MAX_SKEW: Duration = Duration::from_secs(120);
/// Most fragments of one message (chitchat's messages need at most 2).
pub const MAX_FRAGMENTS: usize = 4;
/// Most messages in reassembly at once (oldest given up first).
pub const MAX_PENDING: usize = 64;
/// A message whose fragments have not all arrived by then is given up.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most nonces remembered; past it the oldest are forgotten and the
/// window's floor rises above them (older datagrams are then refused).
pub const NONCE_CACHE: usize = 200_000;

const MAGIC: [u8; 4] = *b"shg1";
const HEADER: usize = 4 + 4 + 8 + 24;
const TAG: usize = 16;
const FRAG_HEADER: usize = 8 + 1 + 1;
/// Largest chunk of a message one datagram carries.
pub const MAX_CHUNK: usize = MAX_DATAGRAM - HEADER - TAG - FRAG_HEADER;

/// Datagram counters since start (`GET /v1/node`, `gossip.datagrams`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SealCounters {
    /// Sealed datagrams sent / unsealed datagrams sent.
    pub sent_sealed: u64,
    pub sent_unsealed: u64,
    /// Bytes of every datagram sent, and the largest one.
    pub bytes_sent: u64,
    pub max_datagram_sent: u64,
    /// Bytes of every datagram received.
    pub bytes_received: u64,
    /// Sealed datagrams that opened (fragments included).
    pub opened: u64,
    /// Unsealed datagrams accepted (transitional and off modes).
    pub accepted_unsealed: u64,
    /// Sealed datagrams that did not open (unknown key id, wrong key,
    /// tampered, other cluster), or sealed ones reaching a node without a key.
    pub dropped_bad_auth: u64,
    /// Sealed datagrams outside the ±120 s window or seen before.
    pub dropped_replay: u64,
    /// Unsealed datagrams in `required` mode.
    pub dropped_unsealed: u64,
    /// Datagrams that are neither a sealed datagram nor a chitchat message,
    /// messages with a key chitchat cannot take (non-ASCII first byte), and
    /// fragments that do not fit together.
    pub dropped_malformed: u64,
    /// Messages too large to send (more than [`MAX_FRAGMENTS`] sealed
    /// fragments, or an unsealed copy over [`MAX_DATAGRAM`]): not sent.
    #[serde(default)]
    pub dropped_oversize: u64,
}

/// The live counters, shared by the transport and whoever reports them.
#[derive(Debug, Default)]
pub struct SealStats {
    sent_sealed: AtomicU64,
    sent_unsealed: AtomicU64,
    bytes_sent: AtomicU64,
    max_datagram_sent: AtomicU64,
    bytes_received: AtomicU64,
    opened: AtomicU64,
    accepted_unsealed: AtomicU64,
    dropped_bad_auth: AtomicU64,
    dropped_replay: AtomicU64,
    dropped_unsealed: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_oversize: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl SealStats {
    pub fn snapshot(&self) -> SealCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SealCounters {
            sent_sealed: g(&self.sent_sealed),
            sent_unsealed: g(&self.sent_unsealed),
            bytes_sent: g(&self.bytes_sent),
            max_datagram_sent: g(&self.max_datagram_sent),
            bytes_received: g(&self.bytes_received),
            opened: g(&self.opened),
            accepted_unsealed: g(&self.accepted_unsealed),
            dropped_bad_auth: g(&self.dropped_bad_auth),
            dropped_replay: g(&self.dropped_replay),
            dropped_unsealed: g(&self.dropped_unsealed),
            dropped_malformed: g(&self.dropped_malformed),
            dropped_oversize: g(&self.dropped_oversize),
        }
    }

    fn sent(&self, len: usize, sealed: bool) {
        bump(if sealed {
            &self.sent_sealed
        } else {
            &self.sent_unsealed
        });
        self.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        self.max_datagram_sent
            .fetch_max(len as u64, Ordering::Relaxed);
    }
}

/// Why a datagram was not taken (pure decisions below return these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    BadAuth,
    Replay,
    Unsealed,
    Malformed,
}

impl SealStats {
    fn dropped(&self, d: Drop) {
        bump(match d {
            Drop::BadAuth => &self.dropped_bad_auth,
            Drop::Replay => &self.dropped_replay,
            Drop::Unsealed => &self.dropped_unsealed,
            Drop::Malformed => &self.dropped_malformed,
        });
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One gossip key ready to seal and open.
struct SealKey {
    id: KeyId,
    aead: XChaCha20Poly1305,
}

/// The keys of a node, primary (the one that seals) first, bound to its
/// cluster id (part of every datagram's associated data).
pub struct Sealer {
    keys: Vec<SealKey>,
    cluster_id: Vec<u8>,
}

/// A message opened from one sealed datagram: one fragment of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Fragment {
    pub msg_id: u64,
    pub index: u8,
    pub count: u8,
    pub chunk: Vec<u8>,
}

impl Sealer {
    /// `keys` as [`crate::keyring::Keyring::gossip_keys`] gives them.
    pub fn new(keys: &[Subkey], cluster_id: &str) -> Sealer {
        Sealer {
            keys: keys
                .iter()
                .map(|k| SealKey {
                    id: k.id,
                    aead: XChaCha20Poly1305::new(k.secret.bytes().into()),
                })
                .collect(),
            cluster_id: cluster_id.as_bytes().to_vec(),
        }
    }

    /// Seals one serialized chitchat message for the node at `to` into one
    /// or more datagrams, none larger than [`MAX_DATAGRAM`]. `None` when it
    /// would take more than [`MAX_FRAGMENTS`] (chitchat never builds such a
    /// message). The receiver's address is bound into the tag (associated
    /// data, not sent): a datagram captured on its way to one node opens
    /// nowhere else, so it cannot be replayed to a node whose nonce cache
    /// has not seen it.
    pub fn seal(&self, message: &[u8], now_ms: u64, to: SocketAddr) -> Option<Vec<Vec<u8>>> {
        let count = message.len().div_ceil(MAX_CHUNK).max(1);
        if count > MAX_FRAGMENTS {
            return None;
        }
        let key = &self.keys[0];
        let msg_id = rand::rngs::OsRng.next_u64();
        let mut out = Vec::with_capacity(count);
        for index in 0..count {
            let chunk = &message[(index * MAX_CHUNK).min(message.len())
                ..((index + 1) * MAX_CHUNK).min(message.len())];
            let mut header = [0u8; HEADER];
            header[..4].copy_from_slice(&MAGIC);
            header[4..8].copy_from_slice(&key.id.0);
            header[8..16].copy_from_slice(&now_ms.to_le_bytes());
            rand::rngs::OsRng.fill_bytes(&mut header[16..40]);
            let mut plain = Vec::with_capacity(FRAG_HEADER + chunk.len());
            plain.extend_from_slice(&msg_id.to_le_bytes());
            plain.push(index as u8);
            plain.push(count as u8);
            plain.extend_from_slice(chunk);
            let aad = aad(&header, &self.cluster_id, to);
            let sealed = key
                .aead
                .encrypt(
                    XNonce::from_slice(&header[16..40]),
                    Payload {
                        msg: &plain,
                        aad: &aad,
                    },
                )
                .expect("XChaCha20-Poly1305 seals any length below its limit");
            let mut dgram = Vec::with_capacity(HEADER + sealed.len());
            dgram.extend_from_slice(&header);
            dgram.extend_from_slice(&sealed);
            debug_assert!(dgram.len() <= MAX_DATAGRAM);
            out.push(dgram);
        }
        Some(out)
    }

    /// Opens a sealed datagram that came to this node, reached at any of
    /// `at` (its advertised gossip address, and its listen address when
    /// that is a specific one): checks the window against `now_ms` and the
    /// nonce against `replay`, then the tag, which holds only for a
    /// datagram sealed for one of `at`. Nothing of the content is looked at
    /// before the tag checked.
    pub fn open(
        &self,
        dgram: &[u8],
        now_ms: u64,
        replay: &mut ReplayGuard,
        at: &[SocketAddr],
    ) -> Result<Fragment, Drop> {
        if !is_sealed(dgram) || dgram.len() < HEADER + TAG + FRAG_HEADER {
            return Err(Drop::Malformed);
        }
        let header = &dgram[..HEADER];
        let id = KeyId(header[4..8].try_into().expect("4 bytes"));
        let ts = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let nonce: [u8; 24] = header[16..40].try_into().expect("24 bytes");
        let key = self.keys.iter().find(|k| k.id == id).ok_or(Drop::BadAuth)?;
        if !replay.in_window(now_ms, ts) {
            return Err(Drop::Replay);
        }
        let plain = at
            .iter()
            .find_map(|&to| {
                key.aead
                    .decrypt(
                        XNonce::from_slice(&nonce),
                        Payload {
                            msg: &dgram[HEADER..],
                            aad: &aad(header, &self.cluster_id, to),
                        },
                    )
                    .ok()
            })
            .ok_or(Drop::BadAuth)?;
        // Only an authentic datagram is remembered, so forged ones cannot
        // fill the cache.
        if !replay.remember(now_ms, ts, nonce) {
            return Err(Drop::Replay);
        }
        let msg_id = u64::from_le_bytes(plain[..8].try_into().expect("8 bytes"));
        let (index, count) = (plain[8], plain[9]);
        if count == 0 || usize::from(count) > MAX_FRAGMENTS || index >= count {
            return Err(Drop::Malformed);
        }
        Ok(Fragment {
            msg_id,
            index,
            count,
            chunk: plain[FRAG_HEADER..].to_vec(),
        })
    }
}

/// The associated data of a sealed datagram: its header, the cluster id and
/// the address of the node it is for (as text: `10.0.0.5:7946`).
fn aad(header: &[u8], cluster_id: &[u8], to: SocketAddr) -> Vec<u8> {
    [header, cluster_id, to.to_string().as_bytes()].concat()
}

/// A datagram in the sealed format (by its magic; not yet authentic).
pub fn is_sealed(dgram: &[u8]) -> bool {
    dgram.starts_with(&MAGIC)
}

/// The replay window and nonce cache of one node.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    /// Nonces seen, by timestamp, for expiry.
    by_time: BTreeSet<(u64, [u8; 24])>,
    seen: HashSet<[u8; 24]>,
    /// Timestamps at or below this are refused: the window's lower edge,
    /// raised when the cache is full.
    floor: u64,
    cap: usize,
}

impl ReplayGuard {
    pub fn new(cap: usize) -> ReplayGuard {
        ReplayGuard {
            cap: cap.max(1),
            ..Default::default()
        }
    }

    fn skew_ms() -> u64 {
        MAX_SKEW.as_millis() as u64
    }

    /// The timestamp is within ±[`MAX_SKEW`] of now and above the floor.
    pub fn in_window(&self, now_ms: u64, ts: u64) -> bool {
        let low = now_ms.saturating_sub(Self::skew_ms()).max(self.floor);
        ts > low && ts <= now_ms.saturating_add(Self::skew_ms())
    }

    /// Records a nonce; false if it was seen before (a replay).
    pub fn remember(&mut self, now_ms: u64, ts: u64, nonce: [u8; 24]) -> bool {
        // Forget what fell out of the window.
        let low = now_ms.saturating_sub(Self::skew_ms());
        while let Some(&(t, n)) = self.by_time.first() {
            if t > low {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&n);
        }
        if !self.seen.insert(nonce) {
            return false;
        }
        self.by_time.insert((ts, nonce));
        while self.by_time.len() > self.cap {
            if let Some((t, n)) = self.by_time.pop_first() {
                self.seen.remove(&n);
                self.floor = self.floor.max(t);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A message in reassembly: when its first fragment came, and its parts.
/// When the first fragment came, its arrival number (the tie-break among
/// equal times, so the oldest is always the one given up), the fragments.
type Partial = ((Instant, u64), Vec<Option<Vec<u8>>>);

/// Messages in reassembly, bounded in count and age.
#[derive(Default)]
struct Reassembly {
    pending: HashMap<(SocketAddr, u64), Partial>,
    /// Messages begun so far.
    begun: u64,
}

impl Reassembly {
    /// Adds a fragment; the whole message once every fragment is in.
    fn add(
        &mut self,
        from: SocketAddr,
        f: Fragment,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, Drop> {
        if f.count == 1 {
            return Ok(Some(f.chunk));
        }
        self.pending
            .retain(|_, ((t, _), _)| now.duration_since(*t) < REASSEMBLY_TIMEOUT);
        let key = (from, f.msg_id);
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            if let Some(oldest) = self
                .pending
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| *k)
            {
                self.pending.remove(&oldest);
            }
        }
        let begun = &mut self.begun;
        let (_, parts) = self.pending.entry(key).or_insert_with(|| {
            *begun += 1;
            ((now, *begun), vec![None; usize::from(f.count)])
        });
        if parts.len() != usize::from(f.count) {
            self.pending.remove(&key);
            return Err(Drop::Malformed);
        }
        parts[usize::from(f.index)] = Some(f.chunk);
        if parts.iter().all(Option::is_some) {
            let (_, parts) = self.pending.remove(&key).expect("just seen");
            return Ok(Some(parts.into_iter().flatten().flatten().collect()));
        }
        Ok(None)
    }
}

/// Decodes an unsealed chitchat message, refusing one that carries a key
/// chitchat cannot take (first byte not ASCII: chitchat 0.11.1 slices
/// `key[0..1]` and panics). chitchat keeps its deltas' fields private, so
/// the keys are read from the message's `Debug` form, where every key
/// appears as `key: "…"` with any `"` inside a string escaped.
pub fn decode_plain(bytes: &[u8]) -> Result<ChitchatMessage, Drop> {
    let mut buf = bytes;
    let msg = ChitchatMessage::deserialize(&mut buf).map_err(|_| Drop::Malformed)?;
    if matches!(
        msg,
        ChitchatMessage::SynAck { .. } | ChitchatMessage::Ack { .. }
    ) {
        let shown = format!("{msg:?}");
        for (i, _) in shown.match_indices("key: \"") {
            let rest = &shown[i + 6..];
            let ok = match rest.chars().next() {
                // An escape: `\"` and `\\` are ASCII, `\u{…}` is not.
                Some('\\') => !rest.starts_with("\\u{"),
                Some(c) => c.is_ascii(),
                None => false,
            };
            if !ok {
                return Err(Drop::Malformed);
            }
        }
    }
    Ok(msg)
}

/// What a running transport seals with, replaceable while it runs (a key
/// rotation or a change of mode needs no restart: `SIGHUP`). A std lock:
/// held only to copy the setting, never across an await.
#[derive(Clone)]
pub struct SealControl {
    inner: Arc<std::sync::RwLock<(SealMode, Option<Arc<Sealer>>)>>,
}

impl SealControl {
    /// `sealer` is required unless `mode` is off (without one, it is off).
    pub fn new(mode: SealMode, sealer: Option<Sealer>) -> SealControl {
        let c = SealControl {
            inner: Arc::new(std::sync::RwLock::new((SealMode::Off, None))),
        };
        c.set(mode, sealer);
        c
    }

    /// Replaces the mode and keys; the next datagram uses them.
    pub fn set(&self, mode: SealMode, sealer: Option<Sealer>) {
        let mode = if sealer.is_none() {
            SealMode::Off
        } else {
            mode
        };
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *g = (mode, sealer.map(Arc::new));
    }

    pub fn mode(&self) -> SealMode {
        self.current().0
    }

    fn current(&self) -> (SealMode, Option<Arc<Sealer>>) {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The chitchat [`Transport`] that seals: bytes on `wire`, sealed per its
/// [`SealControl`].
pub struct SealTransport {
    wire: Arc<dyn Wire>,
    control: SealControl,
    stats: Arc<SealStats>,
    /// The address peers send to, when it is not the listen address.
    advertise: Option<SocketAddr>,
}

impl SealTransport {
    /// `sealer` is required unless `mode` is off.
    pub fn new(
        wire: Arc<dyn Wire>,
        mode: SealMode,
        sealer: Option<Sealer>,
        stats: Arc<SealStats>,
    ) -> SealTransport {
        SealTransport::with_control(wire, SealControl::new(mode, sealer), stats)
    }

    /// A transport whose mode and keys `control` changes while it runs.
    pub fn with_control(
        wire: Arc<dyn Wire>,
        control: SealControl,
        stats: Arc<SealStats>,
    ) -> SealTransport {
        SealTransport {
            wire,
            control,
            stats,
            advertise: None,
        }
    }

    /// Peers reach this node at `addr` (its advertised gossip address),
    /// which may differ from the listen address (`0.0.0.0:7946`): sealed
    /// datagrams for it open here.
    pub fn advertising(mut self, addr: SocketAddr) -> SealTransport {
        self.advertise = Some(addr);
        self
    }
}

#[async_trait]
impl Transport for SealTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let wire =
            self.wire.bind(listen_addr).await.map_err(|e| {
                anyhow::anyhow!("failed to bind to {listen_addr}/UDP for gossip: {e}")
            })?;
        let mut local: Vec<SocketAddr> = self.advertise.into_iter().collect();
        if !listen_addr.ip().is_unspecified() && !local.contains(&listen_addr) {
            local.push(listen_addr);
        }
        Ok(Box::new(SealSocket {
            local,
            wire,
            control: self.control.clone(),
            stats: self.stats.clone(),
            replay: ReplayGuard::new(NONCE_CACHE),
            reassembly: Reassembly::default(),
            heard_sealed: HashSet::new(),
            buf: vec![0u8; MAX_DATAGRAM + 1],
            out: Vec::with_capacity(MAX_DATAGRAM),
        }))
    }
}

/// Most peers remembered as sealing (transitional mode); past it the set
/// starts over (those peers get an unsealed copy again for a round).
const MAX_HEARD: usize = 4096;

struct SealSocket {
    /// The addresses sealed datagrams for this node name (advertised,
    /// listen): what `Sealer::open` checks the tag against.
    local: Vec<SocketAddr>,
    wire: Box<dyn WireSocket>,
    control: SealControl,
    stats: Arc<SealStats>,
    replay: ReplayGuard,
    reassembly: Reassembly,
    /// Transitional mode: peers heard sealed (they get no unsealed copy).
    heard_sealed: HashSet<SocketAddr>,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl SealSocket {
    async fn send_raw(&mut self, to: SocketAddr, bytes: &[u8], sealed: bool) {
        // A send error is a datagram lost, as on UDP; chitchat retries next round.
        match self.wire.send_to(to, bytes).await {
            Ok(()) => self.stats.sent(bytes.len(), sealed),
            Err(e) => {
                tracing::debug!(to = %to, len = bytes.len(), error = %e, "gossip datagram not sent")
            }
        }
    }

    /// One datagram taken apart: the message it completes, if any.
    fn receive(&mut self, from: SocketAddr, len: usize) -> Option<ChitchatMessage> {
        let (mode, sealer) = self.control.current();
        let dgram = &self.buf[..len];
        self.stats
            .bytes_received
            .fetch_add(len as u64, Ordering::Relaxed);
        let result = if is_sealed(dgram) {
            match &sealer {
                None => Err(Drop::BadAuth),
                Some(s) => s
                    .open(dgram, unix_ms(), &mut self.replay, &self.local)
                    .inspect(|_| bump(&self.stats.opened))
                    .and_then(|f| self.reassembly.add(from, f, Instant::now()))
                    .and_then(|whole| match whole {
                        None => Ok(None),
                        Some(bytes) => {
                            if mode == SealMode::Transitional && !self.heard_sealed.contains(&from)
                            {
                                if self.heard_sealed.len() >= MAX_HEARD {
                                    self.heard_sealed.clear();
                                }
                                self.heard_sealed.insert(from);
                            }
                            let mut b = &bytes[..];
                            ChitchatMessage::deserialize(&mut b)
                                .map(Some)
                                .map_err(|_| Drop::Malformed)
                        }
                    }),
            }
        } else if mode == SealMode::Required {
            Err(Drop::Unsealed)
        } else {
            decode_plain(dgram)
                .inspect(|_| bump(&self.stats.accepted_unsealed))
                .map(Some)
        };
        match result {
            Ok(m) => m,
            Err(d) => {
                self.stats.dropped(d);
                tracing::debug!(from = %from, len, reason = ?d, "gossip datagram dropped");
                None
            }
        }
    }
}

#[async_trait]
impl Socket for SealSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        msg.serialize(&mut out);
        let (mode, sealer) = self.control.current();
        let plain_copy = match mode {
            SealMode::Off => true,
            SealMode::Transitional => !self.heard_sealed.contains(&to),
            SealMode::Required => false,
        };
        if let Some(sealer) = sealer.filter(|_| mode != SealMode::Off) {
            match sealer.seal(&out, unix_ms(), to) {
                Some(dgrams) => {
                    for d in dgrams {
                        self.send_raw(to, &d, true).await;
                    }
                }
                None => {
                    bump(&self.stats.dropped_oversize);
                    tracing::warn!(to = %to, len = out.len(), "gossip message too large to seal: not sent")
                }
            }
        }
        if plain_copy {
            if out.len() <= MAX_DATAGRAM {
                self.send_raw(to, &out.clone(), false).await;
            } else {
                bump(&self.stats.dropped_oversize);
                tracing::warn!(to = %to, len = out.len(), "gossip message over one datagram: unsealed copy not sent");
            }
        }
        self.out = out;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.wire.recv_from(&mut self.buf).await {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::OutOfMemory
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(anyhow::anyhow!("gossip socket failed: {e}")),
            };
            if len > MAX_DATAGRAM {
                self.stats.dropped(Drop::Malformed);
                continue;
            }
            if let Some(msg) = self.receive(from, len) {
                return Ok((from, msg));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Keyring;

    /// The node the test datagrams are for.
    fn b() -> SocketAddr {
        "10.0.0.2:7946".parse().unwrap()
    }

    fn sealer(keys: &[[u8; 32]], cluster: &str) -> Sealer {
        Sealer::new(
            &Keyring::from_keys(keys.to_vec()).unwrap().gossip_keys(),
            cluster,
        )
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn seal_open_round_trip_and_fragments() {
        let s = sealer(&[[1; 32]], "c");
        for len in [
            0,
            1,
            1000,
            MAX_CHUNK,
            MAX_CHUNK + 1,
            MAX_DATAGRAM,
            3 * MAX_CHUNK,
        ] {
            let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let dgrams = s.seal(&msg, NOW, b()).unwrap();
            assert_eq!(dgrams.len(), len.div_ceil(MAX_CHUNK).max(1), "{len}");
            assert!(dgrams.iter().all(|d| d.len() <= MAX_DATAGRAM), "{len}");
            let mut guard = ReplayGuard::new(100);
            let mut re = Reassembly::default();
            let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
            let mut whole = None;
            // Out of order.
            for d in dgrams.iter().rev() {
                let f = s.open(d, NOW + 5, &mut guard, &[b()]).unwrap();
                whole = re.add(from, f, Instant::now()).unwrap().or(whole);
            }
            assert_eq!(whole.unwrap(), msg, "{len}");
        }
        assert!(s.seal(&vec![0; 4 * MAX_CHUNK + 1], NOW, b()).is_none());
    }

    #[test]
    fn what_does_not_open_table() {
        let s = sealer(&[[1; 32]], "c");
        let d = s.seal(b"hello", NOW, b()).unwrap().remove(0);
        let mut tampered = d.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let mut header_changed = d.clone();
        header_changed[10] ^= 1; // the timestamp, inside the AAD
        type Case = (&'static str, Sealer, Vec<u8>, u64, Result<(), Drop>);
        let cases: Vec<Case> = vec![
            ("same key", sealer(&[[1; 32]], "c"), d.clone(), NOW, Ok(())),
            (
                "secondary key opens",
                sealer(&[[2; 32], [1; 32]], "c"),
                d.clone(),
                NOW,
                Ok(()),
            ),
            (
                "wrong key",
                sealer(&[[2; 32]], "c"),
                d.clone(),
                NOW,
                Err(Drop::BadAuth),
            ),
            (
                "other cluster",
                sealer(&[[1; 32]], "d"),
                d.clone(),
                NOW,
                Err(Drop::BadAuth),
            ),
            (
                "tampered",
                sealer(&[[1; 32]], "c"),
                tampered,
                NOW,
                Err(Drop::BadAuth),
            ),
            (
                "header changed",
                sealer(&[[1; 32]], "c"),
                header_changed,
                NOW,
                Err(Drop::BadAuth),
            ),
            (
                "truncated",
                sealer(&[[1; 32]], "c"),
                d[..50].to_vec(),
                NOW,
                Err(Drop::Malformed),
            ),
            (
                "not sealed",
                sealer(&[[1; 32]], "c"),
                b"junk".to_vec(),
                NOW,
                Err(Drop::Malformed),
            ),
            (
                "119 s late",
                sealer(&[[1; 32]], "c"),
                d.clone(),
                NOW + 119_000,
                Ok(()),
            ),
            (
                "121 s late",
                sealer(&[[1; 32]], "c"),
                d.clone(),
                NOW + 121_000,
                Err(Drop::Replay),
            ),
            (
                "119 s early",
                sealer(&[[1; 32]], "c"),
                d.clone(),
                NOW - 119_000,
                Ok(()),
            ),
            (
                "121 s early",
                sealer(&[[1; 32]], "c"),
                d.clone(),
                NOW - 121_000,
                Err(Drop::Replay),
            ),
        ];
        for (name, opener, dgram, now, want) in cases {
            let got = opener
                .open(&dgram, now, &mut ReplayGuard::new(10), &[b()])
                .map(|f| assert_eq!(f.chunk, b"hello"));
            assert_eq!(got, want, "{name}");
        }
        // Sealed for node b: it opens at b (among its addresses) and at no
        // other node, so a capture cannot be replayed to a third node.
        let c: SocketAddr = "10.0.0.3:7946".parse().unwrap();
        let at = |addrs: &[SocketAddr]| {
            s.open(&d, NOW, &mut ReplayGuard::new(10), addrs)
                .map(|_| ())
        };
        assert_eq!(at(&[c]), Err(Drop::BadAuth));
        assert_eq!(at(&[]), Err(Drop::BadAuth));
        assert_eq!(at(&[c, b()]), Ok(()));
        let b_other_port: SocketAddr = "10.0.0.2:7947".parse().unwrap();
        assert_eq!(at(&[b_other_port]), Err(Drop::BadAuth));
    }

    #[test]
    fn replays_are_dropped_and_the_cache_is_bounded() {
        let s = sealer(&[[1; 32]], "c");
        let mut guard = ReplayGuard::new(3);
        let d = s.seal(b"x", NOW, b()).unwrap().remove(0);
        assert!(s.open(&d, NOW, &mut guard, &[b()]).is_ok());
        assert_eq!(s.open(&d, NOW + 1, &mut guard, &[b()]), Err(Drop::Replay));
        // Full cache: the oldest are forgotten and the floor rises above them,
        // so they still cannot be replayed.
        let later: Vec<_> = (1..=3)
            .map(|i| s.seal(b"y", NOW + i * 10, b()).unwrap().remove(0))
            .collect();
        for d in &later {
            assert!(s.open(d, NOW + 40, &mut guard, &[b()]).is_ok());
        }
        assert_eq!(guard.len(), 3);
        assert_eq!(s.open(&d, NOW + 41, &mut guard, &[b()]), Err(Drop::Replay));
        assert_eq!(
            s.open(&later[0], NOW + 42, &mut guard, &[b()]),
            Err(Drop::Replay)
        );
        // Out of the window: forgotten, and refused by time.
        let fresh = s.seal(b"z", NOW + 200_000, b()).unwrap().remove(0);
        assert!(s.open(&fresh, NOW + 200_000, &mut guard, &[b()]).is_ok());
        assert_eq!(guard.len(), 1);
    }

    #[test]
    fn reassembly_is_bounded() {
        let mut re = Reassembly::default();
        let t0 = Instant::now();
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let frag = |id: u64, index: u8, count: u8| Fragment {
            msg_id: id,
            index,
            count,
            chunk: vec![index],
        };
        for id in 0..(MAX_PENDING as u64 + 10) {
            assert_eq!(re.add(from, frag(id, 0, 2), t0).unwrap(), None);
        }
        assert_eq!(re.pending.len(), MAX_PENDING);
        // A count that disagrees with the first fragment's.
        assert_eq!(
            re.add(from, frag(MAX_PENDING as u64 + 9, 1, 3), t0),
            Err(Drop::Malformed)
        );
        let done = re
            .add(from, frag(MAX_PENDING as u64 + 8, 1, 2), t0)
            .unwrap();
        assert_eq!(done, Some(vec![0, 1]));
        // Stale ones are given up.
        re.add(from, frag(999, 0, 2), t0 + REASSEMBLY_TIMEOUT)
            .unwrap();
        assert_eq!(re.pending.len(), 1);
    }
}
