//! The binaries' allocator: jemalloc, configured to give freed pages back to the OS. glibc's
//! malloc keeps what a burst of sessions or stalled streams once needed, so a router's memory
//! only ever grew; jemalloc's background thread returns dirty pages after about a second.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A C string pointer jemalloc reads at start-up.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static, immutable, NUL-terminated byte string.
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}

/// jemalloc's start-up options (its `malloc_conf` symbol, under the crate's `_rjem_` prefix):
/// purge from a background thread, dirty pages after 1 s, lazily freed ones at once.
#[allow(unsafe_code)] // a symbol jemalloc looks up by name; it is only ever read
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

#[cfg(test)]
mod tests {
    #[test]
    fn freed_memory_goes_back_to_the_os() {
        // RSS of this process in KiB.
        fn rss_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .expect("VmRSS")
        }
        let before = rss_kib();
        // Many small allocations, as a router's frames and buffers are, then freed.
        let blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 1_000]).collect();
        let held = rss_kib();
        assert!(
            held > before + 150_000,
            "the blocks are resident: {before} -> {held} KiB"
        );
        drop(blocks);
        // Purging is asynchronous (the background thread, ~1 s decay): poll for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while rss_kib() > before + 50_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "freed memory stayed resident: {before} -> {held} -> {} KiB",
                rss_kib()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
