//! The HTML of every page, rendered on the server from plain data (pure:
//! records in, strings out). Every value put in a page goes through
//! [`esc`]. Every form that posts is made by [`post_form`], which takes the
//! session's [`Csrf`] token: a form without one cannot be written. The JavaScript (`assets/shoal.js`) only improves a page that
//! already says everything: it swaps in a fresh copy of the live section
//! when the environment's event stream reports a change.

use std::fmt::Write;
use std::time::Duration;

use time::OffsetDateTime;

pub use super::session::Csrf;
use super::session::{CAP_FIELD, CSRF_FIELD};
use crate::cluster::ClusterView;
use crate::model::{EnvRecord, EnvStatus, ImageInfo};
use crate::units::{format_duration, format_size};

/// Escapes text for HTML content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub fn fmt_time(t: OffsetDateTime) -> String {
    let f = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    t.format(&f).unwrap_or_default()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// "3h ago" / "in 2h5m", to the minute past an hour.
pub fn relative(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (t - now).whole_seconds();
    let mut d = secs.unsigned_abs();
    if d >= 3600 {
        d -= d % 60;
    }
    let s = format_duration(Duration::from_secs(d));
    if secs >= 0 {
        format!("in {s}")
    } else {
        format!("{s} ago")
    }
}

/// A form that posts to `action` (escaped here), with the session's CSRF
/// token and, for a mail link, its capability. `attrs` are fixed
/// attributes (`class="inline"`), never data; `inner` is HTML.
pub fn post_form(
    action: &str,
    csrf: &Csrf,
    cap: Option<&str>,
    attrs: &'static str,
    inner: &str,
) -> String {
    let cap = cap
        .map(|c| {
            format!(
                "<input type=\"hidden\" name=\"{CAP_FIELD}\" value=\"{}\">",
                esc(c)
            )
        })
        .unwrap_or_default();
    let sep = if attrs.is_empty() { "" } else { " " };
    format!(
        "<form method=\"post\" action=\"{}\"{sep}{attrs}>\
         <input type=\"hidden\" name=\"{CSRF_FIELD}\" value=\"{}\">{cap}{inner}</form>",
        esc(action),
        esc(csrf.as_str())
    )
}

/// Who is signed in, as the page header shows it.
pub struct Signed<'a> {
    pub user: &'a str,
    pub operator: bool,
    /// A cookie session (a proxy's header cannot be signed out of here).
    pub cookie: bool,
    pub csrf: &'a Csrf,
}

/// Common data of every page.
pub struct Frame<'a> {
    /// Who is signed in (`None`: the sign-in page, a mail link's page).
    pub signed: Option<Signed<'a>>,
    pub title: &'a str,
    pub node: &'a str,
    /// Which nav entry is current: "catalog", "my", "cluster".
    pub nav: &'a str,
    /// Extra lines in `<head>`.
    pub head: String,
}

pub fn page(f: &Frame, body: &str) -> String {
    let nav = |key: &str, href: &str, label: &str| {
        let cur = if f.nav == key {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{cur}>{label}</a>")
    };
    let (nav_html, who) = match &f.signed {
        None => (String::new(), String::new()),
        Some(sg) => {
            let mut n = nav("catalog", "/", "Catalog") + &nav("my", "/my", "My environments");
            if sg.operator {
                n.push_str(&nav("cluster", "/cluster", "Cluster"));
            }
            let out = if sg.cookie {
                post_form(
                    "/signout",
                    sg.csrf,
                    None,
                    "class=\"signout\"",
                    "<button type=\"submit\" id=\"signout\">Sign out</button>",
                )
            } else {
                String::new()
            };
            let who = format!(
                "<span class=\"who\">{}{}</span>{out}",
                esc(sg.user),
                if sg.operator {
                    " <small>(operator)</small>"
                } else {
                    ""
                }
            );
            (n, who)
        }
    };
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · shoal</title>\n<link rel=\"stylesheet\" href=\"/assets/shoal.css\">\n\
         <script src=\"/assets/shoal.js\" defer></script>\n{head}</head>\n<body>\n\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\n\
         <header><span class=\"brand\">shoal</span><nav>{nav_html}</nav>{who}</header>\n\
         <main id=\"main\">\n{body}\n</main>\n\
         <footer>served by node <b>{node}</b></footer>\n</body>\n</html>\n",
        title = esc(f.title),
        head = f.head,
        node = esc(f.node),
    )
}

