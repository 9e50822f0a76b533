//! CPU time of the whole process, for benches that report CPU per operation beside the rate
//! (it varies much less between runs on a shared machine than the rate does).

/// CPU seconds this process has used, all threads (`/proc/self/stat`, in clock ticks of
/// 1/100 s; 0 where there is no procfs).
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime: fields 14 and 15 of the line, 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}
