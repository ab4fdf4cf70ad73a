//! The pixels of a request's `image_url` parts: `data:` URLs (base64 PNG,
//! JPEG, WebP, ...) always; local files only under `--allow-local-files`;
//! http(s) URLs never (the server fetches nothing).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use image::RgbImage;

use super::api::{ApiError, ImagePart};
use crate::preprocess::{load_image, load_image_bytes};

/// Decodes one image part.
pub fn load_part(part: &ImagePart, allow_local: Option<&Path>) -> Result<RgbImage, ApiError> {
    let param = Some(format!("{}.image_url.url", part.at));
    let bad = |msg: String| ApiError::bad(param.clone(), format!("{}: {msg}", part.at));
    let url = part.url.trim();
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, payload) = rest
            .split_once(',')
            .ok_or_else(|| bad("a data URL needs a ',' before its payload".into()))?;
        if !meta.ends_with(";base64") {
            return Err(bad(format!(
                "only base64 data URLs are accepted (data:image/png;base64,...), got data:{meta},..."
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload.trim())
            .map_err(|e| bad(format!("the data URL is not valid base64: {e}")))?;
        return load_image_bytes(&bytes, &part.at)
            .map_err(|e| ApiError::bad(param.clone(), e.to_string()).with_code("invalid_image"));
    }
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(bad(
            "http(s) image URLs are not fetched by this server; send the image as a base64 data URL (data:image/png;base64,...)"
                .into(),
        )
        .with_code("unsupported_image_url"));
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if !Path::new(path).is_absolute() && !lower.starts_with("file://") && url.contains(':') {
        return Err(bad(format!(
            "unsupported image URL scheme in {:?}: send a base64 data URL",
            url.split(':').next().unwrap_or("")
        )));
    }
    let Some(root) = allow_local else {
        return Err(bad(
            "local image files are not served unless the server was started with --allow-local-files DIR; send a base64 data URL"
                .into(),
        )
        .status(axum::http::StatusCode::FORBIDDEN));
    };
    let file = local_file(root, path).map_err(bad)?;
    load_image(&file)
        .map_err(|e| ApiError::bad(param.clone(), e.to_string()).with_code("invalid_image"))
}

/// `path` (absolute, or relative to `root`) if it lies under `root` once
/// links and `..` are resolved.
fn local_file(root: &Path, path: &str) -> Result<PathBuf, String> {
    let root = root
        .canonicalize()
        .map_err(|e| format!("--allow-local-files {}: {e}", root.display()))?;
    let joined = root.join(path);
    let file = joined
        .canonicalize()
        .map_err(|e| format!("{path}: cannot open: {e}"))?;
    if !file.starts_with(&root) {
        return Err(format!(
            "{path} is outside the directory allowed by --allow-local-files ({})",
            root.display()
        ));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(url: &str) -> ImagePart {
        ImagePart {
            at: "messages[0].content[0]".into(),
            url: url.into(),
        }
    }

    #[test]
    fn urls_that_are_refused() {
        let dir = std::env::temp_dir();
        for (url, allow, needle) in [
            (
                "https://example.com/cat.png",
                Some(dir.as_path()),
                "not fetched",
            ),
            ("data:image/png,abc", None, "base64"),
            ("data:image/png;base64,@@@", None, "not valid base64"),
            (
                "data:image/png;base64,aGVsbG8=",
                None,
                "messages[0].content[0]",
            ),
            ("/etc/passwd", None, "--allow-local-files"),
            ("ftp://x/y.png", None, "scheme"),
        ] {
            let e = load_part(&part(url), allow).unwrap_err();
            assert!(e.message.contains(needle), "{url}: {}", e.message);
        }
    }

    #[test]
    fn local_files_stay_under_the_allowed_directory() {
        let root = std::env::temp_dir().join(format!("mbq-serve-img-{}", std::process::id()));
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::write(root.join("secret.txt"), "x").unwrap();
        let e = local_file(&root.join("in"), "../secret.txt").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        assert!(local_file(&root, "secret.txt").is_ok());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
