//! Differentiable attention, rotary embedding, RMSNorm and cross-entropy whose backward
//! is written out here, so that the graph keeps only their inputs.
//!
//! candle's fused kernels (`softmax_last_dim`, `rotary_emb::rope`) are fast but have no
//! backward pass: a graph through them silently loses its gradient. Composing the same
//! math from small differentiable ops works, but the graph then keeps every intermediate
//! for the backward pass: for attention that is several `[batch, heads, seq, seq]` tensors
//! a layer, which is what exhausted GPU memory at `8 × 1024`.
//!
//! Here the forward runs on detached inputs, and its result is attached to the graph by a
//! custom op that records only the inputs. The backward recomputes what it needs from them
//! (the attention probabilities, as FlashAttention does) and returns the input gradients.
//! Each op is checked against the composed formulation, value and gradient, in the tests
//! below, and `tests/model_gradients.rs` checks the whole model against finite differences.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

use super::frozen::Weight;
use super::norm::internal_dtype;
use super::{fused_cpu, fused_cuda};

/// The one-pass RMSNorm and SwiGLU kernels of [`fused_cuda`] and [`fused_cpu`], picked
/// by the tensors' device. `usable*` says whether either serves the inputs; the others
/// call the one for the device (the CPU's unless the tensor is on CUDA). Attention has
/// its own: the CUDA softmax kernels between candle's products, or the CPU's whole
/// attention per head (`fused_cpu::attention_forward`).
mod kernels {
    use super::{fused_cpu as cpu, fused_cuda as cuda, Out};
    use candle_core::{Device, Result, Tensor};

    pub fn usable_norm(x: &Tensor, weight: &Tensor) -> bool {
        cuda::usable_norm(x, weight) || cpu::usable_norm(x, weight)
    }

    pub fn usable_swiglu(g: &Tensor, u: &Tensor) -> bool {
        cuda::usable_swiglu(g, u) || cpu::usable_swiglu(g, u)
    }

    pub fn rms_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Out> {
        match x.device() {
            Device::Cuda(_) => cuda::rms_forward(x, w, eps).map(Out::Tensor),
            _ => Ok(Out::Cpu(cpu::rms_forward(x, w, eps)?, x.shape().clone())),
        }
    }

    pub fn rms_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64) -> Result<Tensor> {
        match x.device() {
            Device::Cuda(_) => cuda::rms_backward(x, w, dy, eps),
            _ => cpu::rms_backward(x, w, dy, eps),
        }
    }

    pub fn swiglu_forward(g: &Tensor, u: &Tensor) -> Result<Out> {
        match g.device() {
            Device::Cuda(_) => cuda::swiglu_forward(g, u).map(Out::Tensor),
            _ => Ok(Out::Cpu(cpu::swiglu_forward(g, u)?, g.shape().clone())),
        }
    }

    pub fn swiglu_backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        match g.device() {
            Device::Cuda(_) => cuda::swiglu_backward(g, u, dy),
            _ => cpu::swiglu_backward(g, u, dy),
        }
    }
}

/// The backward of a one-input op: the gradient for `x` given the output's gradient.
trait Backward1: Send + Sync + 'static {
    const NAME: &'static str;
    fn bwd(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// The backward of a two-input op.
type Grads2 = (Option<Tensor>, Option<Tensor>);
trait Backward2: Send + Sync + 'static {
    const NAME: &'static str;
    fn bwd(&self, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Grads2>;
}

/// The backward of a three-input op.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
trait Backward3: Send + Sync + 'static {
    const NAME: &'static str;
    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, grad: &Tensor) -> Result<Grads3>;
}

/// A result computed beforehand: a tensor, or the f32 elements and shape a CPU kernel
/// wrote, which the op hands to candle as they are (a tensor's storage would be copied).
enum Out {
    Tensor(Tensor),
    Cpu(Vec<f32>, Shape),
}

impl From<Tensor> for Out {
    fn from(t: Tensor) -> Self {
        Out::Tensor(t)
    }
}

impl Out {
    fn into_tensor(self) -> Result<Tensor> {
        match self {
            Out::Tensor(t) => Ok(t),
            Out::Cpu(v, shape) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
        }
    }
}

/// A custom op whose forward hands back a result computed beforehand, so that candle
/// records it against the op's inputs with `B` as its backward.
struct Attached<B> {
    out: Mutex<Option<Out>>,
    backward: B,
}

impl<B> Attached<B> {
    fn new(out: Out, backward: B) -> Result<Self> {
        // The forward copies a tensor's whole storage: make it exactly `out`'s elements.
        let out = match out {
            Out::Tensor(t) if !(t.is_contiguous() && t.layout().start_offset() == 0) => {
                Out::Tensor(t.force_contiguous()?)
            }
            out => out,
        };
        Ok(Self {
            out: Mutex::new(Some(out)),
            backward,
        })
    }

    fn take(&self) -> Result<Out> {
        let mut slot = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused op: poisoned lock".into()))?;
        slot.take()
            .ok_or_else(|| candle_core::Error::Msg("fused op: forward ran twice".into()))
    }

    /// The result as a tensor, for the backends other than the CPU.
    fn take_tensor(&self) -> Result<Tensor> {
        match self.take()? {
            Out::Tensor(t) => Ok(t),
            Out::Cpu(..) => candle_core::bail!("fused op: result and inputs on different devices"),
        }
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = match self.take()? {
            Out::Cpu(v, shape) => return Ok((CpuStorage::F32(v), shape)),
            Out::Tensor(t) => t,
        };
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("fused op: result and inputs on different devices"),
        }
    }

    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take_tensor()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("fused op: result and inputs on different devices"),
        }
    }

    fn metal(&self) -> Result<(candle_core::MetalStorage, Shape)> {
        let out = self.take_tensor()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => Ok((s.try_clone(layout)?, out.shape().clone())),
            _ => candle_core::bail!("fused op: result and inputs on different devices"),
        }
    }
}

impl<B: Backward1> CustomOp1 for Attached<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.metal()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.backward.bwd(&x.detach(), &grad.detach())
    }
}

impl<B: Backward2> CustomOp2 for Attached<B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.metal()
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Grads2> {
        self.backward.bwd(&a.detach(), &b.detach(), &grad.detach())
    }
}

impl<B: Backward3> CustomOp3 for Attached<B> {
    fn name(&self) -> &'static str {
        B::NAME
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
        self.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }

    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.metal()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        self.backward
            .bwd(&a.detach(), &b.detach(), &c.detach(), &grad.detach())
    }
}

/// `out` (computed from `x` detached) as a function of `x` whose backward is `backward`.
fn attach1<B: Backward1>(x: &Tensor, out: impl Into<Out>, backward: B) -> Result<Tensor> {
    if !x.track_op() {
        return out.into().into_tensor();
    }
    x.apply_op1(Attached::new(out.into(), backward)?)
}

