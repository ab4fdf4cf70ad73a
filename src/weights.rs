//! Memory-mapped safetensors weights of a Hugging Face model directory:
//! `model.safetensors`, or the shards named by `model.safetensors.index.json`,
//! or mbq's packed `model.mbq.safetensors`.
//! Tensors are looked up by name (with a prefix helper, as in
//! `vb.pp("model.layers.0")`) and converted to f32 on demand.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::store::Store;
use crate::tensor::Tensor;

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file (header included in the offset).
    start: usize,
    end: usize,
}

/// The file `mbq quantize` writes its packed weights to. Not
/// `model.safetensors`, so that loaders that do not know the packed format
/// (transformers, vLLM) find no weights and stop, rather than start a model
/// with missing weights initialised at random. Older directories with
/// packed tensors in `model.safetensors` are still read.
pub const MBQ_WEIGHTS_FILE: &str = "model.mbq.safetensors";

/// All weight files of one model, mapped, with an index name -> location.
pub struct WeightFiles {
    paths: Vec<PathBuf>,
    maps: Vec<Arc<Mmap>>,
    entries: HashMap<String, Entry>,
    /// `__metadata__` of the first file (the packed format keeps its
    /// description there).
    pub metadata: HashMap<String, String>,
    /// The `quantization_config` of the directory's config.json (or its
    /// `quantize_config.json`), as written, with the file it came from:
    /// how another tool's quantized checkpoint (GPTQ, AWQ) packs its
    /// linears. `quant::import` reads it; `None` for a dense model, for
    /// mbq's output written before its config.json declared itself and for
    /// `open_file`. mbq's own (`"quant_method": "mbq"`) only describes the
    /// directory: its packed tensors are described by `metadata`.
    pub quantization_config: Option<(PathBuf, serde_json::Value)>,
}

