//! The demo image: shoal carries a tiny static HTTP server (`demo/server.rs`,
//! compiled by `build.rs`) and builds Docker build contexts around it, so a
//! new node has an image to publish and start with nothing pulled from a
//! registry, and tests can make images with exactly the layers, labels and
//! health behaviour they need.
//!
//! This module is pure: it only produces the bytes of a build context (a tar
//! holding a `Dockerfile` and the files it copies). Sending that context to
//! the engine is `docker.rs`'s job.
//!
//! The server answers `GET /` with a page naming the environment and
//! `GET /health` with `ok`; `demo-server --check` is the image's HEALTHCHECK.
//! Its environment switches (`DEMO_UNHEALTHY`, `DEMO_EXIT_AFTER`,
//! `DEMO_START_DELAY`, `DEMO_MESSAGE`) are documented in `demo/server.rs`.

use std::fmt::Write as _;

/// The demo server executable: static, runs `FROM scratch`.
pub const SERVER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo-server"));

/// Where the server lives inside the image.
pub const SERVER_PATH: &str = "/demo-server";

/// The name a node publishes the embedded demo image under by default.
pub const DEFAULT_REF: &str = "demo:1";

/// Files are given a fixed modification time so that the same description
/// always yields the same context bytes (and the engine's build cache hits).
const MTIME: u64 = 1_420_070_400; // 2015-01-01, the year of the seed

/// A description of a demo (or test) image, turned into a Docker build
/// context by [`DemoImage::context_tar`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoImage {
    /// Base image; `None` builds `FROM scratch` and copies the server in.
    /// With a base, the base is expected to hold the server already (it was
    /// built from another `DemoImage`), so the new image only adds its own
    /// layers: the seed's server image built on the database image.
    pub from: Option<String>,
    /// The `shoal.memory` label: memory the environment needs (`"64MiB"`).
    pub memory: Option<String>,
    /// The `shoal.aio` label: AIO contexts the environment needs.
    pub aio: Option<u64>,
    /// Declare `HEALTHCHECK CMD ["/demo-server","--check"]`; when false the
    /// image declares `HEALTHCHECK NONE` (so it does not inherit one), and
    /// readiness falls back to "the exposed ports accept connections".
    pub healthcheck: bool,
    /// The port the server listens on (`ENV PORT`) and that is `EXPOSE`d.
    pub port: u16,
    /// Extra files (path in the image, contents); each becomes its own
    /// `COPY` and so its own layer, in this order.
    pub extra_files: Vec<(String, Vec<u8>)>,
    /// More labels, after `shoal.memory` and `shoal.aio`.
    pub labels: Vec<(String, String)>,
    /// More environment variables, after `PORT`.
    pub env: Vec<(String, String)>,
}

