#![cfg(feature = "cuda")]
//! The GPU kernels' shapes compile to PTX for the H100/H200 (`sm_90a`), on a machine with no
//! GPU, no driver and no CUDA toolkit.
//!
//! Why: with the `cuda` feature, cubecl-cuda 0.11.3 compiles every kernel through LLVM's NVPTX
//! backend (its `CudaCompiler::default()` is `CudaCompiler::Llvm` unless cubecl-cuda's `cpp`
//! feature is on: `cubecl-cuda-0.11.3/src/compiler.rs:24-55`), and it does so lazily, at the
//! first launch on the device. A kernel that the pliron lowering or the LLVM we link
//! (`scripts/setup-cuda-build.sh`) cannot compile is otherwise only found on a GPU machine,
//! minutes into a run. This test drives the same compiler, with the options the runtime gives
//! it on Hopper, from a `KernelDefinition` built without a device, exactly as cubecl-llvm's own
//! offline tests do (`cubecl-llvm-0.11.3/src/nvptx/offline_tests.rs:145-163`: `#[cube]` kernels,
//! fake `DeviceProperties`, an `SmArch`, a `PtxVersion`, PTX text asserted on). No
//! `ComputeClient<CudaRuntime>` is made: making one calls `cuInit`.
//!
//! The kernels are not burn's (burn-cubecl keeps its kernel structs `pub(crate)`); they mirror
//! what dreamloop's CUDA path leans on beyond a plain f32 matmul:
//! - bf16 ↔ f32 casts (bf16 weights, f32 updates; `src/train/optim/rounding.rs`);
//! - the u32 hash and bit operations of stochastic rounding: cubek-random's taus88 + LCG step
//!   (what `Tensor::random` runs on CUDA) and the add-noise-and-truncate of `stochastic_bf16`;
//! - bf16 elementwise arithmetic on the CUDA cores (packed `bf16x2`, no tensor core), and the
//!   device stochastic rounding of `stochastic_with_noise` (casts, abs, divide, compare,
//!   select);
//! - a cube-wide sum: plane shuffles, shared memory and a barrier, bf16 in, f32 accumulated;
//! - SiLU, whose `exp` NVPTX has no instruction for: the LLVM backend links it from the CUDA
//!   toolkit's `libdevice.10.bc`, which a build machine without the toolkit does not have. That
//!   test passes either way but tells which: it compiles when the file is found, and otherwise
//!   accepts only the "libdevice.10.bc was not found" error (set
//!   `DREAMLOOP_REQUIRE_LIBDEVICE=1` to make its absence a failure). Every other kernel here
//!   needs no libdevice function and is asserted to call none.
//!
//! Each kernel is compiled for the PTX ISA of a CUDA 12.8 driver (8.7, what cubecl-llvm's
//! offline tests use) and of a CUDA 13.0 driver (9.0, what `scripts/build-cuda.sh` builds for).
//! Any compilation error fails the test, with the error; an assertion on the PTX prints it.
//!
//! Run: `./scripts/setup-cuda-build.sh && CUDARC_CUDA_VERSION=13000 cargo test -p dreamloop
//! --features cuda --test ptx_offline`.

// `#[cube(launch)]` also generates a `launch` function per kernel, which needs a device and is
// never called here.
#![allow(dead_code)]

use std::sync::Arc;

use cubecl::cuda::compiler::{
    CudaBackend, CudaCompilationOptions, CudaCompiler, CudaRepresentation,
};
use cubecl::ir::features::Features;
use cubecl::ir::nvidia::SmArch;
use cubecl::ir::{DeviceIdentity, HardwareProperties, MemoryDeviceProperties};
use cubecl::prelude::*;
use cubecl::profile::TimingMethod;
use cubecl::{CompilationError, Compiler};
use cubecl_llvm::nvptx::ptx_version::PtxVersion;
use half::bf16;

/// H100 and H200: compute capability 9.0.
const HOPPER: u32 = 90;

