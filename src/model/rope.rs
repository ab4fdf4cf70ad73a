//! RoPE inverse frequencies from the text config, as transformers computes
//! them (`rope_init_fn`), including the linear and llama3 scalings.

use crate::backend::Rope;
use crate::config::{RopeScaling, TextConfig};

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
            .map(|i| if (start..end).contains(&i) { rope.inv_freq[i] } else { 0.0 })
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
) -> crate::error::Result<(Vec<[usize; 3]>, i64)> {
    use crate::error::Error;
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
