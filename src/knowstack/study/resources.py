"""What each step of a study needs: estimated GPU memory and number of GPUs, before anything runs.

The model's shape comes from its config alone, never its weights: a local dir's config.json (a dir holding just
that is enough), a hub id's config.json in the local Hugging Face cache (looked up offline, never downloaded), the
built-in preset, or, for a few well-known hub ids found in neither, the published config.json values of
FALLBACK_CONFIGS (the dry run says which). The config builds the model on the meta device (shapes, no memory), and
its parameters are counted there: exact for every family, whatever its quirks (docs/cluster.md, "Memory per
step", has the formula below and a worked example).

Training memory follows what train/loop.py does: float32 master weights (the model is loaded in
float32 whatever the checkpoint's dtype), float32 gradients of the trainable parameters, AdamW's two
float32 moments, and activations saved for backward at micro_batch_size x max_length tokens (an upper
bound: packing fills rows up to it), in bf16/fp16 under mixed precision and float32 otherwise; no
activation checkpointing. Evaluation loads float32 weights and holds a KV cache and full logits for
an evaluation batch. Merges stream tensors on the CPU: no GPU. The number of GPUs is the fewest over
which FSDP full shard / ZeRO-3 (weights, gradients and optimizer state divided, activations not)
fits in `gpu_memory` with 10% left for the CUDA context and fragmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from knowstack.config import LaunchSettings, StudyConfig, TrainingConfig
from knowstack.modeling.families import lora_targets
from knowstack.study.plan import Plan, Step
from knowstack.validate import error_line, missing_model_files

GiB = 2**30
DEFAULT_GPU_MEMORY = 80 * GiB  # an A100/H100 80 GB
USABLE = 0.9
FLOAT32 = 4


@dataclass(frozen=True)
class Architecture:
    """A decoder's shape, read off the model its config builds on the meta device: enough to count parameters
    (exactly: q/k/v biases, q/k norms, extra norms, fused projections and tied embeddings as the family has them)
    and activations."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    params: int  # every parameter of the model, a tied one once
    mlp_params: int  # one layer's MLP: one FFT-MoE expert per layer
    # the decoder layers' linear modules by (this family's) name: (in + out features summed over all layers,
    # parameters in one layer)
    linears: Mapping[str, tuple[int, int]]
    norms: tuple[int, ...]  # elements per token that each of one layer's norms normalises
    model_type: str = ""
    tied_embeddings: bool = False
    source: str = "config"
    # attention computed outside SDPA's kernels (Gemma-2's soft-capping): each layer keeps its capped scores and
    # their float32 softmax for backward, two (heads x length x length) tensors per sequence
    scores_kept: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def modules(self, llama_names: Iterable[str]) -> list[str]:
        """This family's modules that hold Llama's named linear layers (Phi-3: q_proj, k_proj -> qkv_proj), once."""
        return lora_targets(self.model_type, list(llama_names))

    def lora_params(self, r: int, targets: Iterable[str]) -> int:
        """r x (in + out) per targeted linear layer."""
        return r * sum(self.linears[name][0] for name in self.modules(targets) if name in self.linears)

    def projection_params(self, llama_names: Iterable[str]) -> int:
        """Parameters of the named linear layers in one decoder layer."""
        return sum(self.linears[name][1] for name in self.modules(llama_names) if name in self.linears)


# The published config.json values (huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json; every
# field that sets a parameter's shape) of models a full-scale config names, for machines that have neither the
# model nor its config: used only when no local dir and no Hugging Face cache holds its config.json.
_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}
FALLBACK_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
}


