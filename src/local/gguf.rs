//! Reading a GGUF file's header: metadata, tensor list, and the facts `model list` shows.

use super::LocalError;
use candle_core::quantized::gguf_file::Content;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// What a model file is, from its header alone (no weights are read).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// `general.name`, else the file name without `.gguf`.
    pub name: String,
    pub path: PathBuf,
    /// `general.architecture`, for example `llama`.
    pub architecture: String,
    /// Number of weights, counted from the tensor shapes.
    pub parameters: u64,
    /// The most common tensor type by bytes, for example `Q4_1`.
    pub quantization: String,
    /// The context length the model was trained for (`<arch>.context_length`).
    pub trained_context: usize,
    pub file_size: u64,
}

/// An opened GGUF: its parsed header and the reader positioned anywhere.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LocalError> {
        let file = File::open(path)
            .map_err(|source| LocalError::Io { path: path.to_path_buf(), source })?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let content = Content::read(&mut reader).map_err(|e| LocalError::corrupt(path, e))?;
        Ok(GgufFile { path: path.to_path_buf(), content, reader })
    }

    pub fn string(&self, key: &str) -> Option<&str> {
        self.content.metadata.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    pub fn u32(&self, key: &str) -> Option<u32> {
        self.content.metadata.get(key).and_then(value_u32)
    }

    /// A number however the file stores it (`general.sampling.*` are f32 by convention).
    pub fn f32(&self, key: &str) -> Option<f32> {
        use candle_core::quantized::gguf_file::Value;
        match self.content.metadata.get(key)? {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            other => value_u32(other).map(|x| x as f32),
        }
    }

    pub fn architecture(&self) -> Result<String, LocalError> {
        self.string("general.architecture")
            .map(str::to_owned)
            .ok_or_else(|| LocalError::corrupt(&self.path, "no `general.architecture` metadata"))
    }

    pub fn info(&self) -> Result<ModelInfo, LocalError> {
        let architecture = self.architecture()?;
        let trained_context =
            self.u32(&format!("{architecture}.context_length")).unwrap_or(0) as usize;
        let mut parameters = 0u64;
        let mut bytes_by_type: Vec<(String, u64)> = Vec::new();
        for t in self.content.tensor_infos.values() {
            let elems = t.shape.elem_count() as u64;
            parameters += elems;
            let bytes = elems / t.ggml_dtype.block_size() as u64 * t.ggml_dtype.type_size() as u64;
            let name = format!("{:?}", t.ggml_dtype);
            match bytes_by_type.iter_mut().find(|(n, _)| *n == name) {
                Some((_, b)) => *b += bytes,
                None => bytes_by_type.push((name, bytes)),
            }
        }
        bytes_by_type.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let quantization = bytes_by_type.first().map(|(n, _)| n.clone()).unwrap_or_default();
        let stem = self.path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let name = self.string("general.name").map(str::to_owned).or(stem).unwrap_or_default();
        let file_size = self.reader.get_ref().metadata().map(|m| m.len()).unwrap_or(0);
        Ok(ModelInfo {
            name,
            path: self.path.clone(),
            architecture,
            parameters,
            quantization,
            trained_context,
            file_size,
        })
    }
}

/// Integer metadata comes in any width; token ids and counts fit in u32.
pub(crate) use edgechat_llama::value_u32;

/// Reads the header of every `.gguf` in `dir`, sorted by name; unreadable files are listed
/// with their error so `model list` shows them rather than hiding them.
pub fn list_models(dir: &Path) -> Result<Vec<Result<ModelInfo, LocalError>>, LocalError> {
    let entries =
        std::fs::read_dir(dir).map_err(|source| LocalError::Io { path: dir.into(), source })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    paths.sort();
    Ok(paths.iter().map(|p| GgufFile::open(p).and_then(|g| g.info())).collect())
}
