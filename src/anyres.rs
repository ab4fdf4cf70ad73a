//! LLaVA-OneVision "anyres" geometry on host data, transcribed from
//! transformers 4.57: `select_best_resolution` and `get_patch_output_size`
//! (image_processing_utils.py), `get_anyres_image_grid_shape`,
//! `image_size_to_num_patches`, `unpad_image` and
//! `LlavaOnevisionModel.pack_image_features` (modeling_llava_onevision.py),
//! and the processor's token count `_get_number_of_features` /
//! `_get_unpadded_features` (processing_llava_onevision.py).
//!
//! All sizes are (height, width), as in HF. Python's float semantics are
//! mirrored where they decide an integer: true division in `f64`, `int()`
//! truncation, `round(x, 7)` and float floor division `//`.

use crate::error::{Error, Result};

/// The pinpoint that keeps the most of the image's resolution when the image
/// is scaled to fit it, ties broken by the least wasted area; the first such
/// pinpoint in list order wins. Errors where HF would fail: an empty image, or
/// no pinpoint that keeps at least one pixel (HF returns `None` and crashes).
pub fn select_best_resolution(
    original: (usize, usize),
    pinpoints: &[(usize, usize)],
) -> Result<(usize, usize)> {
    let (oh, ow) = original;
    if oh == 0 || ow == 0 {
        return Err(Error::invalid(format!(
            "image size {oh}x{ow} has no pixels"
        )));
    }
    let mut best = None;
    let mut max_effective = 0u64;
    let mut min_wasted = u64::MAX;
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow as f64).min(h as f64 / oh as f64);
        let down_w = (ow as f64 * scale) as u64;
        let down_h = (oh as f64 * scale) as u64;
        let effective = down_w
            .saturating_mul(down_h)
            .min((ow as u64).saturating_mul(oh as u64));
        let wasted = (w as u64)
            .saturating_mul(h as u64)
            .saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = Some((h, w));
        }
    }
    best.ok_or_else(|| {
        Error::invalid(format!(
            "no image_grid_pinpoints entry fits an image of {oh}x{ow} (height x width)"
        ))
    })
}

/// HF `get_patch_output_size`: the size the image is resized to inside the
/// chosen resolution `target`, keeping its aspect ratio (`ceil` on the scaled
/// side, capped at the target).
pub fn patch_output_size(original: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let (th, tw) = target;
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as usize).min(tw))
    }
}

/// HF `get_anyres_image_grid_shape`: (rows, cols) of tiles of `tile_size`
/// (the vision tower's `image_size`) in the chosen resolution (floor division).
pub fn grid_shape(
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_size: usize,
) -> Result<(usize, usize)> {
    if tile_size == 0 {
        return Err(Error::invalid("tile size must be > 0"));
    }
    let (h, w) = select_best_resolution(image_size, pinpoints)?;
    Ok((h / tile_size, w / tile_size))
}

/// HF `image_size_to_num_patches`: the number of tiles the processor emits for
/// one image, base image included (ceil division, unlike [`grid_shape`]).
pub fn num_tiles(
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_size: usize,
) -> Result<usize> {
    if tile_size == 0 {
        return Err(Error::invalid("tile size must be > 0"));
    }
    let (h, w) = select_best_resolution(image_size, pinpoints)?;
    Ok(h.div_ceil(tile_size) * w.div_ceil(tile_size) + 1)
}

/// `int(round(x, 7))` for `x >= 0`: rounding to 7 decimals only matters when
/// `x` lies within half a unit of the 7th decimal below an integer.
fn py_int_round7(x: f64) -> usize {
    let up = x.ceil();
    if up - x < 5e-8 {
        up as usize
    } else {
        x.floor() as usize
    }
}

/// Python's float floor division `a // b` (CPython `float_floor_div`), for `b != 0`.
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b; // C fmod
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div != 0.0 {
        let floor = div.floor();
        if div - floor > 0.5 {
            floor + 1.0
        } else {
            floor
        }
    } else {
        0.0f64.copysign(a / b)
    }
}

/// HF `unpad_image` on a `current` = (height, width) feature grid: the
/// (top, bottom, left, right) margins that remove the padding the processor
/// added around an image of `original` size.
fn unpad_margins(
    current: (usize, usize),
    original: (usize, usize),
) -> (usize, usize, usize, usize) {
    let (ch, cw) = current;
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let original_aspect = ow / oh;
    let current_aspect = cw as f64 / ch as f64;
    if original_aspect > current_aspect {
        let new_h = py_int_round7(oh * (cw as f64 / ow));
        let pad = ch.saturating_sub(new_h) / 2;
        (pad, pad, 0, 0)
    } else {
        let new_w = py_int_round7(ow * (ch as f64 / oh));
        let pad = cw.saturating_sub(new_w) / 2;
        (0, 0, pad, pad)
    }
}