/// What the request form offers as reservation lengths.
pub fn ttl_choices(default: Duration, max: Duration) -> Vec<(String, bool)> {
    let mut v: Vec<Duration> = [1, 4, 8, 24, 48, 72]
        .iter()
        .map(|h| Duration::from_secs(h * 3600))
        .filter(|d| *d <= max)
        .collect();
    v.push(default);
    v.push(max);
    v.sort();
    v.dedup();
    v.into_iter()
        .map(|d| (format_duration(d), d == default))
        .collect()
}

/// Values the request form is re-shown with after an error.
#[derive(Debug, Default, Clone)]
pub struct FormValues {
    pub image: String,
    pub owner: String,
    pub memory: String,
    pub ttl: String,
}

/// The catalog: published builds per product, newest first, each product
/// with its request form.
/// Who requests from the catalog: a tester for themselves, an operator
/// for anyone (the owner field).
pub struct Requester<'a> {
    pub user: &'a str,
    pub operator: bool,
    pub csrf: &'a Csrf,
}

pub fn catalog(
    images: &[ImageInfo],
    ttls: &[(String, bool)],
    form: &FormValues,
    error: Option<&str>,
    me: &Requester,
    now: OffsetDateTime,
) -> String {
    let mut products: Vec<(&str, Vec<&ImageInfo>)> = Vec::new();
    let mut sorted: Vec<&ImageInfo> = images.iter().collect();
    sorted.sort_by(|a, b| {
        a.name
            .cmp(&b.name)
            .then(b.published_at.cmp(&a.published_at))
            .then(b.build.cmp(&a.build))
    });
    for i in sorted {
        match products.last_mut() {
            Some((n, v)) if *n == i.name => v.push(i),
            _ => products.push((&i.name, vec![i])),
        }
    }
    let mut out = String::from("<h1>Catalog</h1>\n");
    out.push_str(
        "<p class=\"lead\">Every build whose image was published. Pick one \
         and you get a running environment of it; a mail tells you when it is ready.</p>\n",
    );
    if let Some(e) = error {
        let _ = writeln!(out, "<p class=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    if products.is_empty() {
        out.push_str("<p>No build is published yet.</p>\n");
    }
    for (name, builds) in &products {
        let pid = format!("p-{}", esc(name));
        let _ = writeln!(
            out,
            "<section class=\"card product\" aria-labelledby=\"{pid}\">\n<h2 id=\"{pid}\">{}</h2>",
            esc(name)
        );
        out.push_str(
            "<div class=\"scroll\"><table><thead><tr><th>Build</th><th>Size</th><th>Memory</th>\
             <th>Published</th></tr></thead><tbody>\n",
        );
        for b in builds {
            let _ = writeln!(
                out,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td><time datetime=\"{}\" title=\"{}\">{}</time></td></tr>",
                esc(&b.build),
                format_size(b.size),
                b.requirements.memory.map(format_size).unwrap_or_else(|| "default".into()),
                rfc3339(b.published_at),
                fmt_time(b.published_at),
                relative(b.published_at, now)
            );
        }
        out.push_str("</tbody></table></div>\n");
        let fid = |f: &str| format!("{pid}-{f}");
        let mut inner = String::new();
        let _ = write!(
            inner,
            "\n<label for=\"{i}\">Build</label><select id=\"{i}\" name=\"image\">",
            i = fid("image")
        );
        for b in builds {
            let sel = if form.image == b.image_ref {
                " selected"
            } else {
                ""
            };
            let _ = write!(
                inner,
                "<option value=\"{v}\"{sel}>{v}</option>",
                v = esc(&b.image_ref)
            );
        }
        inner.push_str("</select>\n");
        let floor = builds[0]
            .requirements
            .memory
            .map(format_size)
            .unwrap_or_else(|| "the node default".into());
        if me.operator {
            let _ = writeln!(
                inner,
                "<label for=\"{o}\">Owner <small>(optional, default you)</small></label>\
                 <input id=\"{o}\" name=\"owner\" type=\"email\" value=\"{ov}\" placeholder=\"{me}\">",
                o = fid("owner"),
                ov = esc(&form.owner),
                me = esc(me.user),
            );
        } else {
            let _ = writeln!(
                inner,
                "<p class=\"owner\">For <b>{}</b> (you)</p>",
                esc(me.user)
            );
        }
        let _ = write!(
            inner,
            "<label for=\"{m}\">Memory <small>(optional, at least {floor})</small></label>\
             <input id=\"{m}\" name=\"memory\" value=\"{mv}\" placeholder=\"{floor}\" inputmode=\"text\">\n\
             <label for=\"{t}\">Reservation</label><select id=\"{t}\" name=\"ttl\">",
            m = fid("memory"),
            mv = esc(&form.memory),
            t = fid("ttl"),
        );
        for (t, default) in ttls {
            let sel = if (form.ttl.is_empty() && *default) || form.ttl == *t {
                " selected"
            } else {
                ""
            };
            let _ = write!(inner, "<option value=\"{t}\"{sel}>{t}</option>");
        }
        inner.push_str("</select>\n<button type=\"submit\">Request environment</button>\n");
        out.push_str(&post_form(
            "/envs",
            me.csrf,
            None,
            "class=\"request\"",
            &inner,
        ));
        out.push_str("\n</section>\n");
    }
    out
}

/// The steps of an environment's life, for the progress list.
const STEPS: [(&str, &str); 4] = [
    ("placing", "Placed"),
    ("loading", "Loading the image"),
    ("starting", "Starting"),
    ("ready", "Ready"),
];

fn step_index(s: EnvStatus) -> Option<usize> {
    match s {
        EnvStatus::Pending => Some(1),
        EnvStatus::Loading => Some(1),
        EnvStatus::Starting => Some(2),
        EnvStatus::Ready => Some(3),
        _ => None,
    }
}

pub fn in_progress(s: EnvStatus) -> bool {
    matches!(
        s,
        EnvStatus::Pending | EnvStatus::Loading | EnvStatus::Starting
    )
}

/// The part of the environment page that changes: status, progress,
/// endpoints, expiry. Served alone at `/envs/{id}/live` for the script.
pub fn env_live(rec: &EnvRecord, why: Option<&str>, load_bps: u64, now: OffsetDateTime) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<p class=\"status\">Status: <span class=\"badge s-{s}\" data-status=\"{s}\">{s}</span></p>",
        s = rec.status
    );
    if let Some(idx) = step_index(rec.status) {
        out.push_str("<ol class=\"steps\">\n");
        for (i, (key, label)) in STEPS.iter().enumerate() {
            let (class, mark) = if i < idx || rec.status == EnvStatus::Ready {
                ("done", "✓")
            } else if i == idx {
                ("current", "…")
            } else {
                ("todo", "")
            };
            let cur = if class == "current" {
                " aria-current=\"step\""
            } else {
                ""
            };
            let mut detail = String::new();
            match *key {
                "placing" => {
                    detail = format!(" on node <b>{}</b>", esc(&rec.node));
                    if let Some(w) = why {
                        let _ = write!(detail, " <small>({})</small>", esc(w));
                    }
                }
                "loading" if rec.load.bytes_needed > 0 || i < idx => {
                    let l = &rec.load;
                    if l.bytes_needed == 0 {
                        detail = format!(
                            " <small>(the node held all {} layers)</small>",
                            l.layers_total
                        );
                    } else {
                        let done = if i < idx {
                            l.bytes_needed
                        } else {
                            l.bytes_done
                        };
                        let _ = write!(
                            detail,
                            " <small>{} of {} ({} of {} layers held already)</small>",
                            format_size(done),
                            format_size(l.bytes_needed),
                            l.layers_cached,
                            l.layers_total
                        );
                    }
                }
                _ => {}
            }
            let _ = writeln!(
                out,
                "<li class=\"{class}\"{cur}><span class=\"mark\" aria-hidden=\"true\">{mark}</span>{label}{detail}</li>"
            );
        }
        out.push_str("</ol>\n");
    }
    if rec.status == EnvStatus::Loading && rec.load.bytes_needed > 0 {
        let l = &rec.load;
        let pct = (l.bytes_done as f64 * 100.0 / l.bytes_needed as f64).min(100.0);
        let left = l.bytes_needed.saturating_sub(l.bytes_done);
        let eta = (left as f64 / load_bps.max(1) as f64).ceil() as u64;
        let _ = writeln!(
            out,
            "<progress max=\"{}\" value=\"{}\" aria-label=\"image loaded\">{pct:.0}%</progress>\n\
             <p class=\"eta\" data-eta>{pct:.0}% · about {} left</p>",
            l.bytes_needed,
            l.bytes_done,
            format_duration(Duration::from_secs(eta.max(1)))
        );
    }
    if let Some(e) = &rec.error {
        let _ = writeln!(out, "<p class=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    if rec.status == EnvStatus::Ready {
        out.push_str("<h2>Endpoints</h2>\n");
        if rec.endpoints.is_empty() {
            out.push_str("<p>The image exposes no port.</p>\n");
        } else {
            out.push_str("<ul class=\"endpoints\">\n");
            for e in &rec.endpoints {
                let url = format!("http://{}:{}/", e.host, e.host_port);
                let _ = writeln!(
                    out,
                    "<li><a class=\"endpoint\" href=\"{u}\">{u}</a> <small>port {}</small></li>",
                    e.port,
                    u = esc(&url)
                );
            }
            out.push_str("</ul>\n");
        }
    }
    out.push_str("<dl class=\"facts\">\n");
    let mut fact = |k: &str, v: String| {
        let _ = writeln!(out, "<dt>{k}</dt><dd>{v}</dd>");
    };
    fact(
        "Build",
        format!("<code>{}</code>", esc(&rec.image.to_string())),
    );
    fact("Owner", esc(&rec.owner));
    fact("Node", esc(&rec.node));
    fact("Memory", format_size(rec.memory));
    if rec.created_at != OffsetDateTime::UNIX_EPOCH {
        fact(
            "Requested",
            format!(
                "<time datetime=\"{}\">{}</time>",
                rfc3339(rec.created_at),
                fmt_time(rec.created_at)
            ),
        );
    }
    if let Some(e) = rec.expires_at {
        fact(
            "Expires",
            format!(
                "<time id=\"expires\" datetime=\"{}\">{}</time> <small>({})</small>",
                rfc3339(e),
                fmt_time(e),
                relative(e, now)
            ),
        );
    }
    out.push_str("</dl>\n");
    out
}

