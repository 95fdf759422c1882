//! cloud-init `#cloud-config` for Debian/Ubuntu boxes
//! (cloud-config/shoal.yaml): the same model as the Flatcar files, laid out
//! the Debian way (binary under /usr/local/bin, Docker and the NFS client
//! from apt, units started by `runcmd`).

use serde::Serialize;

use super::model::{Contents, Model, DATA_DIR, STORE_MOUNT};
use super::BootstrapError;

#[derive(Serialize)]
struct CloudConfig<'a> {
    hostname: &'a str,
    fqdn: &'a str,
    manage_etc_hosts: bool,
    ssh_authorized_keys: &'a [String],
    write_files: Vec<WriteFile<'a>>,
    runcmd: Vec<Vec<String>>,
}

#[derive(Serialize)]
struct WriteFile<'a> {
    path: String,
    permissions: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<&'static str>,
    content: &'a str,
}

fn header(m: &Model) -> String {
    let secret = m
        .files
        .iter()
        .any(|f| f.secret && matches!(f.contents, Contents::Inline(_)));
    let key = if secret {
        "# It carries the cluster key inline: treat this file as a secret.\n"
    } else {
        "# The cluster key is fetched at first boot (runcmd); this file holds no secret.\n"
    };
    format!(
        "#cloud-config\n\
         #\n\
         # Bootstrap one new Debian/Ubuntu box into a shoal cluster. Rendered by\n\
         #   shoal bootstrap render --format cloud-init cloud-config/bootstrap.example.toml\n\
         # from the same model as flatcar.bu and flatcar.ign: edit the bootstrap\n\
         # config and render again rather than editing this file (docs/bootstrap.md).\n\
         #\n\
         # What it does: host name, ssh key, static network (systemd-networkd), the\n\
         # shoal config and cluster key, fs.aio-max-nr (the seed's failure #5), the\n\
         # NFS image store at {STORE_MOUNT}, Docker, the shoal binary (its SHA-512\n\
         # checked), and shoal.service enabled and started. The unit and sysctl\n\
         # files are systemd/shoal.service and systemd/shoal-aio.conf.\n\
         {key}\n"
    )
}

pub fn render(m: &Model) -> Result<String, BootstrapError> {
    let mut write_files = Vec::new();
    let mut fetch = Vec::new();
    for f in &m.files {
        match &f.contents {
            Contents::Inline(t) => write_files.push(WriteFile {
                path: f.path.clone(),
                permissions: format!("{:04o}", f.mode),
                owner: f.secret.then_some("root:root"),
                content: t,
            }),
            Contents::Remote { url, sha512 } => fetch.push(fetch_cmd(&f.path, f.mode, url, sha512)),
        }
    }
    for u in &m.units {
        let dir = "/etc/systemd/system";
        if let Some(c) = &u.contents {
            write_files.push(WriteFile {
                path: format!("{dir}/{}", u.name),
                permissions: "0644".into(),
                owner: None,
                content: c,
            });
        }
        for (name, c) in &u.dropins {
            write_files.push(WriteFile {
                path: format!("{dir}/{}.d/{name}", u.name),
                permissions: "0644".into(),
                owner: None,
                content: c,
            });
        }
    }
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut runcmd = vec![
        words(&["sysctl", "--system"]),
        words(&["systemctl", "enable", "--now", "systemd-networkd"]),
        // Docker and the NFS client from the distribution (Flatcar ships Docker).
        words(&[
            "sh",
            "-c",
            "command -v dockerd >/dev/null || { apt-get update && apt-get install -y docker.io nfs-common; }",
        ]),
        words(&["mkdir", "-p", DATA_DIR, STORE_MOUNT]),
    ];
    runcmd.extend(fetch);
    runcmd.push(words(&["systemctl", "daemon-reload"]));
    for u in m.units.iter().filter(|u| u.enabled) {
        runcmd.push(words(&["systemctl", "enable", "--now", &u.name]));
    }
    let cc = CloudConfig {
        hostname: &m.hostname,
        fqdn: &m.hostname,
        manage_etc_hosts: true,
        ssh_authorized_keys: &m.ssh_keys,
        write_files,
        runcmd,
    };
    let yaml = serde_yaml_ng::to_string(&cc).map_err(|e| BootstrapError::Render(e.to_string()))?;
    Ok(format!("{}{yaml}", header(m)))
}

/// A `runcmd` entry that downloads `url` to `path` (through `path.new`,
/// its SHA-512 checked when given) with `mode`.
fn fetch_cmd(path: &str, mode: u32, url: &str, sha512: &Option<String>) -> Vec<String> {
    // The model checked the URL (no quotes, blanks, `$`).
    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
    let new = format!("{path}.new");
    let mut s = format!("umask 077 && mkdir -p {dir} && curl -fsSL '{url}' -o {new}");
    if let Some(h) = sha512 {
        s.push_str(&format!(" && echo '{h}  {new}' | sha512sum -c --quiet -"));
    }
    s.push_str(&format!(" && chmod {mode:04o} {new} && mv {new} {path}"));
    vec!["sh".into(), "-c".into(), s]
}
