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
