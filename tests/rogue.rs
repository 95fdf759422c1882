//! Outsiders against a sealed cluster on separate hosts (`tests/common/
//! hosts.rs`): every node a real `shoal daemon` in its own network
//! namespace with its own dockerd, gossip as real UDP across the bridge.
//! One cluster of five hosts for the whole file: three members and two
//! rogues (hosts 3 and 4, started only once the members are sealed).
//!
//! 1. The three members start unsealed and move live to transitional, then
//!    sealed, then rotate their key (new key second, new key primary, old
//!    key dropped): each step rewrites each host's config and key file in
//!    its directory and sends it SIGHUP, one host at a time, while every
//!    host's view is polled: no member is ever seen dead. A forged
//!    unsealed datagram with non-ASCII keys is sent at every mode.
//! 2. A rogue without a key (`--insecure-gossip`, seeded at host 0) and
//!    one with the rotated-out key join: they never appear in any view
//!    (polled for the rest of the test), never see a member, and host 0
//!    counts their datagrams as dropped.
//! 3. Sealed datagrams captured on the bridge and resent byte for byte
//!    from a rogue's namespace are dropped as replays; no view changes.
//! 4. A forged unsealed datagram with non-ASCII keys and a sealed-looking
//!    garbage datagram (with the cluster's real key id) reach every host:
//!    all keep serving, and a new fact published afterwards propagates.
//! 5. Creates sent to every member run on members only: the rogues'
//!    engines have no container and their logs name no request.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::hosts::{wait_for, Hosts, Plan};
use common::*;
use rand::RngCore;
use serde_json::{json, Value};
use shoal::client::Client;
use shoal::keyring::Keyring;

const MEMBERS: [usize; 3] = [0, 1, 2];
const NO_KEY: usize = 3;
const WRONG_KEY: usize = 4;
const GOSSIP_PORT: u16 = 7946;

/// Captures, in the root namespace, the UDP payloads of IPv4 frames to
/// `PORT` crossing the bridge `BRIDGE` for `SECS` seconds (an AF_PACKET
/// socket; promiscuous for its lifetime, so frames between two hosts are
/// seen too). One line per unfragmented datagram: `src dst port hex`.
const CAPTURE: &str = r#"
import socket, struct, sys, time
bridge, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0800))
s.bind((bridge, 0))
mreq = struct.pack("iHH8s", socket.if_nametoindex(bridge), 1, 0, b"")
s.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC
s.settimeout(0.2)
end = time.time() + secs
while time.time() < end:
    try:
        frame = s.recv(70000)
    except socket.timeout:
        continue
    ip = frame[14:]
    if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
        continue
    if struct.unpack("!H", ip[6:8])[0] & 0x3FFF:
        continue
    ihl = (ip[0] & 15) * 4
    sport, dport, ulen = struct.unpack("!HHH", ip[ihl:ihl + 6])
    if dport != port:
        continue
    payload = ip[ihl + 8:ihl + ulen]
    print(socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), dport, payload.hex(), flush=True)
"#;

/// Sends each `ip port hex` line of the file argv[1] as one UDP datagram;
/// prints how many.
const SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = 0
for line in open(sys.argv[1]):
    ip, port, hexdata = line.split()
    s.sendto(bytes.fromhex(hexdata), (ip, int(port)))
    n += 1
print(n)
"#;

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

async fn node_info(c: &Client) -> Result<Value> {
    Ok(c.get::<Value>("/v1/node").await?)
}

async fn counters(c: &Client) -> Result<Value> {
    Ok(node_info(c).await?["gossip"]["datagrams"].clone())
}