/// `out` as a function of `a`, `b` whose backward is `backward`.
fn attach2<B: Backward2>(
    a: &Tensor,
    b: &Tensor,
    out: impl Into<Out>,
    backward: B,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op()) {
        return out.into().into_tensor();
    }
    a.apply_op2(b, Attached::new(out.into(), backward)?)
}

/// `out` as a function of `a`, `b`, `c` whose backward is `backward`.
fn attach3<B: Backward3>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    out: impl Into<Out>,
    backward: B,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return out.into().into_tensor();
    }
    a.apply_op3(b, c, Attached::new(out.into(), backward)?)
}

// ---------------------------------------------------------------------------------------
// Attention

/// Scaled dot-product attention of queries `q` `[b, heads, s, hd]` over keys and values
/// `k`, `v` `[b, kv_heads, t, hd]` (grouped-query: query head `i` reads kv head
/// `i / (heads / kv_heads)`), with an additive `bias` broadcastable to `[b, 1, s, t]` in
/// the softmax dtype. Scores and softmax run in f32 for half types (f64 for f64), as
/// transformers does. Returns `[b, heads, s, hd]`. The backward keeps only `q`, `k`, `v`
/// and recomputes the probabilities; `bias` gets no gradient.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let op = AttentionBackward {
        bias: bias.map(Tensor::detach),
    };
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let (b, nh, s, hd) = qd.dims4()?;
    if fused_cpu::usable_attention(&qd, op.bias.as_ref()) {
        let out = fused_cpu::attention_forward(&qd, &kd, &vd, op.bias.as_ref(), scale(hd))?;
        return attach3(q, k, v, Out::Cpu(out, qd.shape().clone()), op);
    }
    let probs = match op.kernel_bias(&qd) {
        Some(bias) => {
            let scores = op.raw_scores(&qd, &kd)?;
            fused_cuda::softmax_forward(&scores, bias, nh, scale(hd))?
        }
        None => op.probs(&qd, &kd)?.to_dtype(qd.dtype())?,
    };
    let out = probs.matmul(&vd.contiguous()?)?.reshape((b, nh, s, hd))?;
    attach3(q, k, v, out, op)
}

/// The softmax scale of heads of `head_dim`.
fn scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

struct AttentionBackward {
    bias: Option<Tensor>,
}

impl AttentionBackward {
    /// The bias, when the CUDA softmax kernels serve this call (`super::fused_cuda`).
    fn kernel_bias(&self, q: &Tensor) -> Option<&Tensor> {
        let bias = self.bias.as_ref()?;
        fused_cuda::usable(q.device(), q.dtype(), Some(bias)).then_some(bias)
    }

    /// `q k^T` `[b, kv_heads, groups * s, t]` in the input dtype, unscaled: query head
    /// i reads kv head i / groups, so each group is folded into the row axis.
    fn raw_scores(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let (b, nh, s, hd) = q.dims4()?;
        let nkv = k.dim(1)?;
        if nkv == 0 || nh % nkv != 0 {
            candle_core::bail!("attention: {nh} query heads do not group over {nkv} kv heads")
        }
        let q = q.contiguous()?.reshape((b, nkv, (nh / nkv) * s, hd))?;
        q.matmul(&k.contiguous()?.t()?)
    }

    /// The attention probabilities `[b, kv_heads, groups * s, t]` in the softmax dtype.
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let (b, nh, s, hd) = q.dims4()?;
        let (_, nkv, t, _) = k.dims4()?;
        let groups = nh / nkv.max(1);
        let scores = (self.raw_scores(q, k)? * scale(hd))?;
        let scores = scores
            .to_dtype(internal_dtype(scores.dtype()))?
            .reshape((b, nkv, groups, s, t))?;
        let scores = match &self.bias {
            Some(bias) => scores.broadcast_add(&bias.unsqueeze(2)?)?,
            None => scores,
        };
        candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, nkv, groups * s, t))
    }
}

impl Backward3 for AttentionBackward {
    const NAME: &'static str = "taper-attention";

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let (b, nh, s, hd) = q.dims4()?;
        let (_, nkv, t, _) = k.dims4()?;
        let groups = nh / nkv;
        let dtype = q.dtype();
        let scale = scale(hd);
        if fused_cpu::usable_attention(q, self.bias.as_ref()) {
            let (dq, dk, dv) =
                fused_cpu::attention_backward(q, k, v, self.bias.as_ref(), grad, scale)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let q = q.contiguous()?;
        let qf = q.reshape((b, nkv, groups * s, hd))?;
        let grad = grad.contiguous()?.reshape((b, nkv, groups * s, hd))?;
        // out = P v, so dP = dO v^T.
        let dp = grad.matmul(&v.t()?)?;
        let (probs, ds) = match self.kernel_bias(&q) {
            Some(bias) => {
                let scores = self.raw_scores(&q, &k)?;
                fused_cuda::softmax_backward(&scores, bias, &dp, nh, scale)?
            }
            None => {
                let probs = self.probs(&q, &k)?;
                let dp = dp.to_dtype(probs.dtype())?;
                // softmax: dS = P * (dP - sum(P * dP))
                let rows = (&probs * &dp)?.sum_keepdim(D::Minus1)?;
                let ds = (&probs * dp.broadcast_sub(&rows)?)?;
                // scores = (q k^T * scale) cast to the softmax dtype
                (probs.to_dtype(dtype)?, (ds.to_dtype(dtype)? * scale)?)
            }
        };
        let dv = probs.t()?.matmul(&grad)?;
        let dq = ds.matmul(&k)?.reshape((b, nh, s, hd))?;
        let dk = ds.t()?.matmul(&qf)?;
        debug_assert_eq!(dk.dims4()?, (b, nkv, t, hd));
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

// ---------------------------------------------------------------------------------------
// LoRA linear

/// `x W^T (+ bias) + scale (x A^T) B^T` over the last dimension of `x`, for a frozen `W`
/// `[out, in]` and trainable `A` `[r, in]`, `B` `[out, r]`, in one op on the CPU
/// ([`fused_cpu::lora_forward`]: the update is added by the second product, no
/// element-wise passes). `None` where that does not serve (other devices or dtypes);
/// the caller then composes it. Without dropout only: the branch reads `x` itself.
pub fn lora_linear(
    x: &Tensor,
    w: &Weight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    if !fused_cpu::usable_lora(x, w, a, b) || bias.is_some_and(|b| b.dtype() != DType::F32) {
        return Ok(None);
    }
    let dims = x.dims();
    let Some((&i, lead)) = dims.split_last() else {
        return Ok(None);
    };
    // The op takes `x` as it is and gives `y` in its shape: no reshape nodes around it in
    // the graph.
    let m = lead.iter().product::<usize>();
    let x2 = x.detach().reshape((m, i))?;
    let (out, down) = fused_cpu::lora_forward(&x2, w, bias, &a.detach(), &b.detach(), scale)?;
    let mut shape = lead.to_vec();
    shape.push(w.dims()?.0);
    let op = LoraBackward {
        weight: match w {
            Weight::Tensor(t) => Weight::Tensor(t.detach()),
            Weight::Packed(p) => Weight::Packed(p.clone()),
            Weight::Paneled(p) => Weight::Paneled(p.clone()),
        },
        scale,
        down,
        need_dx: x.track_op(),
    };
    attach3(x, a, b, Out::Cpu(out, Shape::from(shape)), op).map(Some)
}

struct LoraBackward {
    weight: Weight,
    scale: f64,
    /// `x A^T` `[rows, r]` as the forward computed it (`None` for a packed weight).
    down: Option<Vec<f32>>,
    /// Whether the input needs its gradient (it does below any other trainable layer).
    need_dx: bool,
}

impl Backward3 for LoraBackward {
    const NAME: &'static str = "taper-lora-linear";

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<Grads3> {
        // The kernels take the rows flat; `dx` goes back in `x`'s shape.
        let (i, o) = (
            x.dims().last().copied().unwrap_or(1),
            grad.dims().last().copied().unwrap_or(1),
        );
        let (x2, g2) = (x.reshape(((), i))?, grad.reshape(((), o))?);
        let (dx, da, db) = fused_cpu::lora_backward(
            &x2,
            &self.weight,
            a,
            b,
            &g2,
            self.scale,
            self.down.as_deref(),
            self.need_dx,
        )?;
        let dx = match dx {
            Some(dx) => Some(dx.reshape(x.shape())?),
            None => None,
        };
        Ok((dx, Some(da), Some(db)))
    }
}

// ---------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension, differentiable. f32 on the CPU runs
/// [`fused_cpu::softmax_forward`] (one pass a row, vectorised `exp`) with its backward
/// `p * (g - sum(p * g))`, `p` recomputed there; elsewhere candle's ops with the max
/// shift as a constant.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_cpu::usable_softmax(x) {
        let p = fused_cpu::softmax_forward(&x.detach())?;
        return attach1(x, Out::Cpu(p, x.shape().clone()), SoftmaxBackward);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

struct SoftmaxBackward;

impl Backward1 for SoftmaxBackward {
    const NAME: &'static str = "taper-softmax";

    fn bwd(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fused_cpu::softmax_backward(x, grad).map(Some)
    }
}

// ---------------------------------------------------------------------------------------
// Rotary embedding

/// Rotary position embedding of `x` `[b, heads, s, hd]` with `cos`/`sin` tables
/// `[s, hd / 2]` (non-interleaved halves, as transformers' Llama and Qwen2), on candle's
/// fused kernel. The rotation's transpose is the rotation by `-angle`, so the backward is
/// the same kernel with `-sin`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let out = candle_nn::rotary_emb::rope(&x.detach().contiguous()?, cos, sin)?;
    attach1(
        x,
        out,
        RopeBackward {
            cos: cos.detach(),
            neg_sin: sin.neg()?.detach(),
        },
    )
}

struct RopeBackward {
    cos: Tensor,
    neg_sin: Tensor,
}

impl Backward1 for RopeBackward {
    const NAME: &'static str = "taper-rope";

