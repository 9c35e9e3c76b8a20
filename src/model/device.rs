//! Which device the math runs on. CUDA and Metal sit behind the cargo features `cuda`
//! and `metal`; the code path is the same for both, and asking for one that was not
//! compiled in is a clear error rather than a silent fall back to the CPU. On the CPU,
//! the two allocator settings the `taper` binary and the benches start with:
//! [`keep_freed_buffers`] and the global allocator [`CacheAligned`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::str::FromStr;

use candle_core::Device;

use super::error::ModelError;

/// A user's device request, as written in a pipeline file or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    Metal,
    /// The first accelerator compiled in and present, else the CPU.
    #[default]
    Auto,
}

impl DeviceChoice {
    /// Opens the device (ordinal 0 for accelerators).
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => open_cuda(),
            Self::Metal => open_metal(),
            Self::Auto => Ok(open_cuda().or_else(|_| open_metal()).unwrap_or(Device::Cpu)),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "metal" | "mps" => Ok(Self::Metal),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown device `{other}` (expected cpu, cuda, metal or auto)"
            )),
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
            Self::Auto => "auto",
        })
    }
}

fn open_cuda() -> Result<Device, ModelError> {
    if !cfg!(feature = "cuda") {
        return Err(ModelError::FeatureMissing { feature: "cuda" });
    }
    Device::new_cuda(0).map_err(|source| ModelError::Device {
        device: "cuda",
        source,
    })
}

fn open_metal() -> Result<Device, ModelError> {
    if !cfg!(feature = "metal") {
        return Err(ModelError::FeatureMissing { feature: "metal" });
    }
    Device::new_metal(0).map_err(|source| ModelError::Device {
        device: "metal",
        source,
    })
}

/// Keeps freed tensor buffers in the process instead of handing each back to the OS.
///
/// candle allocates a fresh buffer for every op's result. glibc serves blocks above its
/// mmap threshold (adaptive, 128 KiB to 32 MiB) with a new `mmap` and unmaps them on
/// free, so every such buffer faults its pages in and has them zeroed again: a tenth of
/// a CPU training step went to page faults (BENCHMARKS.md, "train (CPU)"). Raising the
/// threshold to glibc's maximum (32 MiB) and the trim threshold to 1 GiB lets the heap
/// reuse them. Call once at start-up, before threads are spawned; a no-op elsewhere than
/// glibc Linux.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc malloc's tuning parameters; called before other
    // threads exist, it races with no allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The global allocator of the `taper` binary, its benches and its examples: the system
/// allocator, with every block of [`ALIGNED_FROM`] bytes or more aligned to a 64-byte
/// cache line (PyTorch aligns all its CPU allocations to 64 bytes).
///
/// glibc's `malloc` aligns blocks to 16 bytes, so a tensor's buffer started mid-line and
/// every 64-byte AVX-512 load or store of the kernels in [`super::fused_cpu`] straddled
/// two lines. On the device machine's Xeon, aligning them made layer norm at 4 x 128 x
/// 2048 1.06-1.14x faster and RMSNorm 1.02-1.17x (BENCHMARKS.md, "Session 18"); on the
/// AMD VM, whose AVX-512 runs as two 32-byte halves, 0.96-1.01x, within its noise.
/// Smaller blocks keep `malloc`'s own alignment. Declare it in a binary with
/// `#[global_allocator] static ALLOC: CacheAligned = CacheAligned;`.
pub struct CacheAligned;

/// Blocks of this many bytes or more get a 64-byte alignment from [`CacheAligned`].
pub const ALIGNED_FROM: usize = 4096;

/// A cache line.
const LINE: usize = 64;

impl CacheAligned {
    /// The layout a block is allocated with: `layout`, its alignment raised to a cache
    /// line from [`ALIGNED_FROM`] bytes up. A function of the caller's layout alone, so
    /// that `dealloc` and `realloc` hand the system allocator the layout it allocated.
    fn layout(layout: Layout) -> Layout {
        if layout.size() >= ALIGNED_FROM && layout.align() < LINE {
            // Fails only for sizes within 64 bytes of `isize::MAX`, which no allocator
            // serves: those keep the caller's layout (and fail there).
            Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
        } else {
            layout
        }
    }
}

