//! The local models one server answers with. Each is loaded on first use; at most
//! `max_loaded` stay loaded, within a memory budget, and the least recently used idle one is
//! unloaded to make room (as Ollama does). Invariants:
//! - loading one model never blocks requests to another (no lock is held while a file loads);
//! - two first requests for one model load it once;
//! - a model is unloaded only while idle: while no handle but the registry's exists (a
//!   request holds one from lookup to its answer's end, inside its [`super::Generation`]), so
//!   unloading never cuts a stream;
//! - a model that cannot get room is refused ([`LocalError::NoRoom`]), never loaded over budget.

use super::{Engine, EngineOptions, LocalError};
use std::path::PathBuf;
use std::sync::Mutex;

/// One local model as configured: the name clients use, its file and how its engine runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    pub options: EngineOptions,
}

/// How many models may be loaded at once, and how much memory they may take together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    pub max_loaded: usize,
    /// Files plus KV caches, in bytes; `None`: no budget beyond `max_loaded`.
    pub max_bytes: Option<u64>,
}

/// The configured local models and those loaded now; share it behind an `Arc`.
pub struct Registry {
    specs: Vec<ModelSpec>,
    /// The model that answers when a remote provider cannot, and for the alias `local`.
    fallback: Option<usize>,
    limits: LoadLimits,
    slots: Mutex<Slots>,
    /// One per spec: held while that model loads, so a second request waits for the first's.
    loading: Vec<tokio::sync::Mutex<()>>,
}

struct Slots {
    slots: Vec<Slot>,
    /// Bumped on every use; the smallest `used` is the least recently used.
    clock: u64,
}

enum Slot {
    Empty,
    /// Room taken for a model being loaded: it counts, but cannot be unloaded.
    Loading {
        bytes: u64,
    },
    Ready {
        engine: Engine,
        used: u64,
    },
}

/// A loaded model as `/metrics` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub name: String,
    /// Requests (waiting, in the running batch).
    pub queue: (usize, usize),
    /// [`Engine::memory_bytes`].
    pub memory_bytes: u64,
    pub prompt_cache_bytes: usize,
}

impl Registry {
    /// `specs` in configuration order; `fallback` indexes the one that stands in for remote
    /// providers (none when its file is missing).
    pub fn new(specs: Vec<ModelSpec>, fallback: Option<usize>, limits: LoadLimits) -> Registry {
        let loading = specs.iter().map(|_| tokio::sync::Mutex::new(())).collect();
        let slots = Slots { slots: specs.iter().map(|_| Slot::Empty).collect(), clock: 0 };
        let fallback = fallback.filter(|&i| i < specs.len());
        Registry { specs, fallback, limits, slots: Mutex::new(slots), loading }
    }