/// What the viewer of an environment page may do with it.
pub struct Actions<'a> {
    pub extend: bool,
    pub ret: bool,
    pub csrf: &'a Csrf,
}

/// The environment page: the live section plus its actions.
pub fn env_page(
    rec: &EnvRecord,
    why: Option<&str>,
    ttls: &[(String, bool)],
    load_bps: u64,
    notice: Option<&str>,
    may: &Actions,
    now: OffsetDateTime,
) -> String {
    let id = esc(&rec.id);
    let mut out = format!(
        "<h1>Environment <code>{id}</code></h1>\n<p><a href=\"/my?owner={}\">All environments of {}</a></p>\n",
        enc(&rec.owner),
        esc(&rec.owner)
    );
    if let Some(n) = notice {
        let _ = writeln!(out, "<p class=\"notice\" role=\"status\">{}</p>", esc(n));
    }
    let why_attr = why.map(|w| format!("?why={}", enc(w))).unwrap_or_default();
    let _ = writeln!(
        out,
        "<section id=\"live\" class=\"card\" aria-live=\"polite\" data-events=\"/v1/environments/{id}/events\" data-live=\"/envs/{id}/live{}\">\n{}</section>",
        esc(&why_attr),
        env_live(rec, why, load_bps, now)
    );
    if matches!(rec.status, EnvStatus::Lost | EnvStatus::Deleted) || !(may.extend || may.ret) {
        return out;
    }
    out.push_str("<section class=\"card actions\"><h2>Reservation</h2>\n");
    if may.extend {
        out.push_str(&extend_form(&rec.id, ttls, may.csrf, None));
    }
    if may.ret {
        let _ = writeln!(
            out,
            "<p><a class=\"button danger\" id=\"return\" href=\"/envs/{id}/return\">Return it…</a> \
             <small>stops and deletes it now, for the next tester</small></p>"
        );
    }
    out.push_str("</section>\n");
    out
}