/// `int(vision_aspect_ratio.strip("anyres_max_"))`: note `strip` removes any
/// of those characters from both ends, it is not a prefix removal.
fn max_num_patches(vision_aspect_ratio: &str) -> Result<usize> {
    let digits = vision_aspect_ratio.trim_matches(|c| "anyres_max_".contains(c));
    match digits.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::invalid(format!(
            "vision_aspect_ratio \"{vision_aspect_ratio}\": expected anyres_max_N with N > 0"
        ))),
    }
}

/// The anyres_max_N rule: `Some((h, w))` when the unpadded grid of
/// `current` = (height, width) tokens is more than 1.1x (in linear size) the
/// area of N tiles of `side` x `side` tokens, and must be bilinearly shrunk.
fn downsample_target(
    current: (usize, usize),
    side: usize,
    max_patches: usize,
) -> Option<(usize, usize)> {
    let (ch, cw) = current;
    let area = ch as u128 * cw as u128;
    let budget = max_patches as u128 * side as u128 * side as u128;
    let ratio = (area as f64 / budget as f64).sqrt();
    (ratio > 1.1).then(|| {
        (
            py_floordiv(ch as f64, ratio) as usize,
            py_floordiv(cw as f64, ratio) as usize,
        )
    })
}

/// `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`
/// with an explicit output size, on a token-major grid `[h, w, dim]`, in `f32`
/// as torch's CPU kernel computes it (source index `scale * (i + 0.5) - 0.5`
/// clamped at 0, `scale = in / out`).
fn bilinear_resize(
    src: &[f32],
    (h, w): (usize, usize),
    dim: usize,
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    // (index0, index1, lambda0, lambda1) per output index along one axis.
    let taps = |in_size: usize, out_size: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = in_size as f32 / out_size as f32;
        (0..out_size)
            .map(|i| {
                if in_size == out_size {
                    return (i, i, 1.0, 0.0);
                }
                let real = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (real.floor() as usize).min(in_size.saturating_sub(1));
                let l1 = (real - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh), taps(w, ow));
    let mut out = Vec::with_capacity(oh * ow * dim);
    for &(y0, y1, hy0, hy1) in &ty {
        for &(x0, x1, wx0, wx1) in &tx {
            for c in 0..dim {
                let at = |y: usize, x: usize| src[(y * w + x) * dim + c];
                let top = at(y0, x0) * wx0 + at(y0, x1) * wx1;
                let bottom = at(y1, x0) * wx0 + at(y1, x1) * wx1;
                out.push(top * hy0 + bottom * hy1);
            }
        }
    }
    out
}

/// `LlavaOnevisionModel.pack_image_features` for one image.
///
/// `features` is the projector output `[num_tiles, tokens_per_tile, dim]`
/// (tile 0 the base image, then the grid tiles row by row, as the processor
/// emits them); `image_size` the original (height, width); `tile_size` and
/// `patch_size` the vision tower's `image_size` and `patch_size`.
///
/// Token order of the result `[rows, dim]`:
/// 1. the base tile's `tokens_per_tile` tokens;
/// 2. the grid tiles stitched into one `(grid_rows * side) x (grid_cols * side)`
///    token map (`side = tile_size / patch_size`), unpadded to the image's
///    aspect ratio, bilinearly shrunk when anyres_max_N says so, then read
///    row by row with `image_newline` after each row.
///
/// With a single tile (no grid, HF's multi-image case) the result is that
/// tile's tokens plus one `image_newline`.
#[allow(clippy::too_many_arguments)]
pub fn pack_onevision_features(
    features: &[f32],
    num_tiles: usize,
    tokens_per_tile: usize,
    dim: usize,
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_size: usize,
    patch_size: usize,
    vision_aspect_ratio: &str,
    image_newline: &[f32],
) -> Result<(Vec<f32>, usize)> {
    let expected = num_tiles
        .checked_mul(tokens_per_tile)
        .and_then(|n| n.checked_mul(dim));
    if expected != Some(features.len()) || num_tiles == 0 {
        return Err(Error::invalid(format!(
            "image features: expected {num_tiles} x {tokens_per_tile} x {dim} values (num_tiles > 0), found {}",
            features.len()
        )));
    }
    if image_newline.len() != dim {
        return Err(Error::invalid(format!(
            "image_newline: expected {dim} values, found {}",
            image_newline.len()
        )));
    }
    let tile_len = tokens_per_tile * dim;
    if num_tiles == 1 {
        let mut out = features.to_vec();
        out.extend_from_slice(image_newline);
        return Ok((out, tokens_per_tile + 1));
    }
    if patch_size == 0 {
        return Err(Error::invalid("patch size must be > 0"));
    }
    // Floor division, as HF (384 // 14 = 27 for SigLIP-so400m).
    let side = tile_size / patch_size;
    if side * side != tokens_per_tile {
        return Err(Error::invalid(format!(
            "The number of patches is not consistent with the image size: {tokens_per_tile} tokens per tile, \
             expected {side}x{side}"
        )));
    }
    let (rows, cols) = grid_shape(image_size, pinpoints, tile_size)?;
    if rows * cols != num_tiles - 1 {
        return Err(Error::invalid(format!(
            "{} grid tiles do not form the {rows}x{cols} grid the pinpoints give for an image of {}x{}",
            num_tiles - 1,
            image_size.0,
            image_size.1
        )));
    }
    let max_patches = max_num_patches(vision_aspect_ratio)?;

    // Stitch the grid tiles into one token map, cropping the unpadding margins.
    let (full_h, full_w) = (rows * side, cols * side);
    let (top, bottom, left, right) = unpad_margins((full_h, full_w), image_size);
    let (mut h, mut w) = (full_h - top - bottom, full_w - left - right);
    let mut grid = Vec::with_capacity(h * w * dim);
    for y in top..full_h - bottom {
        for x in left..full_w - right {
            let tile = 1 + (y / side) * cols + x / side;
            let token = (y % side) * side + x % side;
            let start = tile * tile_len + token * dim;
            grid.extend_from_slice(&features[start..start + dim]);
        }
    }
    if let Some((nh, nw)) = downsample_target((h, w), side, max_patches) {
        if nh == 0 || nw == 0 {
            return Err(Error::invalid(format!(
                "anyres_max downsampling of a {h}x{w} token grid gives an empty grid"
            )));
        }
        grid = bilinear_resize(&grid, (h, w), dim, (nh, nw));
        (h, w) = (nh, nw);
    }

    let mut out = Vec::with_capacity((tokens_per_tile + h * (w + 1)) * dim);
    out.extend_from_slice(&features[..tile_len]);
    // (An unpadded grid can be 0 tokens wide for extreme aspect ratios; HF
    // then emits only the newlines.)
    for y in 0..h {
        out.extend_from_slice(&grid[y * w * dim..(y + 1) * w * dim]);
        out.extend_from_slice(image_newline);
    }
    Ok((out, tokens_per_tile + h * (w + 1)))
}

/// The number of `<image>` tokens `LlavaOnevisionProcessor` expands one image
/// to (`_get_number_of_features`, minus one for the "default" feature select
/// strategy). With the processor's `num_image_tokens` = `side^2` (+1 for the
/// CLS token with "default"), this equals the rows [`pack_onevision_features`]
/// returns: base tile + unpadded (possibly shrunk) grid + one newline per row.
pub fn onevision_num_image_tokens(
    image_size: (usize, usize),
    pinpoints: &[(usize, usize)],
    tile_size: usize,
    patch_size: usize,
    vision_aspect_ratio: &str,
    strategy_full: bool,
) -> Result<usize> {
    if patch_size == 0 || tile_size < patch_size {
        return Err(Error::invalid(format!(
            "tile size {tile_size} / patch size {patch_size}: need tile >= patch > 0"
        )));
    }
    let side = tile_size / patch_size;
    let (best_h, best_w) = select_best_resolution(image_size, pinpoints)?;
    let (scale_h, scale_w) = (best_h / tile_size, best_w / tile_size);
    let (mut ch, mut cw) = (side * scale_h, side * scale_w);
    if ch == 0 || cw == 0 {
        return Err(Error::invalid(
            "the chosen pinpoint is smaller than one tile",
        ));
    }
    let (top, bottom, left, right) = unpad_margins((ch, cw), image_size);
    ch -= top + bottom;
    cw -= left + right;
    let (mut unpadded, mut newlines) = (ch * cw, ch);
    if let Some((nh, nw)) = downsample_target((ch, cw), side, max_num_patches(vision_aspect_ratio)?)
    {
        unpadded = nh * nw;
        newlines = nh;
    }
    // The processor's num_image_tokens counts the CLS token of "default" models
    // (e.g. 577 for CLIP-336), and _expand_image_tokens takes it off again.
    let cls = usize::from(!strategy_full);
    let base_features = side * side + cls;
    Ok(unpadded + newlines + base_features - cls)
}
