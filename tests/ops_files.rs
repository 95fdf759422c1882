//! The operations files tested like code: the cloud-config that bootstraps a
//! new box (parsed as YAML, its embedded `shoal.toml` parsed as TOML), the
//! systemd unit (parsed, and `systemd-analyze verify`), the sysctl file, the
//! project scripts (`scripts/ensure-docker` driven against fake `docker`,
//! `apt-get` and `service` commands), and the demo image, built and run on
//! the real Docker engine until its HEALTHCHECK says healthy.
//!
//! `scripts/test` sets `SHOAL_REQUIRE_TOOLS=1`: then a missing
//! `systemd-analyze` fails its test instead of skipping it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_yaml_ng::Value;

/// The top-level keys the daemon's config accepts (`src/config.rs`).
const CONFIG_KEYS: &[&str] = &[
    "name",
    "listen",
    "data_dir",
    "store",
    "memory",
    "memory_reserve",
    "max_envs",
    "publish_addr",
    "advertise_host",
    "ready_timeout",
    "cluster_id",
    "cluster_key",
    "gossip_seal",
    "insecure_gossip",
    "gossip",
    "advertise",
    "seeds",
    "roles",
    "labels",
    "open_read",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

// --- cloud-config ----------------------------------------------------------

fn cloud_config() -> Value {
    serde_yaml_ng::from_str(&read("cloud-config/shoal.yaml")).expect("cloud-config is valid YAML")
}

/// `write_files` as path → content.
fn written_files(cc: &Value) -> BTreeMap<String, String> {
    cc["write_files"]
        .as_sequence()
        .expect("write_files is a list")
        .iter()
        .map(|f| {
            let path = f["path"].as_str().expect("every file has a path");
            let content = f["content"].as_str().expect("every file has a content");
            (path.to_string(), content.to_string())
        })
        .collect()
}

fn written(cc: &Value, path: &str) -> String {
    written_files(cc)
        .remove(path)
        .unwrap_or_else(|| panic!("cloud-config does not write {path}"))
}

/// `runcmd` entries, each joined into one command line.
fn runcmd(cc: &Value) -> Vec<String> {
    cc["runcmd"]
        .as_sequence()
        .expect("runcmd is a list")
        .iter()
        .map(|c| match c {
            Value::String(s) => s.clone(),
            Value::Sequence(words) => words
                .iter()
                .map(|w| w.as_str().expect("runcmd words are strings"))
                .collect::<Vec<_>>()
                .join(" "),
            other => panic!("unexpected runcmd entry {other:?}"),
        })
        .collect()
}

#[test]
fn cloud_config_is_a_cloud_config() {
    let text = read("cloud-config/shoal.yaml");
    assert!(
        text.starts_with("#cloud-config\n"),
        "cloud-init needs the #cloud-config first line"
    );
    let cc = cloud_config();
    assert!(cc["hostname"].as_str().is_some_and(|h| !h.is_empty()));
    let keys = cc["ssh_authorized_keys"]
        .as_sequence()
        .expect("ssh_authorized_keys");
    assert!(!keys.is_empty());
    let files = written_files(&cc);
    for path in [
        "/etc/shoal/shoal.toml",
        "/etc/sysctl.d/90-shoal-aio.conf",
        "/etc/systemd/system/shoal.service",
        "/etc/systemd/network/10-shoal-static.network",
        "/etc/systemd/system/mnt-shoal\\x2dstore.mount",
    ] {
        assert!(
            files.contains_key(path),
            "cloud-config does not write {path}"
        );
    }
}

#[test]
fn cloud_config_starts_docker_the_store_and_shoal() {
    let cmds = runcmd(&cloud_config());
    let pos = |needle: &str| {
        cmds.iter()
            .position(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("no runcmd does {needle:?}: {cmds:#?}"))
    };
    let sysctl = pos("sysctl --system");
    let install = pos("/usr/local/bin/shoal");
    let reload = pos("systemctl daemon-reload");
    let docker = pos("systemctl enable --now docker.service");
    let store = pos("systemctl enable --now mnt-shoal\\x2dstore.mount");
    let shoal = pos("systemctl enable --now shoal.service");
    assert!(sysctl < shoal && install < shoal && reload < shoal && docker < shoal && store < shoal);
}

#[test]
fn cloud_config_network_file_is_static() {
    let net = written(
        &cloud_config(),
        "/etc/systemd/network/10-shoal-static.network",
    );
    for want in [
        "[Match]",
        "Name=",
        "[Network]",
        "Address=",
        "Gateway=",
        "DNS=",
    ] {
        assert!(net.contains(want), "{want} missing from the .network file");
    }
}

#[test]
fn cloud_config_shoal_toml_uses_only_known_keys() {
    let cc = cloud_config();
    let text = written(&cc, "/etc/shoal/shoal.toml");
    let table: toml::Table = text.parse().expect("the embedded shoal.toml is valid TOML");
    for key in table.keys() {
        assert!(
            CONFIG_KEYS.contains(&key.as_str()),
            "the daemon does not know the key {key:?}"
        );
    }
    let s = |k: &str| {
        table[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is a string"))
    };
    assert_eq!(s("listen"), "0.0.0.0:7070");
    assert_eq!(s("gossip"), "0.0.0.0:7946");
    assert_eq!(s("store"), "/mnt/shoal-store");
    assert_eq!(s("data_dir"), "/var/lib/shoal");
    assert_eq!(s("cluster_key"), "/etc/shoal/cluster.key");
    assert_eq!(
        table["open_read"].as_bool(),
        Some(false),
        "production nodes need a token for every read"
    );
    // The key is written inline with mode 0600, or fetched at first boot
    // under umask 077 and chmod 0600 (cloud-config/bootstrap.example.toml
    // fetches it, so the committed file holds no secret).
    let inline = cc["write_files"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str() == Some("/etc/shoal/cluster.key"))
        .map(|f| f["permissions"].as_str());
    match inline {
        Some(perm) => assert_eq!(perm, Some("0600"), "the key file is root's alone"),
        None => assert!(
            runcmd(&cc).iter().any(|c| c.contains("umask 077")
                && c.contains("-o /etc/shoal/cluster.key.new")
                && c.contains("chmod 0600 /etc/shoal/cluster.key.new")),
            "the key file is neither written nor fetched readable by root alone"
        ),
    }
    assert_eq!(s("name"), cc["hostname"].as_str().unwrap());
    assert_eq!(table["max_envs"].as_integer(), Some(8));
    assert_eq!(table["labels"]["memory"].as_str(), Some("256GB"));
    let roles = table["roles"].as_array().expect("roles is a list");
    assert_eq!(
        roles
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect::<Vec<_>>(),
        ["slave"]
    );
    let seeds = table["seeds"].as_array().expect("seeds is a list");
    assert!(seeds
        .iter()
        .all(|s| s.as_str().is_some_and(|s| s.ends_with(":7946"))));

    // The first node's variant, as the comments tell the operator to write it.
    assert!(
        text.contains("seeds = []"),
        "the first-node variant is documented"
    );
    let first: String = text
        .lines()
        .map(|l| {
            if l.starts_with("seeds = [\"") {
                "seeds = []"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let first: toml::Table = first.parse().unwrap();
    assert_eq!(first["seeds"].as_array().map(Vec::len), Some(0));
}

/// `cloud-init schema` (Debian's `cloud-init`) accepts the file.
#[test]
fn cloud_config_passes_cloud_init_schema() {
    if !which("cloud-init") {
        assert!(
            !require_tools(),
            "cloud-init is missing (scripts/ensure-tools installs it)"
        );
        eprintln!("skipped: cloud-init is not installed");
        return;
    }
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(repo("cloud-config/shoal.yaml"))
        .output()
        .expect("run cloud-init");
    assert!(
        out.status.success(),
        "cloud-init schema: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Valid cloud-config"));
}

#[test]
fn cloud_config_copies_are_the_repository_files() {
    let cc = cloud_config();
    assert_eq!(
        written(&cc, "/etc/systemd/system/shoal.service"),
        read("systemd/shoal.service"),
        "the unit in cloud-config/shoal.yaml differs from systemd/shoal.service"
    );
    assert_eq!(
        written(&cc, "/etc/sysctl.d/90-shoal-aio.conf"),
        read("systemd/shoal-aio.conf"),
        "the sysctl file in cloud-config/shoal.yaml differs from systemd/shoal-aio.conf"
    );
}

// --- systemd ---------------------------------------------------------------

/// A unit file as section → (key, value) in order (keys may repeat).
fn parse_unit(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut units: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut section = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_string());
            units.entry(name.to_string()).or_default();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: no '='", n + 1));
        let s = section
            .clone()
            .unwrap_or_else(|| panic!("line {}: outside a section", n + 1));
        units
            .get_mut(&s)
            .unwrap()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    units
}

fn values<'a>(
    unit: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    unit.get(section)
        .map(|kv| {
            kv.iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn service_unit_settings() {
    let unit = parse_unit(&read("systemd/shoal.service"));
    let one = |section: &str, key: &str| -> String {
        let v = values(&unit, section, key);
        assert_eq!(
            v.len(),
            1,
            "[{section}] {key}= should be set once, is {v:?}"
        );
        v[0].to_string()
    };
    let words = |section: &str, key: &str| -> Vec<String> {
        values(&unit, section, key)
            .iter()
            .flat_map(|v| v.split_whitespace().map(str::to_string))
            .collect()
    };
    let cases = [
        ("Service", "Type", "notify"),
        ("Service", "NotifyAccess", "main"),
        (
            "Service",
            "ExecStart",
            "/usr/local/bin/shoal daemon --config /etc/shoal/shoal.toml",
        ),
        ("Service", "Restart", "on-failure"),
        ("Service", "KillSignal", "SIGTERM"),
        ("Service", "TimeoutStopSec", "90"),
        ("Service", "LimitNOFILE", "65536"),
        ("Service", "ProtectSystem", "strict"),
        ("Service", "ProtectHome", "yes"),
        ("Service", "NoNewPrivileges", "yes"),
        ("Service", "PrivateTmp", "yes"),
        ("Unit", "Requires", "docker.service"),
        ("Install", "WantedBy", "multi-user.target"),
    ];
    for (section, key, expect) in cases {
        assert_eq!(one(section, key), expect, "[{section}] {key}=");
    }
    let after = words("Unit", "After");
    assert!(
        after.contains(&"docker.service".into()) && after.contains(&"network-online.target".into())
    );
    assert!(words("Unit", "Wants").contains(&"network-online.target".into()));
    let rw = words("Service", "ReadWritePaths");
    assert!(
        rw.contains(&"/var/lib/shoal".into()),
        "ReadWritePaths {rw:?}"
    );
    assert!(
        rw.contains(&"-/mnt/shoal-store".into()),
        "the store must be writable: {rw:?}"
    );
    // The daemon pings the watchdog while healthy (src/watchdog.rs), every
    // half of it; systemd restarts a node that stays unhealthy or wedges.
    assert_eq!(one("Service", "WatchdogSec"), "60s");
    assert!(words("Service", "Restart").contains(&"on-failure".into()));
    // The Docker socket is AF_UNIX: the address family filter must allow it.
    assert!(words("Service", "RestrictAddressFamilies").contains(&"AF_UNIX".into()));
}

#[test]
fn sysctl_raises_aio_max_nr() {
    let text = read("systemd/shoal-aio.conf");
    let settings: Vec<(&str, &str)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .expect("key = value")
        })
        .collect();
    assert_eq!(settings, [("fs.aio-max-nr", "1048576")]);
}

fn require_tools() -> bool {
    std::env::var("SHOAL_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

fn which(cmd: &str) -> bool {
    which_path(cmd).is_some()
}

/// `systemd-analyze verify` on the unit. The real ExecStart binary is not
/// installed here, and verify rejects a unit whose command is missing, so
/// the unit is verified as a copy whose ExecStart runs `/bin/true` with the
/// same arguments; every other line is checked as written.
#[test]
fn service_unit_passes_systemd_analyze_verify() {
    if !which("systemd-analyze") {
        assert!(
            !require_tools(),
            "systemd-analyze is missing (scripts/ensure-tools installs it)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed; scripts/ensure-tools installs it");
        return;
    }
    let text = read("systemd/shoal.service");
    let exec = "ExecStart=/usr/local/bin/shoal ";
    assert_eq!(text.matches(exec).count(), 1);
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("shoal.service");
    fs::write(&unit, text.replace(exec, "ExecStart=/bin/true ")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("shoal.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains:\n{stderr}"
    );
}

// --- scripts ---------------------------------------------------------------

#[test]
fn scripts_are_executable_strict_bash() {
    let mut paths: Vec<PathBuf> = fs::read_dir(repo("scripts"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.push(repo(".ci/run"));
    for name in ["ensure-docker", "ensure-tools", "test", "demo", "cluster"] {
        assert!(
            paths.contains(&repo("scripts").join(name)),
            "scripts/{name} is missing"
        );
    }
    for p in paths {
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "{} is not executable", p.display());
        let text = fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("#!/usr/bin/env bash\n"),
            "{}: shebang",
            p.display()
        );
        assert!(
            text.contains("\nset -euo pipefail\n"),
            "{}: set -euo pipefail",
            p.display()
        );
    }
}

#[test]
fn ci_runs_exactly_the_test_script() {
    let text = read(".ci/run");
    let commands: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter(|l| *l != "set -euo pipefail" && !l.starts_with("cd "))
        .collect();
    assert_eq!(commands, ["scripts/test"]);
}

/// Real commands `scripts/ensure-docker` and the fakes need.
const TOOLS: &[&str] = &[
    "bash", "sh", "env", "id", "grep", "sleep", "mkdir", "dirname", "nohup", "tail", "cat",
    "chmod", "touch",
];

fn which_path(cmd: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && p.starts_with('/')).then(|| PathBuf::from(p))
}

/// A directory of fake commands for `scripts/ensure-docker`: `docker info`
/// succeeds once `$FAKE/up` exists; `apt-get install` "installs" docker and
/// dockerd; `service docker start` and `dockerd` bring the engine "up"
/// unless `$FAKE/broken` exists. Every call is logged to `$FAKE/calls`.
struct Fakes {
    dir: tempfile::TempDir,
}

impl Fakes {
    fn new(installed: bool) -> Fakes {
        let dir = tempfile::tempdir().unwrap();
        let f = Fakes { dir };
        let docker = r#"#!/bin/sh
echo "docker $*" >> "$FAKE/calls"
[ -e "$FAKE/up" ] || { echo "Cannot connect to the Docker daemon" >&2; exit 1; }
case "$*" in
  *ServerVersion*) echo 99.0-fake ;;
  *Driver*) echo overlay2 ;;
esac
"#;
        let dockerd = r#"#!/bin/sh
echo "dockerd $*" >> "$FAKE/calls"
if [ -e "$FAKE/broken" ]; then echo "overlay mounts are not supported here" >&2; exit 1; fi
touch "$FAKE/up"
exec sleep 3
"#;
        f.script("apt-get", &format!(
            "#!/bin/sh\necho \"apt-get $*\" >> \"$FAKE/calls\"\ncase \"$*\" in *install*docker.io*)\n\
             cat > \"$FAKE/bin/docker\" <<'EOF'\n{docker}EOF\n\
             cat > \"$FAKE/bin/dockerd\" <<'EOF'\n{dockerd}EOF\n\
             chmod 755 \"$FAKE/bin/docker\" \"$FAKE/bin/dockerd\" ;;\nesac\n"
        ));
        f.script(
            "service",
            "#!/bin/sh\necho \"service $*\" >> \"$FAKE/calls\"\n\
             [ -e \"$FAKE/broken\" ] && exit 1\ntouch \"$FAKE/up\"\n",
        );
        f.script("sudo", "#!/bin/sh\nexec \"$@\"\n");
        // The real tools the script and the fakes use, and nothing else: the
        // real docker and dockerd must not be found.
        for tool in TOOLS {
            let real = which_path(tool).unwrap_or_else(|| panic!("{tool} is not installed"));
            std::os::unix::fs::symlink(real, f.dir.path().join("bin").join(tool)).unwrap();
        }
        if installed {
            f.script("docker", docker);
            f.script("dockerd", dockerd);
        }
        f
    }

    fn script(&self, name: &str, body: &str) {
        let bin = self.dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let p = bin.join(name);
        fs::write(&p, body).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn touch(&self, name: &str) {
        fs::write(self.dir.path().join(name), "").unwrap();
    }

    /// Runs scripts/ensure-docker with only the fakes (and links to the
    /// basic tools in TOOLS) on PATH.
    fn run(&self) -> (Output, String) {
        let bin = self.dir.path().join("bin");
        let out = Command::new(repo("scripts/ensure-docker"))
            .env("PATH", &bin)
            .env("FAKE", self.dir.path())
            .env("ENSURE_DOCKER_TIMEOUT", "3")
            .env("ENSURE_DOCKER_LOG", self.dir.path().join("dockerd.log"))
            .output()
            .unwrap();
        let calls = fs::read_to_string(self.dir.path().join("calls")).unwrap_or_default();
        (out, calls)
    }
}

#[test]
fn ensure_docker_does_nothing_when_the_engine_answers() {
    let fakes = Fakes::new(true);
    fakes.touch("up");
    let (out, calls) = fakes.run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("storage driver: overlay2"), "{stderr}");
    assert!(
        !calls.contains("apt-get") && !calls.contains("service"),
        "{calls}"
    );
}

#[test]
fn ensure_docker_installs_and_starts_a_missing_engine() {
    let fakes = Fakes::new(false);
    let (out, calls) = fakes.run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\ncalls:\n{calls}");
    assert!(calls.contains("apt-get update"), "{calls}");
    assert!(calls.contains("apt-get install -y -q docker.io"), "{calls}");
    // Started through the init script where there is one, else directly.
    assert!(
        calls.contains("service docker start") || calls.contains("dockerd"),
        "{calls}"
    );
    assert!(
        stderr.contains("docker engine 99.0-fake is up; storage driver: overlay2"),
        "{stderr}"
    );
}

#[test]
fn ensure_docker_fails_with_the_log_when_the_engine_cannot_start() {
    let fakes = Fakes::new(true);
    fakes.touch("broken");
    let t = Instant::now();
    let (out, calls) = fakes.run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "not bounded: {:?}",
        t.elapsed()
    );
    assert!(calls.contains("dockerd"), "{calls}");
    assert!(
        stderr.contains("overlay mounts are not supported here"),
        "log tail: {stderr}"
    );
    assert!(stderr.contains("no docker engine answered"), "{stderr}");
}

// --- the demo image on the real engine -------------------------------------

/// Removes, on drop, the containers and the images a test made.
struct DockerCleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        for i in self.images.iter().rev() {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker build -t tag -` with the context tar on stdin.
fn docker_build(tag: &str, context: &[u8]) {
    let mut child = Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run docker build");
    child.stdin.take().unwrap().write_all(context).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp
}

#[test]
fn demo_image_builds_runs_and_becomes_healthy() {
    use shoal::demo::DemoImage;
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let tag = format!("shoal-opstest-demo:{}-{nonce}", std::process::id());
    let derived = format!("{tag}-derived");
    let mut cleanup = DockerCleanup {
        containers: vec![],
        images: vec![tag.clone()],
    };

    docker_build(&tag, &DemoImage::default().context_tar());
    let labels = docker(&["image", "inspect", "-f", "{{json .Config.Labels}}", &tag]);
    assert!(labels.contains("\"shoal.memory\":\"64MiB\""), "{labels}");

    // A derived image adds one layer of its own and turns the healthcheck off.
    cleanup.images.push(derived.clone());
    let img = DemoImage {
        from: Some(tag.clone()),
        healthcheck: false,
        extra_files: vec![("/extra.txt".into(), b"extra".to_vec())],
        ..Default::default()
    };
    docker_build(&derived, &img.context_tar());
    let layers = |image: &str| {
        docker(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", image])
            .parse::<usize>()
            .unwrap()
    };
    assert_eq!((layers(&tag), layers(&derived)), (1, 2));
    let hc = docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Healthcheck}}",
        &derived,
    ]);
    assert!(hc.contains("NONE"), "{hc}");

    let id = docker(&[
        "run",
        "-d",
        "-p",
        "127.0.0.1::8080",
        "-e",
        "SHOAL_ENV_ID=ops-test",
        "-e",
        "DEMO_MESSAGE=hello from ops",
        &tag,
    ]);
    cleanup.containers.push(id.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        let h = docker(&["inspect", "-f", "{{.State.Health.Status}}", &id]);
        if h == "healthy" || Instant::now() > deadline {
            break h;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(health, "healthy");
    let addr = docker(&["port", &id, "8080/tcp"]);
    let addr = addr.lines().next().unwrap();
    let page = http_get(addr, "/");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("ops-test") && page.contains("hello from ops"),
        "{page}"
    );

    // PID 1 handles SIGTERM, so `docker stop` does not wait for its timeout.
    let t = Instant::now();
    docker(&["stop", "-t", "10", &id]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "docker stop took {:?}",
        t.elapsed()
    );
    assert_eq!(docker(&["inspect", "-f", "{{.State.ExitCode}}", &id]), "0");
}
