//! The decoder layer of the language model (`LlamaDecoderLayer` /
//! `Qwen2DecoderLayer`), written once: RMSNorm, grouped-query attention
//! with RoPE over a KV cache, a gated MLP, two residual adds.
//!
//! ```text
//! h  = rms_norm(x) * w_in                     <- Site::AttnIn
//! q  = rope(q_proj(h))  k = rope(k_proj(h))   <- Site::Q, Site::K
//! v  = v_proj(h)                              <- Site::V
//! a  = causal_gqa_attention(q, k, v)          <- Site::AttnMix (o_proj's input)
//! m  = x + o_proj(a)                          <- Site::AttnOut, Site::Mid
//! h2 = rms_norm(m) * w_post                   <- Site::MlpIn
//! u  = act(gate_proj(h2)) * up_proj(h2)       <- Site::Gate, Site::Up, Site::MlpMix
//! y  = m + down_proj(u)                       <- Site::MlpOut
//! ```
//!
//! Everything that runs a decoder layer goes through [`DecoderLayer::forward`]
//! or its two halves [`Attention::forward`] and [`Mlp::forward`]: the runtime
//! (no tap), the scale search (a tap that keeps the module inputs and
//! outputs, and the halves run with fake-quantized linears), and the
//! sensitivity pass (a tap that keeps the residual, and the backward
//! [`DecoderLayer::mlp_backward`] and [`DecoderLayer::attn_backward`]
//! beside the forward, on [`Grad`] backends).
//!
//! The layer is generic over its linears `L` and norm weights `N`: on a
//! backend it is `DecoderLayer<Linear<B>, B::Tensor>` ([`Layer`]);
//! calibration keeps host copies, `DecoderLayer<HostLinear, Tensor>`.

pub use super::rope::{Positions, RopePos};
use super::Linear;
use crate::backend::{AttnShape, Backend, Grad, Rope};
use crate::config::{Act, TextConfig};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::weights::{Prefixed, DECODER_LINEARS};

/// Anything that maps `[rows, in]` to `[rows, out]` on a backend: the
/// model's [`Linear`], or the scale search's fake-quantized stand-ins.
pub trait LinearOp<B: Backend> {
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor>;
}

impl<B: Backend> LinearOp<B> for Linear<B> {
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        Linear::forward(self, be, x)
    }
}

impl<B: Backend, L: LinearOp<B> + ?Sized> LinearOp<B> for &L {
    fn forward(&self, be: &B, x: &B::Tensor) -> Result<B::Tensor> {
        (**self).forward(be, x)
    }
}

/// A linear layer as host tensors (calibration folds scales into these).
#[derive(Clone, Debug)]
pub struct HostLinear {
    /// `[out, in]`, f32.
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl HostLinear {
    /// `<prefix>.weight` `[out, in]` (and `<prefix>.bias`) in f32; a packed
    /// linear is an error (calibration needs the unquantized model).
    pub fn load(vb: &Prefixed, out: usize, inp: usize, bias: bool) -> Result<Self> {
        if crate::quant::import::is_quantized(vb) {
            return Err(Error::invalid(format!(
                "{}: calibration needs an unquantized model (this linear is stored quantized)",
                vb.prefix
            )));
        }
        Ok(HostLinear {
            w: vb.get("weight", &[out, inp])?,
            b: if bias {
                Some(vb.get("bias", &[out])?)
            } else {
                None
            },
        })
    }

    /// The linear on a backend (dense weight, full-precision activations).
    pub fn upload<B: Backend>(&self, be: &B) -> Result<Linear<B>> {
        Ok(Linear {
            w: be.weight(&self.w)?,
            b: self.b.as_ref().map(|b| be.upload(b)).transpose()?,
            act_quant: false,
        })
    }
}

/// What every layer of one model shares: norm epsilon, MLP activation,
/// RoPE frequencies and the attention's shape.
#[derive(Clone, Debug)]
pub struct DecoderSpec {
    pub eps: f32,
    pub act: Act,
    pub rope: Rope,
    /// M-RoPE (Qwen2-VL): `rope` split into its temporal, height and width
    /// frequencies ([`super::rope::mrope_parts`]).
    pub mrope: Option<[Rope; 3]>,
    pub attn: AttnShape,
}

impl DecoderSpec {
    pub fn new(cfg: &TextConfig) -> Self {
        let rope = super::rope::rope_inv_freq(cfg);
        DecoderSpec {
            eps: cfg.rms_norm_eps,
            act: cfg.hidden_act,
            mrope: cfg
                .mrope_section
                .as_ref()
                .map(|s| super::rope::mrope_parts(&rope, s)),
            rope,
            attn: AttnShape {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                scale: (cfg.head_dim as f32).powf(-0.5),
            },
        }
    }

