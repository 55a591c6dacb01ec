//! The `tidegate` binary.

/// jemalloc (with its background threads) gives memory back to the system
/// once connections close (the system allocator keeps it), and is quick
/// with the many small buffers a gateway allocates and frees.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
