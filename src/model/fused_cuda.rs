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
//! MLP's `silu(gate) * up` (candle's silu backward alone is several passes). Rows of up to
//! 2,048 keys whose length is a multiple of 8 take warp-per-row attention kernels that
//! hold the row in registers (one read, 16-byte loads, one exponential per element);
//! SwiGLU takes 8 elements a thread when the sizes allow. The kernels are
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
        CpuStorage, CudaDevice, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
        Tensor,
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

// Eight consecutive elements as floats, and back; `p` 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float* v) {
    float4 a = *reinterpret_cast<const float4*>(p);
    float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16* p, float* v) {
    uint4 a = *reinterpret_cast<const uint4*>(p);
    unsigned int w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16* p, const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; i++)
        w[i] = (unsigned int)to_bf16(v[2 * i]) | ((unsigned int)to_bf16(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The same two passes with one warp per row, the row held in registers: lane `l` holds
// elements [8 (32 v + l), 8 (32 v + l) + 8) for v < N, so a row of t <= 256 N elements
// (t a multiple of 8, rows 16-byte aligned) is read once, with 16-byte loads, and each
// exponential is taken once. Same roundings as `forward`/`backward`; only the order of
// the row sums differs.
// For row `row` (a warp's), sets lane `lane`'s z to exp(round_T(x * scale) + bias - max)
// and returns the row's sum of them.
template <typename T, int N>
__device__ __forceinline__ float exp_row(const T* x, const float* bias, int t, int s,
                                         int heads, long bias_batch_stride, float scale,
                                         long row, int lane, float (&z)[N][8]) {
    long batch = row / ((long)heads * s);
    long query = row % s;
    const T* xr = x + row * t;
    const float* br = bias + batch * bias_batch_stride + query * t;
    float m = NEG_INF;
#pragma unroll
    for (int v = 0; v < N; v++) {
        int j = (v * 32 + lane) * 8;
        if (j < t) {
            float a[8], b[8];
            load8(xr + j, a);
            load8(br + j, b);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                z[v][e] = round_to(xr, a[e] * scale) + b[e];
                m = fmaxf(m, z[v][e]);
            }
        }
    }
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < N; v++) {
        if ((v * 32 + lane) * 8 < t) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                z[v][e] = expf(z[v][e] - m);
                sum += z[v][e];
            }
        }
    }
    return warp_sum(sum);
}

template <typename T, int N>
__device__ void forward_warp(const T* x, const float* bias, T* p, int t, int s, int heads,
                             long bias_batch_stride, float scale, long rows) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    float z[N][8];
    float sum = exp_row<T, N>(x, bias, t, s, heads, bias_batch_stride, scale, row, lane, z);
    T* pr = p + row * t;
#pragma unroll
    for (int v = 0; v < N; v++) {
        int j = (v * 32 + lane) * 8;
        if (j < t) {
#pragma unroll
            for (int e = 0; e < 8; e++) z[v][e] = z[v][e] / sum;
            store8(pr + j, z[v]);
        }
    }
}

template <typename T, int N>
__device__ void backward_warp(const T* x, const float* bias, const T* dp, T* p, T* ds, int t,
                              int s, int heads, long bias_batch_stride, float scale, long rows) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    float z[N][8];
    float sum = exp_row<T, N>(x, bias, t, s, heads, bias_batch_stride, scale, row, lane, z);
    const T* dpr = dp + row * t;
    T* pr = p + row * t;
    float g[N][8];
    float dot = 0.0f;
#pragma unroll
    for (int v = 0; v < N; v++) {
        int j = (v * 32 + lane) * 8;
        if (j < t) {
            load8(dpr + j, g[v]);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                z[v][e] = z[v][e] / sum;
                dot += z[v][e] * g[v][e];
            }
            store8(pr + j, z[v]);
        }
    }
    dot = warp_sum(dot);
    T* dsr = ds + row * t;