def architecture_of(config: StudyConfig) -> tuple[Architecture | None, str]:
    """The base model's shape and a sentence saying where it came from (and what was assumed)."""
    base = config.base
    if base.builtin is not None:
        from knowstack.builtin.pretrain import model_config
        from knowstack.builtin.world import PRESETS

        preset = PRESETS[base.builtin]
        arch = _from_hf_config(model_config(preset.shape, preset.vocab_size), source="builtin preset")
        return arch, f"built-in preset '{base.builtin}'"
    trust = base.trust_remote_code
    try:
        hf, where = _offline_config(base.model, trust)
    except Exception as err:  # noqa: BLE001 - a config transformers cannot read: no estimate, and the reason
        return None, f"{base.model}: its config does not load offline ({error_line(err)})"
    if hf is None:
        if base.model in FALLBACK_CONFIGS:
            from transformers import AutoConfig

            arch = _from_hf_config(AutoConfig.for_model(**FALLBACK_CONFIGS[base.model]), source="fallback table")
            return arch, (f"{base.model}: not on this machine ({where}); using knowstack's fallback table of its "
                          "published config.json")
        return None, f"{base.model}: not on this machine ({where}) and not in the fallback table"
    try:
        arch = _from_hf_config(hf, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - a model transformers cannot build from its config
        return None, f"{base.model}: {where}, but transformers cannot build the model from it ({error_line(err)})"
    return arch, f"{base.model}: {where}, parameters counted on the meta device{_config_only_note(base.model)}"


def _offline_config(model: str, trust_remote_code: bool) -> tuple[Any | None, str]:
    """The model's transformers config, read offline (None where this machine has none) and where it was found:
    a local dir's config.json, or a hub id's in the local Hugging Face cache (huggingface_hub's lookup of what
    is already downloaded: no request is made)."""
    from transformers import AutoConfig

    folder = Path(model).expanduser()
    if folder.is_dir():
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code), "its config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "config.json")
    if not isinstance(cached, str):
        return None, "no local dir of that name, and its config.json is not in the Hugging Face cache"
    hf = AutoConfig.from_pretrained(str(Path(cached).parent), trust_remote_code=trust_remote_code)
    return hf, f"its config.json in the Hugging Face cache ({cached})"


def _config_only_note(model: str) -> str:
    """What the dry run assumed for a local dir that lacks the weights or tokenizer (a config-only base)."""
    folder = Path(model).expanduser()
    missing = missing_model_files(folder) if folder.is_dir() else []
    if not missing:
        return ""
    return (f"; the dir has no {' and no '.join(missing)}, which a plan does not need: activations assume every "
            "micro-batch row holds max_length tokens (the upper bound that packing reaches; no tokenizer counts "
            "tokens here), and a run needs the weights and tokenizer in that dir")


def _from_hf_config(hf: Any, *, trust_remote_code: bool = False, source: str = "config") -> Architecture:
    """The shape of the model a transformers config builds, counted on the meta device (shapes only: no memory,
    no weights; ~1 s for an 8B model, most of it importing the family's modeling code)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=trust_remote_code)
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf  # multimodal configs nest the LM's
    hidden, heads, intermediate = int(text.hidden_size), int(text.num_attention_heads), int(text.intermediate_size)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    layers = _decoder_layers(model, int(text.num_hidden_layers))
    mlp = getattr(layers[0], "mlp", None)
    return Architecture(
        vocab=int(text.vocab_size), hidden=hidden, layers=len(layers), intermediate=intermediate, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, params=sum(p.numel() for p in model.parameters()),
        mlp_params=sum(p.numel() for p in mlp.parameters()) if mlp is not None else 3 * hidden * intermediate,
        linears=_linears(layers), norms=_norm_widths(layers[0], heads * head_dim, kv_heads * head_dim),
        model_type=str(getattr(text, "model_type", "")),
        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)), source=source,
        scores_kept=getattr(text, "attn_logit_softcapping", None) is not None)


def _decoder_layers(model: Any, count: int) -> Any:
    """The model's stack of decoder layers: its ModuleList of num_hidden_layers blocks."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and count:
            return module
    raise ValueError(f"no list of {count} decoder layers in {type(model).__name__}")


def _linears(layers: Any) -> dict[str, tuple[int, int]]:
    import torch

    found: dict[str, tuple[int, int]] = {}
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                leaf = name.rsplit(".", 1)[-1]
                width, params = found.get(leaf, (0, 0))
                found[leaf] = (width + module.in_features + module.out_features,
                               params + (sum(p.numel() for p in module.parameters()) if index == 0 else 0))
    return found


