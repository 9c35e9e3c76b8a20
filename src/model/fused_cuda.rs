//! CUDA kernels for the attention softmax, forward and backward, one pass over the
//! scores each.
//!
//! Built of candle ops, the attention's element-wise work (scale, cast to f32, add the
//! mask, softmax, cast back; and in the backward the recomputation, `P * dP`, the row
//! sums, the subtraction, two casts and the scale) is about fourteen passes over a
//! `[batch, heads, seq, seq]` tensor a layer, which an `ncu` profile showed to be most
//! of a CUDA training step (BENCHMARKS.md, "train (CUDA)"). These two kernels do the
//! same arithmetic, with the same roundings, in one pass each: the forward reads the raw
//! scores and writes the probabilities; the backward reads the raw scores and `dP` and
//! writes the probabilities (for `dV`) and `dS`. RMSNorm gets the same treatment (nine
//! element-wise passes forward, fourteen backward, one each here), and so does the
//! MLP's `silu(gate) * up` (candle's silu backward alone is several passes). The kernels are
//! compiled with NVRTC when first used. f32 and bf16 only; other dtypes, and every other backend, take the candle-op
//! path in [`super::fused`].

use candle_core::{DType, Device, Tensor};

/// Whether the kernels can serve scores of this dtype on this device with this bias.
pub fn usable(device: &Device, dtype: DType, bias: Option<&Tensor>) -> bool {
    cfg!(feature = "cuda")
        && device.is_cuda()
        && matches!(dtype, DType::F32 | DType::BF16)
        && bias.is_some_and(|b| b.dtype() == DType::F32 && b.rank() == 4)
}

#[cfg(feature = "cuda")]
pub use imp::{
    rms_backward, rms_forward, softmax_backward, softmax_forward, swiglu_backward, swiglu_forward,
};

/// Whether the RMSNorm kernels can serve `x` with `weight`.
pub fn usable_norm(x: &Tensor, weight: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && weight.dtype() == x.dtype()
        && weight.rank() == 1
}

/// Whether the SwiGLU kernels can serve `g` and `u`.
pub fn usable_swiglu(g: &Tensor, u: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && g.device().is_cuda()
        && matches!(g.dtype(), DType::F32 | DType::BF16)
        && u.dtype() == g.dtype()
        && u.dims() == g.dims()
}

#[cfg(not(feature = "cuda"))]
pub fn swiglu_forward(_: &Tensor, _: &Tensor) -> candle_core::Result<Tensor> {
    candle_core::bail!("the swiglu kernel needs a build with --features cuda")
}

#[cfg(not(feature = "cuda"))]
pub fn swiglu_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    candle_core::bail!("the swiglu kernel needs a build with --features cuda")
}

#[cfg(not(feature = "cuda"))]
pub fn rms_forward(_: &Tensor, _: &Tensor, _: f64) -> candle_core::Result<Tensor> {
    candle_core::bail!("the rms norm kernel needs a build with --features cuda")
}

