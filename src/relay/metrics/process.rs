//! The standard `process_*` families (as Prometheus' own clients name them), read from `/proc/self` at each
//! scrape. Rendered as text rather than recorded: CPU time is a fractional counter, which the `metrics`
//! facade (integer counters) cannot carry. Elsewhere than Linux there is no `/proc`, and nothing is rendered.

use std::fmt::Write as _;
use std::fs;

/// Kernel clock ticks per second in `/proc` (USER_HZ): 100 on every architecture Linux runs containers on;
/// Prometheus' Go client hard-codes it too, rather than calling `sysconf`.
const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of the process.
struct Sample {
    cpu_seconds: f64,
    resident_bytes: u64,
    open_fds: usize,
    max_fds: Option<u64>,
    start_time_seconds: f64,
}

/// Appends the families to `text`, or nothing when `/proc` cannot be read.
pub(super) fn render(text: &mut String) {
    let Some(sample) = read() else { return };
    let mut family = |name: &str, kind: &str, help: &str, value: &dyn std::fmt::Display| {
        let _ = write!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n");
    };
    family(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        &sample.cpu_seconds,
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        &sample.resident_bytes,
    );
    family("process_open_fds", "gauge", "Number of open file descriptors.", &sample.open_fds);
    if let Some(max_fds) = sample.max_fds {
        family("process_max_fds", "gauge", "Maximum number of open file descriptors.", &max_fds);
    }
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        &sample.start_time_seconds,
    );
}

fn read() -> Option<Sample> {
    let stat = Stat::parse(&fs::read_to_string("/proc/self/stat").ok()?)?;
    let boot_time = boot_time(&fs::read_to_string("/proc/stat").ok()?)?;
    Some(Sample {
        cpu_seconds: (stat.utime + stat.stime) as f64 / TICKS_PER_SECOND,
        resident_bytes: resident_bytes(&fs::read_to_string("/proc/self/status").ok()?)?,
        open_fds: fs::read_dir("/proc/self/fd").ok()?.count(),
        max_fds: fs::read_to_string("/proc/self/limits").ok().and_then(|limits| max_open_files(&limits)),
        start_time_seconds: boot_time as f64 + stat.starttime as f64 / TICKS_PER_SECOND,
    })
}

/// The fields of `/proc/self/stat` we use, in clock ticks.
#[derive(Debug, PartialEq)]
struct Stat {
    utime: u64,
    stime: u64,
    /// Since boot.
    starttime: u64,
}

impl Stat {
    fn parse(text: &str) -> Option<Self> {
        // Field 2 is the command in parentheses and may itself hold spaces and ')': count from the last ')'.
        let fields: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
        // fields[0] is field 3 (state); utime, stime and starttime are fields 14, 15 and 22.
        let field = |n: usize| fields.get(n - 3)?.parse().ok();
        Some(Self { utime: field(14)?, stime: field(15)?, starttime: field(22)? })
    }
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat.lines().find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

/// `VmRSS` of `/proc/self/status` (in kB there), in bytes; kB rather than `stat`'s pages, whose size varies.
fn resident_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())?;
    Some(kib * 1024)
}

/// The soft limit on open files in `/proc/self/limits` (absent when unlimited).
fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files")?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (qx-relay (x) y) S 1 4242 4242 0 -1 4194560 1529 0 0 0 250 31 0 0 20 0 3 0 1234567 \
                    123457536 3071 18446744073709551615 1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(Stat::parse(stat), Some(Stat { utime: 250, stime: 31, starttime: 1_234_567 }));
        assert_eq!(Stat::parse("4242 (qx-relay) S 1"), None, "a truncated line is no reading");
    }

    #[test]
    fn status_limits_and_boot_time() {
        let status = "Name:\tqx-relay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t3\n";
        assert_eq!(resident_bytes(status), Some(10_485_760));
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             127405               127405               processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        let unlimited = "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(max_open_files(unlimited), None);
        assert_eq!(boot_time("cpu  1 2 3\nintr 5\nbtime 1765000000\nprocesses 9\n"), Some(1_765_000_000));
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn renders_this_process() {
        let mut text = String::new();
        render(&mut text);
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing:\n{text}");
        }
        let started =
            text.lines().find_map(|l| l.strip_prefix("process_start_time_seconds ")?.parse::<f64>().ok());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(
            started.is_some_and(|t| t <= now + 1.0 && t > now - 3600.0),
            "start time {started:?}:\n{text}"
        );
    }
}