def _norm_widths(layer: Any, q_dim: int, kv_dim: int) -> tuple[int, ...]:
    """Elements per token each norm of a decoder layer normalises. A norm is a leaf module holding only 1-D
    parameters; a q/k norm (its name starts with q or k) acts on the whole projection, whatever its weight's
    size (Qwen3's and Gemma-3's are one head wide, applied per head; OLMo-2's are the projection's width)."""
    widths = []
    for name, module in layer.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or any(p.ndim != 1 for p in own) or next(module.children(), None) is not None:
            continue
        leaf = name.rsplit(".", 1)[-1]
        widths.append(q_dim if leaf.startswith("q") else kv_dim if leaf.startswith("k") else own[0].numel())
    return tuple(widths)


# --- memory ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Bytes on one device if unsharded; gpus: the fewest GPUs it fits on (0: runs on the CPU)."""

    what: str
    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    gpus: int
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def per_gpu(self, n: int) -> int:
        """Fully sharded over n GPUs (FSDP full shard / ZeRO-3): all but the activations divided."""
        return math.ceil((self.weights + self.grads + self.optimizer) / max(n, 1)) + self.activations


def gpus_needed(weights_grads_optimizer: int, activations: int, gpu_memory: int) -> int:
    usable = gpu_memory * USABLE
    if activations >= usable:
        return -1  # does not fit at any count: a smaller micro_batch_size or max_length is needed
    return max(1, math.ceil(weights_grads_optimizer / (usable - activations)))


def activation_bytes_per_token(arch: Architecture, experts_active: int = 1, lora_dropout: bool = False) -> int:
    """Elements saved for backward per token, summed over layers (x bytes per element by the caller):
    each norm's input and output, q, k, v and RoPE'd q, k, attention output (SDPA / flash: no score
    matrix), the MLP's gate, up, act(gate) and product, per active expert."""
    h, q, kv, inter = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    per_layer = 2 * sum(arch.norms) + 3 * q + 3 * kv + 4 * inter * experts_active
    if lora_dropout:  # PEFT applies dropout to each adapted layer's input separately: q, k, v, gate, up read h
        per_layer += 5 * h + q + inter
    return arch.layers * per_layer + 3 * h


def _precision_bytes(launch: LaunchSettings, training: TrainingConfig) -> int:
    """Bytes per activation element: 2 under a launch's bf16/fp16 autocast or with bf16 weights, else 4."""
    from knowstack.train.launch import launched_mixed_precision

    autocast = launched_mixed_precision(launch)
    return 2 if autocast or training.precision == "bf16" else FLOAT32


def _weight_bytes(training: TrainingConfig) -> int:
    """Bytes per trained or frozen weight (and per gradient and AdamW moment of a trained one): training.precision."""
    return 2 if training.precision == "bf16" else FLOAT32


def activation_terms(arch: Architecture, config: StudyConfig, finetune: str, experts_active: int = 1
                     ) -> tuple[int, int, int]:
    """(tokens of a micro-batch, bytes per activation element, elements saved per token) of a training step."""
    training = config.training
    lora_dropout = finetune == "lora" and training.lora.dropout > 0
    return (training.micro_batch_size * training.max_length,
            _precision_bytes(config.launch.for_finetune(finetune), training),
            activation_bytes_per_token(arch, experts_active, lora_dropout))


