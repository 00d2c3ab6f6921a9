//! `infergate-node-agent enter-container`: the last step of starting a container from an image,
//! what runc's init does once the root filesystem is mounted. It runs as root inside the pod's
//! network and mount namespaces, changes root into the container's filesystem, goes to the
//! image's working directory, takes the container's user, group and supplementary groups, and
//! executes the entrypoint, which keeps this process' PID (the agent signals and waits on it).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "infergate-node-agent enter-container")]
pub struct Enter {
    /// The container's root filesystem, mounted.
    #[arg(long)]
    root: PathBuf,
    /// The working directory, inside the root.
    #[arg(long, default_value = "/")]
    workdir: PathBuf,
    /// `UID:GID` to run as; root when absent.
    #[arg(long, value_parser = parse_user)]
    user: Option<(u32, u32)>,
    /// Supplementary groups (the pod's fsGroup).
    #[arg(long = "group")]
    groups: Vec<u32>,
    /// The entrypoint and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<OsString>,
}

fn parse_user(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: expected UID:GID"))?;
    Ok((
        uid.parse().map_err(|e| format!("{uid:?}: {e}"))?,
        gid.parse().map_err(|e| format!("{gid:?}: {e}"))?,
    ))
}

/// Replaces this process with the container's entrypoint; returns only on failure.
pub fn run(enter: Enter) -> anyhow::Result<()> {
    std::os::unix::fs::chroot(&enter.root)?;
    std::env::set_current_dir("/")?;
    std::env::set_current_dir(&enter.workdir)
        .map_err(|e| anyhow::anyhow!("working directory {}: {e}", enter.workdir.display()))?;
    if let Some((uid, gid)) = enter.user {
        drop_to(uid, gid, &enter.groups)?;
    }
    // PATH is the container's (the agent set the environment), so a bare name is looked up in
    // the image, as execvp does in a container.
    let error = std::process::Command::new(&enter.argv[0])
        .args(&enter.argv[1..])
        .exec();
    Err(anyhow::anyhow!(
        "executing {}: {error}",
        enter.argv[0].to_string_lossy()
    ))
}

/// Groups first, then the group, then the user: each step needs the privilege the next drops.
#[expect(
    unsafe_code,
    reason = "std sets a user and group but not supplementary groups (fsGroup)"
)]
fn drop_to(uid: u32, gid: u32, groups: &[u32]) -> std::io::Result<()> {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let check = |result: libc::c_int| match result {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    // SAFETY: plain system calls on this single-threaded process (there are no other threads
    // yet), with a pointer and length from a live Vec.
    unsafe {
        check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    Ok(())
}