/// The drivers whose PTX ISA is emitted, as `cuDriverGetVersion` spells them, with the
/// `.version` line LLVM then writes (`cubecl-llvm-0.11.3/src/nvptx/ptx_version.rs:39-51`).
const DRIVERS: [(i32, &str); 2] = [(12080, ".version 8.7"), (13000, ".version 9.0")];

/// Units per cube of every kernel here: eight warps.
const UNITS: u32 = 256;

/// Lanes of a warp.
const PLANE: u32 = 32;

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

/// bf16 → f32 and f32 → bf16, as loading bf16 weights and writing f32 updates back does.
#[cube(launch)]
fn bf16_casts(wide_in: &[f32], narrow_out: &mut [bf16], narrow_in: &[bf16], wide_out: &mut [f32]) {
    if ABSOLUTE_POS < wide_in.len() {
        narrow_out[ABSOLUTE_POS] = bf16::cast_from(wide_in[ABSOLUTE_POS]);
        wide_out[ABSOLUTE_POS] = f32::cast_from(narrow_in[ABSOLUTE_POS]);
    }
}

/// 32 noise bits for element `index` of a launch seeded with `seed`: one step of each of the
/// four generators cubek-random 0.3.1 combines (`cubek-random-0.3.1/src/state.rs`: three
/// taus88 components and a Numerical Recipes LCG, xored), from the stream of `index`.
#[cube]
fn noise_bits(seed: u32, index: u32) -> u32 {
    let stream = index * 1000000007u32 + seed;
    let z0 = stream ^ 0x9e37_79b9u32;
    let z1 = stream ^ 0x85eb_ca6bu32;
    let z2 = stream ^ 0xc2b2_ae35u32;
    let t0 = (((z0 << 13u32) ^ z0) >> 19u32) ^ ((z0 & 4294967294u32) << 12u32);
    let t1 = (((z1 << 2u32) ^ z1) >> 25u32) ^ ((z1 & 4294967288u32) << 4u32);
    let t2 = (((z2 << 3u32) ^ z2) >> 11u32) ^ ((z2 & 4294967280u32) << 17u32);
    let lcg = stream * 1664525u32 + 1013904223u32;
    t0 ^ t1 ^ t2 ^ lcg
}

/// Stochastic rounding on the bits, as `stochastic_bf16` does on the host: uniform noise added
/// below the 16 bits bf16 keeps, then truncation; non-finite values round to nearest. The
/// truncated f32 is a bf16 value, so its cast is exact (and stays in u32/f32, as cubek's own
/// bit decoding does: `f32::reinterpret(bits << 16u32)` in cubek-tile 0.3.1).
#[cube(launch)]
fn stochastic_round_bits(values: &[f32], rounded: &mut [bf16], seed: u32) {
    if ABSOLUTE_POS < values.len() {
        let x = values[ABSOLUTE_POS];
        let bits = u32::reinterpret(x);
        let noise = noise_bits(seed, ABSOLUTE_POS as u32) >> 16u32;
        let truncated = f32::reinterpret((bits + noise) & 0xffff_0000u32);
        let finite = (bits & 0x7f80_0000u32) != 0x7f80_0000u32;
        rounded[ABSOLUTE_POS] = bf16::cast_from(select(finite, truncated, x));
    }
}

/// `a * x + y` on bf16, four lanes at a time: packed `bf16x2` arithmetic on the CUDA cores,
/// the shape of burn's fused elementwise kernels on bf16 tensors.
#[cube(launch)]
fn bf16_axpy(
    a: &[Vector<bf16, Const<4>>],
    x: &[Vector<bf16, Const<4>>],
    y: &[Vector<bf16, Const<4>>],
    out: &mut [Vector<bf16, Const<4>>],
) {
    if ABSOLUTE_POS < out.len() {
        out[ABSOLUTE_POS] = a[ABSOLUTE_POS] * x[ABSOLUTE_POS] + y[ABSOLUTE_POS];
    }
}