#[cfg(not(feature = "cuda"))]
pub fn rms_backward(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> candle_core::Result<Tensor> {
    candle_core::bail!("the rms norm kernel needs a build with --features cuda")
}

#[cfg(not(feature = "cuda"))]
pub fn softmax_forward(_: &Tensor, _: &Tensor, _: usize, _: f64) -> candle_core::Result<Tensor> {
    candle_core::bail!("the attention softmax kernel needs a build with --features cuda")
}

#[cfg(not(feature = "cuda"))]
pub fn softmax_backward(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: usize,
    _: f64,
) -> candle_core::Result<(Tensor, Tensor)> {
    candle_core::bail!("the attention softmax kernel needs a build with --features cuda")
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::cudarc::nvrtc;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{
        CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
    };

    const SOURCE: &str = r#"
typedef unsigned short bf16;
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float load(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ bf16 to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
__device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, long i, float v) { p[i] = to_bf16(v); }
// The value rounded to the element type, as a float.
__device__ __forceinline__ float round_to(const float*, float v) { return v; }
__device__ __forceinline__ float round_to(const bf16*, float v) {
    return __uint_as_float(((unsigned int)to_bf16(v)) << 16);
}

__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : NEG_INF;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One block per row of `t` scores; rows are (batch, head, query) with `heads` heads and
// `s` queries; the bias row is (batch or 0, query). The score is rounded to the element
// type after scaling (candle scales in that type), then the bias is added in f32.
template <typename T>
__device__ void forward(const T* x, const float* bias, T* p, int t, int s, int heads,
                        long bias_batch_stride, float scale) {
    __shared__ float shared[32];
    long row = blockIdx.x;
    long batch = row / ((long)heads * s);
    long query = row % s;
    const T* xr = x + row * t;
    const float* br = bias + batch * bias_batch_stride + query * t;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        m = fmaxf(m, round_to(xr, load(xr, j) * scale) + br[j]);
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        sum += expf(round_to(xr, load(xr, j) * scale) + br[j] - m);
    sum = block_sum(sum, shared);
    T* pr = p + row * t;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        store(pr, j, expf(round_to(xr, load(xr, j) * scale) + br[j] - m) / sum);
}

// Recomputes P (written out in T for dV = P^T dO) and writes
// dS = round_T(P * (dP - sum(P * dP))) * scale, rounded to T again.
template <typename T>
__device__ void backward(const T* x, const float* bias, const T* dp, T* p, T* ds, int t,
                         int s, int heads, long bias_batch_stride, float scale) {
    __shared__ float shared[32];
    long row = blockIdx.x;
    long batch = row / ((long)heads * s);
    long query = row % s;
    const T* xr = x + row * t;
    const T* dpr = dp + row * t;
    const float* br = bias + batch * bias_batch_stride + query * t;
    float m = NEG_INF;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        m = fmaxf(m, round_to(xr, load(xr, j) * scale) + br[j]);
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x)
        sum += expf(round_to(xr, load(xr, j) * scale) + br[j] - m);
    sum = block_sum(sum, shared);
    float dot = 0.0f;
    T* pr = p + row * t;
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        float pj = expf(round_to(xr, load(xr, j) * scale) + br[j] - m) / sum;
        store(pr, j, pj);
        dot += pj * load(dpr, j);
    }
    dot = block_sum(dot, shared);
    T* dsr = ds + row * t;
    for (int j = threadIdx.x; j < t; j += blockDim.x) {
        float pj = expf(round_to(xr, load(xr, j) * scale) + br[j] - m) / sum;
        float d = round_to(xr, pj * (load(dpr, j) - dot));
        store(dsr, j, d * scale);
    }
}

// RMSNorm over rows of `h`: y = round_T(round_T(x * inv) * w), inv = 1 / sqrt(mean(x^2) + eps).
template <typename T>
__device__ void rms_forward(const T* x, const T* w, T* y, int h, float eps) {
    __shared__ float shared[32];
    long row = blockIdx.x;
    const T* xr = x + row * h;
    float sq = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = load(xr, j); sq += v * v; }
    float inv = 1.0f / sqrtf(block_sum(sq, shared) / h + eps);
    T* yr = y + row * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        store(yr, j, round_to(xr, load(xr, j) * inv) * load(w, j));
}

// dx = (g - n * mean(g * n)) * inv with n = x * inv and g = round_T(dy * w).
template <typename T>
__device__ void rms_backward(const T* x, const T* w, const T* dy, T* dx, int h, float eps) {
    __shared__ float shared[32];
    long row = blockIdx.x;
    const T* xr = x + row * h;
    const T* dyr = dy + row * h;
    float sq = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = load(xr, j); sq += v * v; }
    float inv = 1.0f / sqrtf(block_sum(sq, shared) / h + eps);
    float dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        dot += round_to(xr, load(dyr, j) * load(w, j)) * (load(xr, j) * inv);
    float mean = block_sum(dot, shared) / h;
    T* dxr = dx + row * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float g = round_to(xr, load(dyr, j) * load(w, j));
        store(dxr, j, (g - load(xr, j) * inv * mean) * inv);
    }
}