#pragma unroll
    for (int v = 0; v < N; v++) {
        int j = (v * 32 + lane) * 8;
        if (j < t) {
            float d[8];
#pragma unroll
            for (int e = 0; e < 8; e++) d[e] = round_to(x, z[v][e] * (g[v][e] - dot)) * scale;
            store8(dsr + j, d);
        }
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

// The same, eight elements a thread with 16-byte loads (n a multiple of 8, aligned).
template <typename T>
__device__ void swiglu_forward8(const T* g, const T* u, T* y, long n) {
    for (long i = 8 * (blockIdx.x * (long)blockDim.x + threadIdx.x); i < n;
         i += 8 * (long)gridDim.x * blockDim.x) {
        float gv[8], uv[8], out[8];
        load8(g + i, gv);
        load8(u + i, uv);
#pragma unroll
        for (int e = 0; e < 8; e++) out[e] = round_to(g, gv[e] / (1.0f + expf(-gv[e]))) * uv[e];
        store8(y + i, out);
    }
}

template <typename T>
__device__ void swiglu_backward8(const T* g, const T* u, const T* dy, T* dg, T* du, long n) {
    for (long i = 8 * (blockIdx.x * (long)blockDim.x + threadIdx.x); i < n;
         i += 8 * (long)gridDim.x * blockDim.x) {
        float gv[8], uv[8], dyv[8], dgo[8], duo[8];
        load8(g + i, gv);
        load8(u + i, uv);
        load8(dy + i, dyv);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float sg = 1.0f / (1.0f + expf(-gv[e]));
            float a = round_to(g, gv[e] * sg);
            duo[e] = dyv[e] * a;
            float da = round_to(g, dyv[e] * uv[e]);
            dgo[e] = da * (sg * (1.0f + gv[e] * (1.0f - sg)));
        }
        store8(du + i, duo);
        store8(dg + i, dgo);
    }
}

#define SWIGLU8(SUFFIX, T)                                                                  \
extern "C" __global__ void taper_swiglu_fwd_v8_##SUFFIX(const T* g, const T* u, T* y, long n) { \
    swiglu_forward8(g, u, y, n);                                                            \
}                                                                                           \
extern "C" __global__ void taper_swiglu_bwd_v8_##SUFFIX(const T* g, const T* u, const T* dy, \
        T* dg, T* du, long n) {                                                             \
    swiglu_backward8(g, u, dy, dg, du, n);                                                  \
}
SWIGLU8(f32, float)
SWIGLU8(bf16, bf16)

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