/// `stochastic_with_noise` of `src/train/optim/rounding.rs` in one kernel: the two bf16
/// neighbours of `x` found with casts, the far one taken when `noise` is below the share of the
/// spacing `x` passes.
#[cube(launch)]
fn device_stochastic_round(x: &[f32], noise: &[f32], out: &mut [bf16]) {
    if ABSOLUTE_POS < x.len() {
        let value = x[ABSOLUTE_POS];
        let near = f32::cast_from(bf16::cast_from(value));
        let d = value - near;
        // 0.7 / 128, exactly.
        let magnitude = near.abs() * 0.00546875f32;
        let step = select(d < 0.0f32, 0.0f32 - magnitude, magnitude);
        let far = f32::cast_from(bf16::cast_from(near + step));
        let spacing = (far - near).abs();
        let take_far = noise[ABSOLUTE_POS] < d.abs() / spacing;
        out[ABSOLUTE_POS] = bf16::cast_from(select(take_far, far, near));
    }
}

/// The sum of each cube's slice of `input` (bf16, accumulated in f32) into `output[CUBE_POS]`:
/// a sum per plane by shuffles, the `planes` partial sums through shared memory, and a last
/// plane sum of those.
#[cube(launch)]
fn block_sum(input: &[bf16], output: &mut [f32], #[comptime] planes: usize) {
    let mut partial = Shared::<[f32]>::new_slice(planes);
    let mut value = 0.0f32;
    if ABSOLUTE_POS < input.len() {
        value = f32::cast_from(input[ABSOLUTE_POS]);
    }
    let plane_total = plane_sum(value);
    if UNIT_POS_PLANE == 0 {
        partial[PLANE_POS as usize] = plane_total;
    }
    sync_cube();
    if PLANE_POS == 0 {
        let mut mine = 0.0f32;
        if (UNIT_POS_PLANE as usize) < planes {
            mine = partial[UNIT_POS_PLANE as usize];
        }
        let total = plane_sum(mine);
        if UNIT_POS_PLANE == 0 {
            output[CUBE_POS] = total;
        }
    }
}

/// SiLU on bf16 activations, computed in f32: `x / (1 + e^-x)`. `exp` is a libdevice call.
#[cube(launch)]
fn silu(input: &[bf16], output: &mut [bf16]) {
    if ABSOLUTE_POS < input.len() {
        let v = f32::cast_from(input[ABSOLUTE_POS]);
        output[ABSOLUTE_POS] = bf16::cast_from(v / (1.0f32 + (0.0f32 - v).exp()));
    }
}

// ---------------------------------------------------------------------------------------------
// Building the kernels without a device
// ---------------------------------------------------------------------------------------------

/// What a device would report, reduced to what defining a kernel reads: the fields are
/// `cubecl-llvm-0.11.3/src/shared/offline_kernels.rs:14-44`'s, with the name and fingerprint
/// the CUDA runtime gives an H100 (`cubecl-cuda-0.11.3/src/runtime.rs:205`). The runtime also
/// registers the device's type usages and features (runtime.rs:217-367); cubecl-llvm's offline
/// tests compile bf16 arithmetic, plane operations and shared memory without them, and so does
/// this.
fn hopper_properties() -> Arc<DeviceProperties> {
    let hardware = HardwareProperties {
        load_width: 128,
        vector_register_count: None,
        plane_size_min: PLANE,
        plane_size_max: PLANE,
        max_bindings: 32,
        max_shared_memory_size: 65536,
        max_cube_count: (u32::MAX, u16::MAX as u32, u16::MAX as u32),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 1024),
        num_streaming_multiprocessors: None,
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        num_cpu_cores: None,
        last_level_cache_size: None,
        max_vector_size: VectorSize::MAX,
        cube_mma_reserved_shared_memory: 0,
    };
    Arc::new(DeviceProperties::new(
        Features::default(),
        MemoryDeviceProperties::new(u64::MAX, 256),
        hardware,
        TimingMethod::Device,
        DeviceIdentity {
            name: "offline sm_90".to_string(),
            fingerprint: format!("ptx_sm{HOPPER}"),
            physical: None,
        },
    ))
}

