"""The pydantic models every front end goes through: one per concept.

ModelSpec lives in memtui.engine.model.architectures (it is derived from a Hugging Face
config.json); this module holds the GPU, the training options, recipes and the
Budget an estimate or a trace returns.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Precision = Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"]
Optimizer = Literal["adamw", "adamw-8bit", "sgd", "sgd-momentum", "adafactor", "lion", "galore-adamw",
                    "paged-adamw-8bit", "paged-adamw"]
OptimizerImpl = Literal["foreach", "fused", "for-loop"]
# selective: every matmul and attention output kept; selective-op: torchtitan's op-level policy (every other matmul)
Checkpointing = Literal["none", "selective", "selective-op", "full"]
Attention = Literal["eager", "flash"]
Offload = Literal["none", "optimizer", "optimizer+params"]
Quant = Literal["none", "int8", "nf4"]
Loss = Literal["standard", "chunked", "fused-linear"]
LoraDtype = Literal["fp32", "compute"]
LossDtype = Literal["fp32", "compute"]
LogitsUpcast = Literal["loss", "model"]
BnbVersion = Literal["current", "legacy"]
# What FSDP2 gathers the parameters in: as stored (MixedPrecisionPolicy(), autocast casting them for compute), or in
# the compute dtype (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), no autocast: torchtitan's).
FsdpParamDtype = Literal["stored", "compute"]
Modeling = Literal["hf", "litgpt"]  # whose model code runs the step
# The training stacks whose defaults --stack applies (engine/model/stacks.py); none: memtui's own.
Stack = Literal["none", "hf", "trl", "torchtune", "litgpt", "lightning", "torchtitan", "axolotl"]
Float8 = Literal["off", "tensorwise"]
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b"]

PRECISIONS: tuple[str, ...] = Precision.__args__  # type: ignore[attr-defined]
OPTIMIZERS: tuple[str, ...] = Optimizer.__args__  # type: ignore[attr-defined]
OPTIMIZER_IMPLS: tuple[str, ...] = OptimizerImpl.__args__  # type: ignore[attr-defined]
CHECKPOINTING: tuple[str, ...] = Checkpointing.__args__  # type: ignore[attr-defined]
ATTENTIONS: tuple[str, ...] = Attention.__args__  # type: ignore[attr-defined]
OFFLOADS: tuple[str, ...] = Offload.__args__  # type: ignore[attr-defined]
QUANTS: tuple[str, ...] = Quant.__args__  # type: ignore[attr-defined]


class GpuSpec(BaseModel):
    """One GPU model: its memory as the driver reports it (NVML memory.total)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    name: str
    memory_bytes: int = Field(gt=0)
    bf16: bool
    fp8: bool
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    note: str = ""