impl Default for DemoImage {
    fn default() -> Self {
        DemoImage {
            from: None,
            memory: Some("64MiB".to_string()),
            aio: None,
            healthcheck: true,
            port: 8080,
            extra_files: Vec::new(),
            labels: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl DemoImage {
    /// The `Dockerfile` of this image.
    pub fn dockerfile(&self) -> String {
        let mut d = String::new();
        match &self.from {
            None => d.push_str("FROM scratch\n"),
            Some(base) => {
                let _ = writeln!(d, "FROM {base}");
            }
        }
        // Extra files first: a test that gives each image a unique first
        // file gets layers (and chain ids) no other image shares.
        for (i, (path, _)) in self.extra_files.iter().enumerate() {
            let _ = writeln!(d, "COPY [{}, {}]", json_str(&extra_name(i)), json_str(path));
        }
        if self.from.is_none() {
            let _ = writeln!(d, "COPY demo-server {SERVER_PATH}");
        }
        let _ = writeln!(d, "ENV PORT={}", self.port);
        for (k, v) in &self.env {
            let _ = writeln!(d, "ENV {}={}", quote(k), quote(v));
        }
        if let Some(memory) = &self.memory {
            let _ = writeln!(d, "LABEL shoal.memory={}", quote(memory));
        }
        if let Some(aio) = self.aio {
            let _ = writeln!(d, "LABEL shoal.aio=\"{aio}\"");
        }
        for (k, v) in &self.labels {
            let _ = writeln!(d, "LABEL {}={}", quote(k), quote(v));
        }
        let _ = writeln!(d, "EXPOSE {}/tcp", self.port);
        if self.healthcheck {
            let _ = writeln!(
                d,
                "HEALTHCHECK --interval=1s --timeout=2s --retries=3 CMD [\"{SERVER_PATH}\",\"--check\"]"
            );
        } else {
            d.push_str("HEALTHCHECK NONE\n");
        }
        let _ = writeln!(d, "CMD [\"{SERVER_PATH}\"]");
        d
    }

    /// The build context: a tar with the `Dockerfile`, the server binary
    /// (mode 0755, only when building `FROM scratch`) and the extra files
    /// (mode 0644, under `files/`).
    pub fn context_tar(&self) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        append(&mut b, "Dockerfile", self.dockerfile().as_bytes(), 0o644);
        if self.from.is_none() {
            append(&mut b, "demo-server", SERVER, 0o755);
        }
        for (i, (_, data)) in self.extra_files.iter().enumerate() {
            append(&mut b, &extra_name(i), data, 0o644);
        }
        b.into_inner()
            .expect("writing a tar into memory cannot fail")
    }
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(MTIME);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data)
        .expect("writing a tar into memory cannot fail");
}

fn extra_name(i: usize) -> String {
    format!("files/{i}")
}

/// A JSON string, for the exec form of `COPY`.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// A double-quoted Dockerfile word for `ENV` and `LABEL`: backslash, quote
/// and `$` (variable expansion) are escaped; a line break would end the
/// instruction, so it becomes a space.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '\\' | '"' | '$' => {
                q.push('\\');
                q.push(c);
            }
            '\n' | '\r' => q.push(' '),
            _ => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// (path, mode, contents) of every entry of a context tar.
    fn entries(tar_bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let mode = e.header().mode().unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, mode, data)
            })
            .collect()
    }

    fn dockerfile_of(tar_bytes: &[u8]) -> Vec<String> {
        let (_, _, data) = entries(tar_bytes)
            .into_iter()
            .find(|(p, _, _)| p == "Dockerfile")
            .expect("the context has a Dockerfile");
        String::from_utf8(data)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn default_context_is_scratch_with_server_and_healthcheck() {
        let ctx = DemoImage::default().context_tar();
        let lines = dockerfile_of(&ctx);
        let expect = [
            "FROM scratch",
            "COPY demo-server /demo-server",
            "ENV PORT=8080",
            "LABEL shoal.memory=\"64MiB\"",
            "EXPOSE 8080/tcp",
            "HEALTHCHECK --interval=1s --timeout=2s --retries=3 CMD [\"/demo-server\",\"--check\"]",
            "CMD [\"/demo-server\"]",
        ];
        assert_eq!(lines, expect);

        let all = entries(&ctx);
        let names: Vec<&str> = all.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(names, ["Dockerfile", "demo-server"]);
        let (_, mode, data) = &all[1];
        assert_eq!(mode & 0o777, 0o755, "the server must be executable");
        assert_eq!(data.as_slice(), SERVER);
    }

    #[test]
    fn server_is_a_static_elf() {
        assert_eq!(&SERVER[..4], b"\x7fELF");
        assert!(
            SERVER.len() > 100_000,
            "suspiciously small: {}",
            SERVER.len()
        );
        // A dynamic executable names its interpreter (PT_INTERP = 3).
        assert!(
            !has_interp(SERVER),
            "the demo server must be statically linked"
        );
    }

    /// Whether an ELF64 little-endian file has a PT_INTERP program header.
    fn has_interp(elf: &[u8]) -> bool {
        let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
        let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
        let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
        (0..phnum).any(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) == 3
        })
    }

    #[test]
    fn derived_context_has_no_server_and_one_copy_per_file() {
        let img = DemoImage {
            from: Some("demo:1".into()),
            memory: Some("1GiB".into()),
            aio: Some(65536),
            healthcheck: false,
            port: 9000,
            extra_files: vec![
                ("/data/a.bin".into(), vec![1, 2, 3]),
                ("/data/with space.txt".into(), b"hello".to_vec()),
            ],
            labels: vec![("build".into(), "nightly \"42\"".into())],
            env: vec![("DEMO_MESSAGE".into(), "costs $5\nplease".into())],
        };
        let ctx = img.context_tar();
        let lines = dockerfile_of(&ctx);
        let expect = [
            "FROM demo:1",
            "COPY [\"files/0\", \"/data/a.bin\"]",
            "COPY [\"files/1\", \"/data/with space.txt\"]",
            "ENV PORT=9000",
            "ENV \"DEMO_MESSAGE\"=\"costs \\$5 please\"",
            "LABEL shoal.memory=\"1GiB\"",
            "LABEL shoal.aio=\"65536\"",
            "LABEL \"build\"=\"nightly \\\"42\\\"\"",
            "EXPOSE 9000/tcp",
            "HEALTHCHECK NONE",
            "CMD [\"/demo-server\"]",
        ];
        assert_eq!(lines, expect);
        let all = entries(&ctx);
        let files: Vec<(&str, u32, &[u8])> = all
            .iter()
            .map(|(p, m, d)| (p.as_str(), m & 0o777, d.as_slice()))
            .collect();
        assert_eq!(
            files[1..],
            [
                ("files/0", 0o644, &[1u8, 2, 3][..]),
                ("files/1", 0o644, &b"hello"[..])
            ]
        );
    }

    #[test]
    fn same_description_same_bytes() {
        let img = DemoImage {
            extra_files: vec![("/x".into(), vec![7; 10])],
            ..Default::default()
        };
        assert_eq!(img.context_tar(), img.context_tar());
    }

    // --- the server itself, run as a process on a free port ---------------

    /// The server as built by `build.rs` (the same bytes as `SERVER`).
    fn server_path() -> &'static Path {
        Path::new(concat!(env!("OUT_DIR"), "/demo-server"))
    }

    /// A running demo server; killed on drop.
    struct Server {
        child: Child,
        port: u16,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn start(env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(server_path());
        cmd.env_clear()
            .env("PORT", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the demo server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Server { child, port }
    }

    /// (status, body) of a GET on the server.
    fn get(port: u16, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    fn check(port: u16) -> i32 {
        Command::new(server_path())
            .arg("--check")
            .env_clear()
            .env("PORT", port.to_string())
            .status()
            .unwrap()
            .code()
            .unwrap()
    }

    /// Waits for the child to exit, up to `limit`; its exit status if it did.
    fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    #[test]
    fn server_answers_page_and_health() {
        let s = start(&[
            ("SHOAL_ENV_ID", "env-123"),
            ("SHOAL_IMAGE", "demo:1"),
            ("DEMO_MESSAGE", "hello tester"),
        ]);
        let (status, body) = get(s.port, "/");
        assert_eq!(status, 200);
        for want in ["env-123", "demo:1", "hello tester"] {
            assert!(body.contains(want), "{want:?} missing from {body:?}");
        }
        assert_eq!(get(s.port, "/health"), (200, "ok\n".to_string()));
        assert_eq!(get(s.port, "/nope").0, 404);
        assert_eq!(check(s.port), 0);
    }

    #[test]
    fn unhealthy_switch_fails_health_and_check() {
        let s = start(&[("DEMO_UNHEALTHY", "1")]);
        assert_eq!(get(s.port, "/health").0, 500);
        assert_eq!(get(s.port, "/").0, 200);
        assert_eq!(check(s.port), 1);
    }

    #[test]
    fn check_fails_when_nothing_listens() {
        // Bind and drop to get a port that is (very likely) free.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(check(port), 1);
    }

    #[test]
    fn exit_after_exits_with_code_3() {
        let mut s = start(&[("DEMO_EXIT_AFTER", "0.3")]);
        let st = wait_exit(&mut s.child, Duration::from_secs(10)).expect("server did not exit");
        assert_eq!(st.code(), Some(3));
    }

    #[test]
    fn sigterm_exits_promptly() {
        let mut s = start(&[]);
        let pid = nix::unistd::Pid::from_raw(s.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let st = wait_exit(&mut s.child, Duration::from_secs(2)).expect("no exit on SIGTERM");
        assert_eq!(st.code(), Some(0));
    }

    #[test]
    fn start_delay_postpones_listening() {
        let t = Instant::now();
        let s = start(&[("DEMO_START_DELAY", "0.5")]);
        assert!(t.elapsed() >= Duration::from_millis(500));
        assert_eq!(get(s.port, "/health").0, 200);
    }
}
