//! One loaded model of either format, and a pipeline of them run in order.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use kube_zerocopy_contract::models::{ModelFormat, ModelSource};
use kube_zerocopy_runtime::process::Permanent;
use kube_zerocopy_store::{Bindings, Store};
use tch::{CModule, Device, Tensor};

use crate::jit::SharedScriptModule;
use crate::nn::Mlp;
use crate::shared::SharedModel;

pub const DEFAULT_ARCHITECTURE: &str = "Mlp";

/// A model run by code the worker does not hold: the user's Python code, in the Python worker.
pub trait Forward: Send + Sync {
    /// One batch: the input tensor in, the output tensor out.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// The tensors the model runs with, by name (to show where they lie).
    fn tensors(&self) -> Result<Vec<(String, Tensor)>>;
}

/// Builds the models that name Python code (`python.entryPoint`) from their mapped weights.
/// The Python worker registers one before it runs its commands; the plain worker has none.
pub trait PythonBuilder: Send + Sync {
    /// Builds `source`'s model with its `entry_point` (`module:callable`).
    fn build(
        &self,
        source: &ModelSource,
        entry_point: &str,
        shared: &SharedModel,
        device: Device,
    ) -> Result<Box<dyn Forward>>;
}

static PYTHON: OnceLock<Box<dyn PythonBuilder>> = OnceLock::new();

/// Makes this process build Python models with `builder` (once, before any model is loaded).
pub fn register_python(builder: Box<dyn PythonBuilder>) {
    if PYTHON.set(builder).is_err() {
        panic!("a Python model builder is registered already");
    }
}

fn build_python(
    source: &ModelSource,
    entry_point: &str,
    shared: &SharedModel,
    device: Device,
) -> Result<Box<dyn Forward>> {
    match PYTHON.get() {
        Some(builder) => builder.build(source, entry_point, shared, device),
        None => bail!(
            "model {:?} is run by Python code ({entry_point}), and this worker has no Python: \
             build the pipeline's image FROM the Python runtime image",
            source.name
        ),
    }
}

pub enum Module {
    Mlp(Mlp),
    /// The user's Python code (the Python worker).
    Python(Box<dyn Forward>),
    Script(SharedScriptModule),
    /// The copying baseline for TorchScript (`CModule::load`).
    CModule(CModule),
}

pub struct LoadedModel {
    pub name: String,
    pub module: Module,
    /// The mapping behind a zero-copy model (None for the copying baselines).
    pub shared: Option<SharedModel>,
}

fn permanent(error: anyhow::Error) -> anyhow::Error {
    Permanent(format!("{error:#}")).into()
}

/// Permanent, unless the device failed it (a full GPU): that may pass on a retry.
fn permanent_unless_device(error: anyhow::Error) -> anyhow::Error {
    if is_device_failure(&format!("{error:#}")) {
        error
    } else {
        permanent(error)
    }
}

/// Whether an error is the device's (memory full, a CUDA failure), which a retry on another
/// moment or node may not meet, rather than the model's or its input's.
pub fn is_device_failure(message: &str) -> bool {
    const DEVICE: [&str; 5] = [
        "out of memory",
        "CUDA error",
        "CUBLAS_STATUS",
        "CUDNN_STATUS",
        "Xid",
    ];
    DEVICE.iter().any(|words| message.contains(words))
}

fn check_architecture(source: &ModelSource) -> Result<()> {
    match source.architecture.as_deref().unwrap_or(DEFAULT_ARCHITECTURE) {
        DEFAULT_ARCHITECTURE => Ok(()),
        other => bail!(
            "model {:?}: architecture {other:?} is not built in (built in: {DEFAULT_ARCHITECTURE}); \
             write a worker with the kube-zerocopy-worker library for other architectures",
            source.name
        ),
    }
}

impl LoadedModel {
    /// Maps the published model and binds it, without copying the weights.
    pub fn load_shared(
        store: &Store,
        bindings: &Bindings,
        source: &ModelSource,
        device: Device,
        prefault: bool,
    ) -> Result<Self> {
        let shared = SharedModel::open(store, bindings, &source.name, prefault)?;
        // cuda: one host-to-device copy, from pinned pages when the driver allows it.
        // A Python model is copied to the GPU from the package's own mapping: nothing to pin here.
        let python = source.python_entry_point.is_some();
        let _pinned = match device {
            Device::Cuda(_) if pin_for_cuda() && !python => match shared.pin_for_cuda() {
                Ok(guard) => Some(guard),
                Err(e) => {
                    tracing::warn!(model = %source.name, error = %e, "copying to the GPU from unpinned memory");
                    None
                }
            },
            _ => None,
        };
        // A published model that cannot be built (another architecture, an archive whose code
        // does not load) cannot be built on a retry either: permanent, so a Task fails at once
        // instead of mapping it again for every shard.
        let module = match (source.format, source.python_entry_point.as_deref()) {
            // The user's code, built again on a retry only if the device failed it (its
            // `.to(device)` met a full GPU); anything else fails the same way every time.
            (ModelFormat::Safetensors, Some(entry_point)) => Module::Python(
                build_python(source, entry_point, &shared, device)
                    .map_err(permanent_unless_device)?,
            ),
            (ModelFormat::Safetensors, None) => check_architecture(source)
                .and_then(|()| Mlp::bind(&shared))
                .map_err(permanent)
                .map(|mut mlp| {
                    mlp.to_device(device);
                    Module::Mlp(mlp)
                })?,
            (ModelFormat::TorchScript, _) => {
                let mut m = SharedScriptModule::load(&shared).map_err(permanent)?;
                m.to_device(device)?;
                Module::Script(m)
            }
        };
        Ok(LoadedModel {
            name: source.name.clone(),
            module,
            shared: Some(shared),
        })
    }