pub fn extend_form(id: &str, ttls: &[(String, bool)], csrf: &Csrf, cap: Option<&str>) -> String {
    let mut inner =
        String::from("<label for=\"by\">Extend by</label><select id=\"by\" name=\"by\">");
    for (t, _) in ttls {
        let sel = if t == "4h" { " selected" } else { "" };
        let _ = write!(inner, "<option value=\"{t}\"{sel}>{t}</option>");
    }
    inner.push_str("</select> <button type=\"submit\" id=\"extend\">Extend</button>");
    post_form(
        &format!("/envs/{id}/extend"),
        csrf,
        cap,
        "class=\"inline\"",
        &inner,
    ) + "\n"
}

/// The page behind a mail's "return" link: one button, POST.
pub fn return_confirm(rec: &EnvRecord, csrf: &Csrf, cap: Option<&str>) -> String {
    let id = esc(&rec.id);
    format!(
        "<h1>Return environment <code>{id}</code>?</h1>\n\
         <p>{} on node {}: it is stopped and deleted now. This cannot be undone.</p>\n{}\n",
        esc(&rec.image.to_string()),
        esc(&rec.node),
        post_form(
            &format!("/envs/{}/return", rec.id),
            csrf,
            cap,
            "",
            &format!(
                "<button type=\"submit\" class=\"danger\" id=\"confirm-return\">Yes, return it</button> \
                 <a href=\"/envs/{id}\">No, keep it</a>"
            ),
        )
    )
}