/// A 1-D cube of `units`. burn-cubecl 0.22.1 launches nearly all its kernels with
/// `launch_unchecked` (83 call sites against 8 `launch`), so most kernels here are built
/// unchecked; the casts kernel is built checked, to cover the other mode too.
fn cube_settings(units: u32, mode: ExecutionMode, address_type: AddressType) -> KernelSettings {
    KernelSettings::new(*CubeDim::new_1d(units), mode, address_type)
}

fn no_inplace() -> BufferCompilationArg {
    BufferCompilationArg { inplace: None }
}

fn target_properties() -> Arc<TargetProperties> {
    Arc::new(TargetProperties::default())
}

fn bf16_casts_kernel() -> impl CubeKernel {
    bf16_casts::Bf16Casts::new(
        cube_settings(UNITS, ExecutionMode::Checked, AddressType::U32),
        hopper_properties(),
        target_properties(),
        no_inplace(),
        no_inplace(),
        no_inplace(),
        no_inplace(),
    )
}

/// `address_type`: U64 is what a tensor past 4 Gi elements gets.
fn stochastic_round_bits_kernel(address_type: AddressType) -> impl CubeKernel {
    stochastic_round_bits::StochasticRoundBits::new(
        cube_settings(UNITS, ExecutionMode::Unchecked, address_type),
        hopper_properties(),
        target_properties(),
        no_inplace(),
        no_inplace(),
        // The scalar `seed`: a scalar's compilation argument is `()`
        // (offline_kernels.rs:240-250).
        (),
    )
}

fn bf16_axpy_kernel() -> impl CubeKernel {
    bf16_axpy::Bf16Axpy::new(
        cube_settings(UNITS, ExecutionMode::Unchecked, AddressType::U32),
        hopper_properties(),
        target_properties(),
        no_inplace(),
        no_inplace(),
        no_inplace(),
        no_inplace(),
    )
}

fn device_stochastic_round_kernel() -> impl CubeKernel {
    device_stochastic_round::DeviceStochasticRound::new(
        cube_settings(UNITS, ExecutionMode::Unchecked, AddressType::U32),
        hopper_properties(),
        target_properties(),
        no_inplace(),
        no_inplace(),
        no_inplace(),
    )
}

fn block_sum_kernel() -> impl CubeKernel {
    block_sum::BlockSum::new(
        cube_settings(UNITS, ExecutionMode::Unchecked, AddressType::U32),
        hopper_properties(),
        target_properties(),
        no_inplace(),
        no_inplace(),
        (UNITS / PLANE) as usize,
    )
}

fn silu_kernel() -> impl CubeKernel {
    silu::Silu::new(
        cube_settings(UNITS, ExecutionMode::Unchecked, AddressType::U32),
        hopper_properties(),
        target_properties(),
        no_inplace(),
        no_inplace(),
    )
}

// ---------------------------------------------------------------------------------------------
// Compiling
// ---------------------------------------------------------------------------------------------

/// A kernel compiled to PTX.
struct Ptx {
    text: String,
    entrypoint: String,
    shared_memory_size: usize,
}

/// The architecture the CUDA runtime compiles for on an H100 or H200: `SmArch::new(version,
/// tensor_cores)` (`cubecl-cuda-0.11.3/src/runtime.rs:383`). From 9.0 on it is the
/// architecture-specific `sm_90a` (`cubecl-ir-0.11.3/src/nvidia.rs:30-57`), whatever the
/// second argument says.
fn hopper() -> SmArch {
    SmArch::new(HOPPER, true)
}