    fn bwd(&self, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        candle_nn::rotary_emb::rope(&grad.contiguous()?, &self.cos, &self.neg_sin).map(Some)
    }
}

// ---------------------------------------------------------------------------------------
// Heads

/// A projection's output `x` `[b, s, n * hd]` as `n` heads `[b, n, s, hd]` (contiguous),
/// each position rotated by `rope` (`cos`, `sin` `[s, hd / 2]`, as [`rope`]) when given.
/// On the CPU in f32 one parallel pass each way (`fused_cpu::to_heads`, and
/// `from_heads` rotating back for the backward), which copies each element once;
/// elsewhere a transpose copy and then [`rope`].
pub fn split_heads(x: &Tensor, n: usize, rope: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    let (b, s, width) = x.dims3()?;
    if n == 0 || width % n != 0 {
        candle_core::bail!("split_heads: {width} features do not split into {n} heads")
    }
    let hd = width / n;
    if fused_cpu::usable_heads(x, rope) {
        let out = fused_cpu::to_heads(&x.detach(), (b, s, n, hd), rope, false)?;
        let rope = rope.map(|(c, s)| (c.detach(), s.detach()));
        let backward = HeadsBackward::Split { n, rope };
        return attach1(x, Out::Cpu(out, (b, n, s, hd).into()), backward);
    }
    let heads = x.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()?;
    match rope {
        Some((cos, sin)) => self::rope(&heads, cos, sin),
        None => Ok(heads),
    }
}

/// Heads `x` `[b, n, s, hd]` back to `[b, s, n * hd]`, the input layout of `o_proj`: the
/// inverse of [`split_heads`] without a rotation.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, n, s, hd) = x.dims4()?;
    if fused_cpu::usable_heads(x, None) {
        let out = fused_cpu::from_heads(&x.detach(), (b, n, s, hd), None, false)?;
        return attach1(
            x,
            Out::Cpu(out, (b, s, n * hd).into()),
            HeadsBackward::Merge,
        );
    }
    x.transpose(1, 2)?.reshape((b, s, n * hd))
}

enum HeadsBackward {
    /// Of [`split_heads`] into `n` heads, with its rotation.
    Split {
        n: usize,
        rope: Option<(Tensor, Tensor)>,
    },
    /// Of [`merge_heads`].
    Merge,
}

impl Backward1 for HeadsBackward {
    const NAME: &'static str = "taper-heads";

    fn bwd(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = match self {
            HeadsBackward::Split { n, rope } => {
                let (b, s, width) = x.dims3()?;
                let rope = rope.as_ref().map(|(c, s)| (c, s));
                fused_cpu::from_heads(grad, (b, *n, s, width / n), rope, true)?
            }
            HeadsBackward::Merge => {
                let (b, n, s, hd) = x.dims4()?;
                fused_cpu::to_heads(grad, (b, s, n, hd), None, false)?
            }
        };
        Tensor::from_vec(out, x.shape(), x.device()).map(Some)
    }
}

// ---------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) * up`, the Llama MLP's activation. On CUDA (f32, bf16) and the CPU (f32)
/// one kernel each way (`super::fused_cuda`, `super::fused_cpu`); elsewhere candle's
/// ops, whose own backward is used.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !kernels::usable_swiglu(gate, up) {
        return gate.silu()? * up;
    }
    let (g, u) = (gate.detach().contiguous()?, up.detach().contiguous()?);
    let out = kernels::swiglu_forward(&g, &u)?;
    attach2(gate, up, out, SwigluBackward)
}

struct SwigluBackward;

impl Backward2 for SwigluBackward {
    const NAME: &'static str = "taper-swiglu";

    fn bwd(&self, g: &Tensor, u: &Tensor, grad: &Tensor) -> Result<Grads2> {
        let (g, u, grad) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
        let (dg, du) = kernels::swiglu_backward(&g, &u, &grad)?;
        Ok((Some(dg), Some(du)))
    }
}

// ---------------------------------------------------------------------------------------
// Residual add

