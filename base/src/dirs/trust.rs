//! The ownership checks for anything a process that may be root opens or runs: every directory
//! on the way from `/`, walked by handle, and the executables it starts.

use super::{euid, fstat, is_regular, openat};
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Who may own what freezetrap trusts: root, plus optionally one more user (the service's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owners {
    /// A user trusted besides root (`None`: root only).
    pub also: Option<u32>,
}

impl Owners {
    /// Root only (what a root-run capture tool trusts).
    pub const ROOT: Owners = Owners { also: None };

    /// Root and this process's effective user.
    pub fn root_or_me() -> Owners {
        Owners { also: Some(euid()) }
    }

    pub(crate) fn allows(&self, uid: u32) -> bool {
        uid == 0 || self.also == Some(uid)
    }

    pub(crate) fn describe(&self) -> String {
        match self.also {
            Some(u) if u != 0 => format!("neither root nor this process's user (uid {u})"),
            _ => "not root".to_string(),
        }
    }
}

/// Checks one directory on the way to a path: trusted owner, and not writable by group or
/// others unless it is root's and sticky (only allowed above the final component).
pub(crate) fn check_ancestor(path: &Path, st: &libc::stat, owners: Owners) -> Result<(), String> {
    if !owners.allows(st.st_uid) {
        return Err(format!(
            "{} is owned by uid {}, {}",
            path.display(),
            st.st_uid,
            owners.describe()
        ));
    }
    let mode = st.st_mode & 0o7777;
    let sticky_root = st.st_uid == 0 && mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && !sticky_root {
        return Err(format!(
            "{} is writable by group or others (mode {mode:o})",
            path.display()
        ));
    }
    Ok(())
}

/// Checks the final object of a trusted path: owner, and not writable by group or others.
pub(crate) fn check_final(
    what: &str,
    path: &Path,
    st: &libc::stat,
    owners: Owners,
) -> Result<(), String> {
    if !owners.allows(st.st_uid) {
        return Err(format!(
            "{what} {} is owned by uid {}, {}",
            path.display(),
            st.st_uid,
            owners.describe()
        ));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "{what} {} is writable by group or others (mode {mode:o}): anyone could replace what is in it",
            path.display()
        ));
    }
    Ok(())
}

/// Opens `path`'s parent by walking from `/`, checking every directory on the way, and returns
/// the parent's handle and the final component's name. The parent path is canonicalized first
/// (so `..` and symlinks the caller chose are resolved once), then every component is opened
/// with `O_NOFOLLOW` relative to the one before: if anything changes between the two, the walk
/// fails instead of following it.
pub(crate) fn walk_to_parent(
    path: &Path,
    owners: Owners,
) -> Result<(OwnedFd, PathBuf, std::ffi::OsString), String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} has no final component", path.display()))?
        .to_os_string();
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent = std::fs::canonicalize(parent)
        .map_err(|e| format!("{} cannot be resolved ({e})", parent.display()))?;
    let root = openat(
        libc::AT_FDCWD,
        OsStr::new("/"),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| format!("/ cannot be opened ({e})"))?;
    let st = fstat(root.as_raw_fd()).map_err(|e| format!("/ cannot be read ({e})"))?;
    check_ancestor(Path::new("/"), &st, owners)?;
    let mut fd = root;
    let mut so_far = PathBuf::from("/");
    for c in parent.components() {
        let Component::Normal(part) = c else { continue };
        so_far.push(part);
        let next = openat(
            fd.as_raw_fd(),
            part,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| {
            format!(
                "{} cannot be opened without following a link ({e})",
                so_far.display()
            )
        })?;
        let st = fstat(next.as_raw_fd())
            .map_err(|e| format!("{} cannot be read ({e})", so_far.display()))?;
        check_ancestor(&so_far, &st, owners)?;
        fd = next;
    }
    Ok((fd, so_far, name))
}

/// An executable opened once and checked, to be run from its handle (so replacing the path
/// later changes nothing).
#[derive(Debug)]
pub struct Executable {
    /// The open file (close-on-exec).
    pub fd: OwnedFd,
    /// Its canonical path.
    pub path: PathBuf,
    /// It starts with `#!`: the kernel runs its interpreter, which must read it by a path.
    pub is_script: bool,
}

/// Opens the executable `path` and checks it, and every directory above it, as something a
/// process that may be root will run: absolute, a regular file with an execute bit, owned by
/// one of `owners` and not writable by group or others; every directory above owned by one of
/// `owners` and not writable by group or others (root's sticky `/tmp` excepted). A `#!` script's
/// interpreter is checked the same way.
pub fn open_executable(path: &Path, owners: Owners) -> Result<Executable, String> {
    if !path.is_absolute() {
        return Err("it is not an absolute path".into());
    }
    let canonical = std::fs::canonicalize(path).map_err(|e| format!("it cannot be read ({e})"))?;
    let (parent, parent_path, name) = walk_to_parent(&canonical, owners)?;
    let full = parent_path.join(&name);
    let fd = openat(
        parent.as_raw_fd(),
        &name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )
    .map_err(|e| format!("it cannot be opened ({e})"))?;
    let st = fstat(fd.as_raw_fd()).map_err(|e| format!("it cannot be read ({e})"))?;
    if !is_regular(&st) {
        return Err("it is not a regular file".into());
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "it is group- or world-writable (mode {mode:o}): anyone could replace it"
        ));
    }
    if !owners.allows(st.st_uid) {
        return Err(format!(
            "it is owned by uid {}, neither root nor us (uid {})",
            st.st_uid,
            euid()
        ));
    }
    if mode & 0o111 == 0 {
        return Err("it is not executable".into());
    }
    let mut head = [0u8; 256];
    // SAFETY: pread into a valid local buffer of the given length.
    let n = unsafe { libc::pread(fd.as_raw_fd(), head.as_mut_ptr().cast(), head.len(), 0) };
    let head = &head[..n.max(0) as usize];
    let is_script = head.starts_with(b"#!");
    if is_script {
        let line = head[2..].split(|&b| b == b'\n').next().unwrap_or(&[]);
        let interp = line
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty())
            .ok_or("its #! line names no interpreter")?;
        let interp = Path::new(OsStr::from_bytes(interp));
        open_executable(interp, Owners::ROOT)
            .map_err(|why| format!("its interpreter {} is refused: {why}", interp.display()))?;
    }
    // SAFETY: fcntl on a descriptor we own; clearing O_NONBLOCK (set only so that opening a
    // FIFO planted at the path could not block) before the file is handed on.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
    }
    Ok(Executable {
        fd,
        path: full,
        is_script,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-trust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn executables_are_checked_with_every_directory_above() {
        assert!(open_executable(Path::new("/bin/sh"), Owners::root_or_me()).is_ok());
        assert_eq!(
            open_executable(Path::new("rel/x"), Owners::root_or_me()).unwrap_err(),
            "it is not an absolute path"
        );
        let d = scratch("exe");
        use std::os::unix::fs::PermissionsExt;
        let p = d.join("h.sh");
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let exe = open_executable(&p, Owners::root_or_me()).unwrap();
        assert!(exe.is_script);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_executable(&p, Owners::root_or_me()).unwrap_err();
        assert!(
            e.contains("is writable by group or others (mode 777)"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