// The attention entry points all take `rows` last; the block-per-row ones ignore it.
#define ATTN(SUFFIX, T)                                                                     \
extern "C" __global__ void taper_attn_fwd_##SUFFIX(const T* x, const float* bias, T* p,   \
        int t, int s, int heads, long bs, float scale, long rows) {                         \
    forward(x, bias, p, t, s, heads, bs, scale);                                            \
}                                                                                           \
extern "C" __global__ void taper_attn_bwd_##SUFFIX(const T* x, const float* bias,          \
        const T* dp, T* p, T* ds, int t, int s, int heads, long bs, float scale, long rows) { \
    backward(x, bias, dp, p, ds, t, s, heads, bs, scale);                                   \
}
#define ATTN_WARP(N, SUFFIX, T)                                                             \
extern "C" __global__ void taper_attn_fwd_w##N##_##SUFFIX(const T* x, const float* bias,   \
        T* p, int t, int s, int heads, long bs, float scale, long rows) {                   \
    forward_warp<T, N>(x, bias, p, t, s, heads, bs, scale, rows);                           \
}                                                                                           \
extern "C" __global__ void taper_attn_bwd_w##N##_##SUFFIX(const T* x, const float* bias,   \
        const T* dp, T* p, T* ds, int t, int s, int heads, long bs, float scale, long rows) { \
    backward_warp<T, N>(x, bias, dp, p, ds, t, s, heads, bs, scale, rows);                  \
}
ATTN(f32, float)
ATTN(bf16, bf16)
ATTN_WARP(1, f32, float)
ATTN_WARP(2, f32, float)
ATTN_WARP(4, f32, float)
ATTN_WARP(8, f32, float)
ATTN_WARP(1, bf16, bf16)
ATTN_WARP(2, bf16, bf16)
ATTN_WARP(4, bf16, bf16)
ATTN_WARP(8, bf16, bf16)
"#;

    const MODULE: &str = "taper_fused";

    /// The PTX, compiled once per process.
    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            nvrtc::compile_ptx(SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling taper's CUDA kernels: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// One launch of one of the kernels above. Inputs arrive in the kernel's argument
    /// order; the result is one tensor the shape of the first input, or two stacked
    /// (`[2, ..]`) for the backward kernels that return two.
    #[derive(Clone, Copy)]
    enum Kernel {
        /// `(scores, bias)` -> probabilities.
        AttnForward { heads: usize, scale: f32 },
        /// `(scores, bias, dP)` -> `[P, dS]`.
        AttnBackward { heads: usize, scale: f32 },
        /// `(x, w)` -> y, or `(x, w, dy)` -> dx.
        Rms { eps: f32, backward: bool },
        /// `(g, u)` -> y, or `(g, u, dy)` -> `[dg, du]`.
        Swiglu { backward: bool },
    }

    /// The scalar arguments after the pointers, in the kernel's order.
    enum Scalars {
        /// `t, s, heads`, the bias's batch stride, the scale and the row count.
        Attn([i32; 3], i64, f32, i64),
        Rms(i32, f32),
        Swiglu(i64),
    }

    impl Kernel {
        /// The entry point; `variant` is the vectorised form's infix (`w4`, `v8`) if any.
        fn name(self, suffix: &str, variant: Option<&str>) -> String {
            let (op, backward) = match self {
                Self::AttnForward { .. } => ("attn", false),
                Self::AttnBackward { .. } => ("attn", true),
                Self::Rms { backward, .. } => ("rms", backward),
                Self::Swiglu { backward } => ("swiglu", backward),
            };
            let variant = variant.map(|v| format!("{v}_")).unwrap_or_default();
            format!(
                "taper_{op}_{}_{variant}{suffix}",
                if backward { "bwd" } else { "fwd" }
            )
        }

        fn outputs(self) -> usize {
            match self {
                Self::AttnBackward { .. } | Self::Swiglu { backward: true } => 2,
                _ => 1,
            }
        }

        /// Checks the layouts; returns the launch shape, the scalar arguments and the
        /// vectorised variant when the shapes and alignments allow one.
        fn plan(self, layouts: &[&Layout]) -> Result<(LaunchConfig, Scalars, Option<String>)> {
            let x = layouts[0];
            if layouts.iter().any(|l| l.contiguous_offsets().is_none()) {
                candle_core::bail!("fused kernel: inputs must be contiguous")
            }
            // 16-byte loads need every input to start on a multiple of 8 elements (the
            // outputs are fresh allocations).
            let aligned = layouts.iter().all(|l| l.start_offset() % 8 == 0);
            let last = *x.dims().last().unwrap_or(&0);
            let rows_of = |width: usize, n: usize| LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (width.next_power_of_two().clamp(32, 256) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            match self {
                Self::AttnForward { heads, scale } | Self::AttnBackward { heads, scale } => {
                    let (b, rows_per_batch, t) = match x.dims() {
                        [b, h, q, t] => (*b, h * q, *t),
                        d => candle_core::bail!("attention softmax: scores of shape {d:?}"),
                    };
                    let (bb, one, s, bt) = match layouts[1].dims() {
                        [bb, one, s, bt] => (*bb, *one, *s, *bt),
                        d => candle_core::bail!("attention softmax: bias of shape {d:?}"),
                    };
                    let fits = one == 1 && bt == t && s > 0 && rows_per_batch == heads * s;
                    if !fits
                        || !(bb == 1 || bb == b)
                        || layouts[2..].iter().any(|l| l.dims() != x.dims())
                    {
                        candle_core::bail!(
                            "attention softmax: scores {:?} do not match bias {:?} with {heads} heads",
                            x.dims(),
                            layouts[1].dims()
                        )
                    }
                    let stride = if bb == 1 { 0 } else { (s * t) as i64 };
                    let rows = b * rows_per_batch;
                    let scalars = Scalars::Attn(
                        [t as i32, s as i32, heads as i32],
                        stride,
                        scale,
                        rows as i64,
                    );
                    // One warp a row, the row in registers, when it fits 8 vectors a lane.
                    let warp = [1usize, 2, 4, 8]
                        .into_iter()
                        .find(|n| 256 * n >= t)
                        .filter(|_| aligned && t.is_multiple_of(8));
                    match warp {
                        Some(n) => {
                            let cfg = LaunchConfig {
                                grid_dim: (rows.div_ceil(4) as u32, 1, 1),
                                block_dim: (128, 1, 1),
                                shared_mem_bytes: 0,
                            };
                            Ok((cfg, scalars, Some(format!("w{n}"))))
                        }
                        None => Ok((rows_of(t, rows), scalars, None)),
                    }
                }
                Self::Rms { eps, .. } => {
                    if layouts[1].dims() != [last]
                        || last == 0
                        || layouts[2..].iter().any(|l| l.dims() != x.dims())
                    {
                        candle_core::bail!(
                            "rms norm: weight {:?} for input {:?}",
                            layouts[1].dims(),
                            x.dims()
                        )
                    }
                    let rows = x.shape().elem_count() / last;
                    Ok((rows_of(last, rows), Scalars::Rms(last as i32, eps), None))
                }
                Self::Swiglu { .. } => {
                    if layouts.iter().any(|l| l.dims() != x.dims()) {
                        candle_core::bail!("swiglu: inputs of different shapes")
                    }
                    let n = x.shape().elem_count();
                    let v8 = aligned && n.is_multiple_of(8);
                    let per_thread = if v8 { 8 } else { 1 };
                    let cfg = LaunchConfig {
                        grid_dim: (
                            (n / per_thread).div_ceil(256).clamp(1, 1 << 20) as u32,
                            1,
                            1,
                        ),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    Ok((cfg, Scalars::Swiglu(n as i64), v8.then(|| "v8".to_string())))
                }
            }
        }

        /// Whether input `i` is f32 whatever the element type (the attention bias).
        fn is_f32_input(self, i: usize) -> bool {
            matches!(self, Self::AttnForward { .. } | Self::AttnBackward { .. }) && i == 1
        }

        fn run<T: CudaDType + DeviceRepr>(
            self,
            suffix: &str,
            inputs: &[(&CudaStorage, &Layout)],
        ) -> Result<CudaStorage> {
            let layouts: Vec<&Layout> = inputs.iter().map(|(_, l)| *l).collect();
            let (cfg, scalars, variant) = self.plan(&layouts)?;
            let dev: &CudaDevice = &inputs[0].0.device;
            let name = self.name(suffix, variant.as_deref());
            let func = dev.get_or_load_custom_func(&name, MODULE, ptx()?)?;
            let mut typed = Vec::new();
            let mut floats = Vec::new();
            for (i, (s, l)) in inputs.iter().enumerate() {
                let (o1, o2) = l.contiguous_offsets().unwrap_or((0, 0));
                if self.is_f32_input(i) {
                    floats.push(s.as_cuda_slice::<f32>()?.slice(o1..o2));
                } else {
                    typed.push(s.as_cuda_slice::<T>()?.slice(o1..o2));
                }
            }
            let n = layouts[0].shape().elem_count();
            // SAFETY: the kernel writes every element of every output.
            let mut out: CudaSlice<T> = unsafe { dev.alloc::<T>(self.outputs() * n)? };
            {
                let mut b = func.builder();
                let (mut t, mut f) = (typed.iter(), floats.iter());
                for i in 0..inputs.len() {
                    let view = if self.is_f32_input(i) { None } else { t.next() };
                    match view {
                        Some(v) => b.arg(v),
                        None => b.arg(f.next().ok_or_else(|| {
                            candle_core::Error::Msg("fused kernel: inputs".into())
                        })?),
                    };
                }
                let (mut first, mut second) = out.split_at_mut(n);
                b.arg(&mut first);
                if self.outputs() == 2 {
                    b.arg(&mut second);
                }
                match &scalars {
                    Scalars::Attn(ints, stride, scale, rows) => b
                        .arg(&ints[0])
                        .arg(&ints[1])
                        .arg(&ints[2])
                        .arg(stride)
                        .arg(scale)
                        .arg(rows),
                    Scalars::Rms(h, eps) => b.arg(h).arg(eps),
                    Scalars::Swiglu(len) => b.arg(len),
                };
                // SAFETY: argument types and counts match the kernel's signature.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }

        fn dispatch(self, inputs: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
            use candle_core::backend::BackendStorage;
            let out = match inputs[0].0.dtype() {
                DType::F32 => self.run::<f32>("f32", inputs)?,
                DType::BF16 => self.run::<half::bf16>("bf16", inputs)?,
                d => candle_core::bail!("taper's CUDA kernels: no kernel for {d:?}"),
            };
            let mut dims = if self.outputs() == 2 { vec![2] } else { vec![] };
            dims.extend_from_slice(inputs[0].1.dims());
            Ok((out, Shape::from(dims)))
        }

        fn apply2(self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
            a.apply_op2_no_bwd(b, &self)
        }

        /// Three inputs; a two-output kernel's results come back split.
        fn apply3(self, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Vec<Tensor>> {
            let out = a.apply_op3_no_bwd(b, c, &self)?;
            match self.outputs() {
                2 => Ok(vec![out.get(0)?, out.get(1)?]),
                _ => Ok(vec![out]),
            }
        }
    }

    impl CustomOp2 for Kernel {
        fn name(&self) -> &'static str {
            "taper-cuda-kernel"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("taper's fused kernels run on CUDA only")
        }

        fn cuda_fwd(
            &self,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.dispatch(&[(a, al), (b, bl)])
        }
    }

    impl CustomOp3 for Kernel {
        fn name(&self) -> &'static str {
            "taper-cuda-kernel"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("taper's fused kernels run on CUDA only")
        }

        fn cuda_fwd(
            &self,
            a: &CudaStorage,
            al: &Layout,
            b: &CudaStorage,
            bl: &Layout,
            c: &CudaStorage,
            cl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.dispatch(&[(a, al), (b, bl), (c, cl)])
        }
    }

    fn two(mut v: Vec<Tensor>) -> Result<(Tensor, Tensor)> {
        match (v.pop(), v.pop()) {
            (Some(second), Some(first)) => Ok((first, second)),
            _ => candle_core::bail!("fused kernel: expected two results"),
        }
    }

    fn one(mut v: Vec<Tensor>) -> Result<Tensor> {
        v.pop()
            .ok_or_else(|| candle_core::Error::Msg("fused kernel: no result".into()))
    }

    /// `softmax(round(scores * scale) + bias)` over the last dimension, in the scores'
    /// dtype. `scores` `[b, heads, s, t]`, `bias` `[b or 1, 1, s, t]` f32; both contiguous.
    pub fn softmax_forward(
        scores: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<Tensor> {
        let scale = scale as f32;
        Kernel::AttnForward { heads, scale }.apply2(scores, bias)
    }

    /// The probabilities again and `dS` (scaled), from the raw scores and `dP`.
    pub fn softmax_backward(
        scores: &Tensor,
        bias: &Tensor,
        dp: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<(Tensor, Tensor)> {
        let scale = scale as f32;
        two(Kernel::AttnBackward { heads, scale }.apply3(scores, bias, dp)?)
    }

    /// RMSNorm of contiguous `x` with weight `w` (same dtype), as `fused::rms_norm`.
    pub fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let eps = eps as f32;
        Kernel::Rms {
            eps,
            backward: false,
        }
        .apply2(x, w)
    }

    /// The input gradient of [`rms_forward`] given the output's gradient `dy`.
    pub fn rms_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
        let eps = eps as f32;
        one(Kernel::Rms {
            eps,
            backward: true,
        }
        .apply3(x, w, dy)?)
    }

    /// `silu(g) * u` of contiguous, equal-shaped `g` and `u`.
    pub fn swiglu_forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
        Kernel::Swiglu { backward: false }.apply2(g, u)
    }

    /// `(dg, du)` of [`swiglu_forward`] given the output's gradient `dy`.
    pub fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        two(Kernel::Swiglu { backward: true }.apply3(g, u, dy)?)
    }
}
