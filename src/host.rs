//! Facts about this host that admission and the cluster need: total memory
//! and the Linux AIO limits. Read from `/proc` and sysinfo; nothing cached.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: `{value}` is not a number")]
    Parse { path: String, value: String },
}

/// Bytes an unprivileged writer can still put on the filesystem of `path`.
pub fn disk_free(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Whether an I/O error means the filesystem is full (or over quota).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == nix::libc::ENOSPC || c == nix::libc::EDQUOT)
        || e.kind() == std::io::ErrorKind::StorageFull
}

/// Total physical memory, bytes.
pub fn total_memory() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.total_memory()
}

/// Reads one number from a `/proc/sys` file.
fn read_number(path: &Path) -> Result<u64, HostError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostError::Read {
        path: path.display().to_string(),
        source,
    })?;
    text.trim().parse().map_err(|_| HostError::Parse {
        path: path.display().to_string(),
        value: text.trim().to_string(),
    })
}

/// `fs.aio-max-nr` and `fs.aio-nr`: the host's AIO context limit and how
/// many are in use by the host and all its containers together.
pub fn aio() -> Result<(u64, u64), HostError> {
    Ok((
        read_number(Path::new("/proc/sys/fs/aio-max-nr"))?,
        read_number(Path::new("/proc/sys/fs/aio-nr"))?,
    ))
}

/// What is known to limit a storage driver (the seed lost images to an
/// overlay driver that could not write files over 2.5 GB). Advisory lines
/// shown by `GET /v1/node`.
pub fn storage_notes(driver: &str, containerd_store: bool) -> Vec<String> {
    let mut notes = Vec::new();
    match driver {
        "overlay" => notes.push(
            "legacy overlay driver: known problems with many layers and large files; prefer overlay2".into(),
        ),
        "fuse-overlayfs" => notes.push(
            "fuse-overlayfs: userspace driver, slower for large writes and image loads than overlay2".into(),
        ),
        "vfs" => notes.push("vfs: every layer is a full copy; loads are slow and disks fill fast".into()),
        "devicemapper" => notes.push(
            "devicemapper: container root filesystems are capped by dm.basesize (10 GB by default)".into(),
        ),
        _ => {}
    }
    if containerd_store {
        notes.push(
            "containerd image store: a failed thin load shows only as `Error unpacking image`"
                .into(),
        );
    }
    notes
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_host_facts() {
        assert!(super::total_memory() > 0);
        let (max, used) = super::aio().unwrap();
        assert!(max > 0 && used <= max);
    }
}