def train_estimate(arch: Architecture, config: StudyConfig, finetune: str, *, params: int | None = None,
                   trainable: int | None = None, experts_active: int = 1, what: str = "",
                   gpu_memory: int = DEFAULT_GPU_MEMORY) -> Estimate:
    """FFT: every parameter trained; LoRA: the frozen base plus the adapter's parameters trained.
    `params` / `trainable` override the counts (an MoE, its routers)."""
    training = config.training
    total = params if params is not None else arch.params
    if trainable is None:
        trainable = total if finetune == "fft" else arch.lora_params(training.lora.r, training.lora.target_modules)
    # bf16 precision: the model's weights in bfloat16; a LoRA adapter's own stay float32 (PEFT upcasts them)
    held = _weight_bytes(training) if finetune == "fft" else FLOAT32
    weights = _weight_bytes(training) * total + (FLOAT32 * trainable if finetune == "lora" else 0)
    tokens, act_bytes, per_token = activation_terms(arch, config, finetune, experts_active)
    activations = tokens * per_token * act_bytes
    activations += tokens * arch.vocab * (act_bytes + 2 * FLOAT32)  # logits, their float32 copy, softmax grad
    if arch.scores_kept:  # at most one sequence a row of max_length tokens: the sum of squared lengths is at most
        activations += arch.layers * arch.heads * tokens * training.max_length * 2 * FLOAT32
    grads, optimizer = held * trainable, 2 * held * trainable
    gpus = gpus_needed(weights + grads + optimizer, activations, gpu_memory)
    return Estimate(what or f"train {finetune}", total, weights, grads, optimizer, activations, gpus)


def eval_estimate(arch: Architecture, config: StudyConfig, *, params: int | None = None, experts_active: int = 1,
                  what: str = "eval", gpu_memory: int = DEFAULT_GPU_MEMORY) -> Estimate:
    """float32 weights, a KV cache for an evaluation batch, full logits of an lm-eval batch."""
    total = params if params is not None else arch.params
    length = config.training.max_length
    generation = config.evaluation.batch_size * length
    loglikelihood = config.old_knowledge.batch_size * length
    kv_cache = 2 * arch.layers * arch.kv_dim * generation * FLOAT32
    logits = loglikelihood * arch.vocab * FLOAT32
    working = max(generation, loglikelihood) * (2 * arch.hidden + 2 * arch.intermediate * experts_active) * FLOAT32
    activations = kv_cache + logits + working
    weights = FLOAT32 * total
    return Estimate(what, total, weights, 0, 0, activations, gpus_needed(weights, activations, gpu_memory))


def cpu_estimate(what: str, params: int, host_bytes: int) -> Estimate:
    """A step that runs on the CPU: its host memory, no GPU."""
    return Estimate(what, params, host_bytes, 0, 0, 0, 0, note="CPU")


# --- per step --------------------------------------------------------------------------------------
def _moe_shape(arch: Architecture, step: Step) -> tuple[int, int, int]:
    """(experts, mixed layers, router parameters) of the MoE a `moe` step builds: a router per mixed layer's
    MLP and one per attention projection mixed (o_proj's reads the attention output, hidden wide too)."""
    options = step.params.get("options", {})
    experts = len(step.params.get("models", [])) + (options.get("base_expert") == "routed")
    layers = options.get("layers")
    mixed = arch.layers if layers is None else len(layers)
    per_layer = 1 + len(options.get("attention") or ())
    routers = 0 if options.get("router") == "none" else mixed * per_layer * experts * arch.hidden
    return experts, mixed, routers


def _expert_params(arch: Architecture, attention: list[str]) -> int:
    """Parameters of one expert in one mixed layer: its MLP and the attention projections mixed."""
    return arch.mlp_params + arch.projection_params(attention)


def moe_params(arch: Architecture, step: Step, config: StudyConfig) -> tuple[int, int]:
    """(parameters, experts active per token) of the MoE a `moe` step builds."""
    options = step.params.get("options", {})
    experts, mixed, routers = _moe_shape(arch, step)
    if step.params.get("experts") == "lora":
        lora = config.training.lora
        return arch.params + experts * arch.lora_params(lora.r, lora.target_modules) + routers, 1
    top_k = experts if options.get("router") == "none" else min(int(options.get("top_k", 2)), experts)
    always_on = options.get("base_expert") == "always-on"
    expert = _expert_params(arch, list(options.get("attention") or ()))
    return arch.params + mixed * (experts - 1 + always_on) * expert + routers, top_k + always_on


_FINETUNE_NAMES = {"fft": "FFT", "lora": "LoRA"}