    /// Width of a key or value row: `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.attn.kv_heads * self.attn.head_dim
    }

    /// RoPE on `x` `[rows, heads * head_dim]` at `positions`.
    pub fn rope<B: Backend>(
        &self,
        be: &B,
        x: &B::Tensor,
        heads: usize,
        positions: &Positions,
    ) -> Result<B::Tensor> {
        match positions {
            Positions::Same(p) => be.rope_at(x, heads, &self.rope, p),
            Positions::Thw(axes) => {
                let parts = self.mrope_parts()?;
                let mut y = be.rope_at(x, heads, &parts[0], &axes[0])?;
                for (part, p) in parts.iter().zip(axes).skip(1) {
                    y = be.rope_at(&y, heads, part, p)?;
                }
                Ok(y)
            }
        }
    }

    fn mrope_parts(&self) -> Result<&[Rope; 3]> {
        self.mrope.as_ref().ok_or_else(|| {
            Error::invalid("M-RoPE positions for a language model without mrope_section")
        })
    }
}

/// Where the attention reads and writes its keys and values: `layer` of
/// `cache`, the new rows at positions `pos0..`.
pub struct Kv<'a, B: Backend> {
    pub cache: &'a mut B::Cache,
    pub layer: usize,
    pub pos0: usize,
    pub rope: RopePos<'a>,
}

impl<B: Backend> Kv<'_, B> {
    /// Runs `f` over a fresh one-layer cache of exactly `n` positions: a
    /// sample seen whole from position 0, as calibration runs one layer
    /// at a time.
    pub fn whole_sample<R>(
        be: &B,
        spec: &DecoderSpec,
        n: usize,
        rope: RopePos<'_>,
        f: impl FnOnce(Kv<'_, B>) -> Result<R>,
    ) -> Result<R> {
        let mut cache = be.new_cache(1, spec.kv_dim(), n)?;
        f(Kv {
            cache: &mut cache,
            layer: 0,
            pos0: 0,
            rope,
        })
    }
}

/// One sequence of a batch: its rows of the batch's input are at positions
/// `pos0..pos0 + rows` of its own `cache`.
pub struct SeqKv<'a, B: Backend> {
    pub cache: &'a mut B::Cache,
    pub pos0: usize,
    pub rows: usize,
    pub rope: RopePos<'a>,
}

/// Several sequences run together (the server's batched step): the batch's
/// rows are the sequences' rows one after the other; the linears see them
/// all at once, RoPE and attention each sequence's own.
pub struct KvBatch<'a, 'b, B: Backend> {
    pub seqs: &'a mut [SeqKv<'b, B>],
    pub layer: usize,
}

/// What the attention runs over: [`Kv`] (one sequence) or [`KvBatch`].
pub trait KvTarget<B: Backend> {
    /// The position of each of the `rows` new rows (RoPE's).
    fn positions(&self, rows: usize) -> Result<Positions>;
    /// Causal attention of the new rows (q, k, v after RoPE) over the
    /// cache(s), writing their keys and values there: o_proj's input.
    fn attend(
        &mut self,
        be: &B,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        shape: AttnShape,
    ) -> Result<B::Tensor>;
}

impl<B: Backend> KvTarget<B> for Kv<'_, B> {
    fn positions(&self, rows: usize) -> Result<Positions> {
        self.rope.rows(self.pos0, rows)
    }

    fn attend(
        &mut self,
        be: &B,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        shape: AttnShape,
    ) -> Result<B::Tensor> {
        be.attention_cached(q, k, v, self.cache, self.layer, self.pos0, shape)
    }
}

impl<B: Backend> KvTarget<B> for KvBatch<'_, '_, B> {
    fn positions(&self, rows: usize) -> Result<Positions> {
        let total: usize = self.seqs.iter().map(|s| s.rows).sum();
        if rows != total {
            return Err(Error::invalid(format!(
                "batched attention: {rows} rows for sequences of {total} rows in all"
            )));
        }
        let mut all = Positions::Same(Vec::with_capacity(rows));
        for seq in self.seqs.iter() {
            all.append(seq.rope.rows(seq.pos0, seq.rows)?);
        }
        Ok(all)
    }

