//! Writing a capture directory: the same files whichever mode recorded the data. Every file is
//! created exclusively (never through a symlink, never over an existing file), mode 0600,
//! beneath a directory handle that was checked when it was opened.

use super::{folded, Maps};
use crate::symbols::TargetSymbols;
use base::dirs::Dir;
use serde::Serialize;

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

/// What the data covers, for the files that say so.
#[derive(Clone, Copy, Default)]
pub struct Recorded<'a> {
    /// How long the recording was, ns (the pprof profiles' duration).
    pub duration_ns: u64,
    /// The target's symbols, for the pprof profiles' files and lines.
    pub symbols: Option<&'a TargetSymbols>,
}

/// Writes `offcpu.folded`, `oncpu.folded`, `offcpu.svg` (when there are off-CPU stacks),
/// `offcpu.pb.gz` and `oncpu.pb.gz` (pprof) and `summary.json` into `dir`. `title` heads the
/// flame graph.
pub fn write_capture(
    dir: &Dir,
    maps: &Maps,
    title: &str,
    summary: &impl Serialize,
    recorded: Recorded,
) -> std::io::Result<Written> {
    let off = folded(maps.get("@off"));
    let on = folded(maps.get("@on"));
    let write = |name: &str, lines: &[String]| {
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        dir.write_file(name, text.as_bytes())
    };
    write("offcpu.folded", &off)?;
    write("oncpu.folded", &on)?;
    for (name, map, kind) in [
        ("offcpu.pb.gz", "@off", crate::pprof::OFFCPU),
        ("oncpu.pb.gz", "@on", crate::pprof::ONCPU),
    ] {
        let gz =
            crate::pprof::profile_gz(maps.get(map), kind, recorded.duration_ns, recorded.symbols)?;
        dir.write_file(name, &gz)?;
    }
    let json = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other)?;
    dir.write_file("summary.json", &json)?;

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
                dir.write_file("offcpu.svg", &svg)?;
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