def _producer(plan: Plan, ref: str | None) -> Step | None:
    if not ref or not ref.startswith("@"):
        return None
    return plan.steps.get(ref[1:].split("/", 1)[0])


def with_regulariser(estimate: Estimate, step: Step, arch: Architecture, config: StudyConfig,
                     gpu_memory: int) -> Estimate:
    """A train step's estimate with what EWC or LwF holds beside the model (train/regularizers.py): EWC's Fisher in
    float32 (of every weight for FFT, of the adapted ones for LoRA) and for FFT its anchor, a float32 copy of the
    weights; LwF's FFT teacher, a copy in the training dtype (LoRA's teacher is the model itself)."""
    fft = step.params["finetune"] == "fft"
    adapted = arch.layers * arch.projection_params(config.training.lora.target_modules)
    extra = FLOAT32 * (2 * arch.params if fft else adapted) if "ewc" in step.params else 0
    extra += _weight_bytes(config.training) * arch.params if "lwf" in step.params and fft else 0
    if not extra:
        return estimate
    weights = estimate.weights + extra
    return replace(estimate, weights=weights, gpus=gpus_needed(weights + estimate.grads + estimate.optimizer,
                                                               estimate.activations, gpu_memory))


def estimate_step(step: Step, plan: Plan, arch: Architecture, gpu_memory: int = DEFAULT_GPU_MEMORY) -> Estimate:
    config = plan.config
    if step.kind == "train":
        finetune = step.params["finetune"]
        estimate = train_estimate(arch, config, finetune, gpu_memory=gpu_memory,
                                  what="train " + ("FFT" if finetune == "fft" else "LoRA"))
        return with_regulariser(estimate, step, arch, config, gpu_memory)
    if step.kind == "eval":
        model = step.params["model"]
        made_by = _producer(plan, model.get("adapter")) or _producer(plan, model.get("model"))
        if made_by is not None and made_by.kind == "moe":
            total, active = moe_params(arch, made_by, config)
            return eval_estimate(arch, config, params=total, experts_active=active, gpu_memory=gpu_memory,
                                 what=f"eval {_FINETUNE_NAMES.get(made_by.params.get('experts'), '')}-MoE")
        return eval_estimate(arch, config, params=arch.params + (arch.lora_params(config.training.lora.r,
                             config.training.lora.target_modules) if model.get("adapter") else 0),
                             gpu_memory=gpu_memory)
    if step.kind == "search":  # each trial: a merge (tensor by tensor), then the merged model scored as an eval
        return eval_estimate(arch, config, gpu_memory=gpu_memory, what="search (merge + eval per trial)")
    if step.kind == "moe":
        total, active = moe_params(arch, step, config)
        label = f"{_FINETUNE_NAMES.get(step.params.get('experts'), '')}-MoE"
        if step.params.get("options", {}).get("router_training"):
            routers = _moe_shape(arch, step)[2]
            return train_estimate(arch, config, "fft", params=total, trainable=routers, experts_active=active,
                                  what=f"build {label}, train routers", gpu_memory=gpu_memory)
        # written tensor by tensor; router init from prompts runs the base model once
        return cpu_estimate(f"build {label}", total, FLOAT32 * arch.params)
    if step.kind == "gate":  # the base with a frozen adapter, a gate vector per adapted module trained
        return train_estimate(arch, config, "lora", what="train gates")
    if step.kind == "world":  # the built-in base is pretrained on the CPU
        pretrain = train_estimate(arch, config, "fft", gpu_memory=gpu_memory)
        return cpu_estimate("build world", pretrain.params, pretrain.total)
    # merge, merge-adapter: tensor by tensor (merge) or on the CPU in the checkpoint's dtype
    return cpu_estimate(step.kind, arch.params, 2 * arch.params)