/// `kernel` compiled as the CUDA runtime compiles it on Hopper with a `driver` driver:
/// `define_kernel` then `CudaCompiler::default()` (`cubecl-cuda-0.11.3/src/compute/context.rs:
/// 209-215`), which is the LLVM backend (checked by `the_cuda_runtime_compiles_through_llvm`;
/// named here so that these tests keep testing it whatever the default): `cubecl_llvm::
/// PlironCompiler { target: LlvmTarget::Nvptx }` (compiler.rs:40-49), handed `sm_arch`,
/// `ptx_version` and `grid_constants` (compiler.rs:131-140) — the `PlironOptions`
/// offline_tests.rs:150-154 sets, plus the grid-constant parameter block the runtime turns on
/// from sm_70 (runtime.rs:233-245).
fn compile(kernel: &impl CubeKernel, driver: i32) -> Result<Ptx, CompilationError> {
    let definition = cubecl::define_kernel(kernel)?;
    let mut compiler = CudaCompiler::new(CudaBackend::Llvm);
    let mut options = CudaCompilationOptions {
        arch: Some(hopper()),
        ptx_version: PtxVersion::for_driver(driver),
        ..Default::default()
    };
    options.cpp.supports_features.grid_constants = true;
    match compiler.compile(definition, &options)? {
        CudaRepresentation::Llvm(module) => Ok(Ptx {
            // NUL-terminated (cubecl-llvm-0.11.3/src/shared/base.rs:112).
            text: String::from_utf8_lossy(
                &module
                    .ptx
                    .iter()
                    .take_while(|&&c| c != 0)
                    .map(|&c| c as u8)
                    .collect::<Vec<u8>>(),
            )
            .into_owned(),
            entrypoint: module.entrypoint,
            shared_memory_size: module.shared_memory_size,
        }),
        CudaRepresentation::Cpp(_) => unreachable!("the LLVM backend produces PTX"),
    }
}

/// `kernel`'s PTX for every driver of [`DRIVERS`], each checked by [`check`]; a compilation
/// error fails the test.
fn compile_all(kernel: &impl CubeKernel) -> Vec<Ptx> {
    DRIVERS
        .iter()
        .map(|&(driver, version)| {
            let ptx = compile(kernel, driver).unwrap_or_else(|err| {
                panic!("compiling for sm_{HOPPER} with driver {driver} failed: {err}")
            });
            check(&ptx, version);
            assert!(
                !ptx.text.contains("__nv_"),
                "calls a libdevice function, which needs the CUDA toolkit:\n{}",
                ptx.text
            );
            ptx
        })
        .collect()
}