// SwiGLU: y = round_T(round_T(silu(g)) * u); the backward gives dg and du.
template <typename T>
__device__ void swiglu_forward(const T* g, const T* u, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gv = load(g, i);
        float a = round_to(g, gv / (1.0f + expf(-gv)));
        store(y, i, a * load(u, i));
    }
}

template <typename T>
__device__ void swiglu_backward(const T* g, const T* u, const T* dy, T* dg, T* du, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gv = load(g, i), dyv = load(dy, i);
        float sg = 1.0f / (1.0f + expf(-gv));
        float a = round_to(g, gv * sg);
        store(du, i, dyv * a);
        float da = round_to(g, dyv * load(u, i));
        store(dg, i, da * (sg * (1.0f + gv * (1.0f - sg))));
    }
}

extern "C" __global__ void taper_swiglu_fwd_f32(const float* g, const float* u, float* y, long n) {
    swiglu_forward(g, u, y, n);
}
extern "C" __global__ void taper_swiglu_fwd_bf16(const bf16* g, const bf16* u, bf16* y, long n) {
    swiglu_forward(g, u, y, n);
}
extern "C" __global__ void taper_swiglu_bwd_f32(const float* g, const float* u, const float* dy,
        float* dg, float* du, long n) {
    swiglu_backward(g, u, dy, dg, du, n);
}
extern "C" __global__ void taper_swiglu_bwd_bf16(const bf16* g, const bf16* u, const bf16* dy,
        bf16* dg, bf16* du, long n) {
    swiglu_backward(g, u, dy, dg, du, n);
}

extern "C" __global__ void taper_rms_fwd_f32(const float* x, const float* w, float* y, int h, float eps) {
    rms_forward(x, w, y, h, eps);
}
extern "C" __global__ void taper_rms_fwd_bf16(const bf16* x, const bf16* w, bf16* y, int h, float eps) {
    rms_forward(x, w, y, h, eps);
}
extern "C" __global__ void taper_rms_bwd_f32(const float* x, const float* w, const float* dy,
        float* dx, int h, float eps) {
    rms_backward(x, w, dy, dx, h, eps);
}
extern "C" __global__ void taper_rms_bwd_bf16(const bf16* x, const bf16* w, const bf16* dy,
        bf16* dx, int h, float eps) {
    rms_backward(x, w, dy, dx, h, eps);
}

