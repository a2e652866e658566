//! Why a CPU run's numbers depend on the machine: the three things that fix the rounding of burn's
//! flex backend, read from the libraries that decide them.
//!
//! A flex run is bit-for-bit repeatable on one machine with one thread count, but two machines
//! round differently when any of these differ (measured in `BENCHMARKS.md`, "Reproducibility"):
//!
//! - **SIMD width of flex's own kernels.** flex's reductions (sums over a batch, a channel, a
//!   loss) run through `macerator`, which picks AVX-512 (16 f32 lanes), AVX2 (8), SSE (4) or
//!   NEON (4) when the program starts; each width adds the same numbers in another order.
//! - **The depth block of the matrix multiplies.** flex multiplies (and convolves, by im2col)
//!   with the `gemm` crate, which splits the summed dimension into blocks of `kc` values derived
//!   from the L1 data cache's size and associativity (read from `/sys` at run time): 512 on a
//!   32 KiB 8-way L1, 1024 on a 48 KiB 12-way one. Products longer than one block (the weight
//!   gradients of every convolution: batch x height x width values) are summed in another order.
//! - **FMA.** `gemm` uses fused multiply-adds where the CPU has them, plain ones otherwise.
//! - **The vector unit of `mekd-kernels`' convolutions.** The models' convolutions on flex run
//!   those kernels (`mekd_models::ops`), which pick AVX-512, AVX2 or NEON at run time, and with
//!   the width the algorithm and tiles (Winograd's transforms round differently from a direct
//!   sum).
//!
//! Thread count is recorded too: `gemm` splits rows and columns (not the summed dimension) across
//! threads, but flex sums tensors of over 4 M values in parallel chunks whose combination rayon
//! orders by how the work was split.
//!
//! Forcing one rounding on every machine would mean forking both crates (a fixed lane count in
//! flex's reductions, a fixed `kc` in gemm) and giving up AVX-512; the project records the
//! fingerprint with each distillation run and each demo instead, so two results can be compared
//! knowingly.

use serde::{Deserialize, Serialize};

/// gemm-f32's FMA micro-kernel tile on x86-64 (`MR_DIV_N` 2 x 8 lanes by `NR` 6; see
/// `gemm-f32`'s `microkernel::fma::f32`), the tile `kernel_params` derives `kc` for.
const GEMM_F32_TILE: (usize, usize) = (16, 6);

/// The inputs that fix a flex run's rounding on this machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuNumerics {
    /// The CPU architecture (`x86_64`, `aarch64`, ...).
    pub arch: String,
    /// The instruction set flex's reductions dispatch to (macerator's choice, e.g. `V4`
    /// = AVX-512, `V3` = AVX2 + FMA).
    pub simd: String,
    /// L1 data cache as gemm reads it: bytes.
    pub l1d_bytes: usize,
    /// L1 data cache as gemm reads it: ways.
    pub l1d_ways: usize,
    /// gemm's depth block for a long f32 product (values summed before the result is updated).
    pub gemm_kc: usize,
    /// Whether gemm multiplies with fused multiply-adds.
    pub fma: bool,
    /// Threads of the rayon pool flex runs on.
    pub threads: usize,
    /// The vector unit `mekd-kernels`' convolutions run on (`avx512`, `avx2`, `neon`,
    /// `portable`); empty in runs recorded before the models' convolutions ran them.
    #[serde(default)]
    pub conv_simd: String,
}

impl CpuNumerics {
    /// The fingerprint of a run on `device`: recorded for the CPU backend (flex), whose rounding
    /// it fixes; `None` for the others.
    pub fn for_device(device: crate::device::DeviceKind) -> Option<Self> {
        (device == crate::device::DeviceKind::Flex).then(Self::detect)
    }

    /// Read the fingerprint of this process (the libraries' own detection, not a guess).
    pub fn detect() -> Self {
        let l1 = gemm_common::cache::CACHE_INFO[0];
        let (mr, nr) = GEMM_F32_TILE;
        // A long product: deep enough that the depth is split into blocks.
        let kc = gemm_common::cache::kernel_params(1024, 1024, 1 << 20, mr, nr, size_of::<f32>()).kc;
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        let fma = std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(any(target_arch = "x86", target_arch = "x86_64")))]
        let fma = cfg!(target_arch = "aarch64");
        Self {
            arch: std::env::consts::ARCH.to_string(),
            simd: format!("{:?}", macerator::Arch::detect()),
            l1d_bytes: l1.cache_bytes,
            l1d_ways: l1.associativity,
            gemm_kc: kc,
            fma,
            threads: rayon::current_num_threads(),
            conv_simd: mekd_kernels::Simd::detect().name().to_string(),
        }
    }
}

impl std::fmt::Display for CpuNumerics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} SIMD {}, gemm depth block {} (L1d {} KiB {}-way){}, {} threads, convolutions {}",
            self.arch,
            self.simd,
            self.gemm_kc,
            self.l1d_bytes / 1024,
            self.l1d_ways,
            if self.fma { ", FMA" } else { "" },
            self.threads,
            if self.conv_simd.is_empty() { "burn's" } else { &self.conv_simd }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The depth block follows the L1 geometry gemm read; check it against gemm's formula worked
    /// by hand for the common geometries, so a gemm update that changes the rule is noticed.
    #[test]
    fn depth_block_matches_the_hand_worked_formula() {
        let n = CpuNumerics::detect();
        assert!(n.threads >= 1 && !n.simd.is_empty());
        // kc_0 = line x sets / gcd(MR x 4, line x sets); the multiplier is ways / 1 rounded up
        // to a power of two; kc = max(kc_0 x multiplier, 512).
        let line = 64;
        let sets = n.l1d_bytes.max(32 * 1024) / (line * n.l1d_ways.max(2));
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let kc0 = line * sets / gcd(GEMM_F32_TILE.0 * 4, line * sets);
        let c_lhs = GEMM_F32_TILE.0 * 4 / gcd(GEMM_F32_TILE.0 * 4, line * sets);
        let c_rhs = GEMM_F32_TILE.1 * kc0 * 4 / (line * sets);
        let expected = (kc0 * (n.l1d_ways.max(2) / (c_lhs + c_rhs)).next_power_of_two()).max(512);
        assert_eq!(n.gemm_kc, expected, "{n}");
    }
}