/// One kernel entry of the expected name, for `sm_90a`, at the PTX ISA `version`, with no
/// function left for the driver to resolve.
fn check(ptx: &Ptx, version: &str) {
    let text = &ptx.text;
    let target = format!(".target {}", hopper().target_cpu());
    assert_eq!(target, ".target sm_90a");
    assert!(
        text.lines().any(|line| line.trim() == target),
        "not compiled for {target}:\n{text}"
    );
    assert!(
        text.lines().any(|line| line.trim() == version),
        "not {version}:\n{text}"
    );
    assert!(
        text.contains(&format!(".entry {}(", ptx.entrypoint)),
        "no `.entry {}`:\n{text}",
        ptx.entrypoint
    );
    assert_eq!(
        text.matches(".entry").count(),
        1,
        "one kernel per module:\n{text}"
    );
    assert!(
        !text.contains(".extern .func"),
        "an unresolved function:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The CUDA runtime compiles with the LLVM backend, so this file tests what it runs. Fails if
/// a crate in the graph turns on cubecl-cuda's `cpp` feature (compiler.rs:24-32).
#[test]
fn the_cuda_runtime_compiles_through_llvm() {
    assert!(
        matches!(CudaCompiler::default(), CudaCompiler::Llvm(_)),
        "CudaCompiler::default() is the NVRTC backend"
    );
    assert_eq!(hopper().target_cpu(), "sm_90a");
}

#[test]
fn bf16_f32_casts_compile() {
    for ptx in compile_all(&bf16_casts_kernel()) {
        // Ampere and later narrow with one instruction (offline_tests.rs:50-53).
        assert!(
            ptx.text.contains("cvt.rn.bf16.f32"),
            "f32 → bf16 is not a native conversion:\n{}",
            ptx.text
        );
    }
}

#[test]
fn stochastic_rounding_bit_operations_compile() {
    for address_type in [AddressType::U32, AddressType::U64] {
        for ptx in compile_all(&stochastic_round_bits_kernel(address_type)) {
            // LLVM writes xors; `lop3` is what ptxas makes of them later.
            assert!(
                ptx.text.contains("xor.b32") || ptx.text.contains("lop3.b32"),
                "{address_type:?}: the hash is gone:\n{}",
                ptx.text
            );
        }
    }
}

#[test]
fn bf16_elementwise_compiles_to_packed_bf16_without_tensor_cores() {
    for ptx in compile_all(&bf16_axpy_kernel()) {
        // `a * x + y` contracts to a packed bf16 FMA from sm_80 on (offline_tests.rs:45-49).
        assert!(
            ptx.text.contains("fma.rn.bf16x2"),
            "bf16 arithmetic is not native:\n{}",
            ptx.text
        );
        assert!(
            !ptx.text.contains("mma."),
            "an elementwise kernel on the tensor cores:\n{}",
            ptx.text
        );
    }
}

#[test]
fn device_stochastic_rounding_compiles() {
    for ptx in compile_all(&device_stochastic_round_kernel()) {
        assert!(
            ptx.text.contains("cvt.rn.bf16.f32"),
            "f32 → bf16 is not a native conversion:\n{}",
            ptx.text
        );
    }
}

#[test]
fn block_sum_compiles() {
    for ptx in compile_all(&block_sum_kernel()) {
        assert!(
            ptx.text.contains("shfl.sync") || ptx.text.contains("redux.sync"),
            "the plane sum is not a warp operation:\n{}",
            ptx.text
        );
        assert!(
            ptx.text.contains("bar.sync") || ptx.text.contains("barrier"),
            "no cube barrier:\n{}",
            ptx.text
        );
        assert!(
            ptx.shared_memory_size >= (UNITS / PLANE) as usize * 4,
            "{} bytes of shared memory for {} partial sums",
            ptx.shared_memory_size,
            UNITS / PLANE
        );
    }
}

/// `exp` links libdevice. Without the CUDA toolkit the only acceptable failure is the one
/// naming the missing file (`cubecl-llvm-0.11.3/src/nvptx/libdevice.rs:34-63`: it looks in
/// `$CUDA_PATH`, else /usr/local/cuda, /opt/cuda, /usr/lib/cuda, /usr, for
/// `nvvm/libdevice/libdevice.10.bc`); `DREAMLOOP_REQUIRE_LIBDEVICE=1` refuses that too.
#[test]
fn silu_links_libdevice_or_names_its_absence() {
    let kernel = silu_kernel();
    for (driver, version) in DRIVERS {
        match compile(&kernel, driver) {
            Ok(ptx) => check(&ptx, version),
            Err(err) => {
                let message = err.to_string();
                assert!(
                    message.contains("libdevice.10.bc was not found"),
                    "compiling for sm_{HOPPER} with driver {driver} failed: {message}"
                );
                assert!(
                    std::env::var_os("DREAMLOOP_REQUIRE_LIBDEVICE").is_none(),
                    "DREAMLOOP_REQUIRE_LIBDEVICE is set and {message}"
                );
                eprintln!(
                    "silu (exp) not compiled to PTX: no CUDA toolkit here (libdevice.10.bc was \
                     not found; set CUDA_PATH to one). It lowered to LLVM IR; code generation \
                     was not reached."
                );
                return;
            }
        }
    }
}
