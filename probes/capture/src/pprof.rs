//! The capture's stacks as pprof profiles (`offcpu.pb.gz`, `oncpu.pb.gz`): the protobuf format of
//! <https://github.com/google/pprof/blob/main/proto/profile.proto>, gzipped, which `go tool
//! pprof`, Parca and Pyroscope read. One sample per (thread, stack) with the thread's name as the
//! `thread` label and its id as `tid`; kernel frames are functions ending in `[k]`; user frames
//! are named by freezetrap-capture's own symbolizer and, given the target's symbols, carry their
//! file and line (inlined calls as several lines of one location).
//!
//! The messages are declared here with `prost`'s derive (the fields of profile.proto that a
//! reader needs; protobuf skips what is absent), so nothing is generated at build time.

use crate::maps::split_key;
use crate::symbols::TargetSymbols;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

#[derive(Clone, PartialEq, Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "10")]
    duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    period: i64,
}

#[derive(Clone, PartialEq, Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
struct Label {
    #[prost(int64, tag = "1")]
    key: i64,
    #[prost(int64, tag = "2")]
    str: i64,
    #[prost(int64, tag = "3")]
    num: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(uint64, tag = "3")]
    address: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
    #[prost(int64, tag = "2")]
    line: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
    #[prost(int64, tag = "3")]
    system_name: i64,
    #[prost(int64, tag = "4")]
    filename: i64,
}

/// What one profile's values are: `("offcpu", "microseconds")` or `("oncpu", "count")`.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    /// The sample type's name.
    pub name: &'static str,
    /// Its unit.
    pub unit: &'static str,
    /// For on-CPU samples, the sampling period in ns (a 99 Hz sample stands for ~10.1 ms).
    pub period_ns: Option<i64>,
}

/// Off-CPU microseconds.
pub const OFFCPU: Kind = Kind {
    name: "offcpu",
    unit: "microseconds",
    period_ns: None,
};

/// On-CPU samples at 99 Hz.
pub const ONCPU: Kind = Kind {
    name: "oncpu",
    unit: "count",
    period_ns: Some(1_000_000_000 / 99),
};

/// Interns strings, functions and locations.
#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<(String, String), u64>,
    locations: Vec<Location>,
    location_ids: HashMap<(u64, Vec<(u64, i64)>), u64>,
}

impl Builder {
    fn new() -> Builder {
        let mut b = Builder::default();
        b.string(""); // index 0 is the empty string, by the format's rule
        b
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), i);
        i
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let key = (name.to_string(), file.to_string());
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        let (name, filename) = (self.string(name), self.string(file));
        self.functions.push(Function {
            id,
            name,
            system_name: name,
            filename,
        });
        self.function_ids.insert(key, id);
        id
    }

    /// A location with its lines, innermost first (inlined calls first, as the format wants).
    fn location(&mut self, address: u64, lines: &[(&str, &str, i64)]) -> u64 {
        let line: Vec<Line> = lines
            .iter()
            .map(|(f, file, l)| Line {
                function_id: self.function(f, file),
                line: *l,
            })
            .collect();
        let key = (
            address,
            line.iter().map(|l| (l.function_id, l.line)).collect(),
        );
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location { id, address, line });
        self.location_ids.insert(key, id);
        id
    }
}

/// One line of a location: function, file ("" when unknown), line (0 when unknown).
type SourceLine = (String, String, i64);

/// The user frames of a key as (address, lines innermost first): consecutive `ustack(perf)` lines
/// with one address are one location (the inlined frames [`crate::resymbolize`] wrote). With
/// `syms`, each address is resolved again for its files and lines.
fn user_locations(key: &str, syms: Option<&TargetSymbols>) -> Vec<(u64, Vec<SourceLine>)> {
    let mut out: Vec<(u64, Vec<SourceLine>)> = Vec::new();
    let names = split_key(key).user;
    let mut names = names.into_iter();
    for line in key.split('\n').filter_map(|l| l.strip_prefix('\t')) {
        let addr_text = line.split(' ').next().unwrap_or("");
        let addr = u64::from_str_radix(addr_text, 16).unwrap_or(0);
        let name = names.next().unwrap_or_default();
        match out.last_mut() {
            Some((a, lines)) if *a == addr && addr != 0 => lines.push((name, String::new(), 0)),
            _ => out.push((addr, vec![(name, String::new(), 0)])),
        }
    }
    if let Some(syms) = syms {
        for (i, (addr, lines)) in out.iter_mut().enumerate() {
            // Return addresses are looked up at the call (addr - 1), as when they were named.
            let probe = if i == 0 {
                *addr
            } else {
                addr.saturating_sub(1)
            };
            let frames = syms.resolve(probe);
            if !frames.is_empty() {
                // `resolve` gives the outermost first; the format wants the innermost first.
                *lines = frames
                    .iter()
                    .rev()
                    .map(|f| {
                        (
                            f.function.clone(),
                            f.file.clone().unwrap_or_default(),
                            f.line.map_or(0, i64::from),
                        )
                    })
                    .collect();
            }
        }
    }
    out
}

