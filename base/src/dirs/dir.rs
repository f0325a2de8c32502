//! [`Dir`]: a directory held open, and everything freezetrap does beneath one — subdirectories
//! and files created exclusively, files appended to without following links, listings, sizes
//! and removals that never follow a symlink.

use super::trust::{check_final, walk_to_parent, Owners};
use super::{c_name, cvt, euid, fstat, is_dir, is_regular, lstatat, openat};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A directory held open: every file freezetrap makes is created relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory `path` for a process that may run as root: every directory from `/`
    /// down must be owned by root or `owners.also` and not writable by group or others (a
    /// root-owned sticky directory such as `/tmp` is accepted above it); `path` itself must be
    /// owned by one of `owners`, not writable by group or others, and not a symbolic link.
    /// With `create`, a missing final directory is created (mode 0700).
    pub fn open_trusted(path: &Path, owners: Owners, create: bool) -> Result<Dir, String> {
        let (parent, parent_path, name) = walk_to_parent(path, owners)?;
        let full = parent_path.join(&name);
        if create {
            let c = c_name(&name).map_err(|e| e.to_string())?;
            // SAFETY: valid descriptor and NUL-terminated name.
            let r = unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o700) };
            if r != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(format!("{} cannot be created ({e})", full.display()));
                }
            }
        }
        let fd = openat(
            parent.as_raw_fd(),
            &name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                format!("{} is a symbolic link or not a directory", full.display())
            }
            _ => format!("{} cannot be opened ({e})", full.display()),
        })?;
        let st = fstat(fd.as_raw_fd())
            .map_err(|e| format!("{} cannot be read ({e})", full.display()))?;
        check_final("directory", &full, &st, owners)?;
        Ok(Dir { fd, path: full })
    }

    /// Opens the directory that holds the file `path`, checking it and every directory above it
    /// as [`Dir::open_trusted`] checks the directories *above* its target (so a root-owned
    /// sticky directory such as `/tmp` is accepted: files in it are then created or opened
    /// without following links and checked for their owner). The handle is for `*at` calls
    /// only (it cannot list entries).
    pub fn open_parent_of(path: &Path, owners: Owners) -> Result<Dir, String> {
        let (fd, path, _) = walk_to_parent(path, owners)?;
        Ok(Dir { fd, path })
    }

    /// Opens (creating it, mode 0700, with its parents if missing) a directory that must be
    /// private to this process's user: owned by the effective user, not writable by group or
    /// others, and not a symbolic link. This is the rule for `FREEZETRAP_OUT`; the directories
    /// above it are not checked here (see [`Dir::open_trusted`] for a process that runs as root).
    pub fn open_private(path: &Path) -> Result<Dir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::path::absolute(path)
            .map_err(|e| format!("{} cannot be made absolute ({e})", path.display()))?;
        let name = path
            .file_name()
            .ok_or_else(|| format!("{} has no final component", path.display()))?
            .to_os_string();
        if std::fs::symlink_metadata(&path).is_err() {
            // Missing: create it (and its parents) private. A concurrent creator is caught by
            // the owner check below.
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path);
        }
        let parent = path.parent().unwrap_or(Path::new("/"));
        let pfd = openat(
            libc::AT_FDCWD,
            parent.as_os_str(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| format!("{} cannot be opened ({e})", parent.display()))?;
        let fd = openat(
            pfd.as_raw_fd(),
            &name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                "it is a symbolic link or not a directory".to_string()
            }
            _ => format!("it cannot be opened ({e})"),
        })?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| format!("it cannot be read ({e})"))?;
        let me = euid();
        if st.st_uid != me {
            return Err(format!(
                "it is owned by uid {}, not by this process's user (uid {me})",
                st.st_uid
            ));
        }
        let mode = st.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(format!(
                "it is writable by group or others (mode {mode:o}): make it 0700"
            ));
        }
        Ok(Dir { fd, path })
    }

    /// The path this directory was opened by (for messages and for handing to a helper).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The descriptor, for a process that uses it with `*at` calls of its own.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Deletes the oldest subdirectories (by modification time) whose names start with
    /// `prefix` until they total at most `max_bytes`, never `keep` (the capture just written).
    /// Returns the bytes removed; stops at the first directory it cannot remove. By handle:
    /// nothing below is followed through a symlink.
    pub fn enforce_byte_cap(
        &self,
        prefix: &str,
        max_bytes: u64,
        keep: Option<&OsStr>,
    ) -> io::Result<u64> {
        let mut dirs: Vec<(i64, std::ffi::OsString, u64)> = self
            .entries()?
            .into_iter()
            .filter(|e| e.is_dir && e.name.as_bytes().starts_with(prefix.as_bytes()))
            .map(|e| {
                let bytes = e
                    .name
                    .to_str()
                    .and_then(|n| self.open_dir(n).ok())
                    .map_or(0, |d| d.tree_bytes());
                (e.mtime, e.name, bytes)
            })
            .collect();
        dirs.sort();
        let mut total: u64 = dirs.iter().map(|d| d.2).sum();
        let mut removed = 0;
        for (_, name, bytes) in dirs {
            if total <= max_bytes {
                break;
            }
            if Some(name.as_os_str()) == keep {
                continue;
            }
            self.remove_tree(&name)?;
            total -= bytes;
            removed += bytes;
        }
        Ok(removed)
    }

    /// Another handle on the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Creates the subdirectory `name` exclusively (an existing entry of that name, symlink or
    /// not, is an error) and opens it.
    pub fn create_dir(&self, name: &str, mode: libc::mode_t) -> io::Result<Dir> {
        let c = c_name(OsStr::new(name))?;
        // SAFETY: valid descriptor and NUL-terminated name.
        cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), c.as_ptr(), mode) })?;
        self.open_dir(name)
    }

    /// Opens the subdirectory `name` without following a symbolic link.
    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        let fd = openat(
            self.fd.as_raw_fd(),
            OsStr::new(name),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        Ok(Dir {
            fd,
            path: self.path.join(name),
        })
    }

    /// Creates the file `name` exclusively, mode 0600: never follows a symlink, never opens
    /// something that was already there.
    pub fn create_file(&self, name: &str) -> io::Result<File> {
        let fd = openat(
            self.fd.as_raw_fd(),
            OsStr::new(name),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )?;
        Ok(File::from(fd))
    }

    /// [`Dir::create_file`] and write `bytes` into it.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        self.create_file(name)?.write_all(bytes)
    }

    /// Opens `name` for appending, creating it (0600) if missing: never through a symbolic link,
    /// never a FIFO or device (opened non-blocking, then checked), and only a regular file owned
    /// by this process's user.
    pub fn open_append(&self, name: &str) -> io::Result<File> {
        let fd = openat(
            self.fd.as_raw_fd(),
            OsStr::new(name),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0o600,
        )?;
        let st = fstat(fd.as_raw_fd())?;
        if !is_regular(&st) {
            return Err(io::Error::other(format!("{name} is not a regular file")));
        }
        if st.st_uid != euid() {
            return Err(io::Error::other(format!(
                "{name} is owned by uid {}, not by this process's user",
                st.st_uid
            )));
        }
        // SAFETY: fcntl on a descriptor we own; clearing O_NONBLOCK only.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
        Ok(File::from(fd))
    }

    /// The entries of this directory (not `.` and `..`), each with its own metadata (never a
    /// symlink's target).
    pub fn entries(&self) -> io::Result<Vec<Entry>> {
        let dup = self.fd.try_clone()?;
        // SAFETY: fdopendir takes ownership of `dup` (we release it here); the stream is closed
        // below, and `readdir`'s entries are copied out before the next call.
        unsafe {
            let raw = dup.as_raw_fd();
            let dirp = libc::fdopendir(raw);
            if dirp.is_null() {
                return Err(io::Error::last_os_error());
            }
            std::mem::forget(dup);
            // The duplicate shares the file offset with our handle: start from the top.
            libc::rewinddir(dirp);
            let mut out = Vec::new();
            loop {
                let e = libc::readdir(dirp);
                if e.is_null() {
                    break;
                }
                let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
                let name = OsStr::from_bytes(name.to_bytes());
                if name == "." || name == ".." {
                    continue;
                }
                if let Ok(st) = lstatat(raw, name) {
                    out.push(Entry {
                        name: name.to_os_string(),
                        is_dir: is_dir(&st),
                        mtime: st.st_mtime,
                        bytes: if is_regular(&st) {
                            st.st_size as u64
                        } else {
                            0
                        },
                    });
                }
            }
            libc::closedir(dirp);
            Ok(out)
        }
    }

    /// Bytes of the regular files below this directory, subdirectories included (symlinks are
    /// not followed).
    pub fn tree_bytes(&self) -> u64 {
        self.tree_bytes_at(0)
    }

    fn tree_bytes_at(&self, depth: u32) -> u64 {
        let Ok(entries) = self.entries() else {
            return 0;
        };
        entries
            .iter()
            .map(|e| match (e.is_dir, e.name.to_str()) {
                (true, Some(n)) if depth < MAX_DEPTH => self
                    .open_dir(n)
                    .map(|d| d.tree_bytes_at(depth + 1))
                    .unwrap_or(0),
                _ => e.bytes,
            })
            .sum()
    }

    /// Removes the entry `name` and, for a directory, everything below it, by handle: a symlink
    /// is removed, never followed.
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        self.remove_tree_at(name, 0)
    }

    fn remove_tree_at(&self, name: &OsStr, depth: u32) -> io::Result<()> {
        let st = lstatat(self.fd.as_raw_fd(), name)?;
        let c = c_name(name)?;
        if is_dir(&st) {
            if depth >= MAX_DEPTH {
                return Err(io::Error::other("directory tree too deep to remove"));
            }
            let sub = Dir {
                fd: openat(
                    self.fd.as_raw_fd(),
                    name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?,
                path: self.path.join(name),
            };
            for e in sub.entries()? {
                sub.remove_tree_at(&e.name, depth + 1)?;
            }
            // SAFETY: valid descriptor and NUL-terminated name.
            cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })?;
        } else {
            // SAFETY: as above.
            cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) })?;
        }
        Ok(())
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How deep [`Dir::remove_tree`] and [`Dir::tree_bytes`] go (capture directories are flat).
const MAX_DEPTH: u32 = 8;

