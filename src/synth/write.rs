//! Writing a planned checkpoint: each file's safetensors header from the
//! shapes, then the values generated in seeded chunks (so the same seed
//! gives the same bytes however the work is split) and streamed to disk,
//! into a temporary directory renamed into place when complete.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use super::{files, Init, Plan, PlannedTensor, SynthDtype};
use crate::error::{Error, Result};
use crate::quant::outdir::TempDir;

/// What [`write()`] reports while it works.
#[derive(Debug)]
pub enum SynthProgress<'a> {
    /// Before the first byte: the tensor data to write, over all files.
    Start { total_bytes: u64, files: usize },
    /// Tensor data written so far.
    Bytes { done: u64, total: u64 },
    /// Something to tell the user (a stale temporary directory removed).
    Note(&'a str),
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub output: PathBuf,
    pub tensors: usize,
    pub parameters: u64,
    /// Bytes of all files written.
    pub bytes: u64,
    pub files: Vec<String>,
    pub seconds: f64,
}

/// Elements per independently seeded chunk: the values do not depend on
/// how the work is split across threads.
const CHUNK: usize = 1 << 18;
/// Elements generated per write (a multiple of [`CHUNK`]); 64 MiB of f16.
const BATCH: usize = 128 * CHUNK;

/// Writes the synthetic checkpoint of `plan` to `out` (which must not
/// exist); `seed` picks the values.
pub fn write(
    plan: &Plan,
    out: &Path,
    seed: u64,
    mut progress: impl FnMut(SynthProgress<'_>),
) -> Result<SynthReport> {
    let t0 = Instant::now();
    if fs::symlink_metadata(out).is_ok() {
        return Err(Error::invalid(format!(
            "--out {}: already exists; mbq synth never overwrites, choose another directory",
            out.display()
        )));
    }
    if out.file_name().is_none() {
        return Err(Error::invalid(format!(
            "--out {}: not a directory name",
            out.display()
        )));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::Missing {
            path: parent,
            what: "the parent directory of --out".into(),
        });
    }
    let tmp = TempDir::create(&parent, out, &mut |m| progress(SynthProgress::Note(m)))?;

    let total = plan.total_bytes();
    progress(SynthProgress::Start {
        total_bytes: total,
        files: plan.files.len(),
    });
    let mut done = 0u64;
    let mut bytes = 0u64;
    for (shard, file) in plan.files.iter().enumerate() {
        bytes += write_shard(plan, shard, &tmp.path.join(file), seed, |n| {
            done += n;
            progress(SynthProgress::Bytes { done, total });
        })?;
    }
    if plan.sharded() {
        bytes += files::write_index(plan, &tmp.path)?;
    }
    bytes += files::write_side_files(plan, &tmp.path)?;
    tmp.publish(out)?;
    Ok(SynthReport {
        output: out.to_path_buf(),
        tensors: plan.tensors.len(),
        parameters: plan.parameters(),
        bytes,
        files: plan.files.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The safetensors header of one file: its tensors sorted by name (as the
/// Python writer orders tensors of one dtype), offsets in that order,
/// padded with spaces to a multiple of 8. Returns the header and the
/// file's tensors in data order.
fn shard_header(plan: &Plan, shard: usize) -> (String, Vec<&PlannedTensor>) {
    let mut ts: Vec<&PlannedTensor> = plan.tensors.iter().filter(|t| t.shard == shard).collect();
    ts.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut off = 0u64;
    for t in &ts {
        let end = off + t.numel() * 2;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        // Tensor names are plain ASCII identifiers: no JSON escaping needed.
        let _ = write!(
            h,
            ",\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{off},{end}]}}",
            t.name,
            plan.dtype.st_name(),
            shape.join(",")
        );
        off = end;
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    (h, ts)
}

fn write_shard(
    plan: &Plan,
    shard: usize,
    path: &Path,
    seed: u64,
    mut wrote: impl FnMut(u64),
) -> Result<u64> {
    let (header, ts) = shard_header(plan, shard);
    let io = |e| Error::io(path, e);
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut written = 8 + header.len() as u64;
    let max = ts.iter().map(|t| t.numel()).max().unwrap_or(0);
    let mut buf = vec![0u16; (max.min(BATCH as u64)) as usize];
    for t in ts {
        let id = tensor_id(&t.name);
        let numel = t.numel() as usize;
        let mut start = 0usize;
        while start < numel {
            let n = (numel - start).min(BATCH);
            let out = &mut buf[..n];
            fill(out, start, t.init, plan.dtype, seed, id);
            w.write_all(bytemuck::cast_slice(out)).map_err(io)?;
            start += n;
            written += 2 * n as u64;
            wrote(2 * n as u64);
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

/// A tensor's stream id: a hash of its name, so a tensor's values do not
/// change with `--layers` or with the shard it lands in.
fn tensor_id(name: &str) -> u64 {
    // FNV-1a.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64: the generator and the seed mixer.
#[inline]
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with the 16-bit values of elements `start..start + out.len()`
/// of a tensor (`start` a multiple of [`CHUNK`]).
fn fill(out: &mut [u16], start: usize, init: Init, dtype: SynthDtype, seed: u64, id: u64) {
    // Uniform on (-1/2, 1/2) has std 1/sqrt(12).
    let scale = init.std * 12f32.sqrt() / 65536.0;
    let offset = init.mean - init.std * 12f32.sqrt() * 0.5 + scale * 0.5;
    out.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || vec![0f32; CHUNK],
        |vals, (c, chunk)| {
            let index = (start / CHUNK + c) as u64;
            let mut s = seed ^ id.rotate_left(17);
            let mut state = splitmix(&mut s) ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03);
            let vals = &mut vals[..chunk.len()];
            for four in vals.chunks_mut(4) {
                let r = splitmix(&mut state);
                for (k, v) in four.iter_mut().enumerate() {
                    let u = ((r >> (16 * k)) & 0xffff) as f32;
                    *v = offset + u * scale;
                }
            }
            match dtype {
                SynthDtype::F16 => {
                    let h: &mut [f16] = bytemuck::cast_slice_mut(chunk);
                    h.convert_from_f32_slice(vals);
                }
                SynthDtype::Bf16 => {
                    let h: &mut [bf16] = bytemuck::cast_slice_mut(chunk);
                    h.convert_from_f32_slice(vals);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::super::{plan, Like, SynthOptions, LINEAR};
    use super::*;

    fn values(len: usize, start: usize, seed: u64) -> Vec<u16> {
        let mut v = vec![0u16; len];
        fill(&mut v, start, LINEAR, SynthDtype::F16, seed, tensor_id("t"));
        v
    }

    #[test]
    fn values_do_not_depend_on_how_the_writes_are_split() {
        let whole = values(3 * CHUNK + 5, 0, 1);
        let mut parts = values(2 * CHUNK, 0, 1);
        parts.extend(values(CHUNK + 5, 2 * CHUNK, 1));
        assert_eq!(whole, parts);
        assert_ne!(whole, values(3 * CHUNK + 5, 0, 2));
        let f: Vec<f32> = whole.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
        let n = f.len() as f32;
        let mean = f.iter().sum::<f32>() / n;
        let std = (f.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
            "{mean} {std}"
        );
        assert!(f.iter().all(|x| x.abs() <= 0.02 * 3f32.sqrt() + 1e-4));
    }

    #[test]
    fn header_is_aligned_and_in_name_order() {
        let p = plan(
            Like::LlavaOv05b,
            &SynthOptions {
                layers: Some(1),
                vision_layers: Some(1),
                vocab: Some(64),
                ..SynthOptions::default()
            },
        )
        .unwrap();
        let (h, ts) = shard_header(&p, 0);
        assert_eq!(h.len() % 8, 0);
        assert!(ts.windows(2).all(|w| w[0].name < w[1].name));
        let v: serde_json::Value = serde_json::from_str(&h).unwrap();
        assert_eq!(v.as_object().unwrap().len(), p.tensors.len() + 1);
    }
}