/// The page behind a mail's "extend" link.
pub fn extend_confirm(
    rec: &EnvRecord,
    ttls: &[(String, bool)],
    csrf: &Csrf,
    cap: Option<&str>,
    now: OffsetDateTime,
) -> String {
    let exp = rec
        .expires_at
        .map(|e| format!("{} ({})", fmt_time(e), relative(e, now)))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "<h1>Extend environment <code>{}</code></h1>\n<p>Its reservation ends {}.</p>\n{}\
         <p><a href=\"/envs/{}\">Back to the environment</a></p>\n",
        esc(&rec.id),
        esc(&exp),
        extend_form(&rec.id, ttls, csrf, cap),
        esc(&rec.id)
    )
}

fn env_rows(envs: &[EnvRecord], now: OffsetDateTime, with_owner: bool) -> String {
    let mut out =
        String::from("<div class=\"scroll\"><table><thead><tr><th>Environment</th><th>Build</th>");
    if with_owner {
        out.push_str("<th>Owner</th>");
    }
    out.push_str("<th>Node</th><th>Status</th><th>Expires</th></tr></thead><tbody>\n");
    for r in envs {
        let lost = r.status == EnvStatus::Lost;
        let _ = write!(
            out,
            "<tr{}><td><a href=\"/envs/{id}\"><code>{id}</code></a></td><td><code>{}</code></td>",
            if lost { " class=\"lost\"" } else { "" },
            esc(&r.image.to_string()),
            id = esc(&r.id)
        );
        if with_owner {
            let _ = write!(out, "<td>{}</td>", esc(&r.owner));
        }
        let _ = writeln!(
            out,
            "<td>{}</td><td><span class=\"badge s-{s}\">{s}</span></td><td>{}</td></tr>",
            esc(&r.node),
            r.expires_at
                .map(|e| relative(e, now))
                .unwrap_or_else(|| "—".into()),
            s = r.status
        );
    }
    out.push_str("</tbody></table></div>\n");
    out
}

/// "My environments": an owner's environments across the cluster (an
/// operator may look up anyone's).
pub fn my_envs(
    owner: &str,
    envs: &[EnvRecord],
    notice: Option<&str>,
    operator: bool,
    now: OffsetDateTime,
) -> String {
    let mut out = String::from("<h1>My environments</h1>\n");
    if let Some(n) = notice {
        let _ = writeln!(out, "<p class=\"notice\" role=\"status\">{}</p>", esc(n));
    }
    if operator {
        // A look-up only (GET): it changes nothing, so it needs no token.
        let _ = writeln!(
            out,
            "<form method=\"get\" action=\"/my\" class=\"inline\"><label for=\"owner\">Owner</label>\
             <input id=\"owner\" name=\"owner\" type=\"email\" required value=\"{}\"> \
             <button type=\"submit\">Show</button></form>",
            esc(owner)
        );
    }
    if envs.is_empty() {
        let _ = writeln!(
            out,
            "<p>{} has no environment. <a href=\"/\">Request one from the catalog.</a></p>",
            esc(owner)
        );
    } else {
        out.push_str(&env_rows(envs, now, false));
    }
    out
}

/// Mail delivery as the cluster page shows it.
pub struct MailLine {
    pub transport: String,
    pub pending: usize,
    pub last_error: Option<String>,
}