/// One directory entry, as seen without following symlinks.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its name.
    pub name: std::ffi::OsString,
    /// A directory (not a symlink to one).
    pub is_dir: bool,
    /// Last modification, seconds since the epoch.
    pub mtime: i64,
    /// Size of a regular file, else 0.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ft-dirs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_are_created_exclusively_and_never_through_a_symlink() {
        let d = scratch("excl");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("helper.log")).unwrap();
        let dir = Dir::open_private(&d).unwrap();
        assert!(dir.create_file("helper.log").is_err(), "a planted symlink");
        assert!(
            dir.open_append("helper.log").is_err(),
            "a planted symlink, appending"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        dir.write_file("new", b"x").unwrap();
        assert!(dir.write_file("new", b"y").is_err(), "never overwritten");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.join("new"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A FIFO is refused without blocking.
        let fifo = std::ffi::CString::new(d.join("fifo").as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(dir.open_append("fifo").is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_private_directory_must_be_ours_and_closed() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("private");
        let sub = d.join("open");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Dir::open_private(&sub).unwrap_err();
        assert!(e.contains("writable by group or others (mode 777)"), "{e}");
        std::os::unix::fs::symlink(&d, d.join("link")).unwrap();
        let e = Dir::open_private(&d.join("link")).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let made = Dir::open_private(&d.join("a/b")).unwrap();
        let mode = std::fs::metadata(made.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn trees_are_measured_and_removed_by_handle() {
        let d = scratch("tree");
        std::fs::create_dir_all(d.join("cap/sub")).unwrap();
        std::fs::write(d.join("cap/a"), vec![0u8; 100]).unwrap();
        std::fs::write(d.join("cap/sub/b"), vec![0u8; 50]).unwrap();
        let outside = scratch("tree-outside");
        std::fs::write(outside.join("keep"), b"k").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("cap/link")).unwrap();
        let dir = Dir::open_private(&d).unwrap();
        assert_eq!(dir.open_dir("cap").unwrap().tree_bytes(), 150);
        dir.remove_tree(OsStr::new("cap")).unwrap();
        assert!(!d.join("cap").exists());
        assert!(
            outside.join("keep").exists(),
            "a symlink is removed, not followed"
        );
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn the_byte_cap_removes_the_oldest_matching_directories_and_keeps_the_newest() {
        let d = scratch("cap");
        for (i, name) in ["stall-1-9", "stall-2-9", "stall-3-9"].iter().enumerate() {
            let sub = d.join(name).join("sub");
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join("offcpu.folded"), vec![b'x'; 1000]).unwrap();
            let t =
                std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i as u64 * 10);
            File::open(d.join(name)).unwrap().set_modified(t).unwrap();
        }
        std::fs::write(d.join("report.jsonl"), vec![b'y'; 5000]).unwrap();
        let dir = Dir::open_private(&d).unwrap();
        assert_eq!(dir.enforce_byte_cap("stall-", 2000, None).unwrap(), 1000);
        assert!(!d.join("stall-1-9").exists());
        assert!(d.join("stall-2-9").exists() && d.join("stall-3-9").exists());
        assert!(d.join("report.jsonl").exists(), "not a capture");
        dir.enforce_byte_cap("stall-", 10, Some(OsStr::new("stall-3-9")))
            .unwrap();
        assert!(!d.join("stall-2-9").exists() && d.join("stall-3-9").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