/// The profile of `map` (a capture map: `tid, comm, kstack, ustack` keys), gzipped.
pub fn profile_gz(
    map: Option<&BTreeMap<String, u64>>,
    kind: Kind,
    duration_ns: u64,
    syms: Option<&TargetSymbols>,
) -> std::io::Result<Vec<u8>> {
    let mut b = Builder::new();
    let sample_type = ValueType {
        r#type: b.string(kind.name),
        unit: b.string(kind.unit),
    };
    let (thread_key, tid_key) = (b.string("thread"), b.string("tid"));
    let period_type = kind.period_ns.map(|_| ValueType {
        r#type: b.string("cpu"),
        unit: b.string("nanoseconds"),
    });
    let mut samples = Vec::new();
    for (key, &v) in map.into_iter().flatten() {
        let k = split_key(key);
        // Innermost first: kernel frames, then user frames.
        let mut ids: Vec<u64> = Vec::new();
        for f in &k.kernel {
            ids.push(b.location(0, &[(&format!("{f} [k]"), "", 0)]));
        }
        for (addr, lines) in user_locations(key, syms) {
            let lines: Vec<(&str, &str, i64)> = lines
                .iter()
                .map(|(f, file, l)| (f.as_str(), file.as_str(), *l))
                .collect();
            ids.push(b.location(addr, &lines));
        }
        if ids.is_empty() {
            ids.push(b.location(0, &[(&format!("{} (no stack)", k.comm), "", 0)]));
        }
        let thread = b.string(&k.comm);
        samples.push(Sample {
            location_id: ids,
            value: vec![v.min(i64::MAX as u64) as i64],
            label: vec![
                Label {
                    key: thread_key,
                    str: thread,
                    num: 0,
                },
                Label {
                    key: tid_key,
                    str: 0,
                    num: k.tid as i64,
                },
            ],
        });
    }
    let profile = Profile {
        sample_type: vec![sample_type.clone()],
        sample: samples,
        location: b.locations,
        function: b.functions,
        string_table: b.strings,
        duration_nanos: duration_ns.min(i64::MAX as u64) as i64,
        period_type,
        period: kind.period_ns.unwrap_or(0),
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&profile.encode_to_vec())?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_decodes_with_its_samples_labels_and_inlined_lines() {
        let mut m = BTreeMap::new();
        m.insert(
            "7,worker,\n    schedule+1\n    futex_wait+2\n,\n\t5600 inner (/bin/app)\n\t5600 outer (/bin/app)\n\t5700 main (/bin/app)\n".to_string(),
            1500,
        );
        m.insert("8,idle,,".to_string(), 3);
        let gz = profile_gz(Some(&m), OFFCPU, 1_000_000_000, None).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
        let p = Profile::decode(&raw[..]).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();
        assert_eq!(s(p.sample_type[0].r#type), "offcpu");
        assert_eq!(p.sample.len(), 2);
        let worker = p
            .sample
            .iter()
            .find(|x| x.value == [1500])
            .expect("the worker's sample");
        // Two kernel frames, then two user locations (0x5600 with two inlined lines).
        assert_eq!(worker.location_id.len(), 4);
        let loc = |id: u64| &p.location[id as usize - 1];
        let fname = |id: u64| s(p.function[id as usize - 1].name);
        assert_eq!(
            fname(loc(worker.location_id[0]).line[0].function_id),
            "schedule [k]"
        );
        let inlined = loc(worker.location_id[2]);
        assert_eq!(inlined.address, 0x5600);
        let names: Vec<&str> = inlined.line.iter().map(|l| fname(l.function_id)).collect();
        assert_eq!(names, ["inner", "outer"]);
        assert_eq!(s(worker.label[0].str), "worker");
        assert_eq!(worker.label[1].num, 7);
        // A key without a stack still counts, under its thread's name.
        let idle = p.sample.iter().find(|x| x.value == [3]).unwrap();
        assert_eq!(
            fname(loc(idle.location_id[0]).line[0].function_id),
            "idle (no stack)"
        );
    }
}
