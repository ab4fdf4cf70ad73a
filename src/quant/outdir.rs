//! Writing a model directory safely, shared by `mbq quantize`, `mbq
//! export` and `mbq synth`: the output is checked before any work (it must
//! not exist and may not be inside the input), built in a temporary sibling
//! directory (`.NAME.tmp-PID`, removed on any error and, if a run was
//! killed, by the next one) and renamed into place only when complete, so
//! it either does not exist or is whole; every file is synced. Also the
//! copying of a model's other files and the `quantization_config` edit of
//! its config.json.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::weights::WeightFiles;

/// The files [`copy_other_files`] copied and the other-format weight files
/// it left out (relative paths).
#[derive(Debug, Default)]
pub(crate) struct Copied {
    pub files: Vec<PathBuf>,
    pub skipped: Vec<PathBuf>,
}

/// Files of other weight formats: they would hold the unquantized weights
/// again, so they are not copied (mbq reads safetensors only).
const OTHER_WEIGHT_SUFFIXES: [&str; 8] = [
    ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx",
];
/// The temporary sibling directory an output is built in
/// (`.NAME.tmp-PID`); removed on drop unless [`TempDir::publish`] renamed it
/// into place.
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
    parent: PathBuf,
    armed: bool,
}
impl Drop for TempDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}
impl TempDir {
    /// Creates `.NAME.tmp-PID` in `parent` (the directory [`check_output`]
    /// returned for `output`), first removing stale ones of killed runs
    /// (each told to `note`).
    pub(crate) fn create(
        parent: &Path,
        output: &Path,
        note: &mut impl FnMut(&str),
    ) -> Result<TempDir> {
        let name = output
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{}: not a directory name", output.display())))?;
        for n in remove_stale_temp_dirs(parent, &name.to_string_lossy()) {
            note(&n);
        }
        let tmp_path = parent.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        if fs::symlink_metadata(&tmp_path).is_ok() {
            return Err(Error::invalid(format!(
                "{}: a temporary directory of that name already exists (left by an interrupted run?); remove it",
                tmp_path.display()
            )));
        }
        fs::create_dir(&tmp_path).map_err(|e| {
            Error::invalid(format!(
                "{}: cannot create the output directory in {}: {}",
                output.display(),
                parent.display(),
                crate::error::io_message(&e)
            ))
        })?;
        Ok(TempDir {
            path: tmp_path,
            parent: parent.to_path_buf(),
            armed: true,
        })
    }