extern "C" __global__ void taper_attn_fwd_f32(const float* x, const float* bias, float* p,
        int t, int s, int heads, long bs, float scale) {
    forward(x, bias, p, t, s, heads, bs, scale);
}
extern "C" __global__ void taper_attn_fwd_bf16(const bf16* x, const float* bias, bf16* p,
        int t, int s, int heads, long bs, float scale) {
    forward(x, bias, p, t, s, heads, bs, scale);
}
extern "C" __global__ void taper_attn_bwd_f32(const float* x, const float* bias,
        const float* dp, float* p, float* ds, int t, int s, int heads, long bs, float scale) {
    backward(x, bias, dp, p, ds, t, s, heads, bs, scale);
}
extern "C" __global__ void taper_attn_bwd_bf16(const bf16* x, const float* bias,
        const bf16* dp, bf16* p, bf16* ds, int t, int s, int heads, long bs, float scale) {
    backward(x, bias, dp, p, ds, t, s, heads, bs, scale);
}
"#;

    const MODULE: &str = "taper_attention_softmax";

    /// The PTX, compiled once per process.
    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            nvrtc::compile_ptx(SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling the attention softmax kernel: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// Rows, row length, queries and the bias batch stride, checked.
    struct Geometry {
        rows: usize,
        t: usize,
        s: usize,
        heads: usize,
        bias_stride: i64,
    }

    fn geometry(x: &Layout, bias: &Layout, heads: usize) -> Result<Geometry> {
        let (b, rows_per_batch, t) = match x.dims() {
            [b, h, q, t] => (*b, h * q, *t),
            d => candle_core::bail!("attention softmax: scores of shape {d:?}"),
        };
        let (bb, one, s, bt) = match bias.dims() {
            [bb, one, s, bt] => (*bb, *one, *s, *bt),
            d => candle_core::bail!("attention softmax: bias of shape {d:?}"),
        };
        if one != 1 || bt != t || s == 0 || rows_per_batch != heads * s || !(bb == 1 || bb == b) {
            candle_core::bail!(
                "attention softmax: scores {:?} do not match bias {:?} with {heads} heads",
                x.dims(),
                bias.dims()
            )
        }
        if x.contiguous_offsets().is_none() || bias.contiguous_offsets().is_none() {
            candle_core::bail!("attention softmax: inputs must be contiguous")
        }
        Ok(Geometry {
            rows: b * rows_per_batch,
            t,
            s,
            heads,
            bias_stride: if bb == 1 { 0 } else { (s * t) as i64 },
        })
    }

    fn launch_config(g: &Geometry) -> LaunchConfig {
        let threads = g.t.next_power_of_two().clamp(32, 256) as u32;
        LaunchConfig {
            grid_dim: (g.rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn view<'a, T: CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let (o1, o2) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("attention softmax: not contiguous".into()))?;
        Ok(s.as_cuda_slice::<T>()?.slice(o1..o2))
    }

    struct Forward {
        heads: usize,
        scale: f32,
    }

    impl Forward {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            name: &str,
            x: &CudaStorage,
            xl: &Layout,
            bias: &CudaStorage,
            bl: &Layout,
        ) -> Result<CudaStorage> {
            let g = geometry(xl, bl, self.heads)?;
            let dev: &CudaDevice = &x.device;
            let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
            let (xv, bv) = (view::<T>(x, xl)?, view::<f32>(bias, bl)?);
            // SAFETY: every element is written by the kernel.
            let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(g.rows * g.t)? };
            let (t, s, h) = (g.t as i32, g.s as i32, g.heads as i32);
            let mut b = func.builder();
            b.arg(&xv).arg(&bv).arg(&mut out).arg(&t).arg(&s).arg(&h);
            b.arg(&g.bias_stride).arg(&self.scale);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(launch_config(&g)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }

    impl CustomOp2 for Forward {
        fn name(&self) -> &'static str {
            "taper-attention-softmax"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the attention softmax kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            bias: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let out = match x.dtype() {
                DType::F32 => self.run::<f32>("taper_attn_fwd_f32", x, xl, bias, bl)?,
                DType::BF16 => self.run::<half::bf16>("taper_attn_fwd_bf16", x, xl, bias, bl)?,
                d => candle_core::bail!("attention softmax: no kernel for {d:?}"),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    struct Backward {
        heads: usize,
        scale: f32,
    }

    impl Backward {
        #[allow(clippy::too_many_arguments)]
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            name: &str,
            x: &CudaStorage,
            xl: &Layout,
            bias: &CudaStorage,
            bl: &Layout,
            dp: &CudaStorage,
            dl: &Layout,
        ) -> Result<CudaStorage> {
            let g = geometry(xl, bl, self.heads)?;
            if dl.dims() != xl.dims() {
                candle_core::bail!(
                    "attention softmax: dP {:?} vs scores {:?}",
                    dl.dims(),
                    xl.dims()
                )
            }
            let dev: &CudaDevice = &x.device;
            let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
            let (xv, bv, dv) = (
                view::<T>(x, xl)?,
                view::<f32>(bias, bl)?,
                view::<T>(dp, dl)?,
            );
            let n = g.rows * g.t;
            // SAFETY: every element is written by the kernel: P in the first half, dS in
            // the second.
            let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(2 * n)? };
            {
                let (mut p, mut ds) = out.split_at_mut(n);
                let (t, s, h) = (g.t as i32, g.s as i32, g.heads as i32);
                let mut b = func.builder();
                b.arg(&xv).arg(&bv).arg(&dv).arg(&mut p).arg(&mut ds);
                b.arg(&t)
                    .arg(&s)
                    .arg(&h)
                    .arg(&g.bias_stride)
                    .arg(&self.scale);
                // SAFETY: argument types and counts match the kernel's signature.
                unsafe { b.launch(launch_config(&g)) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }

    impl CustomOp3 for Backward {
        fn name(&self) -> &'static str {
            "taper-attention-softmax-backward"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the attention softmax kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            bias: &CudaStorage,
            bl: &Layout,
            dp: &CudaStorage,
            dl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let out = match x.dtype() {
                DType::F32 => self.run::<f32>("taper_attn_bwd_f32", x, xl, bias, bl, dp, dl)?,
                DType::BF16 => {
                    self.run::<half::bf16>("taper_attn_bwd_bf16", x, xl, bias, bl, dp, dl)?
                }
                d => candle_core::bail!("attention softmax: no kernel for {d:?}"),
            };
            let mut dims = vec![2];
            dims.extend_from_slice(xl.dims());
            Ok((out, Shape::from(dims)))
        }
    }

    /// `softmax(round(scores * scale) + bias)` over the last dimension, in the scores'
    /// dtype. `scores` `[b, heads, s, t]`, `bias` `[b or 1, 1, s, t]` f32; both contiguous.
    pub fn softmax_forward(
        scores: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        scores.apply_op2_no_bwd(
            bias,
            &Forward {
                heads,
                scale: scale as f32,
            },
        )
    }

    /// The probabilities again and `dS` (scaled), from the raw scores and `dP`.
    pub fn softmax_backward(
        scores: &Tensor,
        bias: &Tensor,
        dp: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let both = scores.apply_op3_no_bwd(
            bias,
            dp,
            &Backward {
                heads,
                scale: scale as f32,
            },
        )?;
        Ok((both.get(0)?, both.get(1)?))
    }

    /// RMSNorm rows: `x` `[.., h]`, `w` `[h]`, and for the backward `dy` like `x`.
    struct Rms {
        eps: f32,
        backward: bool,
    }

    impl Rms {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            suffix: &str,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            dy: Option<(&CudaStorage, &Layout)>,
        ) -> Result<CudaStorage> {
            let h = *xl.dims().last().unwrap_or(&0);
            if wl.dims() != [h] || h == 0 {
                candle_core::bail!("rms norm: weight {:?} for rows of {h}", wl.dims())
            }
            let rows = xl.shape().elem_count() / h;
            let dev: &CudaDevice = &x.device;
            let kind = if self.backward { "bwd" } else { "fwd" };
            let func =
                dev.get_or_load_custom_func(&format!("taper_rms_{kind}_{suffix}"), MODULE, ptx()?)?;
            let (xv, wv) = (view::<T>(x, xl)?, view::<T>(w, wl)?);
            // SAFETY: every element is written by the kernel.
            let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(rows * h)? };
            let hi = h as i32;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (h.next_power_of_two().clamp(32, 256) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&xv).arg(&wv);
            let dyv;
            if let Some((dy, dl)) = dy {
                if dl.dims() != xl.dims() {
                    candle_core::bail!(
                        "rms norm: gradient {:?} for input {:?}",
                        dl.dims(),
                        xl.dims()
                    )
                }
                dyv = view::<T>(dy, dl)?;
                b.arg(&dyv);
            }
            b.arg(&mut out).arg(&hi).arg(&self.eps);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        fn dispatch(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            dy: Option<(&CudaStorage, &Layout)>,
        ) -> Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let out = match x.dtype() {
                DType::F32 => self.run::<f32>("f32", x, xl, w, wl, dy)?,
                DType::BF16 => self.run::<half::bf16>("bf16", x, xl, w, wl, dy)?,
                d => candle_core::bail!("rms norm: no kernel for {d:?}"),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    impl CustomOp2 for Rms {
        fn name(&self) -> &'static str {
            "taper-rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the rms norm kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.dispatch(x, xl, w, wl, None)
        }
    }

    impl CustomOp3 for Rms {
        fn name(&self) -> &'static str {
            "taper-rms-norm-backward"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the rms norm kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            dy: &CudaStorage,
            dl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.dispatch(x, xl, w, wl, Some((dy, dl)))
        }
    }

    /// RMSNorm of contiguous `x` with weight `w` (same dtype), as `super::super::fused::rms_norm`.
    pub fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let op = Rms {
            eps: eps as f32,
            backward: false,
        };
        x.apply_op2_no_bwd(w, &op)
    }

    /// The input gradient of [`rms_forward`] given the output's gradient `dy`.
    pub fn rms_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
        let op = Rms {
            eps: eps as f32,
            backward: true,
        };
        x.apply_op3_no_bwd(w, dy, &op)
    }

    /// SwiGLU over equal-shaped contiguous `g`, `u` (and `dy` for the backward).
    struct Swiglu {
        backward: bool,
    }

    impl Swiglu {
        fn run<T: CudaDType + DeviceRepr>(
            &self,
            suffix: &str,
            inputs: &[(&CudaStorage, &Layout)],
        ) -> Result<CudaStorage> {
            let (g, gl) = inputs[0];
            if inputs.iter().any(|(_, l)| l.dims() != gl.dims()) {
                candle_core::bail!("swiglu: inputs of different shapes")
            }
            let n = gl.shape().elem_count();
            let dev: &CudaDevice = &g.device;
            let kind = if self.backward { "bwd" } else { "fwd" };
            let func = dev.get_or_load_custom_func(
                &format!("taper_swiglu_{kind}_{suffix}"),
                MODULE,
                ptx()?,
            )?;
            let views = inputs
                .iter()
                .map(|(s, l)| view::<T>(s, l))
                .collect::<Result<Vec<_>>>()?;
            let outputs = if self.backward { 2 } else { 1 };
            // SAFETY: every element is written by the kernel.
            let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(outputs * n)? };
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).clamp(1, 1 << 20) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let len = n as i64;
            {
                let mut b = func.builder();
                for v in &views {
                    b.arg(v);
                }
                let (mut first, mut second) = out.split_at_mut(n);
                b.arg(&mut first);
                if self.backward {
                    b.arg(&mut second);
                }
                b.arg(&len);
                // SAFETY: argument types and counts match the kernel's signature.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        fn dispatch(&self, inputs: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let (g, gl) = inputs[0];
            let out = match g.dtype() {
                DType::F32 => self.run::<f32>("f32", inputs)?,
                DType::BF16 => self.run::<half::bf16>("bf16", inputs)?,
                d => candle_core::bail!("swiglu: no kernel for {d:?}"),
            };
            let mut dims = if self.backward { vec![2] } else { vec![] };
            dims.extend_from_slice(gl.dims());
            Ok((out, Shape::from(dims)))
        }
    }

    impl CustomOp2 for Swiglu {
        fn name(&self) -> &'static str {
            "taper-swiglu"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the swiglu kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            gl: &Layout,
            u: &CudaStorage,
            ul: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.dispatch(&[(g, gl), (u, ul)])
        }
    }

    impl CustomOp3 for Swiglu {
        fn name(&self) -> &'static str {
            "taper-swiglu-backward"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the swiglu kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            gl: &Layout,
            u: &CudaStorage,
            ul: &Layout,
            dy: &CudaStorage,
            dl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.dispatch(&[(g, gl), (u, ul), (dy, dl)])
        }
    }

    /// `silu(g) * u` of contiguous, equal-shaped `g` and `u`.
    pub fn swiglu_forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
        g.apply_op2_no_bwd(u, &Swiglu { backward: false })
    }

    /// `(dg, du)` of [`swiglu_forward`] given the output's gradient `dy`.
    pub fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let both = g.apply_op3_no_bwd(u, dy, &Swiglu { backward: true })?;
        Ok((both.get(0)?, both.get(1)?))
    }
}
