"""How close `memtui estimate` is to `memtui trace` for data-parallel jobs: the tensor peak of one rank.

    uv run python benchmarks/accuracy_parallel.py [--only SUBSTRING] [--limit N] [--no-write] [--append]

(`--only=--tp --append` measures the rows whose flags contain `--tp` and puts them in the table beside the
rows measured before, in place of their own earlier figures; the header's list of commands drops a command once
every row it measured has been measured again.)

`memtui trace --gpus N --zero K [--shard-group G] [--tp T]` runs the real DDP / FSDP2 / HSDP program, and
DTensor tensor parallelism with sequence parallelism (MoE blocks too), for rank 0 of N on torch's fake process group
(memtui.engine.trace.parallel, memtui.engine.trace.tensor_parallel); this compares its traced tensor peak with the estimator's,
as benchmarks/accuracy.py does for one GPU (the estimator's modelled cuBLAS workspace taken off).
Writes docs/accuracy-parallel.md; prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import label, measure  # noqa: E402  (the same measurement as the single-GPU matrix)

GIB = 2**30


def matrix() -> list[dict]:
    rows: list[dict] = []
    for model in ("qwen2.5-0.5b", "llama-3.2-1b"):
        base = {"model": model, "precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024}
        for gpus in (2, 4, 8):
            for zero in (0, 1, 2, 3):
                rows.append({**base, "gpus": gpus, "zero": zero})
        for zero in (0, 2, 3):
            rows.append({**base, "gpus": 8, "zero": zero, "checkpointing": "full"})
        for zero in (0, 2, 3):
            rows.append({**base, "gpus": 4, "zero": zero, "lora_rank": 16})
        # HSDP: FSDP2 on a (replicate, shard) mesh, sharded within the group
        for zero, group in ((3, 2), (3, 4), (2, 4)):
            rows.append({**base, "gpus": 8, "zero": zero, "shard_group": group})
    # Tensor parallelism with sequence parallelism (DTensor, torchtitan's plan): Llama-layout and Gemma models
    for model, gpus, tp, extra in (("llama-3.1-8b", 2, 2, {}), ("llama-3.1-8b", 4, 4, {}), ("llama-3.1-8b", 8, 8, {}),
                                   ("llama-3.1-8b", 4, 2, {"zero": 3}),
                                   ("llama-3.1-8b", 8, 2, {"zero": 3, "checkpointing": "full"}),
                                   ("mistral-7b", 4, 4, {}),
                                   # Qwen2: q/k/v biases sharded with their projections
                                   ("qwen2.5-7b", 4, 4, {}), ("qwen2.5-7b", 4, 2, {"zero": 3}),
                                   # eager attention: the mask made for the whole sequence
                                   ("llama-3.1-8b", 2, 2, {"attention": "eager"}),
                                   # tied embeddings: one Shard(0) parameter for the embedding and the head
                                   ("llama-3.2-1b", 2, 2, {}), ("llama-3.2-3b", 4, 2, {"zero": 3}),
                                   # ... at short sequences, where the embedding's backward is the peak: the
                                   # tied weight's two gradients summed, the embedding's a view of the whole
                                   # vocabulary's
                                   ("llama-3.2-1b", 4, 2, {"zero": 3, "seq_len": 128}),
                                   ("llama-3.2-1b", 4, 2, {"zero": 3, "seq_len": 128,
                                                           "offload": "optimizer+params"}),
                                   ("qwen2.5-0.5b", 4, 2, {"zero": 3, "seq_len": 128}),
                                   # Gemma: sandwich norms, softcapped eager scores, sliding-window masks
                                   ("gemma-2-9b", 4, 4, {"attention": "eager"}), ("gemma-3-4b", 2, 2, {}),
                                   ("gemma-3-12b", 8, 2, {"zero": 3}),
                                   # at scale (traced from 5 and 6 layers, extended): tp 8 within a node, FSDP2
                                   # over 4 nodes
                                   ("llama-3.1-70b", 32, 8, {"zero": 3}),
                                   ("llama-3.1-405b", 32, 8, {"zero": 3, "seq_len": 4096}),
                                   # Phi-3: fused qkv_proj and gate_up_proj, their rows sharded per part
                                   ("phi-3-mini", 2, 2, {}), ("phi-3-mini", 4, 4, {}),
                                   ("phi-3-mini", 4, 2, {"zero": 3}),
                                   # OLMo 2: q/k norms over every head, on the sequence (OLMo-core's plan)
                                   ("olmo-2-7b", 2, 2, {}), ("olmo-2-7b", 4, 4, {}),
                                   ("olmo-2-7b", 4, 2, {"zero": 3}),
                                   # beside DDP and ZeRO-1 (PyTorch's _pre_dp_module_transform, DDP over the dp
                                   # group) and HSDP (torchtitan's (dp_replicate, dp_shard, tp) mesh)
                                   ("llama-3.1-8b", 4, 2, {"zero": 0}), ("llama-3.1-8b", 4, 2, {"zero": 1}),
                                   ("llama-3.1-8b", 8, 2, {"zero": 3, "shard_group": 2}),
                                   # MoE (torchtitan's plan without expert parallelism): the router replicated,
                                   # the experts sharded on their intermediate dimension
                                   ("mixtral-8x7b", 2, 2, {}), ("mixtral-8x7b", 4, 4, {}),
                                   ("mixtral-8x7b", 8, 2, {"zero": 3}), ("qwen3-30b-a3b", 4, 4, {}),
                                   ("qwen3-30b-a3b", 8, 2, {"zero": 3, "checkpointing": "full"}),
                                   # gpt-oss: biased experts (gate and up interleaved), sinks sharded with the heads
                                   ("gpt-oss-20b", 2, 2, {}), ("gpt-oss-20b", 8, 8, {}),
                                   ("gpt-oss-20b", 8, 2, {"zero": 3}),
                                   # DeepSeek-V3: latent attention (low-rank projections replicated), shared experts
                                   ("moonlight-16b-a3b", 4, 4, {}), ("deepseek-v3", 64, 8, {"zero": 3}),
                                   # GPT-2: Megatron-LM's plan on Conv1D (fused c_attn cut per part, wpe replicated)
                                   ("gpt2", 2, 2, {}), ("gpt2", 8, 4, {"zero": 3})):
        rows.append({"model": model, "precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024, "gpus": gpus,
                     "tp": tp, **extra})
    # peft's LoRA beside tensor parallelism, NeMo Automodel's LoRA-aware plan (the adapters sharded with their base
    # layers, lora_A's output all-gathered on Colwise layers, a Rowwise lora_B's gradient Partial): alone, with
    # LoRA dropout, and with FSDP2 over the dp ranks
    for model, gpus, tp, extra in (("llama-3.1-8b", 2, 2, {}), ("llama-3.1-8b", 4, 4, {"lora_targets": "all-linear"}),
                                   ("llama-3.1-8b", 2, 2, {"lora_targets": "all-linear", "lora_dropout": 0.1}),
                                   ("llama-3.1-8b", 8, 2, {"lora_targets": "all-linear", "zero": 3}),
                                   ("llama-3.1-8b", 8, 2, {"lora_targets": "all-linear", "zero": 2,
                                                           "checkpointing": "full"}),
                                   ("llama-3.2-1b", 2, 2, {"lora_targets": "all-linear", "checkpointing": "full",
                                                           "lora_dropout": 0.1}),
                                   ("qwen2.5-7b", 4, 4, {"lora_targets": "all-linear"}),
                                   ("gemma-3-4b", 2, 2, {"lora_targets": "all-linear"})):
        rows.append({"model": model, "precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024, "gpus": gpus,
                     "tp": tp, "lora_rank": 16, **extra})
    # ... and on the other families of the plan: Phi-3's and GPT-2's fused lora_B rows sharded per part, OLMo 2's
    # whole-width q/k norms left frozen, the MoE families' attention adapted (experts untouched), DeepSeek-V3's
    # replicated low-rank projections with whole adapters
    for model, gpus, tp in (("phi-3-mini", 2, 2), ("olmo-2-7b", 2, 2), ("gpt2", 2, 2), ("mixtral-8x7b", 2, 2),
                            ("qwen3-30b-a3b", 4, 4), ("gpt-oss-20b", 2, 2), ("moonlight-16b-a3b", 4, 4)):
        rows.append({"model": model, "lora_targets": "all-linear", "precision": "bf16-mixed", "batch_size": 1,
                     "seq_len": 1024, "gpus": gpus, "tp": tp, "lora_rank": 16})
    # with FSDP2 over the dp ranks, and checkpointing (peft's input leaf, GPT-2's whole-sequence summed embeddings)
    for model, gpus, extra in (("phi-3-mini", 4, {"zero": 3}), ("mixtral-8x7b", 8, {"zero": 3}),
                               ("gpt2", 2, {"checkpointing": "full"})):
        rows.append({"model": model, "lora_targets": "all-linear", "precision": "bf16-mixed", "batch_size": 1,
                     "seq_len": 1024, "gpus": gpus, "tp": 2, "lora_rank": 16, **extra})
    # FSDP2 casting to bf16 (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), no autocast: torchtitan's)
    for model in ("qwen2.5-0.5b", "llama-3.2-1b"):
        base = {"model": model, "precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024, "gpus": 8,
                "fsdp_param_dtype": "compute"}
        rows += [{**base, "zero": 2}, {**base, "zero": 3}, {**base, "zero": 3, "checkpointing": "full"}]
    # QLoRA: DDP and ZeRO-1 beside the frozen 4-bit weights, FSDP2 / HSDP as bitsandbytes shards them (the packed
    # weights sharded, their quantization statistics whole on every rank)
    qlora = {"precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024, "lora_rank": 16, "quant": "nf4"}
    for zero in (0, 1, 2, 3):
        rows.append({"model": "llama-3.2-1b", **qlora, "gpus": 4, "zero": zero})
    rows += [{"model": "llama-3.2-1b", **qlora, "gpus": 8, "zero": 3, "shard_group": 2},
             {"model": "qwen2.5-0.5b", **qlora, "gpus": 8, "zero": 3, "kbit_prep": True, "checkpointing": "full"},
             {"model": "llama-3.1-8b", **qlora, "gpus": 8, "zero": 3, "lora_targets": "all-linear"},
             {"model": "llama-3.1-70b", **qlora, "precision": "bf16-true", "seq_len": 2048, "gpus": 2, "zero": 3,
              "checkpointing": "full"}]
    # --zero 3 --offload optimizer+params over several GPUs: FSDP2's CPUOffloadPolicy (shards, gradients and the
    # optimizer step on the host)
    base = {"precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024, "zero": 3, "offload": "optimizer+params"}
    rows += [{"model": "llama-3.2-1b", **base, "gpus": 4},
             {"model": "qwen2.5-0.5b", **base, "gpus": 8, "checkpointing": "full"},
             {"model": "llama-3.2-1b", **base, "gpus": 4, "lora_rank": 16, "quant": "nf4"},
             {"model": "llama-3.1-70b", **base, "precision": "bf16-true", "seq_len": 8192, "gpus": 2,
              "lora_rank": 16, "quant": "nf4", "checkpointing": "full"}]
    # --offload optimizer with ZeRO-1 or 2, data parallelism alone or one GPU: DeepSpeed's ZeRO-Offload, bf16 weights
    # with fp32 masters on the host (memtui's stand-in of DeepSpeedZeroOptimizer, memtui.engine.trace.zero_offload)
    for model, gpus, zero, extra in (("llama-3.2-1b", 2, 2, {}), ("llama-3.2-1b", 1, 2, {}), ("llama-3.2-1b", 4, 1, {}),
                                     ("qwen2.5-0.5b", 2, 2, {}), ("llama-3.2-1b", 2, 2, {"lora_rank": 16}),
                                     ("llama-3.1-8b", 1, 2, {"seq_len": 2048, "checkpointing": "full"}),
                                     ("llama-3.1-8b", 4, 1, {"seq_len": 2048, "checkpointing": "full"})):
        rows.append({"model": model, "precision": "bf16-true", "batch_size": 1, "seq_len": 1024, **extra,
                     "gpus": gpus, "zero": zero, "offload": "optimizer", "master_weights": True})
    # with gradient accumulation (ZeRO-1: the bucket and summed gradients kept to the boundary; ZeRO-2: 8B's embedding
    # and head, larger than the bucket, kept whole through the earlier micro-batches), fp16's loss scaler, Lion
    for model, gpus, zero, extra in (("llama-3.2-1b", 2, 2, {"grad_accum": 4}), ("llama-3.2-1b", 4, 1, {"grad_accum": 2}),
                                     ("llama-3.1-8b", 1, 2, {"seq_len": 2048, "checkpointing": "full", "grad_accum": 2}),
                                     ("llama-3.2-1b", 2, 2, {"precision": "16-true"}),
                                     ("llama-3.2-1b", 2, 2, {"optimizer": "lion"})):
        rows.append({"model": model, "precision": "bf16-true", "batch_size": 1, "seq_len": 1024, "gpus": gpus,
                     "zero": zero, "offload": "optimizer", "master_weights": True, **extra})
    # and beside tensor and pipeline parallelism: CPUOffloadPolicy on the (dp, tp) mesh and on every pipeline stage
    # (torchtitan's enable_cpu_offload on each model part)
    for model, gpus, extra in (("llama-3.1-8b", 4, {"tp": 2}),
                               ("llama-3.1-8b", 8, {"tp": 2, "checkpointing": "full"}),
                               ("llama-3.1-8b", 8, {"tp": 2, "lora_rank": 16, "lora_targets": "all-linear"}),
                               ("llama-3.2-1b", 4, {"pp": 2, "pp_schedule": "1f1b", "microbatches": 4}),
                               ("llama-3.2-1b", 8, {"pp": 2, "pp_schedule": "1f1b", "microbatches": 4, "tp": 2})):
        rows.append({"model": model, "precision": "bf16-mixed", "batch_size": extra.get("microbatches", 1),
                     "seq_len": 1024, "gpus": gpus, **extra, "offload": "optimizer+params", "zero": 3})
    # ... with gradient accumulation (each reduced shard added into the host gradient) or fp16 loss scaling (the
    # GradScaler unscaling the host gradients), alone, beside TP and on pipeline stages
    for model, gpus, extra, option in (
            ("llama-3.2-1b", 4, {}, {"grad_accum": 4}), ("qwen2.5-0.5b", 8, {}, {"precision": "16-mixed"}),
            ("llama-3.2-1b", 4, {"tp": 2}, {"grad_accum": 2}), ("llama-3.1-8b", 4, {"tp": 2}, {"precision": "16-mixed"}),
            ("llama-3.2-1b", 4, {"pp": 2, "pp_schedule": "1f1b", "microbatches": 4},
             {"grad_accum": 2, "precision": "16-mixed"})):
        rows.append({"model": model, "batch_size": extra.get("microbatches", 1), "seq_len": 1024, "gpus": gpus,
                     **extra, "offload": "optimizer+params", "zero": 3, "precision": "bf16-mixed", **option})
    for gpus in (8, 128):  # torchtitan's Llama 3 8B runs of docs/measured.md
        rows.append({"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 8192,
                     "gpus": gpus, "zero": 3, "checkpointing": "selective-op", "fsdp_param_dtype": "compute"})
    # torchao's float8 linears (tensorwise) under FSDP2 casting to bf16, gathered in bf16: torchtitan's float8 runs
    rows.append({"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 1024, "gpus": 8,
                 "fsdp_param_dtype": "compute", "zero": 3, "float8": "tensorwise"})
    rows.append({"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 8192, "gpus": 8,
                 "zero": 3, "checkpointing": "selective-op", "fsdp_param_dtype": "compute", "float8": "tensorwise"})
    for gpus in (8, 128):  # ... with training.compile: selective-op compiled into each block, then fully_shard
        rows.append({"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 8192,
                     "gpus": gpus, "zero": 3, "checkpointing": "selective-op", "compile": True, "eager_loss": True,
                     "fsdp_param_dtype": "compute"})
    # Pipeline parallelism (torch.distributed.pipelining, every rank traced): one sequence per micro-batch
    for pp, schedules in ((2, ("gpipe", "1f1b", "interleaved-1f1b")), (4, ("gpipe", "1f1b", "interleaved-1f1b")),
                          (8, ("1f1b", "interleaved-1f1b")), (16, ("gpipe", "1f1b"))):
        for schedule in schedules:
            rows.append({"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": pp, "seq_len": 1024,
                         "gpus": pp, "pp": pp, "pp_schedule": schedule, "microbatches": pp})
    # Pipeline parallelism combined (torchtitan's (pp, dp_shard, tp) mesh, every pipeline rank traced): FSDP2 over
    # the data-parallel ranks, DTensor's plan on each stage, or both
    for model, gpus, pp, schedule, extra in (
            ("llama-3.2-1b", 4, 2, "1f1b", {"zero": 3}), ("qwen2.5-0.5b", 4, 2, "gpipe", {"zero": 2}),
            ("llama-3.2-3b", 8, 4, "1f1b", {"zero": 3}), ("llama-3.2-1b", 8, 2, "interleaved-1f1b", {"zero": 3}),
            ("llama-3.2-1b", 4, 2, "1f1b", {"tp": 2}), ("qwen2.5-0.5b", 4, 2, "gpipe", {"tp": 2}),
            ("llama-3.2-3b", 8, 4, "interleaved-1f1b", {"tp": 2}),
            ("llama-3.2-1b", 8, 2, "1f1b", {"tp": 2, "zero": 3}),
            ("qwen2.5-0.5b", 8, 2, "interleaved-1f1b", {"tp": 2, "zero": 2}),
            # DDP on each stage (outputs kept until their backward), ZeRO-1 per stage, HSDP over 2-rank shard groups
            ("llama-3.2-1b", 4, 2, "1f1b", {"zero": 0}), ("qwen2.5-0.5b", 4, 2, "gpipe", {"zero": 0}),
            ("llama-3.2-1b", 8, 2, "interleaved-1f1b", {"zero": 0}), ("llama-3.2-1b", 4, 2, "1f1b", {"zero": 1}),
            ("llama-3.2-1b", 8, 2, "1f1b", {"zero": 3, "shard_group": 2}),
            ("qwen2.5-0.5b", 8, 2, "gpipe", {"zero": 2, "shard_group": 2}),
            # and DDP or HSDP beside the tensor parallelism (the tied embedding and head on two stages)
            ("llama-3.2-1b", 8, 2, "1f1b", {"tp": 2, "zero": 0}),
            ("llama-3.2-1b", 16, 2, "1f1b", {"tp": 2, "zero": 3, "shard_group": 2}),
            # peft's LoRA on each stage (alone, with DDP per stage)
            ("llama-3.2-1b", 2, 2, "1f1b", {"lora_rank": 16}), ("llama-3.2-3b", 8, 4, "gpipe", {"lora_rank": 16, "zero": 0}),
            # QLoRA: the stages send 16-bit hidden states (the base parameters' dtype)
            ("llama-3.2-1b", 2, 2, "1f1b", {"lora_rank": 16, "quant": "nf4"}),
            # and with DDP on each stage (the frozen 4-bit weights outside the buckets)
            ("llama-3.2-1b", 4, 2, "1f1b", {"lora_rank": 16, "quant": "nf4", "zero": 0}),
            # LoRA and QLoRA (bitsandbytes' FSDP: the packed weights sharded) with FSDP2 or HSDP on each stage: the
            # last stage gathers its frozen root group (the head) again after the loss's backward
            ("llama-3.2-1b", 4, 2, "1f1b", {"lora_rank": 16, "zero": 3}),
            ("qwen2.5-0.5b", 8, 2, "gpipe", {"lora_rank": 16, "zero": 2, "shard_group": 2}),
            ("llama-3.2-1b", 4, 2, "1f1b", {"lora_rank": 16, "quant": "nf4", "zero": 3}),
            # LoRA (on the attention projections) beside tensor parallelism on each stage (NeMo Automodel's
            # LoRA-aware plan), alone and with FSDP2
            ("llama-3.2-1b", 4, 2, "1f1b", {"tp": 2, "lora_rank": 16}),
            ("llama-3.2-1b", 8, 2, "1f1b", {"tp": 2, "lora_rank": 16, "zero": 3}),
            # and on the MLP projections too: RowwiseParallelLora's down_proj holds peft's cast input beside its
            # whole (Partial) lora_B output, and its lora_B gradient stays Partial (every column) on each stage
            ("llama-3.2-1b", 4, 2, "1f1b", {"tp": 2, "lora_rank": 16, "lora_targets": "all-linear"}),
            ("llama-3.2-1b", 8, 2, "1f1b", {"tp": 2, "lora_rank": 16, "lora_targets": "all-linear", "zero": 3}),
            # ... on the other families of the plan (Phi-3's and GPT-2's fused lora_B rows per part, OLMo 2's whole-width
            # q/k norms frozen, the MoE families' experts not adapted, DeepSeek-V3's replicated modules), alone and
            # with FSDP2 per stage
            *(((model, 4, 2, "1f1b", {"lora_targets": "all-linear", "tp": 2, "lora_rank": 16}))
              for model in ("phi-3-mini", "olmo-2-7b", "gpt2", "mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b",
                            "moonlight-16b-a3b")),
            *(((model, 8, 2, "1f1b", {"lora_targets": "all-linear", "tp": 2, "lora_rank": 16, "zero": 3}))
              for model in ("phi-3-mini", "moonlight-16b-a3b")),
            # (FSDP2's groups under LoRA each at its own layer's size: Moonlight's dense layer beside its MoE ones)
            ("moonlight-16b-a3b", 4, 2, "1f1b", {"lora_targets": "all-linear", "lora_rank": 16, "zero": 3}),
            # Phi-3, OLMo 2 (its received input's autocast cast shared by q/k/v) and GPT-2 (embeddings on the first
            # stage as Megatron-LM's pre_process) cut into stages
            ("phi-3-mini", 2, 2, "1f1b", {}), ("olmo-2-7b", 2, 2, "gpipe", {}), ("gpt2", 2, 2, "1f1b", {}),
            # the last stage's chunked (torchtune) or fused linear (Liger) loss (alone, with FSDP2), gradient accumulation (a
            # schedule.step() per accumulation step, alone, with DDP and with FSDP2 per stage), fp16's GradScaler
            ("llama-3.2-1b", 2, 2, "1f1b", {"loss": "chunked"}), ("llama-3.2-1b", 2, 2, "gpipe", {"loss": "fused-linear"}),
            ("llama-3.2-1b", 4, 2, "1f1b", {"loss": "chunked", "zero": 3}),
            ("llama-3.2-1b", 2, 2, "1f1b", {"grad_accum": 2}), ("qwen2.5-0.5b", 4, 2, "gpipe", {"grad_accum": 2, "zero": 0}),
            ("llama-3.2-1b", 4, 2, "1f1b", {"grad_accum": 2, "zero": 3}),
            ("llama-3.2-1b", 2, 2, "interleaved-1f1b", {"precision": "16-mixed"}),
            # the MoE families cut as torchtitan cuts them (Moonlight: DeepSeek-V3's layout, its dense layer on the
            # first stage), alone, with FSDP2, DDP and the MoE tensor-parallel plan per stage
            ("mixtral-8x7b", 2, 2, "1f1b", {}), ("mixtral-8x7b", 4, 2, "1f1b", {"zero": 3}),
            ("mixtral-8x7b", 4, 2, "1f1b", {"zero": 0}), ("mixtral-8x7b", 4, 2, "1f1b", {"tp": 2}),
            ("qwen3-30b-a3b", 2, 2, "gpipe", {}), ("gpt-oss-20b", 2, 2, "1f1b", {}),
            ("moonlight-16b-a3b", 2, 2, "1f1b", {}), ("moonlight-16b-a3b", 4, 2, "1f1b", {"tp": 2}),
            # FSDP2 on a stage holding a dense layer and MoE ones: each layer's group gathered at its own size
            ("moonlight-16b-a3b", 4, 2, "1f1b", {"zero": 3}), ("moonlight-16b-a3b", 8, 2, "1f1b", {"tp": 2, "zero": 3}),
            # Gemma-2 and Gemma 3 cut into stages, each with its own layers' kinds (sliding-window or full attention)
            ("gemma-3-1b", 2, 2, "gpipe", {}), ("gemma-2-9b", 2, 2, "1f1b", {}), ("gemma-3-12b", 4, 2, "1f1b", {"tp": 2})):
        rows.append({"model": model, "precision": "bf16-mixed", "batch_size": 2 * pp, "seq_len": 1024, "gpus": gpus,
                     "pp": pp, "pp_schedule": schedule, "microbatches": 2 * pp, **extra})
    # FSDP2 (ZeRO-3) holds two layers gathered in the layers' backward, one before it (the root's pre-backward
    # prefetched the last): frozen MoE experts under LoRA, the layers' backward beside the head's, at short sequences
    rows += [{"model": "mixtral-8x7b", "lora_targets": "all-linear", "precision": "bf16-mixed", "batch_size": 1,
              "seq_len": 512, "gpus": 8, "lora_rank": 16, "zero": 3},
             {"model": "gemma-3-27b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 512, "gpus": 8, "zero": 3,
              "shard_group": 4},
             {"model": "mistral-7b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 1024, "gpus": 8, "tp": 4,
              "zero": 3, "attention": "eager"}]
    return rows


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


FINDINGS = "## Findings"  # the hand-written section below the table, kept when the table is re-measured


_ROW = re.compile(r"^\| `(?P<config>[^`]+)` \| (?P<traced>[\d.]+) \| (?P<estimated>[\d.]+) \| (?P<error>[-+\d.]+)% "
                  r"\| (?P<fb_error>[-+\d.]+)% \| (?P<traced_phase>\w+) / (?P<estimated_phase>\w+) \| (?P<seconds>\d+) \|$")


def table_rows(text: str) -> list[dict]:
    """The rows of a table write_markdown wrote, as results (GiB and percentages as printed there)."""
    rows = []
    for line in text.splitlines():
        match = _ROW.match(line)
        if match:
            rows.append({"config": match["config"], "traced": float(match["traced"]) * GIB,
                         "estimated": float(match["estimated"]) * GIB, "error": float(match["error"]) / 100,
                         "fb_error": float(match["fb_error"]) / 100, "traced_phase": match["traced_phase"],
                         "estimated_phase": match["estimated_phase"], "seconds": float(match["seconds"])})
    return rows


def _previous_commands(text: str) -> list[str]:
    match = re.search(r"with (`[^\n]*`)\.\n", text)
    return re.findall(r"`([^`]+)`", match[1]) if match else []


def _selected(args: argparse.Namespace) -> list[dict]:
    """The matrix rows a run measures."""
    rows = [row for row in matrix() if not args.only or args.only in label(row)]
    return rows[: args.limit] if args.limit else rows


def _still_shown(command: str, measured: set[str]) -> bool:
    """Whether a recorded command measured a row the new run does not replace."""
    args, _unknown = _parser().parse_known_args(shlex.split(command)[4:])  # after `uv run python <script>`
    return not {label(row) for row in _selected(args)} <= measured


def write_markdown(results: list[dict], path: Path, command: str, *, append: bool = False) -> None:
    previous = path.read_text() if path.exists() else ""
    findings = previous[previous.index(FINDINGS):] if FINDINGS in previous else ""
    commands = [command]
    if append:  # the rows already measured stay, those measured again are replaced in place, new ones added
        fresh = {r["config"]: r for r in results}
        kept = [fresh.pop(r["config"], r) for r in table_rows(previous)]
        measured = {r["config"] for r in results}
        results = kept + list(fresh.values())
        # the commands whose rows are all measured again are no longer behind any figure
        commands = [line for line in _previous_commands(previous) if _still_shown(line, measured)] + commands
    commands = " then ".join(f"`{line}`" for line in commands)
    errors = [abs(r["error"]) for r in results]
    lines = [
        "# Estimator accuracy for parallel jobs: `memtui estimate` vs `memtui trace --gpus N --zero K "
        "[--shard-group G] [--tp T] [--pp P]`",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} with {commands}.",
        "Traced = tensor peak of rank 0 running the real DDP (ZeRO-0), DDP + ZeroRedundancyOptimizer (ZeRO-1), FSDP2 "
        "(ZeRO-2/3), HSDP (`--shard-group`: FSDP2 on a (replicate, shard) mesh) or DTensor tensor-parallel (`--tp`: "
        "torchtitan's Llama plan, with Qwen3's q/k norms as its Qwen3 plan, Phi-3's fused projections sharded per "
        "part, OLMo 2's whole-width q/k norms as OLMo-core's plan, GPT-2 by Megatron-LM's GPT plan on its Conv1D "
        "layers and the MoE families' experts (and DeepSeek-V3's latent attention) as torchtitan's MoE "
        "plan without expert parallelism, sequence and loss parallel; peft's LoRA by NeMo Automodel's LoRA-aware "
        "Colwise, Rowwise and SequenceParallel styles; with FSDP2 over dp "
        "on a (dp, tp) mesh, HSDP on a (dp_replicate, dp_shard, tp) one, or DDP / ZeRO-1 over the dp group on the "
        "parameters PyTorch's `_pre_dp_module_transform` makes local) program at "
        "the real world size on torch's fake process group, two training steps on fake tensors (`--pp`: every "
        "pipeline rank of torch.distributed.pipelining's schedule traced, the largest rank's peak); estimated = `memtui estimate`'s "
        "tensor peak less its modelled cuBLAS workspace; forward/backward: the same for the highest moment before "
        "the optimizer step. Every row: bf16-mixed, AdamW (foreach), batch 1 (`--pp`: one sequence per "
        "micro-batch), sequence 1024, flash attention.",
        "",
        f"{len(results)} configurations; median |error| {100 * statistics.median(errors):.2f}%, "
        f"max |error| {100 * max(errors):.2f}%.",
        "",
        "| configuration | traced GiB | estimated GiB | error | forward/backward error | peak (trace / estimate) "
        "| trace s |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r['config']}` | {_gib(r['traced'])} | {_gib(r['estimated'])} | {100 * r['error']:+.2f}% "
            f"| {100 * r['fb_error']:+.2f}% | {r['traced_phase']} / {r['estimated_phase']} | {r['seconds']:.0f} |"
        )
    if findings:
        lines += ["", findings.strip()]
    lines.append("")
    path.write_text("\n".join(lines))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="rows whose flags contain this text")
    parser.add_argument("--limit", type=int, help="the first N rows")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/accuracy-parallel.md alone")
    parser.add_argument("--append", action="store_true",
                        help="keep the table's other rows and add (or replace) the rows measured now")
    return parser


def main() -> int:
    args = _parser().parse_args()
    results = []
    for row in _selected(args):
        result = measure(row)
        # The table compares traces of the parallel program: a row whose layout the trace could only model (the
        # estimator's sharding applied to one GPU's trace) would compare the estimator with itself.
        untraced = [line for line in result["modelled"] if "not traced" in line or "single-GPU trace" in line]
        if untraced:
            raise SystemExit(f"{result['config']}: the trace did not run this layout ({'; '.join(untraced)})")
        results.append(result)
        print(f"{result['config']:<75} traced {_gib(result['traced'])} estimated {_gib(result['estimated'])} GiB "
              f"{100 * result['error']:+.2f}% ({result['traced_phase']}/{result['estimated_phase']}, "
              f"{result['seconds']:.0f} s)", flush=True)
    errors = [abs(r["error"]) for r in results]
    print(f"median |error| {100 * statistics.median(errors):.2f}%, max {100 * max(errors):.2f}%")
    if not args.no_write:
        command = shlex.join(["uv", "run", "python", "benchmarks/accuracy_parallel.py", *sys.argv[1:]])
        write_markdown(results, Path(__file__).resolve().parent.parent / "docs" / "accuracy-parallel.md", command,
                       append=args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