/// The operators' page: every node (dead ones stand out) and every
/// environment (lost ones stand out).
pub fn cluster(
    view: &ClusterView,
    envs: &[EnvRecord],
    mail: &MailLine,
    now: OffsetDateTime,
) -> String {
    let mut out = String::from("<h1>Cluster</h1>\n");
    let dead = view.nodes.iter().filter(|n| !n.alive && !n.left).count();
    let lost = envs.iter().filter(|e| e.status == EnvStatus::Lost).count();
    if dead > 0 || lost > 0 {
        let _ = writeln!(
            out,
            "<p class=\"error\" role=\"alert\">{dead} node(s) dead, {lost} environment(s) lost. \
             shoal never moves them; they come back with their node.</p>"
        );
    }
    out.push_str(
        "<div class=\"scroll\"><table class=\"nodes\"><thead><tr><th>Node</th><th>State</th><th>HTTP</th>\
         <th>Memory committed</th><th>Envs</th><th>AIO committed</th><th>Storage</th><th>Last seen</th>\
         <th>Heartbeat</th><th>Phi</th><th>Gossip state</th><th>Version</th></tr></thead><tbody>\n",
    );
    for n in &view.nodes {
        let state = if n.left {
            "left"
        } else if !n.alive {
            "DEAD"
        } else if n.facts.as_ref().is_some_and(|f| f.draining) {
            "draining"
        } else if let Some(f) = n.facts.as_ref().filter(|f| !f.engine.is_ok()) {
            match f.engine {
                crate::cluster::keys::EngineState::Hung => "engine hung",
                _ => "engine unreachable",
            }
        } else {
            "alive"
        };
        let class = match state {
            "DEAD" => " class=\"dead\"",
            "left" | "draining" | "engine hung" | "engine unreachable" => " class=\"warn\"",
            _ => "",
        };
        let me = if n.is_self {
            " <small>(this node)</small>"
        } else {
            ""
        };
        let seen = n
            .last_seen
            .map(|d| format!("{:.0}s ago", d.as_secs_f64()))
            .unwrap_or_else(|| "—".into());
        // Numbers only: nothing here needs escaping.
        let gossip = format!(
            "<td>{}</td><td>{}</td><td>{} B</td>",
            n.heartbeat,
            n.phi.map_or_else(|| "—".to_string(), |p| format!("{p:.1}")),
            n.state_bytes
        );
        match &n.facts {
            Some(f) => {
                let _ = writeln!(
                    out,
                    "<tr{class}><td>{}{me}</td><td><b>{state}</b></td><td>{}</td><td>{} of {}</td>\
                     <td>{} of {}</td><td>{} of {}</td><td>{}</td><td>{seen}</td>{gossip}<td>{}</td></tr>",
                    esc(&n.name),
                    match &n.http_error {
                        None => esc(&f.http_addr),
                        Some(e) => format!(
                            "{} <small>(not used: {})</small>",
                            esc(&f.http_addr),
                            esc(e)
                        ),
                    },
                    format_size(f.memory_committed),
                    format_size(f.memory_allocatable),
                    f.env_count,
                    f.max_envs,
                    f.aio_committed,
                    f.aio_max.saturating_sub(f.aio_in_use),
                    esc(&f.storage_driver),
                    esc(&f.version)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "<tr{class}><td>{}{me}</td><td><b>{state}</b></td><td colspan=\"6\">facts unreadable: {}</td><td>{seen}</td>{gossip}</tr>",
                    esc(&n.name),
                    esc(n.facts_error.as_deref().unwrap_or("none yet"))
                );
            }
        }
    }
    out.push_str("</tbody></table></div>\n<h2>Environments</h2>\n");
    if envs.is_empty() {
        out.push_str("<p>None.</p>\n");
    } else {
        out.push_str(&env_rows(envs, now, true));
    }
    let _ = writeln!(
        out,
        "<h2>Mail (this node)</h2>\n<p>Delivery: {} · queued: {}{}</p>",
        esc(&mail.transport),
        mail.pending,
        mail.last_error
            .as_ref()
            .map(|e| format!(
                " · last error: <span class=\"error-text\">{}</span>",
                esc(e)
            ))
            .unwrap_or_default()
    );
    out
}

/// The sign-in page: paste a token.
pub fn signin(error: Option<&str>, next: &str, csrf: &Csrf) -> String {
    let mut out = String::from(
        "<h1>Sign in</h1>\n<p class=\"lead\">Paste the token an operator gave you \
         (<code>shoal token issue</code>). It stays in this browser as a cookie until it \
         expires or you sign out.</p>\n",
    );
    if let Some(e) = error {
        let _ = writeln!(out, "<p class=\"error\" role=\"alert\">{}</p>", esc(e));
    }
    out.push_str(&post_form(
        "/signin",
        csrf,
        None,
        "class=\"request\"",
        &format!(
            "<input type=\"hidden\" name=\"next\" value=\"{}\">\
             <label for=\"token\">Token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" required autocomplete=\"off\" spellcheck=\"false\">\n\
             <button type=\"submit\" id=\"signin\">Sign in</button>",
            esc(next)
        ),
    ));
    out.push('\n');
    out
}

/// A page that says something was done (a mail link used without a
/// sign-in).
pub fn done(title: &str, text: &str) -> String {
    format!(
        "<h1>{}</h1>\n<p class=\"notice\" role=\"status\">{}</p>\n",
        esc(title),
        esc(text)
    )
}