// SAFETY: every block comes from `System` with `Self::layout` of the caller's layout,
// whose alignment is at least the caller's, and goes back to `System` with the same
// layout (`realloc` moves a block whose alignment class changes itself).
unsafe impl GlobalAlloc for CacheAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `Self::layout` keeps the caller's non-zero size.
        unsafe { System.alloc(Self::layout(layout)) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(Self::layout(layout)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`, `alloc_zeroed` or `realloc` with this layout.
        unsafe { System.dealloc(ptr, Self::layout(layout)) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = Self::layout(layout);
        let Ok(wanted) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = Self::layout(wanted);
        // SAFETY: `ptr` is a live block of `old`; `new_size` is non-zero (the caller's
        // contract); a moved block copies the bytes both sizes hold and frees the old
        // one only once the new one exists.
        unsafe {
            if new.align() == old.align() {
                return System.realloc(ptr, old, new_size);
            }
            let moved = System.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
            moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_always_open() {
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        assert!(DeviceChoice::Auto.open().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let err = DeviceChoice::Cuda.open().unwrap_err();
        assert_eq!(err.to_string(), "taper was built without the cuda feature");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_says_so() {
        let err = DeviceChoice::Metal.open().unwrap_err();
        assert_eq!(err.to_string(), "taper was built without the metal feature");
    }

    #[test]
    fn parses_names() {
        assert_eq!("CUDA".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda));
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().contains("tpu"));
    }

    /// Calls `CacheAligned` directly (this test binary keeps the default allocator).
    #[test]
    fn cache_aligned_blocks_start_on_a_line_and_keep_their_bytes() {
        let a = CacheAligned;
        let lay = |size| Layout::from_size_align(size, 4).unwrap();
        // SAFETY: every block is checked non-null before use, written and read within
        // its size, and freed once with the layout it was allocated or resized to.
        unsafe {
            let live = |p: *mut u8, what: &str| {
                assert!(!p.is_null(), "{what}: no block");
                p
            };
            // Many blocks: malloc alone puts a block on a line about one time in four.
            let blocks: Vec<_> = (0..16)
                .map(|i| (live(a.alloc(lay(ALIGNED_FROM + 4 * i)), "alloc"), i))
                .collect();
            for &(p, i) in &blocks {
                assert_eq!(p as usize % LINE, 0, "block {i}");
            }
            for (p, i) in blocks {
                a.dealloc(p, lay(ALIGNED_FROM + 4 * i));
            }
            // Zeroed blocks: aligned and zero.
            let z = live(a.alloc_zeroed(lay(1 << 20)), "alloc_zeroed");
            assert_eq!(z as usize % LINE, 0);
            assert!(std::slice::from_raw_parts(z, 1 << 20)
                .iter()
                .all(|&b| b == 0));
            a.dealloc(z, lay(1 << 20));
            // Small blocks grown past the threshold, then past a mmap-sized one, then
            // shrunk below the threshold again: each lands on a line while large, and
            // its bytes survive each move.
            for block in 0..8 {
                let mut size = 100 + 8 * block;
                let mut p = live(a.alloc(lay(size)), "small alloc");
                for j in 0..size {
                    *p.add(j) = j as u8;
                }
                for new_size in [ALIGNED_FROM * 2, 64 << 20, 200, 60] {
                    p = live(a.realloc(p, lay(size), new_size), "realloc");
                    if new_size >= ALIGNED_FROM {
                        assert_eq!(p as usize % LINE, 0, "block {block} grown to {new_size}");
                    }
                    for j in 0..size.min(new_size).min(100) {
                        assert_eq!(*p.add(j), j as u8, "byte {j} after the move to {new_size}");
                    }
                    size = new_size;
                }
                a.dealloc(p, lay(size));
            }
            // A caller's own alignment above a line is kept, through a move too.
            let wide = |size| Layout::from_size_align(size, 256).unwrap();
            let p = live(a.alloc(wide(ALIGNED_FROM)), "wide alloc");
            assert_eq!(p as usize % 256, 0);
            *p = 7;
            let p = live(a.realloc(p, wide(ALIGNED_FROM), 1 << 20), "wide realloc");
            assert_eq!((p as usize % 256, *p), (0, 7));
            a.dealloc(p, wide(1 << 20));
        }
        // Layouts below the threshold, or already aligned, are the caller's.
        assert_eq!(CacheAligned::layout(lay(64)), lay(64));
        let page = Layout::from_size_align(1 << 16, 4096).unwrap();
        assert_eq!(CacheAligned::layout(page), page);
    }
}
