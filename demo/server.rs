//! The demo environment: a tiny HTTP/1.1 server that shoal ships inside its
//! own binary so that a new user (and every test) has an image to publish and
//! start without pulling anything from a registry.
//!
//! It is compiled by `build.rs` with plain `rustc` as a static executable, so
//! it needs no crates and runs `FROM scratch`. Only `std` is used, plus two
//! functions of the C library that `std` already links (`signal`, `_exit`) to
//! exit promptly on SIGTERM: as PID 1 of a container the kernel drops every
//! signal that has no handler, and `docker stop` would otherwise wait its
//! whole timeout and then SIGKILL.
//!
//! Routes: `GET /` → 200, a short text page naming the environment;
//! `GET /health` → 200 `ok` (or 500 when `DEMO_UNHEALTHY=1`); anything else
//! 404 (405 for other methods). `HEAD` is answered like `GET` without a body.
//!
//! Environment variables:
//! - `PORT` (default 8080): the TCP port to listen on, on every address;
//!   `0` picks a free port (the chosen address is printed on stdout).
//! - `SHOAL_ENV_ID`, `SHOAL_IMAGE`, `DEMO_MESSAGE`: shown on the page.
//! - `DEMO_UNHEALTHY=1`: `/health` answers 500.
//! - `DEMO_EXIT_AFTER=<secs>`: the process exits with code 3 after that long.
//! - `DEMO_START_DELAY=<secs>`: wait that long before binding the port.
//!
//! `demo-server --check` is the image's HEALTHCHECK: it GETs
//! `http://127.0.0.1:$PORT/health` and exits 0 on a 200, 1 otherwise.
//!
//! Fake installer modes for the build watcher's tests (a recipe's
//! privileged install step runs them): `demo-server --install FILE [TEXT]`
//! writes TEXT and the process's effective capabilities (`CapEff` of
//! `/proc/self/status`, which shows whether it ran privileged) to FILE,
//! creating its directory, and exits 0; `demo-server --fail MESSAGE` prints
//! MESSAGE on stderr and exits 1.

use std::env;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Largest request head we read; anything longer is answered 431.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once; more are answered 503 and closed, so a flood
/// cannot make the server spawn threads without bound.
const MAX_CONNECTIONS: usize = 64;
/// Read and write timeout on every connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit code used when `DEMO_EXIT_AFTER` fires.
const EXIT_AFTER_CODE: i32 = 3;

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

extern "C" {
    // Both live in the C library that std links anyway (statically here).
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn _exit(status: i32) -> !;
}

/// Runs inside the signal handler: `_exit` is async-signal-safe, which
/// `std::process::exit` (it runs atexit hooks and flushes) is not.
extern "C" fn on_terminate(_signum: i32) {
    // SAFETY: `_exit` only ends the process; it touches no shared state.
    unsafe { _exit(0) }
}