    fn attend(
        &mut self,
        be: &B,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        shape: AttnShape,
    ) -> Result<B::Tensor> {
        if let [seq] = &mut *self.seqs {
            return be.attention_cached(q, k, v, seq.cache, self.layer, seq.pos0, shape);
        }
        let mut parts = Vec::with_capacity(self.seqs.len());
        let mut at = 0;
        for seq in self.seqs.iter_mut() {
            let rows = |t: &B::Tensor| be.rows(t, at, seq.rows);
            let (qi, ki, vi) = (rows(q)?, rows(k)?, rows(v)?);
            parts.push(be.attention_cached(&qi, &ki, &vi, seq.cache, self.layer, seq.pos0, shape)?);
            at += seq.rows;
        }
        be.concat_all(parts)
    }
}

/// The points of a layer's forward that a [`Tap`] sees (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    AttnIn,
    Q,
    K,
    V,
    AttnMix,
    AttnOut,
    Mid,
    MlpIn,
    Gate,
    Up,
    MlpMix,
    MlpOut,
}

/// A hook into the forward. `at` sees each site's tensor as soon as it is
/// made (and may change it: the finite-difference tests add a step there);
/// `keep` receives it when the forward no longer needs it (dropped by
/// default), so a tap keeps activations without copying them.
pub trait Tap<B: Backend> {
    fn at(&mut self, _site: Site, _t: &mut B::Tensor) -> Result<()> {
        Ok(())
    }
    fn keep(&mut self, _site: Site, _t: B::Tensor) -> Result<()> {
        Ok(())
    }
}

/// The runtime's tap: sees nothing, keeps nothing.
pub struct NoTap;
impl<B: Backend> Tap<B> for NoTap {}

/// Self-attention: q, k, v, o projections.
#[derive(Clone, Debug)]
pub struct Attention<L> {
    pub q: L,
    pub k: L,
    pub v: L,
    pub o: L,
}

impl<L> Attention<L> {
    /// `h` `[n, hidden]` (the normed input) -> o_proj's output `[n, hidden]`,
    /// causal over each sequence's cache positions (for [`Kv`]:
    /// `0..kv.pos0 + n`).
    pub fn forward<B: Backend>(
        &self,
        spec: &DecoderSpec,
        be: &B,
        h: &B::Tensor,
        mut kv: impl KvTarget<B>,
        tap: &mut impl Tap<B>,
    ) -> Result<B::Tensor>
    where
        L: LinearOp<B>,
    {
        let s = &spec.attn;
        let q = self.q.forward(be, h)?;
        let k = self.k.forward(be, h)?;
        let mut v = self.v.forward(be, h)?;
        let positions = kv.positions(be.dims(h).0)?;
        let mut q = spec.rope(be, &q, s.heads, &positions)?;
        tap.at(Site::Q, &mut q)?;
        let mut k = spec.rope(be, &k, s.kv_heads, &positions)?;
        tap.at(Site::K, &mut k)?;
        tap.at(Site::V, &mut v)?;
        let mut a = kv.attend(be, &q, &k, &v, *s)?;
        tap.at(Site::AttnMix, &mut a)?;
        tap.keep(Site::Q, q)?;
        tap.keep(Site::K, k)?;
        tap.keep(Site::V, v)?;
        let mut y = self.o.forward(be, &a)?;
        tap.at(Site::AttnOut, &mut y)?;
        tap.keep(Site::AttnMix, a)?;
        Ok(y)
    }

