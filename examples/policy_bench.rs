//! Measures a host list at scale for scripts/bench's policy section: what a one-million-name
//! `@FILE` costs to load, in memory, and per lookup.
//!
//!   policy_bench [--names 1000000] [--dir DIR]
//!       Writes DIR/list.txt (names and `.domain` entries, 3 to 5 labels), loads it with the
//!       proxy's own loader (`HostSet::load`), and looks up as many hosts as the list has,
//!       half of them on it (a name, or a name under a listed domain) and half not. Prints
//!       one JSON line: load_s, rss_bytes_per_name (the process's resident memory grown by
//!       the load, per name), lookup_ns (mean, per host), hits; `_cpu` figures: this
//!       thread's CPU time, which the machine's other load does not stretch.
//!
//! Build: cargo build --release --example policy_bench

use std::hint::black_box;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use baton::proxy::hostset::HostSet;

fn main() -> anyhow::Result<()> {
    let mut names = 1_000_000usize;
    let mut dir = std::env::temp_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--names" => names = args.next().context("--names N")?.parse()?,
            "--dir" => dir = PathBuf::from(args.next().context("--dir DIR")?),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let path = dir.join("list.txt");
    write_list(&path, names)?;
    let before = rss_bytes()?;
    let (started, cpu) = (Instant::now(), cpu_s());
    let set = HostSet::load(&path)?;
    let (load_s, load_cpu_s) = (started.elapsed().as_secs_f64(), cpu_s() - cpu);
    let grown = rss_bytes()?.saturating_sub(before);
    let hosts: Vec<String> = (0..names).map(host).collect();
    let (started, cpu) = (Instant::now(), cpu_s());
    let hits = hosts.iter().filter(|h| black_box(set.find(h, None)).is_some()).count();
    let lookup_ns = started.elapsed().as_nanos() as f64 / names as f64;
    let lookup_cpu_ns = (cpu_s() - cpu) * 1e9 / names as f64;
    println!(
        "{{\"names\":{names},\"load_s\":{load_s:.3},\"load_cpu_s\":{load_cpu_s:.3},\"rss_bytes_per_name\":{:.1},\"lookup_ns\":{lookup_ns:.0},\"lookup_cpu_ns\":{lookup_cpu_ns:.0},\"hits\":{hits}}}",
        grown as f64 / names as f64
    );
    drop(black_box(set));
    Ok(())
}

/// Entry `i`: every fourth a domain, the rest names; 3 to 5 labels.
fn entry(i: usize) -> String {
    let labels = ["cdn", "api", "img", "www", "static", "edge"];
    let depth = 3 + i % 3;
    let mut parts = vec![format!("h{i:x}")];
    for d in 1..depth - 1 {
        parts.push(labels[(i / d) % labels.len()].to_string());
    }
    parts.push(["com", "net", "org", "example"][i % 4].to_string());
    let name = parts.join(".");
    if i.is_multiple_of(4) { format!(".{name}") } else { name }
}

/// Host `i` to look up: even ones are on the list (an entry, or a name under a domain
/// entry), odd ones are not.
fn host(i: usize) -> String {
    let e = entry(i);
    match (i % 2, e.strip_prefix('.')) {
        (0, Some(domain)) => format!("a.b.{domain}"),
        (0, None) => e,
        (_, Some(domain)) => format!("x{domain}"),
        (_, None) => format!("miss.{e}"),
    }
}

fn write_list(path: &std::path::Path, names: usize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "# {names} names for scripts/bench")?;
    for i in 0..names {
        writeln!(out, "{}", entry(i))?;
    }
    out.flush()?;
    Ok(())
}

/// This thread's CPU time: on a shared machine, wall time also counts the other processes'
/// turns on the core.
/// (The first field of schedstat: nanoseconds this thread ran.)
fn cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |ns| ns / 1e9)
}

fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kib * 1024)
}
