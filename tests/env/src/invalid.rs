//! Pipelines the API server refuses, shared by the test against the real API server and the
//! test of `kube-zerocopy render`, which must refuse them too, with the same words.

/// Invalid pipelines, each with a piece of the message the API server gives (tests/operator/mistakes.rs)
/// and `kube-zerocopy render` too (tests/render_cli.rs).
pub fn invalid_pipelines(namespace: &str) -> Vec<(&'static str, String, &'static str)> {
    let named = |name: &str, spec: &str| {
        format!("apiVersion: kube-zerocopy.io/v1alpha1\nkind: InferencePipeline\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}")
    };
    let base = |spec: &str| named("bad", spec);
    let model = "  models: [{name: m, format: TorchScript, source: {uri: 'file:///m.pt'}}]\n";
    let task =
        "  input: {uri: 'file:///in'}\n  output: {uri: 'file:///out'}\n  task: {shards: 2}\n";
    vec![
        ("no models", base(&format!("  mode: Task\n  models: []\n{task}")), "should have at least 1 items"),
        (
            "duplicate model names",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///a.pt'}}}}, {{name: m, format: TorchScript, source: {{uri: 'file:///b.pt'}}}}]\n{task}")),
            "model names must be unique",
        ),
        (
            "short sha256",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt', sha256: abc}}}}]\n{task}")),
            "64 lowercase hex digits",
        ),
        (
            "unsupported scheme",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'ftp://host/m.pt'}}}}]\n{task}")),
            "must start with file:///, http://, https://, s3:// or az://",
        ),
        ("task settings in Actor mode", base(&format!("  mode: Actor\n{model}  actor: {{replicas: 1}}\n  task: {{shards: 2}}\n")), "spec.task applies only to mode Task"),
        ("actor settings in Task mode", base(&format!("  mode: Task\n{model}{task}  actor: {{replicas: 1}}\n")), "spec.actor applies only to mode Actor"),
        ("zero replicas", base(&format!("  mode: Actor\n{model}  actor: {{replicas: 0}}\n")), "actor.replicas must be at least 1"),
        ("an Actor with an input and no output", base(&format!("  mode: Actor\n{model}  actor: {{replicas: 1}}\n  input: {{uri: 'file:///in'}}\n")), "mode Actor takes spec.input and spec.output together"),
        ("batches in flight without a batch run", base(&format!("  mode: Actor\n{model}  actor: {{replicas: 1, inFlightPerReplica: 2}}\n")), "actor.inFlightPerReplica applies only to a batch run"),
        ("dynamic batching of zero rows", base(&format!("  mode: Actor\n{model}  actor: {{replicas: 1, batching: {{maxRows: 0}}}}\n")), "actor.batching.maxRows must be at least 1"),
        ("a batching delay of minutes", base(&format!("  mode: Actor\n{model}  actor: {{replicas: 1, batching: {{maxRows: 8, maxDelayMillis: 60000}}}}\n")), "actor.batching.maxDelayMillis must be 0 to 1000"),
        ("unknown mode", base(&format!("  mode: Batch\n{model}")), "Unsupported value: \"Batch\""),
        (
            "bad model name",
            base(&format!("  mode: Task\n  models: [{{name: Encoder_1, format: TorchScript, source: {{uri: 'file:///m.pt'}}}}]\n{task}")),
            "model name must be lowercase",
        ),
        (
            "Safetensors with no way to run it",
            base(&format!("  mode: Task\n  models: [{{name: m, format: Safetensors, source: {{uri: 'file:///m.safetensors'}}}}]\n{task}")),
            "a Safetensors model is named tensors with no code to run them: give python.entryPoint",
        ),
        (
            "Python code named for a TorchScript model",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, python: {{entryPoint: 'models:build'}}, source: {{uri: 'file:///m.pt'}}}}]\n{task}")),
            "python applies only to format Safetensors",
        ),
        (
            "both Python code and a built-in architecture",
            base(&format!("  mode: Task\n  models: [{{name: m, format: Safetensors, architecture: Mlp, python: {{entryPoint: 'models:build'}}, source: {{uri: 'file:///m.safetensors'}}}}]\n{task}")),
            "give python or architecture, not both",
        ),
        (
            "Python code with no image to hold it",
            base(&format!("  mode: Task\n  models: [{{name: m, format: Safetensors, python: {{entryPoint: 'models:build'}}, source: {{uri: 'file:///m.safetensors'}}}}]\n{task}")),
            "a model run by Python code needs template.image",
        ),
        (
            "a Python entry point that is a path",
            base(&format!("  mode: Task\n  models: [{{name: m, format: Safetensors, python: {{entryPoint: 'models/build.py'}}, source: {{uri: 'file:///m.safetensors'}}}}]\n{task}")),
            "python.entryPoint must be module:callable",
        ),
        (
            "architecture on TorchScript",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, architecture: Mlp, source: {{uri: 'file:///m.pt'}}}}]\n{task}")),
            "architecture applies only to format Safetensors",
        ),
        (
            "a name too long for the pipeline's objects",
            named(&"a".repeat(60), &format!("  mode: Task\n{model}{task}")),
            "metadata.name may have at most 54 characters",
        ),
        (
            "a name too long for its shards' host names",
            named(&"a".repeat(50), &format!("  mode: Task\n{model}  input: {{uri: 'file:///in'}}\n  output: {{uri: 'file:///out'}}\n  task: {{shards: 10000}}\n")),
            "host name <name>-zerocopy-<shard index> must have at most 63 characters",
        ),
        (
            "output into the input folder",
            base(&format!("  mode: Task\n{model}  input: {{uri: 'file:///data'}}\n  output: {{uri: 'file:///data/'}}\n  task: {{shards: 2}}\n")),
            "spec.output must be another folder than spec.input",
        ),
        (
            "a size that is not a quantity",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt', size: big}}}}]\n{task}")),
            "source.size must be a quantity such as 400Mi or 2Gi",
        ),
        (
            "credentials in the source's URI",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://user:pw@hub.example/m.pt'}}}}]\n{task}")),
            "source.uri must not carry credentials",
        ),
        (
            "a presigned URL's signature in the source's URI",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://b.s3.amazonaws.com/m.pt?X-Amz-Credential=AKIA&X-Amz-Signature=ab12'}}}}]\n{task}")),
            "source.uri must not carry a signature or token in its query",
        ),
        (
            "an Azure SAS in the source's URI",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://a.blob.core.windows.net/c/m.pt?sv=2024&sig=ab12'}}}}]\n{task}")),
            "source.uri must not carry a signature or token in its query",
        ),
        (
            "a driver's name too long for its Job",
            named(&"b".repeat(50), &format!("  mode: Actor\n{model}  actor: {{replicas: 1}}\n  input: {{uri: 'file:///in'}}\n  output: {{uri: 'file:///out'}}\n")),
            "its driver's Job is named <name>-zerocopy-driver",
        ),
        (
            "a bearer token for a file source",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'file:///m.pt', bearerTokenSecret: {{name: s, key: t}}}}}}]\n{task}")),
            "bearerTokenSecret applies only to http(s) sources",
        ),
        (
            "an s3 URI without a key",
            base(&format!("  mode: Task\n  models: [{{name: m, format: Safetensors, architecture: Mlp, source: {{uri: 's3://weights'}}}}]\n{task}")),
            "source.uri must be s3://<bucket>/<key>",
        ),
        (
            "s3 settings for an https source",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://hub.example/m.pt', s3: {{region: eu-west-1}}}}}}]\n{task}")),
            "source.s3 applies only to s3:// sources",
        ),
        (
            "an s3 endpoint with a path",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 's3://weights/m.pt', s3: {{endpoint: 'http://minio:9000/weights'}}}}}}]\n{task}")),
            "s3.endpoint must be http(s)://<host>[:<port>]",
        ),
        (
            "an s3 source with Node sharing and no credentials",
            base(&format!("  mode: Task\n  sharing: Node\n  models: [{{name: m, format: TorchScript, source: {{uri: 's3://weights/m.pt', sha256: '{zeros}', s3: {{region: eu-west-1}}}}}}]\n{task}", zeros = "0".repeat(64))),
            "sharing: Node reads an s3:// or az:// source only with the pipeline's own credentials",
        ),
        (
            "an az:// source without its account",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'az://models/m.pt'}}}}]\n{task}")),
            "source.azure (the storage account) is needed by az:// sources and applies only to them",
        ),
        (
            "an az:// source with Node sharing and no credentials",
            base(&format!("  mode: Task\n  sharing: Node\n  models: [{{name: m, format: TorchScript, source: {{uri: 'az://models/m.pt', sha256: '{zeros}', azure: {{account: models}}}}}}]\n{task}", zeros = "0".repeat(64))),
            "sharing: Node reads an s3:// or az:// source only with the pipeline's own credentials",
        ),
        (
            "an Azure account name with capitals",
            base(&format!("  mode: Task\n  models: [{{name: m, format: TorchScript, source: {{uri: 'az://models/m.pt', azure: {{account: MyModels}}}}}}]\n{task}")),
            "azure.account must be 3 to 24 lowercase letters and digits",
        ),
        (
            "an az:// output without its account",
            base(&format!("  mode: Task\n{model}  input: {{uri: 'file:///in'}}\n  output: {{uri: 'az://out/x/'}}\n")),
            "azure (the storage account) is needed by az:// input and output prefixes",
        ),
        (
            "s3 settings for a folder of data",
            base(&format!("  mode: Task\n{model}  input: {{uri: 'file:///in', s3: {{region: eu-west-1}}}}\n  output: {{uri: 'file:///out'}}\n")),
            "s3 applies only to s3:// input and output prefixes",
        ),
        (
            "data at an http URL",
            base(&format!("  mode: Task\n{model}  input: {{uri: 'https://data.example/in/'}}\n  output: {{uri: 'file:///out'}}\n")),
            "input and output must be file:/// folders mounted into the pod, s3://<bucket>/<prefix>/",
        ),
        (
            "an s3 output in a bucket with an invalid name",
            base(&format!("  mode: Task\n{model}  input: {{uri: 'file:///in'}}\n  output: {{uri: 's3://Out_Bucket/x/'}}\n")),
            "a bucket name of 3 to 63 lowercase letters",
        ),
        (
            "a CA ConfigMap with Node sharing",
            base(&format!("  mode: Task\n  sharing: Node\n  models: [{{name: m, format: TorchScript, source: {{uri: 'https://hub.example/m.pt', caConfigMap: {{name: ca, key: ca.crt}}}}}}]\n{task}")),
            "sharing: Node: the node's agent takes a model's credentials from one Secret",
        ),
    ]
}