    /// The ordinary, copying way: `VarStore::load` into an initialised tch::nn model, or
    /// `CModule::load`. The baseline for tests and benchmarks.
    pub fn load_copying(path: &Path, source: &ModelSource, device: Device) -> Result<Self> {
        let module = match source.format {
            ModelFormat::Safetensors if source.python_entry_point.is_some() => {
                bail!(
                    "model {:?}: the copying loader runs built-in models only",
                    source.name
                )
            }
            ModelFormat::Safetensors => {
                check_architecture(source)?;
                let (sizes, kind) = mlp_header(path)?;
                let mut vs = tch::nn::VarStore::new(device);
                let mlp = Mlp::build_in(&vs.root(), &sizes);
                vs.set_kind(kind);
                vs.load(path)
                    .with_context(|| format!("VarStore::load {}", path.display()))?;
                Module::Mlp(mlp)
            }
            ModelFormat::TorchScript => {
                let mut m = CModule::load_on_device(path, device)
                    .with_context(|| format!("CModule::load {}", path.display()))?;
                m.set_eval();
                Module::CModule(m)
            }
        };
        Ok(LoadedModel {
            name: source.name.clone(),
            module,
            shared: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| match &self.module {
            Module::Mlp(m) => m.f_forward(&self.name, x),
            Module::Python(m) => m.forward(x),
            Module::Script(m) => m.forward(std::slice::from_ref(x)),
            Module::CModule(m) => Ok(m.forward_ts(&[x])?),
        })
        .with_context(|| format!("running model {:?}", self.name))
    }

    /// Parameters and buffers, with their names.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match &self.module {
            Module::Mlp(m) => m
                .parameters()
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("param{i}"), t.shallow_clone()))
                .collect(),
            Module::Script(m) => m
                .named_tensors()?
                .into_iter()
                .map(|n| (n.name, n.tensor))
                .collect(),
            Module::CModule(m) => m.named_parameters()?,
            Module::Python(m) => m.tensors()?,
        })
    }
}

/// Whether to pin the mapping before copying to the GPU (`KZC_PIN_HOST`, default true).
fn pin_for_cuda() -> bool {
    std::env::var(kube_zerocopy_contract::pod::PIN_HOST_ENV)
        .map(|v| v != "false" && v != "0")
        .unwrap_or(true)
}

/// The Mlp's layer sizes and dtype from a safetensors file's header (reads only the header).
pub fn mlp_header(path: &Path) -> Result<(Vec<i64>, tch::Kind)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)?;
    let n = crate::nn::mlp_layer_count(header.keys().cloned());
    let shape = |i: usize| -> Result<Vec<i64>> {
        let s = &header[&format!("layers.{i}.weight")]["shape"];
        serde_json::from_value(s.clone()).context("bad shape in safetensors header")
    };
    let mut sizes = vec![shape(0)?[1]];
    for i in 0..n {
        sizes.push(shape(i)?[0]);
    }
    let kind = match header["layers.0.weight"]["dtype"].as_str() {
        Some("F32") => tch::Kind::Float,
        Some("F16") => tch::Kind::Half,
        Some("BF16") => tch::Kind::BFloat16,
        Some("F64") => tch::Kind::Double,
        other => bail!("unsupported Mlp dtype {other:?}"),
    };
    Ok((sizes, kind))
}

/// Several models run in order, the output of one the input of the next.
pub struct Pipeline {
    pub models: Vec<LoadedModel>,
    pub device: Device,
}

impl Pipeline {
    pub fn load_shared(
        store: &Store,
        bindings: &Bindings,
        sources: &[ModelSource],
        device: Device,
        prefault: bool,
    ) -> Result<Self> {
        let models = sources
            .iter()
            .map(|s| LoadedModel::load_shared(store, bindings, s, device, prefault))
            .collect::<Result<_>>()?;
        Ok(Pipeline { models, device })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.to_device(self.device);
        for m in &self.models {
            x = m.forward(&x)?;
        }
        Ok(x)
    }
}
