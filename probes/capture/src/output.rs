//! Writing a capture directory: the same four files whichever mode recorded the data, and the
//! byte cap over all of them (used by the armed recorder and by the watchdog's trigger).

use super::{folded, Maps};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What [`write_capture`] wrote.
#[derive(Debug)]
pub struct Written {
    /// Lines in `offcpu.folded`.
    pub offcpu_stacks: usize,
    /// Lines in `oncpu.folded`.
    pub oncpu_stacks: usize,
    /// Why there is no `offcpu.svg`, when there is none (no off-CPU stacks, or inferno failed).
    pub no_graph: Option<String>,
}

/// Writes `offcpu.folded`, `oncpu.folded`, `offcpu.svg` (when there are off-CPU stacks) and
/// `summary.json` into `dir`, which must exist. `title` heads the flame graph.
pub fn write_capture(
    dir: &Path,
    maps: &Maps,
    title: &str,
    summary: &impl Serialize,
) -> std::io::Result<Written> {
    let off = folded(maps.get("@off"));
    let on = folded(maps.get("@on"));
    let write = |name: &str, lines: &[String]| {
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(dir.join(name), text)
    };
    write("offcpu.folded", &off)?;
    write("oncpu.folded", &on)?;
    let json = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json)?;

    let mut svg = Vec::new();
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    opts.count_name = "us".into();
    opts.colors =
        inferno::flamegraph::color::Palette::Basic(inferno::flamegraph::color::BasicPalette::Io);
    let no_graph = if off.is_empty() {
        Some("no off-CPU stacks".to_string())
    } else {
        match inferno::flamegraph::from_lines(&mut opts, off.iter().map(String::as_str), &mut svg) {
            Ok(()) => {
                std::fs::write(dir.join("offcpu.svg"), &svg)?;
                None
            }
            Err(e) => Some(e.to_string()),
        }
    };
    Ok(Written {
        offcpu_stacks: off.len(),
        oncpu_stacks: on.len(),
        no_graph,
    })
}

/// Bytes under `dir`, subdirectories included.
fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some(if m.is_dir() {
                tree_bytes(&e.path())
            } else {
                m.len()
            })
        })
        .sum()
}

/// Deletes the oldest directories in `out` whose names start with `prefix` (capture
/// directories: `stall-` for the triggered helper, `armed-` for the recorder) until they total
/// at most `max_bytes`. `keep` (the capture just written) is never deleted. Returns the bytes
/// removed; stops at the first directory it cannot remove.
pub fn enforce_byte_cap(
    out: &Path,
    prefix: &str,
    max_bytes: u64,
    keep: Option<&Path>,
) -> std::io::Result<u64> {
    let mut dirs: Vec<(std::time::SystemTime, PathBuf, u64)> = std::fs::read_dir(out)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter_map(|e| {
            let m = e.metadata().ok().filter(|m| m.is_dir())?;
            Some((m.modified().ok()?, e.path(), tree_bytes(&e.path())))
        })
        .collect();
    dirs.sort();
    let mut total: u64 = dirs.iter().map(|d| d.2).sum();
    let mut removed = 0;
    for (_, dir, bytes) in dirs {
        if total <= max_bytes {
            break;
        }
        if Some(dir.as_path()) == keep {
            continue;
        }
        std::fs::remove_dir_all(&dir)?;
        total -= bytes;
        removed += bytes;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_cap_deletes_the_oldest_matching_directories_and_keeps_the_newest() {
        let root = std::env::temp_dir().join(format!("freezetrap-cap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (i, name) in ["stall-1-9", "stall-2-9", "stall-3-9"].iter().enumerate() {
            let d = root.join(name).join("sub");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("offcpu.folded"), vec![b'x'; 1000]).unwrap();
            // Distinct modification times, oldest first.
            let t =
                std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i as u64 * 10);
            std::fs::File::open(root.join(name))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::write(root.join("report.jsonl"), vec![b'y'; 5000]).unwrap(); // not a capture
        let removed = enforce_byte_cap(&root, "stall-", 2000, None).unwrap();
        assert_eq!(removed, 1000, "subdirectories count");
        assert!(!root.join("stall-1-9").exists());
        assert!(root.join("stall-2-9").exists() && root.join("stall-3-9").exists());
        assert!(root.join("report.jsonl").exists());
        // The one to keep survives even when it alone is over the cap.
        let newest = root.join("stall-3-9");
        enforce_byte_cap(&root, "stall-", 10, Some(&newest)).unwrap();
        assert!(!root.join("stall-2-9").exists() && newest.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