fn count(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// Waits (20 s at most) until counter `k` of host `i` exceeds `floor`.
async fn counter_above(hosts: &Hosts, i: usize, k: &str, floor: u64) -> Result<()> {
    let c = &hosts.host(i).anonymous()?;
    wait_for(Duration::from_secs(20), || async {
        Ok(count(&counters(c).await?, k) > floor)
    })
    .await
    .with_context(|| format!("{} never counted {k} above {floor}", hosts.host(i).name))
}

/// What a host's view holds of each node, beyond liveness timing: name,
/// generation, gossip address, liveness and facts.
async fn view(c: &Client) -> Result<BTreeMap<String, Value>> {
    let v: Value = c.get("/v1/cluster").await?;
    Ok(v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            let name = n["name"].as_str().unwrap_or("").to_string();
            let keep = json!({
                "generation": n["generation"],
                "gossip_addr": n["gossip_addr"],
                "alive": n["alive"],
                "facts": n["facts"],
            });
            (name, keep)
        })
        .collect())
}

/// Runs the sender in host `from`'s namespace: one datagram per line.
async fn send_from(hosts: &Hosts, from: usize, lines: &[String]) -> Result<usize> {
    let file = hosts.dir.join(unique("dgrams"));
    std::fs::write(&file, lines.join("\n") + "\n")?;
    let out = hosts
        .exec(
            from,
            &["python3", "-c", SEND, file.to_str().context("path")?],
        )
        .await?;
    std::fs::remove_file(&file)?;
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn line(ip: &str, dgram: &[u8]) -> String {
    format!("{ip} {GOSSIP_PORT} {}", hex::encode(dgram))
}

/// The forged Ack with non-ASCII first bytes, aimed at member 2's state as
/// every member knows it, for every host in `to`.
async fn forgeries(hosts: &Hosts, to: &[usize]) -> Result<Vec<String>> {
    let victim = hosts.host(2);
    let v: Value = hosts.host(0).anonymous()?.get("/v1/cluster").await?;
    let generation = v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == victim.name.as_str())
        .and_then(|n| n["generation"].as_u64())
        .context("member 2's generation")?;
    let ip: std::net::Ipv4Addr = victim.ip.parse()?;
    let mut out = Vec::new();
    for &i in to {
        for key in ["égal", "ключ"] {
            let d = forged_ack(key, (&victim.name, generation, GOSSIP_PORT), ip.octets());
            out.push(line(&hosts.host(i).ip, &d));
        }
    }
    Ok(out)
}

/// Sends the forgeries from the no-key rogue's namespace to every member
/// and waits until each counts both under `counter`.
async fn forge(hosts: &Hosts, counter: &str) -> Result<()> {
    let mut before = Vec::new();
    for i in MEMBERS {
        before.push(count(
            &counters(&hosts.host(i).anonymous()?).await?,
            counter,
        ));
    }
    let sent = send_from(hosts, NO_KEY, &forgeries(hosts, &MEMBERS).await?).await?;
    ensure!(sent == 6, "sent {sent}");
    for (k, i) in MEMBERS.into_iter().enumerate() {
        counter_above(hosts, i, counter, before[k] + 1).await?;
    }
    Ok(())
}