class TrainingConfig(BaseModel):
    """Everything that decides one training step's memory, exactly as the CLI flags name it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "llama-3.1-8b"
    gpu: str = "h100-80gb"
    gpus: int = Field(1, ge=1, le=65536, description="total GPUs; data-parallel ranks = gpus / (tp * pp)")
    batch_size: int = Field(1, ge=1, le=65536, description="micro-batch per data-parallel rank")
    seq_len: int = Field(2048, ge=1, le=10_485_760)
    precision: Precision = "bf16-mixed"
    master_weights: bool = False
    optimizer: Optimizer = "adamw"
    optimizer_impl: OptimizerImpl = "foreach"
    galore_rank: int = Field(128, ge=1)
    checkpointing: Checkpointing = "none"
    attention: Attention = "flash"
    zero: int = Field(0, ge=0, le=3)
    offload: Offload = "none"
    tp: int = Field(1, ge=1, le=1024)
    pp: int = Field(1, ge=1, le=1024)
    lora_rank: int = Field(0, ge=0, description="0 trains every weight; R > 0 trains LoRA adapters only")
    lora_targets: str = "q_proj,v_proj"
    quant: Quant = "none"
    loss: Loss = "standard"
    loss_chunks: int = Field(8, ge=1, le=1024, description="chunks of the sequence for the chunked head and loss")
    loss_dtype: LossDtype = "fp32"
    logits_upcast: LogitsUpcast = "loss"
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimizer step")
    optimizer_in_backward: bool = False
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False,
                                description="peft's lora_dropout: dropout on each adapter's input")
    lora_dtype: LoraDtype = "fp32"
    kbit_prep: bool = False
    activation_offload: bool = False
    compile: bool = False
    eager_loss: bool = False
    shard_group: int = Field(0, ge=0, le=65536,
                             description="HSDP: ranks per FSDP shard group, replicated across the rest; 0: all ranks")
    bnb_version: BnbVersion = "current"
    # Whose defaults the options started from (engine/model/stacks.py); the estimate reads the options only.
    stack: Stack = "none"
    pp_schedule: PipelineSchedule = "1f1b"
    microbatches: int = Field(1, ge=1, le=65536, description="pipeline micro-batches the batch is split into")
    fsdp_param_dtype: FsdpParamDtype = "stored"
    float8: Float8 = "off"
    modeling: Modeling = "hf"

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def shard_ranks(self) -> int:
        """The ranks ZeRO spreads its shards over: the HSDP shard group, else every data-parallel rank."""
        return self.shard_group or self.dp

    @property
    def deepspeed_offload(self) -> bool:
        """Whether `--offload` here is DeepSpeed's ZeRO-Offload, which PyTorch has no policy for: optimizer-only,
        beside DDP (ZeRO-1), or without data-parallel shards (one GPU); else FSDP2's CPUOffloadPolicy."""
        return self.offload != "none" and (self.offload == "optimizer" or self.zero <= 1 or self.shard_ranks == 1)

    @property
    def microbatch_size(self) -> int:
        """Sequences per pipeline micro-batch: the batch split into --microbatches (whole, as validation checks)."""
        return self.batch_size // self.microbatches if self.pp > 1 else self.batch_size

    @property
    def virtual_stages(self) -> int:
        """Pipeline stages each rank runs: two under interleaved 1F1B (torchtitan's smallest interleaving)."""
        return 2 if self.pp > 1 and self.pp_schedule == "interleaved-1f1b" else 1

    @property
    def uses_lora(self) -> bool:
        return self.lora_rank > 0

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of activations and matmul operands."""
        return 4 if self.precision == "32-true" else 2

    @property
    def weight_bytes(self) -> int:
        """Bytes per element of the stored (unquantized) weights."""
        return 2 if self.precision in ("16-true", "bf16-true") else 4

    @property
    def fsdp_casts(self) -> bool:
        """FSDP2 casts the gathered parameters to bf16 and reduces gradients in fp32 (MixedPrecisionPolicy with
        param_dtype, torchtitan's): the layers run in bf16 with no autocast, the shards and states stay fp32.
        Modelled for a full fine-tune sharded by FSDP2 alone; elsewhere autocast casts (validation's note says so)."""
        return (self.fsdp_param_dtype == "compute" and self.precision == "bf16-mixed" and self.zero >= 2
                and self.shard_ranks > 1 and self.tp == 1 and self.pp == 1 and self.offload == "none"
                and self.quant == "none" and not self.uses_lora)

    @property
    def autocast(self) -> bool:
        return self.precision in ("16-mixed", "bf16-mixed") and not self.fsdp_casts

    @property
    def adapter_dtype(self) -> str:
        """The LoRA adapters' dtype ("fp32", "bf16" or "fp16"): fp32 is peft's default (autocast_adapter_dtype=True);
        compute keeps them in the dtype of the layers they adapt: the stored weights', or a quantized layer's
        compute dtype."""
        unquantized_fp32 = self.quant == "none" and self.autocast
        if self.lora_dtype == "fp32" or self.precision == "32-true" or unquantized_fp32:
            return "fp32"
        return "fp16" if self.precision.startswith("16") else "bf16"

    @property
    def adapter_bytes(self) -> int:
        """Bytes per element of LoRA adapters, their gradients and (without master weights) optimizer states."""
        return 4 if self.adapter_dtype == "fp32" else 2


class Recipe(BaseModel):
    """A named option set people reach for; applying it overrides only what it names."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]*$")
    name: str
    description: str
    options: dict[str, Any]


class ModelSummary(BaseModel):
    id: str
    params: int
    trainable_params: int


class GpuSummary(BaseModel):
    id: str
    memory_bytes: int


class ModelStates(BaseModel):
    """Steady-state bytes per GPU of what lives across steps."""

    weights: int
    gradients: int
    optimizer_states: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer_states


class Components(BaseModel):
    """Bytes per GPU by component, at the peak moment of the step."""

    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    temporary: int
    overhead: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer_states + self.activations + self.temporary
                + self.overhead)


COMPONENT_NAMES: tuple[str, ...] = tuple(Components.model_fields)
COMPONENT_LABELS: dict[str, str] = {
    "weights": "Weights",
    "gradients": "Gradients",
    "optimizer_states": "Optimizer states",
    "activations": "Activations",
    "temporary": "Temporaries",
    "overhead": "CUDA overhead",
}


class TimelinePoint(BaseModel):
    phase: str
    bytes: int


class StageBudget(BaseModel):
    """One pipeline rank's step (--pp): the stages it runs and its own peak."""

    rank: int
    stages: list[int] = Field(description="the pipeline stage indices this rank runs (two under interleaved 1F1B)")
    layers: int = Field(description="decoder layers over those stages")
    embedding: bool = Field(description="runs the first stage: the embedding")
    head: bool = Field(description="runs the last stage: the final norm, the head and the loss per micro-batch")
    tensor_peak_bytes: int
    peak_phase: str
    per_gpu: Components

    @property
    def role(self) -> str:
        """What the rank holds beside its layers, as the tables label it: "emb", "head", both or ""."""
        return "+".join(part for part, held in (("emb", self.embedding), ("head", self.head)) if held)


class Budget(BaseModel):
    """What one training step needs on each GPU; the schema of `memtui estimate --json`."""

    model: ModelSummary
    gpu: GpuSummary
    config: dict[str, Any]
    model_states: ModelStates
    per_gpu: Components
    tensor_peak_bytes: int = Field(description="what torch.cuda.max_memory_allocated reports after two steps")
    reserved_peak_bytes: int | None = Field(
        default=None,
        description="what torch.cuda.max_memory_reserved reports: the step's allocations replayed through a model "
                    "of the CUDA caching allocator; null where no allocation sequence was replayed")
    device_peak_bytes: int = Field(description="what NVML / nvidia-smi would show at the peak")
    fits: bool
    headroom_bytes: int
    bytes_per_param: float = Field(description="model states per GPU divided by the model's parameters")
    peak_phase: str
    timeline: list[TimelinePoint]
    notes: list[str] = []
    method: Literal["estimate", "trace", "generic (traced layers)"] = "estimate"
    paged_bytes: int = Field(
        default=0,
        description="bitsandbytes' paged optimizer states (CUDA unified memory, outside the caching allocator): "
                    "not in tensor_peak_bytes; in device_peak_bytes and optimizer_states while resident")
    paged_evicted_bytes: int = Field(
        default=0,
        description="the part of paged_bytes the driver pages out to host memory because the rest of the step "
                    "leaves no room for it on the card (not in device_peak_bytes)")

    offloaded_activation_bytes: int = Field(
        default=0,
        description="--activation-offload: saved activations in pinned host memory at the end of the forward "
                    "(host RAM, not GPU memory; in no other figure)")

    @property
    def device_required_bytes(self) -> int:
        """The device peak less the paged states resident in it: the driver pages those out rather than let the
        step run out of memory, so this is what decides whether it fits."""
        return self.device_peak_bytes - (self.paged_bytes - self.paged_evicted_bytes)
    fragmentation_bytes: int | None = Field(
        default=None,
        description="reserved peak minus allocated peak in the allocator replay: cached but unusable at the peak; "
                    "null where nothing was replayed")
    replayed_seq_lens: list[int] | None = Field(
        default=None, description="the sequence length of every step replayed through the allocator, the first "
                                  "(which makes the optimizer states) included; null where nothing was replayed")
    device_overhead: dict[str, int] | None = Field(
        default=None, description="what the device holds beyond the allocator's reserved memory, by source "
                                  "(cuda_context, nccl); null where nothing was replayed")
    stages: list[StageBudget] = Field(
        default_factory=list, description="--pp: every pipeline rank's peak (the budget is the largest); empty "
                                          "without pipeline parallelism")
    replayed_device_peak_bytes: int | None = Field(
        default=None, description="reserved_peak_bytes + device_overhead: the device peak the allocator replay "
                                  "implies (device_peak_bytes keeps the estimate's model until a CUDA run checks "
                                  "the replay); null where nothing was replayed")