    /// Every configured model's name, loaded or not, in configuration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.iter().map(|s| s.name.as_str())
    }

    /// The fallback model's name.
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.map(|i| self.specs[i].name.as_str())
    }

    /// The models that can answer now (loaded, or their file is there to load), in
    /// configuration order: what `/v1/models` lists.
    pub fn available(&self) -> Vec<&str> {
        let slots = self.lock();
        let ready = |i: usize| matches!(slots.slots[i], Slot::Ready { .. });
        let specs = self.specs.iter().enumerate();
        specs.filter(|(i, s)| ready(*i) || s.path.exists()).map(|(_, s)| s.name.as_str()).collect()
    }

    /// The configured name `model` refers to (names compare case-insensitively).
    pub fn find(&self, model: &str) -> Option<&str> {
        self.index(model).map(|i| self.specs[i].name.as_str())
    }

    /// Reads the header of every model file that is there, and compiles every configured chat
    /// template, so that a file that cannot load stops the start rather than a later request;
    /// warns of each missing model file and returns a line for each. Blocking.
    pub fn check_files(&self) -> Result<Vec<String>, LocalError> {
        let mut missing = Vec::new();
        for spec in &self.specs {
            if let Some(file) = &spec.options.chat_template {
                let source = std::fs::read_to_string(file).map_err(|e| {
                    LocalError::Template(format!("cannot read {}: {e}", file.display()))
                })?;
                super::ChatTemplate::new(&source, "", "")
                    .map_err(|e| LocalError::Template(format!("{}: {e}", file.display())))?;
            }
            if !spec.path.exists() {
                tracing::warn!(model = %spec.name, path = %spec.path.display(), "no file for this local model: it answers once the file is there (`edgechat model pull`, or `bash models/fetch-default.sh` for the default)");
                missing.push(format!(
                    "local model {}: no file at {}",
                    spec.name,
                    spec.path.display()
                ));
                continue;
            }
            let architecture = super::gguf::GgufFile::open(&spec.path)?.info()?.architecture;
            if !super::model::SUPPORTED.split(", ").any(|a| a == architecture) {
                let supported = super::model::SUPPORTED;
                let path = spec.path.clone();
                return Err(LocalError::UnsupportedArchitecture { path, architecture, supported });
            }
        }
        Ok(missing)
    }

    /// The models loaded now, in configuration order. (No handle leaves: one held would make
    /// its model look busy.)
    pub fn loaded(&self) -> Vec<Loaded> {
        let slots = self.lock();
        let ready = slots.slots.iter().zip(&self.specs).filter_map(|(slot, spec)| match slot {
            Slot::Ready { engine, .. } => Some(Loaded {
                name: spec.name.clone(),
                queue: engine.queue_depth(),
                memory_bytes: engine.memory_bytes(),
                prompt_cache_bytes: engine.prompt_cache_bytes(),
            }),
            _ => None,
        });
        ready.collect()
    }

    /// The engine of `model`, loading it first when it is not loaded (after unloading idle
    /// models to make room). Loading runs off the async threads.
    pub async fn engine(&self, model: &str) -> Result<Engine, LocalError> {
        let i = self.index(model).ok_or_else(|| LocalError::UnknownModel(model.to_owned()))?;
        if let Some(engine) = self.touch(i) {
            return Ok(engine);
        }
        let _one_load = self.loading[i].lock().await;
        if let Some(engine) = self.touch(i) {
            return Ok(engine); // loaded while this request waited for the other's load
        }
        let spec = &self.specs[i];
        let bytes = std::fs::metadata(&spec.path)
            .map_err(|source| LocalError::Io { path: spec.path.clone(), source })?
            .len();
        self.make_room(i, bytes)?;
        // Gives the room back if this request is dropped (or fails) before the model is in.
        let mut reserved = Reservation { registry: self, index: i, done: false };
        let (path, options) = (spec.path.clone(), spec.options.clone());
        let started = std::time::Instant::now();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&path, options))
            .await
            .map_err(|e| LocalError::Generation(format!("loading stopped: {e}")))??;
        let load_ms = started.elapsed().as_millis() as u64;
        tracing::info!(model = %spec.name, path = %spec.path.display(), kernels = engine.kernels(), load_ms, "local model loaded");
        crate::metrics::local_kernels(engine.kernels());
        let mut slots = self.lock();
        slots.clock += 1;
        slots.slots[i] = Slot::Ready { engine: engine.clone(), used: slots.clock };
        reserved.done = true;
        Ok(engine)
    }

    /// Takes room for model `i` of `bytes`, unloading the least recently used idle models
    /// while the loaded ones are too many or too large.
    fn make_room(&self, i: usize, bytes: u64) -> Result<(), LocalError> {
        let mut slots = self.lock();
        loop {
            let (count, used) = slots.slots.iter().fold((0, 0), |(n, b), s| match s {
                Slot::Empty => (n, b),
                Slot::Loading { bytes } => (n + 1, b + bytes),
                Slot::Ready { engine, .. } => (n + 1, b + engine.memory_bytes()),
            });
            let fits_budget = self.limits.max_bytes.is_none_or(|max| used + bytes <= max);
            if count < self.limits.max_loaded && fits_budget {
                slots.slots[i] = Slot::Loading { bytes };
                return Ok(());
            }
            let Some(victim) = least_recently_used_idle(&slots.slots) else {
                return Err(self.no_room(i, bytes, count, fits_budget));
            };
            let name = &self.specs[victim].name;
            tracing::info!(model = %name, to_load = %self.specs[i].name, "local model unloaded to make room");
            slots.slots[victim] = Slot::Empty;
        }
    }

    fn no_room(&self, i: usize, bytes: u64, count: usize, fits_budget: bool) -> LocalError {
        let name = &self.specs[i].name;
        let mib = |b: u64| b.div_ceil(1 << 20);
        let why = match self.limits.max_bytes {
            Some(max) if bytes > max => format!(
                "it needs {} MiB, more than local.max_memory_mb ({}) allows",
                mib(bytes),
                mib(max)
            ),
            _ if !fits_budget => format!(
                "the loaded models are answering and leave less than its {} MiB of local.max_memory_mb; retry shortly",
                mib(bytes)
            ),
            _ => format!(
                "the {count} loaded models (local.max_loaded_models) are all answering; retry shortly"
            ),
        };
        LocalError::NoRoom(format!("cannot load local model `{name}`: {why}"))
    }

    /// The loaded engine of model `i`, marked as just used.
    fn touch(&self, i: usize) -> Option<Engine> {
        let mut slots = self.lock();
        slots.clock += 1;
        let now = slots.clock;
        match &mut slots.slots[i] {
            Slot::Ready { engine, used } => {
                *used = now;
                Some(engine.clone())
            }
            _ => None,
        }
    }

    fn index(&self, model: &str) -> Option<usize> {
        if model == "local" {
            return self.fallback;
        }
        self.specs.iter().position(|s| s.name.eq_ignore_ascii_case(model))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn least_recently_used_idle(slots: &[Slot]) -> Option<usize> {
    let idle = slots.iter().enumerate().filter_map(|(i, s)| match s {
        Slot::Ready { engine, used } if !engine.in_use() => Some((*used, i)),
        _ => None,
    });
    idle.min().map(|(_, i)| i)
}

/// Room taken for a model being loaded, given back unless the load completes.
struct Reservation<'a> {
    registry: &'a Registry,
    index: usize,
    done: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.registry.lock().slots[self.index] = Slot::Empty;
        }
    }
}