/// A page for an error (not found, refused).
pub fn message(title: &str, text: &str) -> String {
    format!(
        "<h1>{}</h1>\n<p class=\"error\" role=\"alert\">{}</p>\n<p><a href=\"/\">Back to the catalog</a></p>\n",
        esc(title),
        esc(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, LoadProgress};
    use time::macros::datetime;

    fn rec(status: EnvStatus) -> EnvRecord {
        EnvRecord {
            id: "e1".into(),
            image: "erp:2".parse().unwrap(),
            owner: "<b>o</b>@example.com".into(),
            node: "n1".into(),
            status,
            error: None,
            memory: 256 << 20,
            aio: 0,
            env: Default::default(),
            created_at: datetime!(2025-01-01 0:00 UTC),
            ready_at: None,
            endpoints: vec![Endpoint {
                port: 8080,
                host: "127.0.0.1".into(),
                host_port: 40001,
            }],
            load: LoadProgress {
                layers_total: 3,
                layers_cached: 1,
                bytes_needed: 100 << 20,
                bytes_done: 25 << 20,
            },
            container: None,
            expires_at: Some(datetime!(2025-01-02 0:00 UTC)),
        }
    }

    fn csrf() -> Csrf {
        let keys = crate::keyring::Keyring::from_keys(vec![[7; 32]])
            .unwrap()
            .web_keys();
        super::super::session::csrf(&keys, "token:t1", 1_800_000_000)
    }

    /// Every `<form method="post"` of a page carries the CSRF field first.
    fn every_post_form_has_the_token(html: &str, csrf: &Csrf) -> usize {
        let want = format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            esc(csrf.as_str())
        );
        let open = ["<form method=", "\"post\""].concat();
        let forms: Vec<&str> = html.split(&open).skip(1).collect();
        for f in &forms {
            let (_, rest) = f.split_once('>').unwrap();
            assert!(rest.starts_with(&want), "a form without the token: {f}");
        }
        forms.len()
    }

    #[test]
    fn post_forms_are_written_in_one_place_and_carry_the_token() {
        // The only literal post form in this file is post_form's.
        let src = include_str!("pages.rs");
        let needle = ["<form method=", "\\\"post"].concat();
        assert_eq!(
            src.matches(&needle).count(),
            1,
            "a post form outside post_form"
        );
        let c = csrf();
        let now = datetime!(2025-01-01 1:00 UTC);
        let r = rec(EnvStatus::Ready);
        let may = Actions {
            extend: true,
            ret: true,
            csrf: &c,
        };
        let ttls = ttl_choices(Duration::from_secs(3600), Duration::from_secs(7200));
        let frame = Frame {
            signed: Some(Signed {
                user: "li@lab",
                operator: false,
                cookie: true,
                csrf: &c,
            }),
            title: "t",
            node: "n1",
            nav: "",
            head: String::new(),
        };
        let pages = [
            (
                page(&frame, &env_page(&r, None, &ttls, 1, None, &may, now)),
                2,
            ),
            (return_confirm(&r, &c, Some("CAP<")), 1),
            (extend_confirm(&r, &ttls, &c, None, now), 1),
            (signin(None, "/my", &c), 1),
        ];
        for (html, n) in &pages {
            assert_eq!(every_post_form_has_the_token(html, &c), *n, "{html}");
        }
        assert!(pages[1].0.contains("name=\"cap\" value=\"CAP&lt;\""));
        // Nothing to do, no form.
        let none = Actions {
            extend: false,
            ret: false,
            csrf: &c,
        };
        let html = env_page(&r, None, &ttls, 1, None, &none, now);
        assert!(
            !html.contains("<form") && !html.contains("id=\"return\""),
            "{html}"
        );
    }

    #[test]
    fn escapes_everything_put_in_a_page() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let now = datetime!(2025-01-01 1:00 UTC);
        let c = csrf();
        let may = Actions {
            extend: true,
            ret: true,
            csrf: &c,
        };
        let html = env_page(
            &rec(EnvStatus::Ready),
            Some("<why>"),
            &[],
            1,
            None,
            &may,
            now,
        );
        assert!(
            !html.contains("<b>o</b>") && !html.contains("<why>"),
            "{html}"
        );
    }

    #[test]
    fn loading_shows_bytes_bar_and_estimate() {
        let now = datetime!(2025-01-01 0:01 UTC);
        let html = env_live(&rec(EnvStatus::Loading), None, 25 << 20, now);
        assert!(html.contains("25MiB of 100MiB"), "{html}");
        assert!(
            html.contains("<progress max=\"104857600\" value=\"26214400\""),
            "{html}"
        );
        assert!(html.contains("25% · about 3s left"), "{html}");
        assert!(html.contains("class=\"current\" aria-current=\"step\"><span class=\"mark\" aria-hidden=\"true\">…</span>Loading"), "{html}");
        assert!(!html.contains("class=\"endpoint\""));
    }

    #[test]
    fn ready_shows_endpoint_links_and_expiry() {
        let now = datetime!(2025-01-01 1:00 UTC);
        let html = env_live(&rec(EnvStatus::Ready), None, 1, now);
        assert!(
            html.contains("<a class=\"endpoint\" href=\"http://127.0.0.1:40001/\">"),
            "{html}"
        );
        assert!(
            html.contains("2025-01-02 00:00 UTC</time> <small>(in 23h)</small>"),
            "{html}"
        );
        assert!(!html.contains("<progress"));
    }

    #[test]
    fn dead_nodes_and_lost_envs_stand_out() {
        use crate::cluster::{NodeFacts, NodeView};
        let node = |name: &str, alive: bool| NodeView {
            name: name.into(),
            facts: Some(NodeFacts {
                name: name.into(),
                http_addr: format!("{name}:7070"),
                ..Default::default()
            }),
            facts_error: None,
            http_error: None,
            alive,
            left: false,
            is_self: name == "n1",
            generation: 1,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            heartbeat: 1,
            last_seen: None,
            phi: None,
            state_bytes: 0,
        };
        let mut frozen = node("n3", true);
        if let Some(f) = frozen.facts.as_mut() {
            f.engine = crate::cluster::keys::EngineState::Hung;
        }
        let mut dead = node("n2", false);
        dead.last_seen = Some(Duration::from_secs(42));
        dead.heartbeat = 17;
        dead.phi = Some(63.84);
        dead.state_bytes = 640;
        let view = ClusterView {
            self_name: "n1".into(),
            nodes: vec![node("n1", true), dead, frozen],
        };
        let mut lost = rec(EnvStatus::Lost);
        lost.node = "n2".into();
        let mail = MailLine {
            transport: "smtp://mail:25".into(),
            pending: 2,
            last_error: Some("connection refused".into()),
        };
        let html = cluster(&view, &[lost], &mail, datetime!(2025-01-01 0:00 UTC));
        assert!(
            html.contains("1 node(s) dead, 1 environment(s) lost"),
            "{html}"
        );
        assert!(
            html.contains("<tr class=\"dead\"><td>n2</td><td><b>DEAD</b>"),
            "{html}"
        );
        assert!(
            html.contains("<tr><td>n1 <small>(this node)</small></td><td><b>alive</b>"),
            "{html}"
        );
        assert!(html.contains("<tr class=\"lost\">"), "{html}");
        // The gossip detail: last seen, heartbeat, phi, state bytes.
        assert!(
            html.contains("<td>42s ago</td><td>17</td><td>63.8</td><td>640 B</td>"),
            "{html}"
        );
        assert!(
            html.contains("<tr class=\"warn\"><td>n3</td><td><b>engine hung</b>"),
            "{html}"
        );
        assert!(
            html.contains("queued: 2") && html.contains("connection refused"),
            "{html}"
        );
    }

    #[test]
    fn ttl_choices_respect_the_maximum() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        let names = |v: Vec<(String, bool)>| {
            v.into_iter()
                .map(|(s, d)| format!("{s}{}", if d { "*" } else { "" }))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(ttl_choices(h(24), h(99))),
            ["1h", "4h", "8h", "1d*", "2d", "3d", "4d3h"]
        );
        assert_eq!(names(ttl_choices(h(2), h(6))), ["1h", "2h*", "4h", "6h"]);
    }

    #[test]
    fn catalog_groups_products_newest_first() {
        let img = |name: &str, build: &str, at: OffsetDateTime| ImageInfo {
            name: name.into(),
            build: build.into(),
            image_ref: format!("{name}:{build}"),
            image_id: "sha256:0".into(),
            size: 1 << 30,
            compressed_size: 1,
            layers: 1,
            requirements: Default::default(),
            exposed_ports: vec![],
            healthcheck: false,
            published_at: at,
        };
        let now = datetime!(2025-01-03 0:00 UTC);
        let html = catalog(
            &[
                img("erp", "1", datetime!(2025-01-01 0:00 UTC)),
                img("db", "7", datetime!(2025-01-01 0:00 UTC)),
                img("erp", "2", datetime!(2025-01-02 0:00 UTC)),
            ],
            &ttl_choices(Duration::from_secs(86400), Duration::from_secs(99 * 3600)),
            &FormValues::default(),
            None,
            &Requester {
                user: "li@lab",
                operator: false,
                csrf: &csrf(),
            },
            now,
        );
        let pos = |s: &str| html.find(s).unwrap_or_else(|| panic!("{s} missing"));
        assert!(pos("id=\"p-db\"") < pos("id=\"p-erp\""));
        assert!(pos("<code>2</code>") < pos("<code>1</code>"));
        assert!(html.contains("1d ago") && html.contains("1GiB"), "{html}");
        assert!(html.contains("<option value=\"1d\" selected>"), "{html}");
        // A tester has no owner field: the environment is theirs.
        assert!(!html.contains("name=\"owner\"") && html.contains("For <b>li@lab</b>"));
        assert_eq!(every_post_form_has_the_token(&html, &csrf()), 2);
    }
}