impl WeightFiles {
    /// Opens the weights of `dir`: mbq's packed `model.mbq.safetensors`
    /// ([`MBQ_WEIGHTS_FILE`]), else `model.safetensors`
    /// or the shards listed in `model.safetensors.index.json` (where mbq's
    /// older output keeps its packed weights). A
    /// directory with both mbq's file and another one is refused: which
    /// weights are meant is not clear.
    pub fn open(dir: &Path) -> Result<Self> {
        let mbq = dir.join(MBQ_WEIGHTS_FILE);
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        for p in [&mbq, &single, &index] {
            if let Some(e) = Error::wrong_kind(p, false, "a file") {
                return Err(e);
            }
        }
        if mbq.is_file() {
            if let Some(other) = [&single, &index].into_iter().find(|p| p.is_file()) {
                return Err(Error::config(
                    dir,
                    format!(
                        "holds both {} (mbq's packed weights) and {}; keep one of them",
                        MBQ_WEIGHTS_FILE,
                        other
                            .file_name()
                            .map(|n| n.to_string_lossy())
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        let files: Vec<PathBuf> = if mbq.is_file() {
            vec![mbq]
        } else if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&index, format!("not valid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "expected an object \"weight_map\""))?;
            let mut names: Vec<String> = Vec::new();
            for v in map.values() {
                let f = v.as_str().ok_or_else(|| {
                    Error::config(&index, "\"weight_map\" values must be file names")
                })?;
                if !names.iter().any(|n| n == f) {
                    names.push(f.to_string());
                }
            }
            names.sort();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::Missing {
                path: single,
                what: "model weights (model.safetensors, model.safetensors.index.json or model.mbq.safetensors)".into(),
            });
        };
        let mut wf = WeightFiles {
            paths: Vec::new(),
            maps: Vec::new(),
            entries: HashMap::new(),
            metadata: HashMap::new(),
            quantization_config: quantization_config(dir)?,
        };
        for path in files {
            wf.add_file(path)?;
        }
        Ok(wf)
    }

    /// Opens one safetensors file by path.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut wf = WeightFiles {
            paths: Vec::new(),
            maps: Vec::new(),
            entries: HashMap::new(),
            metadata: HashMap::new(),
            quantization_config: None,
        };
        wf.add_file(path.to_path_buf())?;
        Ok(wf)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        if let Some(e) = Error::wrong_kind(&path, false, "a safetensors file") {
            return Err(e);
        }
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::Missing {
                path: path.clone(),
                what: "weight shard".into(),
            },
            _ => Error::io(&path, e),
        })?;
        // SAFETY: the map is read-only; a file changed underneath us while
        // mapped is outside what we can defend against (as in every mmap
        // loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        // Where the file is not in the page cache yet, read it in 2 MiB
        // folios, mapped as 2 MiB pages: a decode step streams every weight
        // once, and on 4 KiB pages the TLB misses cost a large part of the
        // memory bandwidth (docs/BENCHMARKS.md). Only advice: a kernel
        // without it maps 4 KiB pages as before.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let bad = |msg: String| Error::Safetensors {
            path: path.clone(),
            msg,
        };
        let (header_len, meta) = SafeTensors::read_metadata(&map)
            .map_err(|e| bad(safetensors_message(&e, map.len())))?;
        let base = 8 + header_len;
        let file_idx = self.maps.len();
        if file_idx == 0 {
            if let Some(m) = meta.metadata() {
                self.metadata = m.clone();
            }
        }
        for (name, info) in meta.tensors() {
            let (a, b) = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            let expected_bytes = numel * dtype_size(info.dtype).unwrap_or(0);
            if dtype_size(info.dtype).is_some() && b - a != expected_bytes {
                return Err(bad(format!(
                    "tensor \"{name}\" of shape {:?} and dtype {:?} needs {expected_bytes} bytes, the header gives {}",
                    info.shape,
                    info.dtype,
                    b - a
                )));
            }
            self.entries.insert(
                name,
                Entry {
                    file: file_idx,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + a,
                    end: base + b,
                },
            );
        }
        self.paths.push(path);
        self.maps.push(Arc::new(map));
        Ok(())
    }

    /// The safetensors files read, in order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// How many numbered blocks `<prefix>.<N>.*` the files hold (distinct N),
    /// e.g. the decoder layers under `language_model.model.layers`.
    pub fn count_numbered(&self, prefix: &str) -> usize {
        let head = format!("{prefix}.");
        let mut seen = std::collections::HashSet::new();
        for name in self.entries.keys() {
            if let Some(rest) = name.strip_prefix(&head) {
                if let Some(n) = rest.split('.').next().and_then(|n| n.parse::<usize>().ok()) {
                    seen.insert(n);
                }
            }
        }
        seen.len()
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.location(),
        })
    }

    /// The weight file, or the directory of the shards (for messages).
    pub fn location(&self) -> PathBuf {
        match self.paths.as_slice() {
            [one] => one.clone(),
            [first, ..] => first.parent().map(Path::to_path_buf).unwrap_or_default(),
            [] => PathBuf::new(),
        }
    }

    /// The raw bytes, dtype and shape of a tensor (for copying it unchanged).
    pub fn raw(&self, name: &str) -> Result<(Dtype, &[usize], &[u8])> {
        let e = self.entry(name)?;
        Ok((e.dtype, &e.shape, &self.maps[e.file][e.start..e.end]))
    }

    /// A tensor converted to f32, any shape.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = &self.maps[e.file][e.start..e.end];
        let data = to_f32(e.dtype, bytes).ok_or_else(|| Error::Safetensors {
            path: self.paths[e.file].clone(),
            msg: format!(
                "tensor \"{name}\" has dtype {:?}; expected F32, F16 or BF16",
                e.dtype
            ),
        })?;
        Tensor::new(e.shape.clone(), data)
    }

    /// The entry of tensor `name`, which must have `shape`.
    fn entry_shaped(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        Ok(e)
    }

    /// A tensor converted to f32 that must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.entry_shaped(name, shape)?;
        self.get_any(name)
    }

    /// A tensor's values where the file holds them (mapped, or copied
    /// when the file does not align them), which must be `dtype` (any
    /// shape; the caller checks it with [`WeightFiles::shape`]).
    pub fn store<T: bytemuck::Pod>(&self, name: &str, dtype: Dtype) -> Result<Store<T>> {
        let e = self.entry(name)?;
        if e.dtype != dtype {
            return Err(Error::Safetensors {
                path: self.paths[e.file].clone(),
                msg: format!(
                    "tensor \"{name}\" has dtype {:?}; expected {dtype:?}",
                    e.dtype
                ),
            });
        }
        Ok(Store::from_map(&self.maps[e.file], e.start, e.end))
    }

    /// A weight of `shape` as stored: f16 and bf16 stay in the mapped file
    /// (a backend converts them as it reads them), f32 too.
    pub fn stored(&self, name: &str, shape: &[usize]) -> Result<StoredWeight> {
        let e = self.entry_shaped(name, shape)?;
        let data = match e.dtype {
            Dtype::F32 => StoredData::F32(self.store(name, Dtype::F32)?),
            Dtype::F16 => StoredData::F16(self.store(name, Dtype::F16)?),
            Dtype::BF16 => StoredData::BF16(self.store(name, Dtype::BF16)?),
            other => {
                return Err(Error::Safetensors {
                    path: self.paths[e.file].clone(),
                    msg: format!(
                        "tensor \"{name}\" has dtype {other:?}; expected F32, F16 or BF16"
                    ),
                })
            }
        };
        Ok(StoredWeight {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A view with a name prefix, e.g. `w.pp("model.layers.3")`.
    pub fn pp<'a>(&'a self, prefix: impl AsRef<str>) -> Prefixed<'a> {
        Prefixed {
            files: self,
            prefix: prefix.as_ref().to_string(),
        }
    }
}

