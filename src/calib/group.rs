//! The four groups of linears of a decoder layer that share one
//! per-input-channel scale `s` (docs/MBQ.md):
//!
//! | group    | scaled linears | input (site)          | `s` folded into          | output compared    |
//! |----------|----------------|-----------------------|--------------------------|--------------------|
//! | attn_in  | q, k, v        | input_layernorm out   | input_layernorm          | self-attention out |
//! | attn_out | o              | attention mix         | v_proj rows (same shape) | o_proj out         |
//! | mlp_in   | gate, up       | post_attention_ln out | post_attention_layernorm | MLP out            |
//! | mlp_out  | down           | act(gate) * up        | up_proj rows             | down_proj out      |

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::decoder::{
    Attention, DecoderLayer, DecoderSpec, HostLinear, Kv, LinearOp, Mlp, NoTap, RopePos, Site,
};
use crate::tensor::Tensor;

/// A decoder layer as calibration holds it: host f32 tensors.
pub type HostLayer = DecoderLayer<HostLinear, Tensor>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    AttnIn,
    AttnOut,
    MlpIn,
    MlpOut,
}

impl Group {
    /// Every group, in search order.
    pub const ALL: [Group; 4] = [Group::AttnIn, Group::AttnOut, Group::MlpIn, Group::MlpOut];

    /// The name in reports and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            Group::AttnIn => "attn_in",
            Group::AttnOut => "attn_out",
            Group::MlpIn => "mlp_in",
            Group::MlpOut => "mlp_out",
        }
    }

    /// Where the forward makes the group's input.
    pub fn input(self) -> Site {
        match self {
            Group::AttnIn => Site::AttnIn,
            Group::AttnOut => Site::AttnMix,
            Group::MlpIn => Site::MlpIn,
            Group::MlpOut => Site::MlpMix,
        }
    }

    /// Where the output the search compares is made.
    pub fn output(self) -> Site {
        if self.is_attention() {
            Site::AttnOut
        } else {
            Site::MlpOut
        }
    }

    /// Whether the group belongs to the attention half (its ratio is the
    /// attention's).
    pub fn is_attention(self) -> bool {
        matches!(self, Group::AttnIn | Group::AttnOut)
    }

    /// The linears the scale multiplies (input columns).
    pub fn linears<L, N>(self, l: &DecoderLayer<L, N>) -> Vec<&L> {
        match self {
            Group::AttnIn => vec![&l.attn.q, &l.attn.k, &l.attn.v],
            Group::AttnOut => vec![&l.attn.o],
            Group::MlpIn => vec![&l.mlp.gate, &l.mlp.up],
            Group::MlpOut => vec![&l.mlp.down],
        }
    }

    /// Whether the group can be folded in this layer: attn_out needs v and
    /// o of one shape (no GQA), as in the official code.
    pub fn applies(self, l: &HostLayer) -> bool {
        self != Group::AttnOut || l.attn.v.w.shape == l.attn.o.w.shape
    }

    /// Folds `s` into the layer: the previous op divided, the group's
    /// linears multiplied (the full-precision function is unchanged).
    pub fn fold(self, l: &mut HostLayer, s: &[f32]) -> Result<()> {
        let div_norm = |n: &mut Tensor| n.data.iter_mut().zip(s).for_each(|(v, k)| *v /= k);
        match self {
            Group::AttnIn => div_norm(&mut l.input_layernorm),
            Group::AttnOut => div_rows(&mut l.attn.v, s)?,
            Group::MlpIn => div_norm(&mut l.post_attention_layernorm),
            Group::MlpOut => div_rows(&mut l.mlp.up, s)?,
        }
        match self {
            Group::AttnIn => {
                let a = &mut l.attn;
                [&mut a.q, &mut a.k, &mut a.v]
                    .into_iter()
                    .for_each(|x| mul_cols(x, s));
            }
            Group::AttnOut => mul_cols(&mut l.attn.o, s),
            Group::MlpIn => {
                let m = &mut l.mlp;
                [&mut m.gate, &mut m.up]
                    .into_iter()
                    .for_each(|x| mul_cols(x, s));
            }
            Group::MlpOut => mul_cols(&mut l.mlp.down, s),
        }
        Ok(())
    }

    /// The output of the group's module from the group's input `x`, with
    /// `q` (the group's linears, in [`Group::linears`] order) in place of
    /// the layer's and its own linears `fp` (o_proj, down_proj) elsewhere: the attention
    /// (causal over `0..n`) for attn_in, o_proj alone for attn_out, the MLP
    /// for mlp_in, down_proj alone for mlp_out.
    pub fn forward<B: Backend, Q: LinearOp<B>>(
        self,
        spec: &DecoderSpec,
        be: &B,
        fp: Fixed<'_, B>,
        q: &[Q],
        x: &B::Tensor,
        rope: RopePos<'_>,
    ) -> Result<B::Tensor> {
        let want = match self {
            Group::AttnIn => 3,
            Group::MlpIn => 2,
            Group::AttnOut | Group::MlpOut => 1,
        };
        if q.len() != want {
            return Err(Error::invalid(format!(
                "{}: {} linears given, {want} expected",
                self.name(),
                q.len()
            )));
        }
        match self {
            Group::AttnIn => {
                let attn = Attention {
                    q: &q[0] as &dyn LinearOp<B>,
                    k: &q[1],
                    v: &q[2],
                    o: fp.o,
                };
                Kv::whole_sample(be, spec, be.dims(x).0, rope, |kv| {
                    attn.forward(spec, be, x, kv, &mut NoTap)
                })
            }
            Group::MlpIn => {
                let mlp = Mlp {
                    gate: &q[0] as &dyn LinearOp<B>,
                    up: &q[1],
                    down: fp.down,
                };
                mlp.forward(spec, be, x, &mut NoTap)
            }
            Group::AttnOut | Group::MlpOut => q[0].forward(be, x),
        }
    }
}

/// The layer's own linears that a group's module runs beside the group's:
/// o_proj after the attention (attn_in) and down_proj after the MLP's gate
/// and up (mlp_in).
pub struct Fixed<'a, B: Backend> {
    pub o: &'a dyn LinearOp<B>,
    pub down: &'a dyn LinearOp<B>,
}

impl<B: Backend> Clone for Fixed<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Fixed<'_, B> {}

fn mul_cols(l: &mut HostLinear, s: &[f32]) {
    let d = l.w.cols();
    for r in l.w.data.chunks_exact_mut(d) {
        for (v, k) in r.iter_mut().zip(s) {
            *v *= k;
        }
    }
}

/// Divides the last `s.len()` output rows (and bias entries) of `l` by `s`.
/// With GQA, v has fewer rows than o has columns: the last rows are the
/// ones that feed o's scaled columns (official `fc1.weight[-n:]`).
fn div_rows(l: &mut HostLinear, s: &[f32]) -> Result<()> {
    let d = l.w.cols();
    let rows = l.w.rows();
    if s.len() > rows {
        return Err(Error::invalid(format!(
            "folding {} scales into the rows of a [{rows}, {d}] weight",
            s.len()
        )));
    }
    for (k, r) in
        l.w.data
            .chunks_exact_mut(d)
            .skip(rows - s.len())
            .enumerate()
    {
        r.iter_mut().for_each(|v| *v /= s[k]);
    }
    if let Some(b) = &mut l.b {
        let n = b.data.len();
        for (k, v) in b.data[n - s.len()..].iter_mut().enumerate() {
            *v /= s[k];
        }
    }
    Ok(())
}
