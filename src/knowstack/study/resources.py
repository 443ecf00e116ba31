"""What each step of a study needs: estimated GPU memory and number of GPUs, before anything runs.

The model's shape comes from its config (AutoConfig, offline: local dir or HF cache), from the
built-in preset, or, for a few well-known hub ids that are not on this machine, from a table of their
published architecture (FALLBACK_ARCHITECTURES; the dry-run says when it used it).

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
from dataclasses import dataclass
from typing import Any

from knowstack.config import LaunchSettings, StudyConfig
from knowstack.study.plan import Plan, Step

GiB = 2**30
DEFAULT_GPU_MEMORY = 80 * GiB  # an A100/H100 80 GB
USABLE = 0.9
FLOAT32 = 4


@dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder's shape: enough to count parameters and activations."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied_embeddings: bool = False
    source: str = "config"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_params(self) -> int:
        """One layer's gate, up and down projections: one FFT-MoE expert per layer."""
        return 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        per_layer = attention + self.mlp_params + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        """r x (in + out) per targeted linear layer."""
        h, kv, inter = self.hidden, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                  "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        return self.layers * sum(r * sum(shapes[name]) for name in targets if name in shapes)


# Published configs (config.json on the hub) of models a full-scale config names, for machines that
# cannot fetch them: used only when AutoConfig cannot load the model offline.
_LLAMA3_8B = Architecture(vocab=128256, hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8,
                          source="fallback table")
FALLBACK_ARCHITECTURES: dict[str, Architecture] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
}


def architecture_of(config: StudyConfig) -> tuple[Architecture | None, str]:
    """The base model's shape and a sentence saying where it came from."""
    base = config.base
    if base.builtin is not None:
        from knowstack.builtin.world import PRESETS

        preset = PRESETS[base.builtin]
        shape = preset.shape
        arch = Architecture(vocab=preset.vocab_size, hidden=shape.hidden, layers=shape.layers,
                            intermediate=shape.intermediate, heads=shape.heads, kv_heads=shape.kv_heads,
                            source="builtin preset")
        return arch, f"built-in preset '{base.builtin}'"
    try:
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(base.model, local_files_only=True, trust_remote_code=base.trust_remote_code)
        return _from_hf_config(hf), f"{base.model}: its config (loaded offline)"
    except Exception as err:  # not on disk, not in the HF cache, or no network: all the same here
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        if base.model in FALLBACK_ARCHITECTURES:
            return FALLBACK_ARCHITECTURES[base.model], (
                f"{base.model}: AutoConfig could not load it offline ({reason}); using knowstack's "
                "fallback table of its published architecture")
        return None, f"{base.model}: AutoConfig could not load it offline ({reason}) and it is not in the fallback table"


def _from_hf_config(hf: Any) -> Architecture:
    text = getattr(hf, "text_config", None) or hf  # multimodal configs nest the language model's
    heads = int(text.num_attention_heads)
    return Architecture(vocab=int(text.vocab_size), hidden=int(text.hidden_size), layers=int(text.num_hidden_layers),
                        intermediate=int(text.intermediate_size), heads=heads,
                        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                        tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)))


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
    norms' inputs and outputs, q, k, v and RoPE'd q, k, attention output (SDPA / flash: no score
    matrix), the MLP's gate, up, silu(gate) and product, per active expert."""
    h, kv, inter = arch.hidden, arch.kv_dim, arch.intermediate
    per_layer = 7 * h + 3 * kv + 4 * inter * experts_active
    if lora_dropout:  # PEFT applies dropout to each adapted layer's input separately
        per_layer += 6 * h + inter
    return arch.layers * per_layer + 3 * h


def _precision_bytes(launch: LaunchSettings) -> int:
    precision = launch.mixed_precision
    if precision is None and launch.accelerate_config is not None:
        from knowstack.train.launch import accelerate_config_path, read_accelerate_config

        try:
            precision = read_accelerate_config(accelerate_config_path(launch.accelerate_config)).get("mixed_precision")
        except Exception:
            precision = None
    return 2 if precision in ("bf16", "fp16") else FLOAT32


def train_estimate(arch: Architecture, config: StudyConfig, finetune: str, *, params: int | None = None,
                   trainable: int | None = None, experts_active: int = 1, what: str = "",
                   gpu_memory: int = DEFAULT_GPU_MEMORY) -> Estimate:
    """FFT: every parameter trained; LoRA: the frozen base plus the adapter's parameters trained.
    `params` / `trainable` override the counts (an MoE, its routers)."""
    training = config.training
    total = params if params is not None else arch.params
    if trainable is None:
        trainable = total if finetune == "fft" else arch.lora_params(training.lora.r, training.lora.target_modules)
    weights = FLOAT32 * (total + (trainable if finetune == "lora" else 0))
    tokens = training.micro_batch_size * training.max_length
    act_bytes = _precision_bytes(config.launch.for_finetune(finetune))
    lora_dropout = finetune == "lora" and training.lora.dropout > 0
    activations = tokens * activation_bytes_per_token(arch, experts_active, lora_dropout) * act_bytes
    activations += tokens * arch.vocab * (act_bytes + 2 * FLOAT32)  # logits, their float32 copy, softmax grad
    grads, optimizer = FLOAT32 * trainable, 2 * FLOAT32 * trainable
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
    h, kv = arch.hidden, arch.kv_dim
    projections = {"q_proj": h * h, "k_proj": h * kv, "v_proj": h * kv, "o_proj": h * h}
    return arch.mlp_params + sum(projections[name] for name in attention)


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


def estimate_step(step: Step, plan: Plan, arch: Architecture, gpu_memory: int = DEFAULT_GPU_MEMORY) -> Estimate:
    config = plan.config
    if step.kind == "train":
        finetune = step.params["finetune"]
        return train_estimate(arch, config, finetune, gpu_memory=gpu_memory,
                              what="train " + ("FFT" if finetune == "fft" else "LoRA"))
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
    elif step.kind in ("eval", "gate") and (estimate is None or estimate.gpus == 1):
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