/// `quantization_config` of `dir/config.json`, else the object of
/// `dir/quantize_config.json` (AutoGPTQ's file), else `None`. A config.json
/// that is not valid JSON is left to the config loader to report.
fn quantization_config(dir: &Path) -> Result<Option<(PathBuf, serde_json::Value)>> {
    let read = |p: &Path| -> Result<Option<serde_json::Value>> {
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        Ok(serde_json::from_str(&text).ok())
    };
    let config = dir.join("config.json");
    if let Some(qc) =
        read(&config)?.and_then(|mut c| c.get_mut("quantization_config").map(|v| v.take()))
    {
        return Ok(Some((config, qc)));
    }
    let aux = dir.join("quantize_config.json");
    Ok(read(&aux)?.filter(|v| v.is_object()).map(|v| (aux, v)))
}

/// A name prefix over [`WeightFiles`]: `get("q_proj.weight")` looks up
/// `"<prefix>.q_proj.weight"`.
#[derive(Clone)]
pub struct Prefixed<'a> {
    pub files: &'a WeightFiles,
    pub prefix: String,
}

impl<'a> Prefixed<'a> {
    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{}", self.prefix, leaf)
        }
    }
    pub fn pp(&self, sub: impl AsRef<str>) -> Prefixed<'a> {
        Prefixed {
            files: self.files,
            prefix: self.name(sub.as_ref()),
        }
    }
    pub fn get(&self, leaf: &str, shape: &[usize]) -> Result<Tensor> {
        self.files.get(&self.name(leaf), shape)
    }
    pub fn contains(&self, leaf: &str) -> bool {
        self.files.contains(&self.name(leaf))
    }
    pub fn stored(&self, leaf: &str, shape: &[usize]) -> Result<StoredWeight> {
        self.files.stored(&self.name(leaf), shape)
    }
}

/// A dense weight as its file stores it (see [`WeightFiles::stored`]).
#[derive(Clone, Debug)]
pub struct StoredWeight {
    pub shape: Vec<usize>,
    pub data: StoredData,
}

/// The values of a [`StoredWeight`] in their stored type.
#[derive(Clone, Debug)]
pub enum StoredData {
    F32(Store<f32>),
    F16(Store<f16>),
    BF16(Store<bf16>),
}

impl StoredWeight {
    /// An owned f16 weight (benchmarks and tests make them).
    pub fn f16(shape: Vec<usize>, values: Vec<f16>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != values.len() {
            return Err(Error::invalid(format!(
                "weight of shape {shape:?} needs {n} values, got {}",
                values.len()
            )));
        }
        Ok(StoredWeight {
            shape,
            data: StoredData::F16(values.into()),
        })
    }