    /// Syncs the finished directory and renames it to `output` (never
    /// replacing anything).
    pub(crate) fn publish(mut self, output: &Path) -> Result<()> {
        sync_dir(&self.path)?;
        publish(&self.path, output)?;
        self.armed = false;
        sync_dir(&self.parent)
    }
}
/// Checks, before any work, that `output` can be written: it does not
/// exist, its parent does, and it is not inside `input`. Returns the
/// parent directory.
pub fn check_output(input: &Path, output: &Path) -> Result<PathBuf> {
    if !input.is_dir() {
        return Err(Error::Missing {
            path: input.to_path_buf(),
            what: "model directory".into(),
        });
    }
    refuse_existing(output)?;
    if output.file_name().is_none() {
        return Err(Error::invalid(format!(
            "{}: not a directory name",
            output.display()
        )));
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let parent_abs = parent.canonicalize().map_err(|e| Error::io(&parent, e))?;
    let input_abs = input.canonicalize().map_err(|e| Error::io(input, e))?;
    if parent_abs.starts_with(&input_abs) {
        return Err(Error::invalid(format!(
            "{}: the output may not be inside the input directory {}",
            output.display(),
            input.display()
        )));
    }
    Ok(parent)
}
/// Writes `to`: the JSON object of `from` (a config.json) with its
/// `quantization_config` set to `qc`. The text is kept as it is and the key
/// appended before the closing brace; a `quantization_config` already there
/// is replaced (where mbq appended it, by cutting it off; elsewhere the
/// whole object is written again, keys sorted).
pub(crate) fn set_quantization_config(
    from: &Path,
    to: &Path,
    qc: &serde_json::Value,
) -> Result<()> {
    const KEY: &str = "\"quantization_config\"";
    let text = fs::read_to_string(from).map_err(|e| Error::io(from, e))?;
    let parsed: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(from, format!("not valid JSON: {e}")))?;
    let Some(obj) = parsed.as_object() else {
        return Err(Error::config(from, "expected a JSON object"));
    };
    let body = serde_json::to_string_pretty(qc).map_err(|e| Error::invalid(e.to_string()))?;
    let body = body.replace('\n', "\n  ");
    let mut base = text.trim_end().to_string();
    if obj.contains_key("quantization_config") {
        // mbq's own: `,\n  "quantization_config": {...}\n}` at the end.
        let cut = base
            .rfind(&format!(",\n  {KEY}: "))
            .map(|i| format!("{}\n}}", &base[..i]))
            .filter(|t| {
                let mut want = obj.clone();
                want.remove("quantization_config");
                serde_json::from_str::<serde_json::Value>(t).ok()
                    == Some(serde_json::Value::Object(want))
            });
        base = match cut {
            Some(t) => t,
            None => {
                let mut o = obj.clone();
                o.remove("quantization_config");
                serde_json::to_string_pretty(&o).map_err(|e| Error::invalid(e.to_string()))?
            }
        };
    }
    let Some(head) = base.strip_suffix('}') else {
        return Err(Error::config(from, "expected a JSON object ending in }"));
    };
    let head = head.trim_end();
    let sep = if head.ends_with('{') { "" } else { "," };
    let out = format!("{head}{sep}\n  {KEY}: {body}\n}}\n");
    if fs::symlink_metadata(to).is_ok() {
        fs::remove_file(to).map_err(|e| Error::io(to, e))?;
    }
    fs::write(to, out).map_err(|e| Error::io(to, e))?;
    sync_file(to)
}
/// Removes the temporary directories `.NAME.tmp-PID` in `parent` left by
/// runs that were killed (PID no longer running); returns a note for the
/// user about each one it found (removed, or left and why). Whether a
/// process runs is read from /proc, so elsewhere than Linux they are left
/// (with a note saying so).
pub fn remove_stale_temp_dirs(parent: &Path, name: &str) -> Vec<String> {
    let head = format!(".{name}.tmp-");
    let own = std::process::id();
    let mut notes = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return notes;
    };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name
            .strip_prefix(&head)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let path = e.path();
        if cfg!(target_os = "linux") {
            if Path::new(&format!("/proc/{pid}")).exists() {
                notes.push(format!(
                    "note: {} belongs to process {pid}, which is still running; left alone",
                    path.display()
                ));
                continue;
            }
            match fs::remove_dir_all(&path) {
                Ok(()) => notes.push(format!(
                    "note: removed {}, the unfinished output of an interrupted run (process {pid}, no longer running)",
                    path.display()
                )),
                Err(err) => notes.push(format!(
                    "note: could not remove {}, the unfinished output of an interrupted run: {}",
                    path.display(),
                    Error::io(&path, err)
                )),
            }
        } else {
            notes.push(format!(
                "note: {} may be the unfinished output of an interrupted run (process {pid}); this OS gives no way to check whether it still runs, so it is left: remove it if no other run is writing",
                path.display()
            ));
        }
    }
    notes
}
fn refuse_existing(output: &Path) -> Result<()> {
    if fs::symlink_metadata(output).is_ok() {
        return Err(Error::invalid(format!(
            "{}: already exists; mbq never overwrites, choose another output directory",
            output.display()
        )));
    }
    Ok(())
}
/// Renames the finished temporary directory to `output` without ever
/// replacing anything: on Unix `output` is first created empty (which fails
/// if anything is there) and the rename then replaces that empty directory.
fn publish(tmp: &Path, output: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        fs::create_dir(output).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::invalid(format!(
                "{}: already exists; mbq never overwrites, choose another output directory",
                output.display()
            )),
            _ => Error::io(output, e),
        })?;
        fs::rename(tmp, output).map_err(|e| {
            let _ = fs::remove_dir(output);
            Error::io(output, e)
        })
    }
    #[cfg(not(unix))]
    {
        refuse_existing(output)?;
        fs::rename(tmp, output).map_err(|e| Error::io(output, e))
    }
}
/// Names (relative to the directory) of the weight files that are not
/// copied: the safetensors files read, the index and the shards it names.
pub(crate) fn weight_file_names(dir: &Path, w: &WeightFiles) -> HashSet<PathBuf> {
    let mut skip: HashSet<PathBuf> = w
        .paths()
        .iter()
        .filter_map(|p| p.strip_prefix(dir).ok().map(Path::to_path_buf))
        .collect();
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = fs::read_to_string(&index) {
        skip.insert(PathBuf::from("model.safetensors.index.json"));
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(map) = j.get("weight_map").and_then(|m| m.as_object()) {
                skip.extend(map.values().filter_map(|v| v.as_str()).map(PathBuf::from));
            }
        }
    }
    skip
}
pub(crate) fn copy_other_files(
    src_root: &Path,
    dst_root: &Path,
    rel: &Path,
    skip: &HashSet<PathBuf>,
    copied: &mut Copied,
) -> Result<()> {
    let src = src_root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&src)
        .map_err(|e| Error::io(&src, e))?
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(&src, e))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let r = rel.join(&name);
        let from = src_root.join(&r);
        let to = dst_root.join(&r);
        // Follows symlinks (Hugging Face cache snapshots link to blobs).
        let md = fs::metadata(&from).map_err(|e| Error::io(&from, e))?;
        if md.is_dir() {
            if name == ".git" || name == ".cache" {
                continue;
            }
            fs::create_dir(&to).map_err(|e| Error::io(&to, e))?;
            copy_other_files(src_root, dst_root, &r, skip, copied)?;
            sync_dir(&to)?;
        } else if md.is_file() {
            if skip.contains(&r) {
                continue;
            }
            let lower = name.to_string_lossy().to_lowercase();
            if OTHER_WEIGHT_SUFFIXES.iter().any(|s| lower.ends_with(s)) {
                copied.skipped.push(r);
                continue;
            }
            fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
            sync_file(&to)?;
            copied.files.push(r);
        }
    }
    Ok(())
}
pub(crate) fn file_len(p: &Path) -> Result<u64> {
    Ok(fs::metadata(p).map_err(|e| Error::io(p, e))?.len())
}
pub(crate) fn sync_file(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(p, e))
}
/// Syncs a directory's entries (a no-op where directories cannot be opened).
pub(crate) fn sync_dir(p: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(p, e))
    }
    #[cfg(not(unix))]
    {
        let _ = p;
        Ok(())
    }
}