/// Polls every host's view until stopped: a member seen dead, or any name
/// other than the members in a member's view, or any name but its own in
/// a rogue's view (once it runs), is kept.
struct Poller {
    stop: Arc<AtomicBool>,
    bad: Arc<Mutex<Vec<String>>>,
    rounds: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    fn start(hosts: &Hosts) -> Poller {
        let members: BTreeSet<String> = MEMBERS
            .iter()
            .map(|&i| hosts.host(i).name.clone())
            .collect();
        let all: Vec<(usize, String, Client)> = hosts
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let c = h.anonymous().expect("a client");
                (i, h.name.clone(), c)
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let bad: Arc<Mutex<Vec<String>>> = Arc::default();
        let rounds = Arc::new(AtomicUsize::new(0));
        let task = {
            let (stop, bad, rounds) = (stop.clone(), bad.clone(), rounds.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for (i, me, c) in &all {
                        let Ok(v) = c.get::<Value>("/v1/cluster").await else {
                            // A rogue not started yet.
                            if MEMBERS.contains(i) {
                                bad.lock().unwrap().push(format!("{me}: no view"));
                            }
                            continue;
                        };
                        for n in v["nodes"].as_array().into_iter().flatten() {
                            let who = n["name"].as_str().unwrap_or("").to_string();
                            let wrong = if MEMBERS.contains(i) {
                                if !members.contains(&who) {
                                    Some(format!("{me} saw outsider {who}"))
                                } else if n["alive"] != true {
                                    Some(format!("{me} saw {who} dead"))
                                } else {
                                    None
                                }
                            } else {
                                (who != *me).then(|| format!("rogue {me} saw {who}"))
                            };
                            if let Some(w) = wrong {
                                bad.lock().unwrap().push(w);
                            }
                        }
                    }
                    rounds.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        };
        Poller {
            stop,
            bad,
            rounds,
            task,
        }
    }

    fn check(&self, when: &str) -> Result<()> {
        let bad: BTreeSet<String> = self.bad.lock().unwrap().iter().cloned().collect();
        ensure!(bad.is_empty(), "{when}: {bad:?}");
        Ok(())
    }

    async fn finish(self) -> Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let Poller {
            task, bad, rounds, ..
        } = self;
        task.await?;
        let bad: BTreeSet<String> = bad.lock().unwrap().iter().cloned().collect();
        ensure!(bad.is_empty(), "at the end: {bad:?}");
        let rounds = rounds.load(Ordering::Relaxed);
        Ok(rounds)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_replays_and_forgeries_change_nothing_in_a_cluster_sealed_and_rotated_live(
) -> Result<()> {
    let key_a = Keyring::generate_line();
    let key_b = Keyring::generate_line();
    let id = |line: &str| Keyring::parse(line).unwrap().primary_id().to_string();
    let (id_a, id_b) = (id(&key_a), id(&key_b));

    let mut plan = Plan::new(5)?;
    let conf = |plan: &Plan, i: usize| -> Result<std::path::PathBuf> {
        Ok(plan.host_dir(i)?.join("shoal.toml"))
    };
    for i in MEMBERS {
        std::fs::write(
            conf(&plan, i)?,
            "insecure_gossip = true\ngossip_seal = \"off\"\n",
        )?;
        // Reads without a token: every member's key changes under the
        // test (its own, then the shared one, then the rotated one).
        plan.each.push(vec![
            "--config".into(),
            conf(&plan, i)?.display().to_string(),
            "--open-read".into(),
        ]);
    }
    plan.each
        .push(vec!["--insecure-gossip".into(), "--open-read".into()]);
    let old_key = plan.host_dir(WRONG_KEY)?.join("old.key");
    write_private(&old_key, &key_a)?;
    plan.each.push(vec![
        "--cluster-key".into(),
        old_key.display().to_string(),
        "--open-read".into(),
    ]);
    plan.defer = vec![NO_KEY, WRONG_KEY];
    let hosts = plan.up().await?;
    for i in MEMBERS {
        let g = node_info(&hosts.host(i).anonymous()?).await?["gossip"].clone();
        assert_eq!(g["mode"], "off", "{g}");
    }
    let image = hosts.publish_demo(0).await?;
    let poll = Poller::start(&hosts);

    // 1. Unsealed → transitional → sealed → rotation, one host at a time,
    // with a forged non-ASCII datagram at every mode: parsed and dropped
    // while unsealed datagrams are accepted, never parsed once sealed.
    forge(&hosts, "dropped_malformed").await?;
    let steps: [(&str, String, &str, &str); 5] = [
        ("transitional", key_a.clone(), &id_a, "dropped_malformed"),
        ("required", key_a.clone(), &id_a, "dropped_unsealed"),
        (
            "required",
            format!("{key_a}{key_b}"),
            &id_a,
            "dropped_unsealed",
        ),
        (
            "required",
            format!("{key_b}{key_a}"),
            &id_b,
            "dropped_unsealed",
        ),
        ("required", key_b.clone(), &id_b, "dropped_unsealed"),
    ];
    for (mode, keys, primary, forged_counter) in &steps {
        for i in MEMBERS {
            let dir = hosts.host_dir(i);
            write_private(&dir.join("shoal.key"), keys)?;
            std::fs::write(
                dir.join("shoal.toml"),
                format!(
                    "cluster_key = \"{}\"\ngossip_seal = \"{mode}\"\n",
                    dir.join("shoal.key").display()
                ),
            )?;
            hosts.hup_shoal(i).await?;
            let c = &hosts.host(i).anonymous()?;
            wait_for(Duration::from_secs(20), || async {
                let g = node_info(c).await?["gossip"].clone();
                Ok(g["mode"] == *mode && g["key_ids"][0] == *primary)
            })
            .await
            .with_context(|| {
                format!("{} never reloaded to {mode} {primary}", hosts.host(i).name)
            })?;
            // A few gossip rounds in this state before the next host.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        forge(&hosts, forged_counter).await?;
        poll.check(&format!("after the step to {mode} {primary}"))?;
        eprintln!("step done: {mode}, primary {primary}");
    }
    for i in MEMBERS {
        let g = node_info(&hosts.host(i).anonymous()?).await?["gossip"].clone();
        assert_eq!(g["key_ids"], json!([id_b]), "{g}");
        assert!(count(&g["datagrams"], "opened") > 0, "{g}");
    }
    // Every member sees the members alive, and no one else (read without a
    // token: the harness's token was signed with a key rotated out).
    let want: BTreeSet<String> = MEMBERS
        .iter()
        .map(|&i| hosts.host(i).name.clone())
        .collect();
    for i in MEMBERS {
        let c = hosts.host(i).anonymous()?;
        let want = &want;
        wait_for(Duration::from_secs(10), || async {
            let alive: BTreeSet<String> = view(&c)
                .await?
                .into_iter()
                .filter(|(_, n)| n["alive"] == true && !n["facts"].is_null())
                .map(|(name, _)| name)
                .collect();
            Ok(&alive == want)
        })
        .await
        .with_context(|| format!("view of {}", hosts.host(i).name))?;
    }

    // 2. The rogues: no key (unsealed), and the key rotated out.
    let at_seed = counters(&hosts.host(0).anonymous()?).await?;
    hosts.start_shoal(NO_KEY).await?;
    hosts.start_shoal(WRONG_KEY).await?;
    let g3 = node_info(&hosts.host(NO_KEY).anonymous()?).await?["gossip"].clone();
    assert_eq!(
        (&g3["mode"], &g3["insecure"]),
        (&json!("off"), &json!(true))
    );
    let g4 = node_info(&hosts.host(WRONG_KEY).anonymous()?).await?["gossip"].clone();
    assert_eq!(g4["key_ids"], json!([id_a]), "{g4}");
    counter_above(
        &hosts,
        0,
        "dropped_unsealed",
        count(&at_seed, "dropped_unsealed"),
    )
    .await?;
    counter_above(
        &hosts,
        0,
        "dropped_bad_auth",
        count(&at_seed, "dropped_bad_auth"),
    )
    .await?;
    // Some gossip rounds with the rogues knocking (the poller watches).
    tokio::time::sleep(Duration::from_secs(5)).await;
    poll.check("with the rogues running")?;
    for r in [NO_KEY, WRONG_KEY] {
        let c = counters(&hosts.host(r).anonymous()?).await?;
        assert_eq!(
            count(&c, "opened") + count(&c, "accepted_unsealed"),
            0,
            "{c}"
        );
    }

    // 3. Replays: sealed datagrams between members, captured on the bridge,
    // resent byte for byte from the no-key rogue's namespace.
    let member_ips: BTreeSet<String> = MEMBERS.iter().map(|&i| hosts.host(i).ip.clone()).collect();
    let views_before = {
        let mut v = Vec::new();
        for i in MEMBERS {
            v.push(view(&hosts.host(i).anonymous()?).await?);
        }
        v
    };
    let replay_before: Vec<u64> = {
        let mut v = Vec::new();
        for i in MEMBERS {
            v.push(count(
                &counters(&hosts.host(i).anonymous()?).await?,
                "dropped_replay",
            ));
        }
        v
    };
    let bad_auth_before: Vec<u64> = {
        let mut v = Vec::new();
        for i in MEMBERS {
            v.push(count(
                &counters(&hosts.host(i).anonymous()?).await?,
                "dropped_bad_auth",
            ));
        }
        v
    };
    let cap = tokio::process::Command::new("python3")
        .args([
            "-c",
            CAPTURE,
            &hosts.bridge(),
            &GOSSIP_PORT.to_string(),
            "3",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    ensure!(
        cap.status.success(),
        "capture: {}",
        String::from_utf8_lossy(&cap.stderr)
    );
    let mut replays = Vec::new();
    let mut per_target: BTreeMap<String, u64> = BTreeMap::new();
    let mut misdirected: BTreeMap<String, u64> = BTreeMap::new();
    for l in String::from_utf8(cap.stdout)?.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let [src, dst, _port, data] = w[..] else {
            continue;
        };
        if !(member_ips.contains(src) && member_ips.contains(dst)) {
            continue;
        }
        let d = hex::decode(data)?;
        assert!(
            d.starts_with(b"shg1"),
            "unsealed gossip between sealed members"
        );
        replays.push(line(dst, &d));
        *per_target.entry(dst.to_string()).or_default() += 1;
        // The same datagram to the third member, whose nonce cache never
        // saw it: sealed for `dst`, it must not open there either.
        // Sent twice: had the first opened there, the second would count
        // as a replay, which the exact count below rules out.
        if let Some(third) = member_ips.iter().find(|ip| *ip != src && *ip != dst) {
            replays.push(line(third, &d));
            replays.push(line(third, &d));
            *misdirected.entry(third.clone()).or_default() += 2;
        }
    }
    ensure!(
        replays.len() >= 3,
        "captured {} member datagrams",
        replays.len()
    );
    assert_eq!(send_from(&hosts, NO_KEY, &replays).await?, replays.len());
    for (k, i) in MEMBERS.into_iter().enumerate() {
        let want = replay_before[k] + per_target.get(&hosts.host(i).ip).copied().unwrap_or(0);
        counter_above(&hosts, i, "dropped_replay", want.saturating_sub(1)).await?;
        let want = bad_auth_before[k] + misdirected.get(&hosts.host(i).ip).copied().unwrap_or(0);
        counter_above(&hosts, i, "dropped_bad_auth", want.saturating_sub(1)).await?;
    }
    // Exactly the replays to their own receivers were replays: none of the
    // datagrams sent on to a third member opened there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (k, i) in MEMBERS.into_iter().enumerate() {
        let now = count(
            &counters(&hosts.host(i).anonymous()?).await?,
            "dropped_replay",
        );
        let own = per_target.get(&hosts.host(i).ip).copied().unwrap_or(0);
        assert_eq!(
            now - replay_before[k],
            own,
            "{}: a datagram sealed for another member opened here",
            hosts.host(i).name
        );
    }
    for (k, i) in MEMBERS.into_iter().enumerate() {
        assert_eq!(
            view(&hosts.host(i).anonymous()?).await?,
            views_before[k],
            "{}'s view changed after the replays",
            hosts.host(i).name
        );
    }
    eprintln!(
        "replayed {} captured datagrams: to their receivers {per_target:?}, to a third member {misdirected:?}",
        replays.len()
    );

    // 4. A forged unsealed datagram and sealed-looking garbage (magic, the
    // cluster's real key id, a current timestamp, random nonce and body)
    // at every host, the rogues included.
    let all: Vec<usize> = (0..hosts.len()).collect();
    let mut before = Vec::new();
    for &i in &all {
        before.push(counters(&hosts.host(i).anonymous()?).await?);
    }
    let mut dgrams = forgeries(&hosts, &all).await?;
    for &i in &all {
        let mut g = b"shg1".to_vec();
        g.extend(hex::decode(&id_b)?);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        g.extend((now.as_millis() as u64).to_le_bytes());
        let mut rest = vec![0u8; 24 + 300];
        rand::thread_rng().fill_bytes(&mut rest);
        g.extend(rest);
        dgrams.push(line(&hosts.host(i).ip, &g));
    }
    assert_eq!(send_from(&hosts, WRONG_KEY, &dgrams).await?, dgrams.len());
    for &i in &all {
        let b = &before[i];
        counter_above(&hosts, i, "dropped_bad_auth", count(b, "dropped_bad_auth")).await?;
        let c = &hosts.host(i).anonymous()?;
        wait_for(Duration::from_secs(20), || async {
            let now = counters(c).await?;
            let refused = |v: &Value| count(v, "dropped_unsealed") + count(v, "dropped_malformed");
            Ok(refused(&now) >= refused(b) + 2)
        })
        .await
        .with_context(|| format!("{} never refused the forgeries", hosts.host(i).name))?;
        let (code, _) = raw(c, "GET", "/healthz", None).await?;
        assert_eq!(code, 200, "{} after the forgeries", hosts.host(i).name);
    }

    // 5. Creates at every member, after all of it: they run on members,
    // and the new facts (environment counts) reach every member.
    // Tokens now verify with the rotated key every member holds.
    let final_key = hosts.host_dir(0).join("shoal.key");
    let op = token_with(
        &final_key,
        "r@example.com",
        "operator",
        Duration::from_secs(3600),
    )?;
    let as_op = |i: usize| -> Result<Client> { Ok(bearer(hosts.host(i).anonymous()?, &op)) };
    let mut ids = Vec::new();
    for i in MEMBERS {
        let (code, body) = raw(
            &as_op(i)?,
            "POST",
            "/v1/environments",
            Some(serde_json::to_vec(
                &json!({"image": image, "owner": "r@example.com"}),
            )?),
        )
        .await?;
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().context("id")?.to_string());
    }
    let mut on: BTreeMap<String, u64> = BTreeMap::new();
    for id in &ids {
        let rec = settled(&as_op(0)?, id, || hosts.logs_tail(20)).await?;
        assert_eq!(rec.status.as_str(), "ready", "{rec:?}");
        let owner = hosts.index(&rec.node).context("owner is a harness host")?;
        assert!(MEMBERS.contains(&owner), "{id} ran on {}", rec.node);
        assert!(
            hosts.shoal_log(owner).contains(id.as_str()),
            "the owner's log names {id}"
        );
        *on.entry(rec.node.clone()).or_default() += 1;
    }
    for i in MEMBERS {
        let c = &hosts.host(i).anonymous()?;
        let on = &on;
        wait_for(Duration::from_secs(30), || async {
            let v = view(c).await?;
            Ok(on.iter().all(|(n, k)| {
                v.get(n)
                    .and_then(|x| x["facts"]["env_count"].as_u64())
                    .is_some_and(|c| c >= *k)
            }))
        })
        .await
        .with_context(|| {
            format!(
                "{} never saw the new environment counts",
                hosts.host(i).name
            )
        })?;
    }
    for r in [NO_KEY, WRONG_KEY] {
        assert!(hosts.host(r).containers().await?.is_empty());
        let log = hosts.shoal_log(r);
        assert!(!log.is_empty());
        for id in &ids {
            assert!(!log.contains(id.as_str()), "rogue {r}'s log names {id}");
        }
        assert!(
            !log.contains("/v1/environments"),
            "rogue {r} was asked for environments"
        );
    }
    let rounds = poll.finish().await?;
    assert!(rounds > 20, "the views were polled {rounds} times");
    eprintln!("views polled {rounds} rounds, every host, no outsider and no dead member");
    Ok(())
}