    /// The weight converted to f32 (what a backend without a reader of the
    /// stored type uploads from).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let data = match &self.data {
            StoredData::F32(v) => v.to_vec(),
            StoredData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            StoredData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        };
        Tensor::new(self.shape.clone(), data)
    }
}

/// A safetensors header error in plain words (the crate's Debug names,
/// `HeaderTooSmall` or `MetadataIncompleteBuffer`, mean little to a user).
pub fn safetensors_message(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!(
            "the file is {file_len} bytes, too short to hold a safetensors header (empty or truncated?)"
        ),
        E::HeaderTooLarge | E::InvalidHeaderLength => format!(
            "the header length in the first 8 bytes does not fit the file of {file_len} bytes (truncated, or not a safetensors file?)"
        ),
        E::MetadataIncompleteBuffer => format!(
            "the tensors' data ends beyond the end of the file ({file_len} bytes): the file is truncated"
        ),
        E::InvalidHeaderStart | E::InvalidHeader(_) => {
            "the header is not JSON text (not a safetensors file, or corrupt)".into()
        }
        E::InvalidHeaderDeserialization(j) | E::JsonError(j) => {
            format!("the header is not a valid safetensors JSON header: {j}")
        }
        E::InvalidOffset(name) => {
            format!("tensor \"{name}\" has data offsets outside the data or overlapping another tensor")
        }
        E::TensorInvalidInfo | E::ValidationOverflow => {
            "a tensor's shape and dtype do not match its data size".into()
        }
        other => other.to_string(),
    }
}

