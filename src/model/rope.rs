//! RoPE inverse frequencies from the text config, as transformers computes
//! them (`rope_init_fn`), including the linear and llama3 scalings; where
//! each row sits ([`RopePos`], [`Positions`]); and M-RoPE (Qwen2-VL): the
//! frequency split by `mrope_section` and the (t, h, w) positions of a
//! prompt with images ([`mrope_positions`], [`Mrope`]).

use crate::backend::Rope;
use crate::config::{RopeScaling, TextConfig};
use crate::error::{Error, Result};

/// `head_dim / 2` inverse frequencies for `cfg`.
pub fn rope_inv_freq(cfg: &TextConfig) -> Rope {
    let d = cfg.head_dim;
    let mut inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen {
                    *f / factor
                } else {
                    *f
                };
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                // transformers' `~(wavelen < high) * ~(wavelen > low)`, NaN included.
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                let is_medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                *f = if is_medium { smoothed } else { scaled };
            }
        }
    }
    Rope {
        inv_freq: inv,
        head_dim: d,
    }
}

/// M-RoPE (Qwen2-VL): `rope` split by `mrope_section` into the frequencies
/// that take the temporal, the height and the width position. Each part is
/// `rope` with the other frequencies set to 0; an angle of 0 leaves a pair
/// exactly as it is, so the three parts applied in turn, each at its axis'
/// positions, rotate every pair by its own axis (transformers'
/// `apply_multimodal_rotary_pos_emb`).
pub fn mrope_parts(rope: &Rope, section: &[usize]) -> [Rope; 3] {
    let mut start = 0;
    [0, 1, 2].map(|axis| {
        let end = start + section.get(axis).copied().unwrap_or(0);
        let inv_freq = (0..rope.inv_freq.len())
            .map(|i| {
                if (start..end).contains(&i) {
                    rope.inv_freq[i]
                } else {
                    0.0
                }
            })
            .collect();
        start = end;
        Rope {
            inv_freq,
            head_dim: rope.head_dim,
        }
    })
}

/// The (t, h, w) M-RoPE positions of a prompt of `len` tokens whose images
/// fill `spans` (`(start, count)`, in order), each a single frame merged to
/// `grids[i]` = (rows, cols) tokens, and the `rope_delta` that later
/// positions add to their index (transformers' `get_rope_index`). Text
/// takes its running position on all three axes; an image starting at
/// running position `s` puts token (r, c) at (s, s + r, s + c), and the text
/// after it resumes at `s + max(rows, cols)`.
pub fn mrope_positions(
    len: usize,
    spans: &[(usize, usize)],
    grids: &[(usize, usize)],
) -> Result<(Vec<[usize; 3]>, i64)> {
    if spans.len() != grids.len() {
        return Err(Error::invalid(format!(
            "M-RoPE: {} image span(s) for {} image grid(s)",
            spans.len(),
            grids.len()
        )));
    }
    let mut out = Vec::with_capacity(len);
    let mut next = 0usize; // the next text position
    let mut at = 0usize; // the next token index
    for (&(start, count), &(rows, cols)) in spans.iter().zip(grids) {
        if start < at || start + count > len || rows * cols != count {
            return Err(Error::invalid(format!(
                "M-RoPE: image span {start}+{count} does not fit a {rows}x{cols} grid in a prompt of {len} tokens"
            )));
        }
        for _ in at..start {
            out.push([next; 3]);
            next += 1;
        }
        for r in 0..rows {
            for c in 0..cols {
                out.push([next, next + r, next + c]);
            }
        }
        next += rows.max(cols);
        at = start + count;
    }
    for _ in at..len {
        out.push([next; 3]);
        next += 1;
    }
    Ok((out, next as i64 - len as i64))
}

/// Where each row of a sequence sits for RoPE.
#[derive(Clone, Copy, Debug, Default)]
pub enum RopePos<'a> {
    /// The row at cache position `p` is at position `p`.
    #[default]
    Sequential,
    /// M-RoPE: cache positions below `thw.len()` (the prompt) are at the
    /// listed (t, h, w) positions; a later position `p` is at `p + delta` on
    /// every axis ([`mrope_positions`]).
    Multi { thw: &'a [[usize; 3]], delta: i64 },
}

impl RopePos<'_> {
    /// The positions of cache rows `pos0..pos0 + rows`.
    pub fn rows(&self, pos0: usize, rows: usize) -> Result<Positions> {
        let range = pos0..pos0 + rows;
        match *self {
            RopePos::Sequential => Ok(Positions::Same(range.collect())),
            RopePos::Multi { thw, delta } => {
                let at = |p: usize| -> Result<[usize; 3]> {
                    match thw.get(p) {
                        Some(&x) => Ok(x),
                        None => usize::try_from(p as i64 + delta)
                            .map(|q| [q; 3])
                            .map_err(|_| {
                                Error::invalid(format!(
                                    "M-RoPE: position {p} + delta {delta} is negative"
                                ))
                            }),
                    }
                };
                let all: Vec<[usize; 3]> = range.map(at).collect::<Result<_>>()?;
                if all.iter().all(|p| p[0] == p[1] && p[1] == p[2]) {
                    return Ok(Positions::Same(all.iter().map(|p| p[0]).collect()));
                }
                Ok(Positions::Thw(
                    [0, 1, 2].map(|a| all.iter().map(|p| p[a]).collect()),
                ))
            }
        }
    }
}

/// The RoPE positions of a block of rows: one per row, or (M-RoPE) one per
/// row and axis.
#[derive(Clone, Debug, PartialEq)]
pub enum Positions {
    Same(Vec<usize>),
    Thw([Vec<usize>; 3]),
}

impl Positions {
    /// `self` followed by `other` (M-RoPE when either is).
    pub(crate) fn append(&mut self, other: Positions) {
        match (self, other) {
            (Positions::Same(a), Positions::Same(b)) => a.extend(b),
            (this, other) => {
                let axes = |p: &Positions| match p {
                    Positions::Same(v) => [v.clone(), v.clone(), v.clone()],
                    Positions::Thw(a) => a.clone(),
                };
                let mut a = axes(this);
                for (x, y) in a.iter_mut().zip(axes(&other)) {
                    x.extend(y);
                }
                *this = Positions::Thw(a);
            }
        }
    }
}

/// [`RopePos::Multi`]'s data, owned: a prompt's (t, h, w) positions and
/// the delta of the positions after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Mrope {
    pub thw: Vec<[usize; 3]>,
    pub delta: i64,
}

impl Mrope {
    /// [`mrope_positions`] of a prompt of `len` tokens.
    pub fn new(len: usize, spans: &[(usize, usize)], grids: &[(usize, usize)]) -> Result<Mrope> {
        let (thw, delta) = mrope_positions(len, spans, grids)?;
        Ok(Mrope { thw, delta })
    }

    pub fn rope_pos(&self) -> RopePos<'_> {
        RopePos::Multi {
            thw: &self.thw,
            delta: self.delta,
        }
    }
}

/// [`Mrope::rope_pos`] of an optional [`Mrope`]; sequential without one.
pub fn rope_pos(m: Option<&Mrope>) -> RopePos<'_> {
    m.map_or(RopePos::Sequential, Mrope::rope_pos)
}
