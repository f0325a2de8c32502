//! Kernel function names for the compiled recorder's stack addresses, from `/proc/kallsyms`.
//!
//! bpftrace named kernel frames itself; with the compiled recorder the addresses come back raw.
//! The table holds only text symbols, in one string buffer (122k functions are ~5 MiB here, most
//! of the recorder's memory), and is read once, on a thread, while the program loads: reading it
//! during a freeze is fine (it is not the target's memory) but takes ~60 ms.

use std::io::BufRead;

/// Text symbols of the running kernel, sorted by address.
pub(crate) struct KernelSymbols {
    /// `(address, end of its name in names)`; a name starts where the previous one ends.
    starts: Vec<(u64, u32)>,
    names: String,
}

impl KernelSymbols {
    /// Reads `/proc/kallsyms`. Addresses all zero (kptr_restrict, not root) make an empty table:
    /// frames are then printed as addresses.
    pub(crate) fn load() -> std::io::Result<Self> {
        let file = std::fs::File::open("/proc/kallsyms")?;
        Ok(Self::parse(std::io::BufReader::new(file)))
    }

    /// A table that names nothing (frames are printed as addresses).
    pub(crate) fn empty() -> Self {
        Self {
            starts: Vec::new(),
            names: String::new(),
        }
    }

    fn parse(reader: impl BufRead) -> Self {
        let mut entries: Vec<(u64, String)> = Vec::new();
        for line in reader.lines().map_while(Result::ok) {
            let mut parts = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            match u64::from_str_radix(addr, 16) {
                Ok(a) if a != 0 => entries.push((a, name.to_string())),
                _ => {}
            }
        }
        entries.sort_unstable_by_key(|e| e.0);
        let mut names = String::with_capacity(entries.iter().map(|e| e.1.len()).sum());
        let starts = entries
            .into_iter()
            .map(|(a, n)| {
                names.push_str(&n);
                (a, names.len() as u32)
            })
            .collect();
        Self { starts, names }
    }

    fn name(&self, i: usize) -> &str {
        let begin = if i == 0 {
            0
        } else {
            self.starts[i - 1].1 as usize
        };
        &self.names[begin..self.starts[i].1 as usize]
    }

    /// `name+offset` of the function holding `addr`, or `0xADDR`.
    pub(crate) fn frame(&self, addr: u64) -> String {
        match self.starts.partition_point(|s| s.0 <= addr) {
            0 => format!("0x{addr:x}"),
            i => format!("{}+{}", self.name(i - 1), addr - self.starts[i - 1].0),
        }
    }

    /// How many functions the table holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.starts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_named_by_the_function_below_them() {
        let t = KernelSymbols::parse(
            "ffffffff81000200 T second\n\
             ffffffff81000100 t first\n\
             ffffffff81000300 d some_data\n\
             ffffffff813a4380 t bpf_prog_6deef7357e7b4530_on_switch\t[bpf]\n\
             0000000000000000 T hidden\n"
                .as_bytes(),
        );
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.frame(0xffffffff813a4388),
            "bpf_prog_6deef7357e7b4530_on_switch+8"
        );
        assert_eq!(t.frame(0xffffffff81000105), "first+5");
        assert_eq!(t.frame(0xffffffff81000200), "second+0");
        assert_eq!(t.frame(0xffffffff81000310), "second+272");
        assert_eq!(t.frame(0x10), "0x10");
    }

    #[test]
    fn this_kernel_names_its_scheduler() {
        let Ok(t) = KernelSymbols::load() else { return };
        if t.len() == 0 {
            eprintln!("skipped: /proc/kallsyms shows no addresses to this user");
            return;
        }
        let schedule = t.frame(
            u64::from_str_radix(
                std::fs::read_to_string("/proc/kallsyms")
                    .unwrap()
                    .lines()
                    .find(|l| l.ends_with(" schedule"))
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap(),
                16,
            )
            .unwrap()
                + 1,
        );
        assert_eq!(schedule, "schedule+1");
    }
}