pub fn dtype_size(d: Dtype) -> Option<usize> {
    match d {
        Dtype::F32 | Dtype::I32 | Dtype::U32 => Some(4),
        Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => Some(2),
        Dtype::I64 | Dtype::U64 | Dtype::F64 => Some(8),
        Dtype::U8 | Dtype::I8 | Dtype::BOOL => Some(1),
        _ => None,
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let v = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(v)
}

/// The decoder linears that are quantized, per layer, in this order (names
/// below `...layers.<i>`).
pub const DECODER_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Where a checkpoint keeps each part. transformers 4 wrote the legacy
/// names (`language_model.model.*`, `language_model.lm_head.*`,
/// `vision_tower.vision_model.*`); transformers 5 can write them nested under
/// `model.` (`model.language_model.*`, `lm_head.*`, `model.vision_tower.*`
/// without `vision_model.`), and a mix of both. Qwen2-VL's Hub files use
/// `model.*` for the language model and `visual.*` for the tower with its
/// merger (`model.language_model.*` and `model.visual.*` from
/// transformers 5). Each part is found on its own.
pub struct Prefixes {
    pub text: String,
    pub lm_head: String,
    /// The vision model itself (its `embeddings.*`, `encoder.*` below it).
    pub vision: String,
    pub projector: String,
    pub image_newline: String,
}

impl Prefixes {
    pub fn detect(w: &WeightFiles) -> Result<Prefixes> {
        let find = |candidates: &[&str], leaf: &str| -> Result<String> {
            for c in candidates {
                if w.contains(&format!("{c}.{leaf}")) {
                    return Ok(c.to_string());
                }
            }
            Err(Error::MissingTensor {
                name: candidates
                    .iter()
                    .map(|c| format!("{c}.{leaf}"))
                    .collect::<Vec<_>>()
                    .join(" or "),
                path: w.location(),
            })
        };
        let text = find(
            &[
                "language_model.model",
                "model.language_model",
                "language_model",
                // Qwen2-VL as transformers 4 wrote it.
                "model",
            ],
            "embed_tokens.weight",
        )?;
        // Qwen2-VL's tower (`visual`, `model.visual`) holds its merger.
        let qwen = find(&["visual", "model.visual"], "patch_embed.proj.weight").ok();
        // InternViT (`InternVLVisionModel`): transformers 4.57 and 5's
        // default save write `vision_tower.*`, 5's native names
        // `model.vision_tower.*`.
        let intern = find(
            &["vision_tower", "model.vision_tower"],
            "embeddings.patch_embeddings.projection.weight",
        )
        .ok();
        let (vision, projector) = match (qwen, intern) {
            (Some(v), _) => (v.clone(), format!("{v}.merger")),
            (None, Some(v)) => (
                v,
                find(
                    &["multi_modal_projector", "model.multi_modal_projector"],
                    "linear_1.weight",
                )?,
            ),
            (None, None) => (
                find(
                    &[
                        "vision_tower.vision_model",
                        "model.vision_tower.vision_model",
                        "model.vision_tower",
                        "vision_tower",
                    ],
                    "embeddings.patch_embedding.weight",
                )?,
                find(
                    &["multi_modal_projector", "model.multi_modal_projector"],
                    "linear_1.weight",
                )?,
            ),
        };
        let lm_head = if text == "model" || text.starts_with("model.") {
            "lm_head"
        } else {
            "language_model.lm_head"
        };
        let lm_head = [lm_head, "lm_head", "language_model.lm_head"]
            .into_iter()
            .find(|c| w.contains(&format!("{c}.weight")))
            .unwrap_or(lm_head)
            .to_string();
        let image_newline = ["image_newline", "model.image_newline"]
            .into_iter()
            .find(|c| w.contains(c))
            .unwrap_or("image_newline")
            .to_string();
        Ok(Prefixes {
            text,
            lm_head,
            vision,
            projector,
            image_newline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_f32_f16_bf16_and_rejects_other_dtypes() {
        let dir = std::env::temp_dir().join(format!("mbq-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let vals = [1.5f32, -2.25, 0.125, 3.0, -0.5, 7.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        write(
            &dir.join("model.safetensors"),
            &[
                ("a", Dtype::F32, vec![2, 3], f32b),
                ("b", Dtype::F16, vec![2, 3], f16b),
                ("c", Dtype::BF16, vec![3, 2], bf16b),
                ("d", Dtype::I8, vec![2], vec![1, 2]),
            ],
        );
        let w = WeightFiles::open(&dir).unwrap();
        // These values are exact in every one of the three dtypes.
        assert_eq!(w.get("a", &[2, 3]).unwrap().data, vals);
        assert_eq!(w.get("b", &[2, 3]).unwrap().data, vals);
        assert_eq!(w.get("c", &[3, 2]).unwrap().data, vals);
        let e = w.get("b", &[3, 2]).unwrap_err().to_string();
        assert!(
            e.contains("\"b\"") && e.contains("[3, 2]") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = w.get_any("d").unwrap_err().to_string();
        assert!(e.contains("\"d\"") && e.contains("I8"), "{e}");
        let e = w.get_any("zz").unwrap_err().to_string();
        assert!(e.contains("\"zz\" not found"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mbq_weights_file_is_read_first_and_not_beside_another() {
        let dir = std::env::temp_dir().join(format!("mbq-weights-mbq-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let one = 1.0f32.to_le_bytes().to_vec();
        write(
            &dir.join(MBQ_WEIGHTS_FILE),
            &[("x", Dtype::F32, vec![1], one.clone())],
        );
        let w = WeightFiles::open(&dir).unwrap();
        assert_eq!(w.get("x", &[1]).unwrap().data, [1.0]);
        assert!(w.location().ends_with("model.mbq.safetensors"));
        write(
            &dir.join("model.safetensors"),
            &[("y", Dtype::F32, vec![1], one)],
        );
        let e = WeightFiles::open(&dir).err().unwrap().to_string();
        assert!(
            e.contains("model.mbq.safetensors") && e.contains("model.safetensors;"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sharded_index_is_followed() {
        let dir = std::env::temp_dir().join(format!("mbq-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let one = 1.0f32.to_le_bytes().to_vec();
        let two = 2.0f32.to_le_bytes().to_vec();
        write(
            &dir.join("model-00001-of-00002.safetensors"),
            &[("x", Dtype::F32, vec![1], one)],
        );
        write(
            &dir.join("model-00002-of-00002.safetensors"),
            &[("y", Dtype::F32, vec![1], two)],
        );
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = WeightFiles::open(&dir).unwrap();
        assert_eq!(w.get("x", &[1]).unwrap().data, [1.0]);
        assert_eq!(w.get("y", &[1]).unwrap().data, [2.0]);
        // A shard named by the index but absent is named in the error.
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        let e = WeightFiles::open(&dir).err().unwrap().to_string();
        assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