    /// The four linears with their checkpoint names, in [`DECODER_LINEARS`] order.
    pub fn linears(&self) -> [&L; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    pub fn linears_mut(&mut self) -> [&mut L; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}

/// The gated MLP: gate, up, down projections.
#[derive(Clone, Debug)]
pub struct Mlp<L> {
    pub gate: L,
    pub up: L,
    pub down: L,
}

impl<L> Mlp<L> {
    /// `h` `[n, hidden]` (the normed input) -> down_proj's output `[n, hidden]`.
    pub fn forward<B: Backend>(
        &self,
        spec: &DecoderSpec,
        be: &B,
        h: &B::Tensor,
        tap: &mut impl Tap<B>,
    ) -> Result<B::Tensor>
    where
        L: LinearOp<B>,
    {
        let mut g = self.gate.forward(be, h)?;
        tap.at(Site::Gate, &mut g)?;
        let mut u = self.up.forward(be, h)?;
        tap.at(Site::Up, &mut u)?;
        let mut m = be.gated(&g, &u, spec.act)?;
        tap.at(Site::MlpMix, &mut m)?;
        tap.keep(Site::Gate, g)?;
        tap.keep(Site::Up, u)?;
        let mut y = self.down.forward(be, &m)?;
        tap.at(Site::MlpOut, &mut y)?;
        tap.keep(Site::MlpMix, m)?;
        Ok(y)
    }

    pub fn linears(&self) -> [&L; 3] {
        [&self.gate, &self.up, &self.down]
    }

    pub fn linears_mut(&mut self) -> [&mut L; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }
}

/// One decoder layer: linears `L`, norm weights `N`.
#[derive(Clone, Debug)]
pub struct DecoderLayer<L, N> {
    pub input_layernorm: N,
    pub attn: Attention<L>,
    pub post_attention_layernorm: N,
    pub mlp: Mlp<L>,
}

/// A decoder layer on a backend.
pub type Layer<B> = DecoderLayer<Linear<B>, <B as Backend>::Tensor>;

impl<L, N> DecoderLayer<L, N> {
    /// Reads layer `<vb>` (`...layers.<i>`): `linear(prefix, out, in, bias)`
    /// makes each linear, `norm(prefix, dim)` each norm weight. The one place
    /// that names a layer's tensors.
    pub fn load(
        vb: &Prefixed,
        cfg: &TextConfig,
        mut linear: impl FnMut(&Prefixed, usize, usize, bool) -> Result<L>,
        mut norm: impl FnMut(&Prefixed, usize) -> Result<N>,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_attention_heads * cfg.head_dim;
        let kv_dim = cfg.num_key_value_heads * cfg.head_dim;
        let im = cfg.intermediate_size;
        // (out, in, bias) in DECODER_LINEARS order.
        let dims = [
            (q_dim, h, cfg.qkv_bias),
            (kv_dim, h, cfg.qkv_bias),
            (kv_dim, h, cfg.qkv_bias),
            (h, q_dim, cfg.o_bias),
            (im, h, cfg.mlp_bias),
            (im, h, cfg.mlp_bias),
            (h, im, cfg.mlp_bias),
        ];
        let mut ls = Vec::with_capacity(7);
        for (name, (out, inp, bias)) in DECODER_LINEARS.iter().zip(dims) {
            ls.push(linear(&vb.pp(*name), out, inp, bias)?);
        }
        let mut ls = ls.into_iter();
        let mut next = || {
            ls.next()
                .ok_or_else(|| Error::invalid("decoder layer: fewer linears than names"))
        };
        Ok(DecoderLayer {
            input_layernorm: norm(&vb.pp("input_layernorm"), h)?,
            attn: Attention {
                q: next()?,
                k: next()?,
                v: next()?,
                o: next()?,
            },
            post_attention_layernorm: norm(&vb.pp("post_attention_layernorm"), h)?,
            mlp: Mlp {
                gate: next()?,
                up: next()?,
                down: next()?,
            },
        })
    }

    /// The seven linears, in [`DECODER_LINEARS`] order.
    pub fn linears(&self) -> [&L; 7] {
        let [q, k, v, o] = self.attn.linears();
        let [g, u, d] = self.mlp.linears();
        [q, k, v, o, g, u, d]
    }

    pub fn linears_mut(&mut self) -> [&mut L; 7] {
        let [q, k, v, o] = self.attn.linears_mut();
        let [g, u, d] = self.mlp.linears_mut();
        [q, k, v, o, g, u, d]
    }
}

impl<L> DecoderLayer<L, Tensor> {
    /// Every tensor of the layer by its name below the layer's prefix
    /// (`input_layernorm.weight`, `self_attn.q_proj.weight`, ...), with
    /// `weight(l)` giving a linear's `(weight, bias)`.
    pub fn tensors<'a>(
        &'a self,
        weight: impl Fn(&'a L) -> (&'a Tensor, Option<&'a Tensor>),
    ) -> Vec<(String, &'a Tensor)> {
        let mut v = vec![
            ("input_layernorm.weight".to_string(), &self.input_layernorm),
            (
                "post_attention_layernorm.weight".to_string(),
                &self.post_attention_layernorm,
            ),
        ];
        for (name, l) in DECODER_LINEARS.iter().zip(self.linears()) {
            let (w, b) = weight(l);
            v.push((format!("{name}.weight"), w));
            if let Some(b) = b {
                v.push((format!("{name}.bias"), b));
            }
        }
        v
    }
}

impl DecoderLayer<HostLinear, Tensor> {
    /// Layer `<vb>` as host f32 tensors.
    pub fn load_host(vb: &Prefixed, cfg: &TextConfig) -> Result<Self> {
        Self::load(vb, cfg, HostLinear::load, |p, dim| p.get("weight", &[dim]))
    }

    /// The layer on a backend (dense weights).
    pub fn upload<B: Backend>(&self, be: &B) -> Result<Layer<B>> {
        let up = |l: &HostLinear| l.upload(be);
        Ok(DecoderLayer {
            input_layernorm: be.upload(&self.input_layernorm)?,
            attn: Attention {
                q: up(&self.attn.q)?,
                k: up(&self.attn.k)?,
                v: up(&self.attn.v)?,
                o: up(&self.attn.o)?,
            },
            post_attention_layernorm: be.upload(&self.post_attention_layernorm)?,
            mlp: Mlp {
                gate: up(&self.mlp.gate)?,
                up: up(&self.mlp.up)?,
                down: up(&self.mlp.down)?,
            },
        })
    }

    /// Every tensor of the layer by its name below the layer's prefix.
    pub fn host_tensors(&self) -> Vec<(String, &Tensor)> {
        self.tensors(|l| (&l.w, l.b.as_ref()))
    }
}

impl<B: Backend> DecoderLayer<Linear<B>, B::Tensor> {
    /// Layer `<vb>` on a backend (packed linears stay packed).
    pub fn load_on(be: &B, vb: &Prefixed, cfg: &TextConfig) -> Result<Self> {
        Self::load(
            vb,
            cfg,
            |p, out, inp, bias| Linear::load(be, p, out, inp, bias),
            |p, dim| be.upload(&p.get("weight", &[dim])?),
        )
    }
}

impl<L, N> DecoderLayer<L, N> {
    /// `x` `[n, hidden]` at positions `kv.pos0..kv.pos0 + n` -> the layer's
    /// output `[n, hidden]`.
    pub fn forward<B>(
        &self,
        spec: &DecoderSpec,
        be: &B,
        x: &B::Tensor,
        kv: impl KvTarget<B>,
        tap: &mut impl Tap<B>,
    ) -> Result<B::Tensor>
    where
        B: Backend<Tensor = N>,
        L: LinearOp<B>,
    {
        let mut h = be.rms_norm(x, &self.input_layernorm, spec.eps)?;
        tap.at(Site::AttnIn, &mut h)?;
        let ya = self.attn.forward(spec, be, &h, kv, tap)?;
        tap.keep(Site::AttnIn, h)?;
        let mut m = be.add(x, &ya)?;
        tap.at(Site::Mid, &mut m)?;
        tap.keep(Site::AttnOut, ya)?;
        let mut h2 = be.rms_norm(&m, &self.post_attention_layernorm, spec.eps)?;
        tap.at(Site::MlpIn, &mut h2)?;
        let ym = self.mlp.forward(spec, be, &h2, tap)?;
        tap.keep(Site::MlpIn, h2)?;
        let y = be.add(&m, &ym)?;
        tap.keep(Site::Mid, m)?;
        tap.keep(Site::MlpOut, ym)?;
        Ok(y)
    }
}

/// Keeps the tensors of the sites it is asked for (the backward's
/// recomputation).
struct Keep<T> {
    sites: &'static [Site],
    kept: Vec<(Site, T)>,
}

impl<T> Keep<T> {
    fn new(sites: &'static [Site]) -> Self {
        Keep {
            sites,
            kept: Vec::new(),
        }
    }
    fn take(&mut self, site: Site) -> Result<T> {
        let k = self
            .kept
            .iter()
            .position(|(s, _)| *s == site)
            .ok_or_else(|| Error::invalid(format!("backward: {site:?} was not recorded")))?;
        Ok(self.kept.swap_remove(k).1)
    }
}

impl<B: Backend> Tap<B> for Keep<B::Tensor> {
    fn keep(&mut self, site: Site, t: B::Tensor) -> Result<()> {
        if self.sites.contains(&site) {
            self.kept.push((site, t));
        }
        Ok(())
    }
}

impl<B: Grad> DecoderLayer<Linear<B>, B::Tensor> {
    /// Backward of the MLP half of [`forward`](Self::forward)
    /// (`y = m + down(act(gate(h2)) * up(h2))`, `h2 = rms_norm(m)`),
    /// activation gradients only: `m` is the layer's residual after
    /// attention (kept by the forward), `dy` the gradient of the layer's
    /// output (= of down_proj's output). Returns dL/dm (= dL/d(o_proj
    /// output)). Gate and up are recomputed by the same [`Mlp::forward`].
    pub fn mlp_backward(
        &self,
        spec: &DecoderSpec,
        be: &B,
        m: &B::Tensor,
        dy: &B::Tensor,
    ) -> Result<B::Tensor> {
        let h2 = be.rms_norm(m, &self.post_attention_layernorm, spec.eps)?;
        let mut rec = Keep::new(&[Site::Gate, Site::Up]);
        self.mlp.forward(spec, be, &h2, &mut rec)?;
        let (gate, up) = (rec.take(Site::Gate)?, rec.take(Site::Up)?);
        let du = be.linear_backward(dy, &self.mlp.down.w)?;
        let (dgate, dup) = be.gated_backward(&gate, &up, &du, spec.act)?;
        let dh2 = be.add(
            &be.linear_backward(&dgate, &self.mlp.gate.w)?,
            &be.linear_backward(&dup, &self.mlp.up.w)?,
        )?;
        let dm = be.rms_norm_backward(m, &self.post_attention_layernorm, spec.eps, &dh2)?;
        be.add(dy, &dm)
    }

    /// Backward of the attention half (`m = x + o(attn(rope(q(h)),
    /// rope(k(h)), v(h)))`, `h = rms_norm(x)`) at positions `0..n` (a fresh
    /// cache): `x` is the layer's input, `dm` the gradient of the residual
    /// after attention. Returns dL/dx. q, k and v are recomputed by the same
    /// [`Attention::forward`].
    pub fn attn_backward(
        &self,
        spec: &DecoderSpec,
        be: &B,
        x: &B::Tensor,
        dm: &B::Tensor,
        rope: RopePos<'_>,
    ) -> Result<B::Tensor> {
        let n = be.dims(x).0;
        let h = be.rms_norm(x, &self.input_layernorm, spec.eps)?;
        let mut cache = be.new_cache(1, spec.kv_dim(), n)?;
        let kv = Kv {
            cache: &mut cache,
            layer: 0,
            pos0: 0,
            rope,
        };
        let mut rec = Keep::new(&[Site::Q, Site::K, Site::V]);
        self.attn.forward(spec, be, &h, kv, &mut rec)?;
        let (q, k, v) = (rec.take(Site::Q)?, rec.take(Site::K)?, rec.take(Site::V)?);
        let da = be.linear_backward(dm, &self.attn.o.w)?;
        let (dq, dk, dv) = be.attention_backward(&q, &k, &v, &da, spec.attn)?;
        let positions = rope.rows(0, n)?;
        let dq = rope_backward(spec, be, &dq, spec.attn.heads, &positions)?;
        let dk = rope_backward(spec, be, &dk, spec.attn.kv_heads, &positions)?;
        let mut dh = be.linear_backward(&dq, &self.attn.q.w)?;
        dh = be.add(&dh, &be.linear_backward(&dk, &self.attn.k.w)?)?;
        dh = be.add(&dh, &be.linear_backward(&dv, &self.attn.v.w)?)?;
        let dxa = be.rms_norm_backward(x, &self.input_layernorm, spec.eps, &dh)?;
        be.add(dm, &dxa)
    }
}

/// The backward of [`DecoderSpec::rope`]: the rotation by minus the angle.
/// Positions `0..n` use the backend's `rope_backward`; any others (M-RoPE)
/// the forward op with negated frequencies (`cos` is even, `sin` odd).
fn rope_backward<B: Grad>(
    spec: &DecoderSpec,
    be: &B,
    dy: &B::Tensor,
    heads: usize,
    positions: &Positions,
) -> Result<B::Tensor> {
    let negated = |r: &Rope| Rope {
        inv_freq: r.inv_freq.iter().map(|f| -f).collect(),
        head_dim: r.head_dim,
    };
    match positions {
        Positions::Same(p) if p.iter().enumerate().all(|(i, &q)| i == q) => {
            be.rope_backward(dy, heads, &spec.rope, 0)
        }
        Positions::Same(p) => be.rope_at(dy, heads, &negated(&spec.rope), p),
        Positions::Thw(axes) => {
            let parts = spec.mrope_parts()?;
            let mut d = be.rope_at(dy, heads, &negated(&parts[0]), &axes[0])?;
            for (part, p) in parts.iter().zip(axes).skip(1) {
                d = be.rope_at(&d, heads, &negated(part), p)?;
            }
            Ok(d)
        }
    }
}