@dataclass(frozen=True)
class StepResources:
    """What a Ray task for one step asks for. memory: host RAM where the step's GPUs hold the model;
    cpu_memory: where it runs on the CPU (a cluster without GPUs, or a step that always does)."""

    cpus: float
    gpus: int
    memory: int = 0
    cpu_memory: int = 0

    def ray_options(self, cluster: dict[str, float], label: str) -> dict[str, Any]:
        """Ray task options; a cluster without GPUs runs everything on its CPUs (the built-in world).
        cluster: ray.cluster_resources() plus max_node_memory, the most memory one node offers."""
        from knowstack.errors import KnowstackError

        options: dict[str, Any] = {"num_cpus": self.cpus}
        have = int(cluster.get("GPU", 0))
        on_gpu = bool(self.gpus and have)
        if on_gpu:
            if self.gpus > have:
                raise KnowstackError(f"step {label} needs {self.gpus} GPUs; the Ray cluster has {have}")
            options["num_gpus"] = self.gpus
        memory = self.memory if on_gpu else self.cpu_memory
        # Ray's memory is a scheduling quantity: ask for it only where one node can grant it
        if 0 < memory < cluster.get("max_node_memory", 0):
            options["memory"] = memory
        return options


def step_resources(step: Step, config: StudyConfig, estimate: Estimate | None = None) -> StepResources:
    """Training runs on GPUs where the cluster has them, one per launched process (accelerate moves the
    model there); an evaluation on one GPU where its model fits one (modelio.on_gpu_if_it_fits), else on
    the CPU; merges and MoE building on the CPU, but an MoE's router training under a launch section on
    its processes' GPUs, as a training. Host memory: on GPUs, the float32 weights each process loads; on
    the CPU, the whole estimate."""
    processes, gpus = 1, 0
    launch = _launch_of(step, config)
    if launch is not None and (step.kind == "train" or launch.launched):
        processes = launch.num_processes if launch.launched else 1
        gpus = 0 if config.launch.cpu else processes
    elif step.kind in ("eval", "gate", "search") and (estimate is None or estimate.gpus == 1):
        gpus = 1
    if estimate is None:
        return StepResources(cpus=float(processes), gpus=gpus)
    return StepResources(cpus=float(processes), gpus=gpus, memory=processes * FLOAT32 * estimate.params,
                         cpu_memory=processes * estimate.total)


def _launch_of(step: Step, config: StudyConfig) -> LaunchSettings | None:
    """The launch settings of a step that trains: a train step, or an MoE step that trains its routers
    (steps.run_moe launches that as the training of its experts)."""
    if step.kind == "train":
        return config.launch.for_finetune(step.params["finetune"])
    if step.kind == "moe" and step.params["options"].get("router_training"):
        return config.launch.for_finetune(step.params["experts"])
    return None


def as_launched(step: Step, estimate: Estimate, config: StudyConfig) -> tuple[int, int] | None:
    """A train step under the config's launch section: (processes, bytes per GPU); None for other steps."""
    if step.kind != "train":
        return None
    launch = config.launch.for_finetune(step.params["finetune"])
    if not launch.launched:
        return 1, estimate.total
    from knowstack.train.launch import accelerate_config_path, shards_parameters

    sharded = shards_parameters(accelerate_config_path(launch.accelerate_config))
    return launch.num_processes, estimate.per_gpu(launch.num_processes) if sharded else estimate.total


def estimate_plan(plan: Plan, gpu_memory: int = DEFAULT_GPU_MEMORY) -> tuple[list[tuple[Step, Estimate]], str]:
    arch, source = architecture_of(plan.config)
    if arch is None:
        return [], source
    return [(step, estimate_step(step, plan, arch, gpu_memory)) for step in plan.ordered()], source


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def shares_cores(step: Step, config: StudyConfig, estimate: Estimate | None) -> bool:
    """Whether the local executor may run this step beside others, on its share of the cores: a step of known,
    small size (at most executor.shared_params parameters) in one process. The world is built alone, on every
    core, as it always was: its weights' fingerprint is recorded with the thread count that made them."""
    if step.kind == "world" or estimate is None or estimate.params > config.executor.shared_params:
        return False
    return step_resources(step, config, estimate).cpus == 1