/// `a + b` for the residual connections. On the CPU in f32, `fused_cpu::add_forward`
/// (on the caller's rayon pool; see there why); elsewhere candle's add.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fused_cpu::usable_add(a, b) {
        return a + b;
    }
    let out = fused_cpu::add_forward(&a.detach(), &b.detach())?;
    attach2(a, b, Out::Cpu(out, a.shape().clone()), AddBackward)
}

struct AddBackward;

impl Backward2 for AddBackward {
    const NAME: &'static str = "taper-add";

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Grads2> {
        Ok((Some(grad.clone()), Some(grad.clone())))
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// `(x / sqrt(mean(x^2) + eps))` in f32 (f64 for f64), cast back to `x`'s dtype, times
/// `weight`: transformers' `LlamaRMSNorm` step by step. The weight is frozen (no
/// gradient); the backward keeps only `x` and recomputes the inverse root.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let out = if kernels::usable_norm(x, weight) {
        kernels::rms_forward(&x.detach().contiguous()?, weight, eps)?
    } else {
        let x32 = x.detach().to_dtype(internal_dtype(dtype))?;
        let inv = rms_inverse(&x32, eps)?;
        Out::Tensor(
            x32.broadcast_mul(&inv)?
                .to_dtype(dtype)?
                .broadcast_mul(weight)?,
        )
    };
    attach1(
        x,
        out,
        RmsNormBackward {
            weight: weight.detach(),
            eps,
        },
    )
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * w + b`,
/// differentiable with respect to `x`; `w` and `b` are frozen, as base weights are. No
/// model taper loads has one (Llama and Qwen2 use RMSNorm): it is here for the seed's
/// benchmark suite and for architectures to come. On the CPU in f32 one pass a row each
/// way (`fused_cpu`); elsewhere candle's ops.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (w, b) = (w.detach(), b.detach());
    if fused_cpu::usable_norm(x, &w) && b.dtype() == DType::F32 {
        let out = fused_cpu::layer_norm_forward(&x.detach(), &w, &b, eps)?;
        let backward = LayerNormBackward { weight: w, eps };
        return attach1(x, Out::Cpu(out, x.shape().clone()), backward);
    }
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&w)?
        .broadcast_add(&b)
}

struct LayerNormBackward {
    weight: Tensor,
    eps: f64,
}

impl Backward1 for LayerNormBackward {
    const NAME: &'static str = "taper-layer-norm";

    fn bwd(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        fused_cpu::layer_norm_backward(x, &self.weight, grad, self.eps).map(Some)
    }
}

/// `1 / sqrt(mean(x^2) + eps)` over the last dimension, keeping it.
fn rms_inverse(x: &Tensor, eps: f64) -> Result<Tensor> {
    (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
}

struct RmsNormBackward {
    weight: Tensor,
    eps: f64,
}

impl Backward1 for RmsNormBackward {
    const NAME: &'static str = "taper-rms-norm";

    fn bwd(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if kernels::usable_norm(x, &self.weight) {
            let (x, grad) = (x.contiguous()?, grad.contiguous()?);
            return kernels::rms_backward(&x, &self.weight, &grad, self.eps).map(Some);
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(internal_dtype(dtype))?;
        let inv = rms_inverse(&x32, self.eps)?;
        let normed = x32.broadcast_mul(&inv)?;
        // d(normed) = grad * weight, cast to the norm's dtype.
        let g = grad.broadcast_mul(&self.weight)?.to_dtype(x32.dtype())?;
        // dx = inv * (g - normed * mean(g * normed))
        let mean = (&g * &normed)?.mean_keepdim(D::Minus1)?;
        let dx = g.sub(&normed.broadcast_mul(&mean)?)?.broadcast_mul(&inv)?;
        dx.to_dtype(dtype).map(Some)
    }
}

// ---------------------------------------------------------------------------------------
// Cross-entropy

/// Mean cross-entropy of `logits` `[n, vocab]` (f32 or f64) against `labels` `[n]` (u32),
/// each row weighted by `weights` `[n]` (same dtype as the logits; the mean divides by
/// their sum; a row of weight 0 is left out) when given. Returns a scalar. The backward
/// is `softmax - one_hot`, scaled, without keeping the log-softmax of the whole
/// vocabulary for it.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let x = logits.detach();
    let labels = labels.detach();
    // log_softmax picked at the label, with the max shift; on the CPU in one pass
    // (`fused_cpu`), which also keeps each row's log-sum-exp for the backward.
    let (picked, lse) = if fused_cpu::usable_cross_entropy(&x) {
        let (picked, lse) = fused_cpu::cross_entropy_forward(&x, &labels)?;
        (picked, Some(lse))
    } else {
        let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let picked = shifted
            .gather(&labels.unsqueeze(1)?, 1)?
            .sub(&lse)?
            .squeeze(1)?;
        (picked, None)
    };
    let (loss, row_scale) = match weights {
        None => (picked.mean_all()?.neg()?, None),
        Some(w) => {
            let count = w.sum_all()?;
            // A row of weight 0 does not count, even where its log-probability is not
            // finite (0 * -inf would be NaN).
            let picked = w.ne(0.0)?.where_cond(&picked, &picked.zeros_like()?)?;
            let loss = (&picked * w)?.sum_all()?.neg()?.broadcast_div(&count)?;
            (loss, Some(w.broadcast_div(&count)?.detach()))
        }
    };
    attach1(
        logits,
        loss,
        CrossEntropyBackward {
            labels,
            row_scale,
            rows: n,
            lse,
        },
    )
}

struct CrossEntropyBackward {
    /// `[n]` u32.
    labels: Tensor,
    /// `[n]`: weight / sum of weights; `None` for `1 / n`.
    row_scale: Option<Tensor>,
    rows: usize,
    /// `[n]`: each row's log-sum-exp, when the CPU kernel ran the forward.
    lse: Option<Tensor>,
}

impl Backward1 for CrossEntropyBackward {
    const NAME: &'static str = "taper-cross-entropy";

    fn bwd(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(x.dtype())?;
        if let Some(lse) = &self.lse {
            // Each row's factor: its share of the mean times the loss's gradient.
            let k = match &self.row_scale {
                Some(scale) => scale.broadcast_mul(&grad)?,
                None => Tensor::full(1.0 / self.rows as f32, self.rows, x.device())?
                    .broadcast_mul(&grad)?,
            };
            return fused_cpu::cross_entropy_backward(x, &self.labels, lse, &k).map(Some);
        }
        let probs = candle_nn::ops::softmax_last_dim(&x.contiguous()?)?;
        let minus_one = Tensor::full(-1f64, (self.rows, 1), x.device())?.to_dtype(x.dtype())?;
        let d = probs.scatter_add(&self.labels.unsqueeze(1)?, &minus_one, 1)?;
        let d = match &self.row_scale {
            Some(scale) => d.broadcast_mul(&scale.unsqueeze(1)?)?,
            None => (d / self.rows as f64)?,
        };
        d.broadcast_mul(&grad).map(Some)
    }
}

/// The dtype the cross-entropy runs in for logits of `dtype`.
pub fn loss_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_util::{max_diff, rel_diff};
    use candle_core::{Device, Var};

    /// Deterministic values in about [-1.7, 1.7], different for each seed.
    fn var(shape: &[usize], seed: u64) -> Var {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f64> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 * 3.4 - 1.7
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// The composed attention the fused op replaces (all ops differentiable).
    fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let (b, nh, s, hd) = q.dims4().unwrap();
        let (_, nkv, t, _) = k.dims4().unwrap();
        let g = nh / nkv;
        let q = q.reshape((b, nkv, g * s, hd)).unwrap();
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt()))
            .unwrap()
            .reshape((b, nkv, g, s, t))
            .unwrap();
        let scores = match bias {
            Some(bias) => scores.broadcast_add(&bias.unsqueeze(2).unwrap()).unwrap(),
            None => scores,
        };
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.reshape((b, nkv, g * s, t))
            .unwrap()
            .matmul(v)
            .unwrap()
            .reshape((b, nh, s, hd))
            .unwrap()
    }

    #[test]
    fn attention_matches_composed_value_and_gradients() {
        // 4 query heads over 2 kv heads, causal bias with one padded key.
        let (q, k, v) = (
            var(&[2, 4, 5, 8], 1),
            var(&[2, 2, 5, 8], 2),
            var(&[2, 2, 5, 8], 3),
        );
        let mask = Tensor::new(&[[1u8, 1, 1, 1, 1], [0, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let bias = super::super::mask::attention_bias(2, 5, Some(&mask), DType::F64, &Device::Cpu)
            .unwrap();
        let w = var(&[2, 4, 5, 8], 4);
        let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&bias)).unwrap();
        let want = composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&bias));
        assert!(max_diff(&ours, &want) < 1e-12);
        let g1 = (ours * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (want * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for x in [&q, &k, &v] {
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) < 1e-12,
                "gradient differs by {}",
                max_diff(a, b)
            );
            assert!(
                max_diff(a, &a.zeros_like().unwrap()) > 1e-3,
                "gradient is zero"
            );
        }
    }

    /// An f32 copy of `v` as a new variable.
    fn f32_var(v: &Var) -> Var {
        Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap()
    }

    /// The gradient of `sum(y * w)` for each of `xs`.
    fn grads_of(y: &Tensor, w: &Tensor, xs: &[&Var]) -> Vec<Tensor> {
        let g = (y * w).unwrap().sum_all().unwrap().backward().unwrap();
        xs.iter()
            .map(|x| g.get(x.as_tensor()).expect("a gradient").clone())
            .collect()
    }

    #[test]
    fn layer_norm_kernel_matches_the_composed_ops() {
        // Rows of 101 (a tail after the 64-lane sums), offset from zero so the mean
        // matters; the f64 copy takes the composed path.
        let x64 =
            Var::from_tensor(&var(&[3, 5, 101], 51).as_tensor().affine(3.0, 2.0).unwrap()).unwrap();
        let x = f32_var(&x64);
        let (w64, b64) = (
            var(&[101], 52).as_tensor().clone(),
            var(&[101], 53).as_tensor().clone(),
        );
        let (w, b) = (
            w64.to_dtype(DType::F32).unwrap(),
            b64.to_dtype(DType::F32).unwrap(),
        );
        assert!(fused_cpu::usable_norm(x.as_tensor(), &w));
        let ours = layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap();
        let want = layer_norm(x64.as_tensor(), &w64, &b64, 1e-5).unwrap();
        let want32 = want.to_dtype(DType::F32).unwrap();
        assert!(
            rel_diff(&ours, &want32) < 1e-6,
            "layer norm {}",
            rel_diff(&ours, &want32)
        );
        let dy = var(&[3, 5, 101], 54);
        let dy32 = dy.as_tensor().to_dtype(DType::F32).unwrap();
        let g1 = &grads_of(&ours, &dy32, &[&x])[0];
        let g2 = grads_of(&want, dy.as_tensor(), &[&x64])[0]
            .to_dtype(DType::F32)
            .unwrap();
        assert!(
            rel_diff(g1, &g2) < 1e-5,
            "layer norm gradient {}",
            rel_diff(g1, &g2)
        );
    }

    #[test]
    fn heads_split_and_merge_match_the_composed_layout_and_rope_in_f32() {
        // 3 heads of 6 over 5 positions; cos and sin need not be a rotation for the
        // backward (the transpose) to be right, so any values do.
        let (b, s, n, hd) = (2, 5, 3, 6);
        let x = f32_var(&var(&[b, s, n * hd], 41));
        let (cos, sin) = (
            f32_var(&var(&[s, hd / 2], 42)).as_tensor().clone(),
            f32_var(&var(&[s, hd / 2], 43)).as_tensor().clone(),
        );
        assert!(fused_cpu::usable_heads(x.as_tensor(), Some((&cos, &sin))));
        let heads = |t: &Tensor| {
            t.reshape((b, s, n, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let w = f32_var(&var(&[b, n, s, hd], 44));
        for rope in [Some((&cos, &sin)), None] {
            let ours = split_heads(x.as_tensor(), n, rope).unwrap();
            let want = match rope {
                Some((c, sn)) => {
                    candle_nn::rotary_emb::rope_slow(&heads(x.as_tensor()), c, sn).unwrap()
                }
                None => heads(x.as_tensor()),
            };
            assert_eq!(ours.dims(), [b, n, s, hd]);
            assert!(
                rel_diff(&ours, &want) < 1e-6,
                "split {}",
                rel_diff(&ours, &want)
            );
            let (g1, g2) = (
                &grads_of(&ours, w.as_tensor(), &[&x])[0],
                &grads_of(&want, w.as_tensor(), &[&x])[0],
            );
            assert!(
                rel_diff(g1, g2) < 1e-6,
                "split gradient {}",
                rel_diff(g1, g2)
            );
        }
        let y = f32_var(&var(&[b, n, s, hd], 45));
        let ours = merge_heads(y.as_tensor()).unwrap();
        let want = y
            .as_tensor()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, n * hd))
            .unwrap();
        assert_eq!(max_diff(&ours, &want), 0.0);
        let w = f32_var(&var(&[b, s, n * hd], 46));
        let (g1, g2) = (
            &grads_of(&ours, w.as_tensor(), &[&y])[0],
            &grads_of(&want, w.as_tensor(), &[&y])[0],
        );
        assert_eq!(max_diff(g1, g2), 0.0);
        // A rotation that does not cover the positions is an error, not a panic.
        let short = cos.narrow(0, 0, s - 1).unwrap();
        assert!(split_heads(x.as_tensor(), n, Some((&short, &short))).is_err());
    }

    #[test]
    fn cpu_kernels_match_the_composed_ops_in_f32() {
        // The f32 CPU path takes `fused_cpu`'s kernels; the composed formulation is
        // candle's ops. Rows of 101 and 300 keys leave tails after the 64-lane sums.
        let cpu = Device::Cpu;
        // (batch, kv heads, seq, bias): 2 x 2 query heads a kv head over 21 keys with
        // left padding; 70 queries a head (140 rows a kv head: several row chunks, so dK
        // and dV add up across chunks) without a bias, as a decoding step has none; 2
        // query heads over 300 keys with left padding, whose row chunks see from a chunk's
        // worth to all 300 keys under the causal mask (the rest skipped), except the
        // padded batch's first chunk, whose fully masked rows see all 300: the two
        // batches' key limits differ.
        for (b, nkv, n, with_bias) in [(2, 2, 21, true), (1, 2, 70, false), (2, 1, 300, true)] {
            let (q, k, v) = (
                f32_var(&var(&[b, 2 * nkv, n, 8], 21)),
                f32_var(&var(&[b, nkv, n, 8], 22)),
                f32_var(&var(&[b, nkv, n, 8], 23)),
            );
            let mut real = vec![1u8; b * n];
            real[(b - 1) * n..(b - 1) * n + 3].fill(0); // left padding in the last row
            let mask = Tensor::from_vec(real, (b, n), &cpu).unwrap();
            let bias =
                super::super::mask::attention_bias(b, n, Some(&mask), DType::F32, &cpu).unwrap();
            let bias = with_bias.then_some(&bias);
            assert!(fused_cpu::usable_attention(q.as_tensor(), bias));
            let w = f32_var(&var(&[b, 2 * nkv, n, 8], 24));
            let ours = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), bias).unwrap();
            let want = composed_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), bias);
            let d = rel_diff(&ours, &want);
            assert!(d < 1e-6, "attention {d}");
            let g1 = grads_of(&ours, w.as_tensor(), &[&q, &k, &v]);
            let g2 = grads_of(&want, w.as_tensor(), &[&q, &k, &v]);
            for (a, b) in g1.iter().zip(&g2) {
                assert!(
                    rel_diff(a, b) < 1e-5,
                    "attention gradient {}",
                    rel_diff(a, b)
                );
            }
        }

        let x = f32_var(&var(&[3, 5, 101], 25));
        let nw = var(&[101], 26).as_tensor().to_dtype(DType::F32).unwrap();
        assert!(fused_cpu::usable_norm(x.as_tensor(), &nw));
        let ours = rms_norm(x.as_tensor(), &nw, 1e-5).unwrap();
        let t = x.as_tensor();
        let inv = rms_inverse(t, 1e-5).unwrap();
        let want = t.broadcast_mul(&inv).unwrap().broadcast_mul(&nw).unwrap();
        assert!(
            rel_diff(&ours, &want) < 1e-6,
            "rms norm {}",
            rel_diff(&ours, &want)
        );
        let dy = f32_var(&var(&[3, 5, 101], 27));
        let (a, b) = (
            &grads_of(&ours, dy.as_tensor(), &[&x])[0],
            &grads_of(&want, dy.as_tensor(), &[&x])[0],
        );
        assert!(
            rel_diff(a, b) < 1e-5,
            "rms norm gradient {}",
            rel_diff(a, b)
        );

        // Gates out to +-10 reach both tails of the sigmoid.
        let gate = Var::from_tensor(
            &(var(&[3, 7, 50], 28).as_tensor() * 6.0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let up = f32_var(&var(&[3, 7, 50], 29));
        assert!(fused_cpu::usable_swiglu(gate.as_tensor(), up.as_tensor()));
        let ours = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let want = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        assert!(
            rel_diff(&ours, &want) < 1e-6,
            "swiglu {}",
            rel_diff(&ours, &want)
        );
        let dy = f32_var(&var(&[3, 7, 50], 30));
        let g1 = grads_of(&ours, dy.as_tensor(), &[&gate, &up]);
        let g2 = grads_of(&want, dy.as_tensor(), &[&gate, &up]);
        for (a, b) in g1.iter().zip(&g2) {
            assert!(rel_diff(a, b) < 1e-5, "swiglu gradient {}", rel_diff(a, b));
        }

        // The residual add, more elements than one task takes: exact, both gradients
        // the output's.
        let (a, b) = (
            f32_var(&var(&[3, 70, 101], 32)),
            f32_var(&var(&[3, 70, 101], 33)),
        );
        assert!(fused_cpu::usable_add(a.as_tensor(), b.as_tensor()));
        let ours = add(a.as_tensor(), b.as_tensor()).unwrap();
        let want = (a.as_tensor() + b.as_tensor()).unwrap();
        assert_eq!(rel_diff(&ours, &want), 0.0, "add");
        let dy = f32_var(&var(&[3, 70, 101], 34));
        let g1 = grads_of(&ours, dy.as_tensor(), &[&a, &b]);
        let g2 = grads_of(&want, dy.as_tensor(), &[&a, &b]);
        for (x, y) in g1.iter().zip(&g2) {
            assert_eq!(rel_diff(x, y), 0.0, "add gradient");
        }

        let logits = Var::from_tensor(
            &(var(&[6, 101], 31).as_tensor() * 4.0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let labels = Tensor::new(&[0u32, 3, 100, 5, 5, 17], &cpu).unwrap();
        let weights = Tensor::new(&[1f32, 0., 1., 1., 0., 1.], &cpu).unwrap();
        assert!(fused_cpu::usable_cross_entropy(logits.as_tensor()));
        for weights in [None, Some(&weights)] {
            let ours = cross_entropy(logits.as_tensor(), &labels, weights).unwrap();
            let want = composed_cross_entropy(logits.as_tensor(), &labels, weights);
            assert!(
                rel_diff(&ours, &want) < 1e-6,
                "cross-entropy {}",
                rel_diff(&ours, &want)
            );
            let three = Tensor::new(3f32, &cpu).unwrap();
            let (a, b) = (
                &grads_of(&ours, &three, &[&logits])[0],
                &grads_of(&want, &three, &[&logits])[0],
            );
            assert!(
                rel_diff(a, b) < 1e-5,
                "cross-entropy gradient {}",
                rel_diff(a, b)
            );
        }
        let bad = Tensor::new(&[0u32, 3, 101, 5, 5, 17], &cpu).unwrap();
        let err = cross_entropy(logits.as_tensor(), &bad, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("label 101 is outside the vocabulary of 101"),
            "{err}"
        );
    }

    /// [`lora_linear_matches_the_composed_layer_in_f32`] for x `[2, seq, inp]`.
    fn lora_linear_matches_at(seq: usize, inp: usize) {
        let x = f32_var(&var(&[2, seq, inp], 51));
        let (a, b) = (f32_var(&var(&[5, inp], 52)), f32_var(&var(&[21, 5], 53)));
        let w = var(&[21, inp], 54)
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .detach();
        let bias = var(&[21], 55)
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .detach();
        let composed = |x: &Tensor| {
            let base = x
                .broadcast_matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            let down = x.broadcast_matmul(&a.as_tensor().t().unwrap()).unwrap();
            let up = down.broadcast_matmul(&b.as_tensor().t().unwrap()).unwrap();
            (base + (up * 1.5).unwrap()).unwrap()
        };
        // The weight as loaded, and as inference stores it (its transpose, viewed back, or
        // packed), and with training's panels.
        let w_t = w.t().unwrap().contiguous().unwrap().t().unwrap();
        assert_eq!(w_t.layout().stride(), [1, 21]);
        let packed = Weight::Packed(std::sync::Arc::new(
            crate::model::packed::PackedWeight::pack(&w).unwrap(),
        ));
        let dy = f32_var(&var(&[2, seq, 21], 56));
        let mut stored = vec![Weight::Tensor(w.clone()), Weight::Tensor(w_t), packed];
        // And as training stores it on CPUs with AVX-512 (whatever its size here).
        if crate::model::panels::available() {
            let mut frozen = crate::model::frozen::FrozenLinear::new(w.clone(), None);
            frozen.panel().unwrap();
            assert!(matches!(frozen.stored(), Weight::Paneled(..)));
            stored.push(frozen.stored().clone());
            // And inference's panels (the forward's alone; the backward unpacks them).
            let mut frozen = crate::model::frozen::FrozenLinear::new(w.clone(), None);
            frozen
                .store_as(crate::model::frozen::InferenceLayout::Paneled)
                .unwrap();
            assert!(matches!(frozen.stored(), Weight::Paneled(p) if !p.trains()));
            stored.push(frozen.stored().clone());
        }
        for w_stored in stored {
            let ours = lora_linear(
                x.as_tensor(),
                &w_stored,
                Some(&bias),
                a.as_tensor(),
                b.as_tensor(),
                1.5,
            )
            .unwrap()
            .expect("the CPU kernel serves f32");
            let want = composed(x.as_tensor());
            assert_eq!(ours.dims(), [2, seq, 21]);
            assert!(
                rel_diff(&ours, &want) < 1e-6,
                "lora linear at [2, {seq}, {inp}]: {}",
                rel_diff(&ours, &want)
            );
            let g1 = grads_of(&ours, dy.as_tensor(), &[&x, &a, &b]);
            let g2 = grads_of(&want, dy.as_tensor(), &[&x, &a, &b]);
            for (name, (p, q)) in ["x", "A", "B"].iter().zip(g1.iter().zip(&g2)) {
                assert!(
                    rel_diff(p, q) < 1e-5,
                    "gradient of {name} at [2, {seq}, {inp}]: {}",
                    rel_diff(p, q)
                );
            }
        }
    }

    #[test]
    fn lora_linear_matches_the_composed_layer_in_f32() {
        // x [2, 9, 37] through a 37 -> 21 linear with bias and a rank-5 update; and
        // [2, 30, 1030], whose weight as loaded (training's) is packed at the call where
        // packing pays (`fused_cpu::packs_per_call`).
        for (seq, inp) in [(9, 37), (30, 1030)] {
            lora_linear_matches_at(seq, inp);
        }
        let x = f32_var(&var(&[2, 9, 37], 51));
        let (a, b) = (f32_var(&var(&[5, 37], 52)), f32_var(&var(&[21, 5], 53)));
        let w = var(&[21, 37], 54)
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .detach();
        let dy = f32_var(&var(&[2, 9, 21], 56));
        // An input that needs no gradient gets none (and costs no product).
        let xc = x.as_tensor().detach();
        let y = lora_linear(
            &xc,
            &Weight::Tensor(w.clone()),
            None,
            a.as_tensor(),
            b.as_tensor(),
            1.5,
        )
        .unwrap()
        .unwrap();
        let grads = (y * dy.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&xc).is_none() && grads.get(a.as_tensor()).is_some());
        // f64 is not the kernel's: the caller composes.
        let x64 = x.as_tensor().to_dtype(DType::F64).unwrap();
        let w64 = Weight::Tensor(w.to_dtype(DType::F64).unwrap());
        assert!(
            lora_linear(&x64, &w64, None, a.as_tensor(), b.as_tensor(), 1.5)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn attention_without_graph_returns_the_plain_result() {
        let (q, k, v) = (
            var(&[1, 2, 3, 4], 5),
            var(&[1, 2, 3, 4], 6),
            var(&[1, 2, 3, 4], 7),
        );
        let (q, k, v) = (
            q.as_tensor().detach(),
            k.as_tensor().detach(),
            v.as_tensor().detach(),
        );
        let ours = attention(&q, &k, &v, None).unwrap();
        assert!(!ours.track_op());
        assert!(max_diff(&ours, &composed_attention(&q, &k, &v, None)) < 1e-12);
    }

    #[test]
    fn rope_matches_composed_value_and_gradient() {
        let x = var(&[2, 3, 5, 8], 8);
        let angles = var(&[5, 4], 9).as_tensor().detach();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let ours = rope(x.as_tensor(), &cos, &sin).unwrap();
        // x * cos + rotate_half(x) * sin with full-width tables.
        let full = |t: &Tensor| Tensor::cat(&[t, t], 1).unwrap();
        let x1 = x.as_tensor().narrow(3, 0, 4).unwrap();
        let x2 = x.as_tensor().narrow(3, 4, 4).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
        let want = (x.as_tensor().broadcast_mul(&full(&cos)).unwrap()
            + rotated.broadcast_mul(&full(&sin)).unwrap())
        .unwrap();
        assert!(max_diff(&ours, &want) < 1e-12);
        let w = var(&[2, 3, 5, 8], 10);
        let g1 = (ours * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (want * w.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(max_diff(a, b) < 1e-12);
    }

    #[test]
    fn rms_norm_matches_composed_value_and_gradient() {
        let x = var(&[2, 3, 8], 12);
        let w = var(&[8], 13).as_tensor().detach().affine(0.3, 1.0).unwrap();
        let ours = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let t = x.as_tensor();
        let inv = (t.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let want = t.broadcast_mul(&inv).unwrap().broadcast_mul(&w).unwrap();
        assert!(max_diff(&ours, &want) < 1e-12);
        let dy = var(&[2, 3, 8], 14);
        let g1 = (ours * dy.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (want * dy.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g1.get(t).unwrap(), g2.get(t).unwrap());
        assert!(
            max_diff(a, b) < 1e-12,
            "gradient differs by {}",
            max_diff(a, b)
        );
        assert!(g1.get(&w).is_none(), "the norm weight is frozen");
    }

    /// The mean (or `w`-weighted mean) of `-log_softmax(x)[label]` from candle's ops, the
    /// max shift a constant: the formulation the cross-entropy op replaces.
    fn composed_cross_entropy(x: &Tensor, labels: &Tensor, w: Option<&Tensor>) -> Tensor {
        let max = x.max_keepdim(1).unwrap().detach();
        let sh = x.broadcast_sub(&max).unwrap();
        let lp = sh
            .broadcast_sub(&sh.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap())
            .unwrap();
        let picked = lp
            .gather(&labels.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        match w {
            None => picked.mean_all().unwrap().neg().unwrap(),
            Some(w) => (picked * w)
                .unwrap()
                .sum_all()
                .unwrap()
                .neg()
                .unwrap()
                .broadcast_div(&w.sum_all().unwrap())
                .unwrap(),
        }
    }

    #[test]
    fn cross_entropy_matches_composed_value_and_gradient() {
        let logits = var(&[6, 11], 11);
        let labels = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
        let composed = |w: Option<&Tensor>| composed_cross_entropy(logits.as_tensor(), &labels, w);
        let weights = Tensor::new(&[1f64, 0., 1., 1., 0., 1.], &Device::Cpu).unwrap();
        for w in [None, Some(&weights)] {
            let ours = cross_entropy(logits.as_tensor(), &labels, w).unwrap();
            let want = composed(w);
            assert!(max_diff(&ours, &want) < 1e-12);
            let g1 = (ours * 3.0).unwrap().backward().unwrap();
            let g2 = (want * 3.0).unwrap().backward().unwrap();
            let (a, b) = (
                g1.get(logits.as_tensor()).unwrap(),
                g2.get(logits.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) < 1e-12,
                "gradient differs by {}",
                max_diff(a, b)
            );
        }
    }

    /// The CUDA SwiGLU kernels against the CPU path (the CPU kernel in f32, candle's ops
    /// in bf16): value and both gradients. Runs only in a `--features cuda` build, on a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_swiglu_kernels_match_the_cpu() {
        let gpu = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        // 1,050 elements take the one-element-a-thread kernels, 1,536 the 8-wide ones.
        for shape in [[3, 7, 50], [3, 8, 64]] {
            swiglu_kernels_match_the_cpu(&gpu, &shape);
        }
    }

    #[cfg(feature = "cuda")]
    fn swiglu_kernels_match_the_cpu(gpu: &Device, shape: &[usize]) {
        let (g, u, dy) = (var(shape, 41), var(shape, 42), var(shape, 43));
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.02)] {
            let run = |dev: &Device| {
                let on = |x: &Var| {
                    Var::from_tensor(
                        &x.as_tensor()
                            .to_dtype(dtype)
                            .unwrap()
                            .to_device(dev)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (g, u) = (on(&g), on(&u));
                assert_eq!(
                    super::super::fused_cuda::usable_swiglu(g.as_tensor(), u.as_tensor()),
                    dev.is_cuda()
                );
                let out = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
                let dy = dy
                    .as_tensor()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(dev)
                    .unwrap();
                let grads = (&out * dy).unwrap().sum_all().unwrap().backward().unwrap();
                let back = |t: &Tensor| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                };
                vec![
                    back(&out),
                    back(grads.get(g.as_tensor()).unwrap()),
                    back(grads.get(u.as_tensor()).unwrap()),
                ]
            };
            let (cpu, cuda) = (run(&Device::Cpu), run(gpu));
            for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
                let (d, size) = (max_diff(a, b), max_diff(a, &a.zeros_like().unwrap()));
                assert!(
                    d < tol * size.max(1.0),
                    "{dtype:?} tensor {i} (out, dg, du) differs by {d} (largest {size})"
                );
            }
        }
    }

    /// The CUDA RMSNorm kernels against the candle-op path on the CPU: value and input
    /// gradient, f32 and bf16. Runs only in a `--features cuda` build, on a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_rms_norm_kernels_match_the_cpu() {
        let gpu = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        let (x, w, dy) = (
            var(&[3, 5, 300], 31),
            var(&[300], 32),
            var(&[3, 5, 300], 33),
        );
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.02)] {
            let run = |dev: &Device| {
                let x = Var::from_tensor(
                    &x.as_tensor()
                        .to_dtype(dtype)
                        .unwrap()
                        .to_device(dev)
                        .unwrap(),
                )
                .unwrap();
                let w = w
                    .as_tensor()
                    .detach()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(dev)
                    .unwrap();
                assert_eq!(
                    super::super::fused_cuda::usable_norm(x.as_tensor(), &w),
                    dev.is_cuda()
                );
                let out = rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
                let dy = dy
                    .as_tensor()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(dev)
                    .unwrap();
                let grads = (&out * dy).unwrap().sum_all().unwrap().backward().unwrap();
                let back = |t: &Tensor| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                };
                vec![back(&out), back(grads.get(x.as_tensor()).unwrap())]
            };
            let (cpu, cuda) = (run(&Device::Cpu), run(&gpu));
            for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
                let (d, size) = (max_diff(a, b), max_diff(a, &a.zeros_like().unwrap()));
                assert!(
                    d < tol * size.max(1.0),
                    "{dtype:?} tensor {i} (out, dx) differs by {d} (largest {size})"
                );
            }
        }
    }

    /// The CUDA softmax kernels against the candle-op path on the CPU: values and all
    /// three gradients, f32 and bf16. Runs only in a `--features cuda` build, on a GPU.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_attention_kernels_match_the_cpu() {
        let gpu = Device::new_cuda(0).expect("a CUDA build's tests need a GPU");
        // 33 keys take the block-per-row kernels; 40 and 264 (a multiple of 8) the
        // warp-per-row ones, with one and two vectors a lane.
        for seq in [33, 40, 264] {
            attention_kernels_match_the_cpu(&gpu, seq);
        }
    }

    #[cfg(feature = "cuda")]
    fn attention_kernels_match_the_cpu(gpu: &Device, seq: usize) {
        let (q, k, v) = (
            var(&[2, 8, seq, 16], 21),
            var(&[2, 2, seq, 16], 22),
            var(&[2, 2, seq, 16], 23),
        );
        let w = var(&[2, 8, seq, 16], 24).as_tensor().detach();
        let mut mask = vec![1u8; 2 * seq];
        mask[seq] = 0;
        mask[seq + 1] = 0;
        let mask = Tensor::from_vec(mask, (2, seq), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.02)] {
            let bias =
                super::super::mask::attention_bias(2, seq, Some(&mask), DType::F32, &Device::Cpu)
                    .unwrap();
            let run = |dev: &Device| {
                let on = |x: &Var| {
                    Var::from_tensor(
                        &x.as_tensor()
                            .to_dtype(dtype)
                            .unwrap()
                            .to_device(dev)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (q, k, v) = (on(&q), on(&k), on(&v));
                let bias = bias.to_device(dev).unwrap();
                assert_eq!(
                    super::super::fused_cuda::usable(dev, dtype, Some(&bias)),
                    dev.is_cuda()
                );
                let out =
                    attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&bias)).unwrap();
                let w = w.to_dtype(dtype).unwrap().to_device(dev).unwrap();
                let grads = (&out * w).unwrap().sum_all().unwrap().backward().unwrap();
                let back = |t: &Tensor| {
                    t.to_device(&Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                };
                let mut all = vec![back(&out)];
                for x in [&q, &k, &v] {
                    all.push(back(grads.get(x.as_tensor()).unwrap()));
                }
                all
            };
            let (cpu, cuda) = (run(&Device::Cpu), run(gpu));
            for (i, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
                let (d, size) = (max_diff(a, b), max_diff(a, &a.zeros_like().unwrap()));
                assert!(
                    d < tol * size.max(1.0),
                    "{dtype:?} seq {seq}: tensor {i} (out, dq, dk, dv) differs by {d} (largest {size})"
                );
            }
        }
    }
}