fn main() {
    let args: Vec<String> = env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--install") => install(&args[2..]),
        Some("--fail") => {
            eprintln!(
                "{}",
                args.get(2)
                    .map(String::as_str)
                    .unwrap_or("installer failed")
            );
            process::exit(1);
        }
        _ => {}
    }
    let port = match env::var("PORT") {
        Ok(v) => match v.trim().parse::<u16>() {
            Ok(p) => p,
            Err(_) => fail(&format!("PORT is not a port number: {v:?}")),
        },
        Err(_) => 8080,
    };
    if env::args().nth(1).as_deref() == Some("--check") {
        process::exit(if check(port) { 0 } else { 1 });
    }

    // SAFETY: installs a handler that only calls `_exit`.
    unsafe {
        signal(SIGTERM, on_terminate);
        signal(SIGINT, on_terminate);
    }

    if let Some(secs) = secs_var("DEMO_EXIT_AFTER") {
        // A detached timer thread; it ends the whole process when it fires.
        thread::spawn(move || {
            thread::sleep(secs);
            eprintln!("demo-server: DEMO_EXIT_AFTER elapsed, exiting with code {EXIT_AFTER_CODE}");
            process::exit(EXIT_AFTER_CODE);
        });
    }
    if let Some(secs) = secs_var("DEMO_START_DELAY") {
        eprintln!("demo-server: waiting {secs:?} before listening (DEMO_START_DELAY)");
        thread::sleep(secs);
    }

    let listener = match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))) {
        Ok(l) => l,
        Err(e) => fail(&format!("cannot listen on port {port}: {e}")),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("demo-server listening on {addr}");
    let _ = io::stdout().flush();

    let page = Arc::new(Page::from_env());
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("demo-server: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(&mut stream, 503, "busy\n", false);
            continue;
        }
        let page = Arc::clone(&page);
        let active = Arc::clone(&active);
        // One short-lived thread per connection, bounded by MAX_CONNECTIONS.
        thread::spawn(move || {
            serve(&mut stream, &page);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// What `GET /` shows, fixed at start.
struct Page {
    body: String,
    unhealthy: bool,
}

impl Page {
    fn from_env() -> Page {
        let var = |k: &str| env::var(k).unwrap_or_default();
        let body = format!(
            "shoal demo environment\n\
             environment: {}\n\
             image: {}\n\
             host: {}\n\
             message: {}\n",
            or_dash(var("SHOAL_ENV_ID")),
            or_dash(var("SHOAL_IMAGE")),
            or_dash(hostname()),
            or_dash(var("DEMO_MESSAGE")),
        );
        Page {
            body,
            unhealthy: var("DEMO_UNHEALTHY") == "1",
        }
    }
}

fn serve(stream: &mut TcpStream, page: &Page) {
    let head = match read_head(stream) {
        Ok(Some(h)) => h,
        Ok(None) => {
            let _ = respond(stream, 431, "request head too large\n", false);
            return;
        }
        Err(_) => return, // timed out or the peer went away: nothing to answer
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    let _ = match (method, path) {
        ("GET" | "HEAD", "/") => respond(stream, 200, &page.body, head_only),
        ("GET" | "HEAD", "/health") if page.unhealthy => {
            respond(stream, 500, "unhealthy\n", head_only)
        }
        ("GET" | "HEAD", "/health") => respond(stream, 200, "ok\n", head_only),
        ("GET" | "HEAD", _) => respond(stream, 404, "not found\n", head_only),
        _ => respond(stream, 405, "method not allowed\n", false),
    };
}

/// Reads until the blank line that ends the request head. `Ok(None)` when the
/// head is larger than `MAX_HEAD`. A body, if any, is ignored.
fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n").or_else(|| find(&buf, b"\n\n")) {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn respond(stream: &mut TcpStream, status: u16, body: &str, head_only: bool) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// The HEALTHCHECK: true when `GET /health` on the local port answers 200.
fn check(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let status_line = String::from_utf8_lossy(&buf[..got]);
    status_line.split_whitespace().nth(1) == Some("200")
}

/// Docker sets `HOSTNAME`; elsewhere the kernel knows it.
fn hostname() -> String {
    env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s
    }
}

/// A duration in (possibly fractional) seconds from an environment variable.
fn secs_var(name: &str) -> Option<Duration> {
    let v = env::var(name).ok()?;
    match v.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s)),
        _ => fail(&format!("{name} is not a number of seconds: {v:?}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("demo-server: {msg}");
    process::exit(2);
}

/// `--install FILE [TEXT]`: see the module header.
fn install(args: &[String]) -> ! {
    let Some(file) = args.first() else {
        fail("--install needs a file");
    };
    let text = args.get(1).map(String::as_str).unwrap_or("installed");
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("CapEff:"))
                .map(String::from)
        })
        .unwrap_or_else(|| "CapEff: unknown".into());
    let path = std::path::Path::new(file);
    if let Some(dir) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            fail(&format!("creating {}: {e}", dir.display()));
        }
    }
    if let Err(e) = std::fs::write(path, format!("{text}\n{caps}\n")) {
        fail(&format!("writing {file}: {e}"));
    }
    println!("installed {file} ({caps})");
    process::exit(0)
}
