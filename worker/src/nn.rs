//! Binding shared weights to tch::nn modules built in Rust.
//!
//! Building a model with `tch::nn` initialises every variable first (Kaiming and friends): a
//! private copy and about a second for a 400 MiB model, all thrown away by `VarStore::load`.
//! tch's layer structs have public fields, so the modules here are built straight from the
//! shared tensors, with shapes checked: no variable is ever initialised.

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::Tensor;

use crate::shared::SharedModel;

/// `nn::Linear` over `<prefix>.weight` [out, in] and `<prefix>.bias` [out] if present.
pub fn linear(model: &SharedModel, prefix: &str) -> Result<nn::Linear> {
    let ws = model.tensor(&format!("{prefix}.weight"))?;
    if ws.dim() != 2 {
        bail!(
            "model {:?}: {prefix}.weight must be 2-D, it has shape {:?}",
            model.name,
            ws.size()
        );
    }
    let out = ws.size()[0];
    let bias = format!("{prefix}.bias");
    let bs = match model.manifest.tensor(&bias) {
        Some(_) => Some(model.tensor_with_shape(&bias, &[out])?),
        None => None,
    };
    Ok(nn::Linear { ws, bs })
}

/// A batch that does not fit a model, worded for the client who sent it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongInput(pub String);

/// The built-in `Mlp` architecture: `layers.0 .. layers.N-1`, each Linear, ReLU between them.
/// It is what `architecture: Mlp` names for safetensors models, and what the demo runs.
#[derive(Debug)]
pub struct Mlp {
    pub layers: Vec<nn::Linear>,
}

/// The tensor names of the Mlp's layers, in order, as the manifest lists them.
pub fn mlp_layer_count(names: impl Iterator<Item = String>) -> usize {
    names
        .filter_map(|n| {
            n.strip_prefix("layers.")?
                .strip_suffix(".weight")?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

impl Mlp {
    /// Binds the shared weights; no copy, no initialisation.
    pub fn bind(model: &SharedModel) -> Result<Self> {
        let n = mlp_layer_count(model.manifest.tensors.iter().map(|t| t.name.clone()));
        if n == 0 {
            bail!(
                "model {:?} has no layers.<i>.weight tensors: not an Mlp",
                model.name
            );
        }
        let layers = (0..n)
            .map(|i| linear(model, &format!("layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        for (i, pair) in layers.windows(2).enumerate() {
            let (out, next_in) = (pair[0].ws.size()[0], pair[1].ws.size()[1]);
            if out != next_in {
                bail!(
                    "model {:?}: layers.{i} gives {out} features, layers.{} takes {next_in}",
                    model.name,
                    i + 1
                );
            }
        }
        Ok(Mlp { layers })
    }

    /// The ordinary tch way, the baseline: build with `nn::linear` (initialised variables),
    /// then `VarStore::load`, which reads the file into those variables.
    pub fn build_in(vs: &nn::Path, sizes: &[i64]) -> Self {
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| nn::linear(vs / "layers" / i, w[0], w[1], Default::default()))
            .collect();
        Mlp { layers }
    }

    /// The forward pass for untrusted batches: the input's width is checked first, and
    /// libtorch's errors come back as errors (tch's `Module::forward` panics on them).
    pub fn f_forward(&self, name: &str, xs: &Tensor) -> Result<Tensor> {
        let width = self.in_features();
        if xs.size().last() != Some(&width) {
            return Err(WrongInput(format!(
                "model {name:?} takes rows of {width} values; the batch has shape {:?}",
                xs.size()
            ))
            .into());
        }
        let last = self.layers.len() - 1;
        let mut x = xs.f_to_kind(self.layers[0].ws.kind())?;
        for (i, l) in self.layers.iter().enumerate() {
            x = x.f_linear(&l.ws, l.bs.as_ref())?;
            if i != last {
                x = x.f_relu()?;
            }
        }
        Ok(x)
    }

    pub fn in_features(&self) -> i64 {
        self.layers[0].ws.size()[1]
    }

    pub fn sizes(&self) -> Vec<i64> {
        let mut sizes = vec![self.in_features()];
        sizes.extend(self.layers.iter().map(|l| l.ws.size()[0]));
        sizes
    }

    pub fn parameters(&self) -> Vec<&Tensor> {
        self.layers
            .iter()
            .flat_map(|l| std::iter::once(&l.ws).chain(l.bs.as_ref()))
            .collect()
    }

    pub fn to_device(&mut self, device: tch::Device) {
        for l in &mut self.layers {
            l.ws = l.ws.to_device(device);
            l.bs = l.bs.as_ref().map(|b| b.to_device(device));
        }
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let last = self.layers.len() - 1;
        let mut x = xs.to_kind(self.layers[0].ws.kind());
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x);
            if i != last {
                x = x.relu();
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_layers_from_names() {
        let names = [
            "layers.0.weight",
            "layers.0.bias",
            "layers.2.weight",
            "head.weight",
        ];
        assert_eq!(
            super::mlp_layer_count(names.iter().map(|s| s.to_string())),
            3
        );
        assert_eq!(super::mlp_layer_count(std::iter::empty()), 0);
    }
}
