"""How close `memtui estimate` is to `memtui trace`: the tensor peak of one training step.

    uv run python benchmarks/accuracy.py [--only SUBSTRING] [--limit N] [--no-write]

For every configuration of the matrix below, trace two real training steps of
the real architecture on fake tensors (memtui.engine.trace) and compare the traced
tensor peak with the estimator's. Both sides exclude what the trace cannot see
(CUDA context, allocator slack); the estimator's modelled cuBLAS workspace is
taken off its figure so that like is compared with like. Writes the table to
docs/accuracy.md and prints the median and max |error|. Prints numbers; asserts
nothing (tests/test_accuracy.py holds a fast subset to a bound).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from memtui.engine.estimator import estimate  # noqa: E402
from memtui.engine.estimator.overhead import cublas_workspace_bytes  # noqa: E402
from memtui.engine.model.presets import resolve_gpu, resolve_model  # noqa: E402
from memtui.engine.model.specs import TrainingConfig  # noqa: E402

# Each row: flags as `memtui estimate` takes them (gpu does not change the tensor peak but the workspace).
MATRIX: list[dict] = [
    # small models, every precision
    {"model": "qwen2.5-0.5b", "precision": "32-true", "batch_size": 4, "seq_len": 512},
    {"model": "qwen2.5-0.5b", "precision": "bf16-mixed", "batch_size": 8, "seq_len": 1024},
    {"model": "qwen2.5-0.5b", "precision": "16-mixed", "batch_size": 2, "seq_len": 2048},
    {"model": "qwen2.5-0.5b", "precision": "bf16-true", "batch_size": 16, "seq_len": 256},
    {"model": "qwen2.5-0.5b", "precision": "16-true", "batch_size": 1, "seq_len": 4096},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 2048},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 2048, "optimizer_impl": "fused"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 2048, "optimizer_impl": "for-loop"},
    {"model": "llama-3.2-1b", "precision": "32-true", "batch_size": 2, "seq_len": 1024, "optimizer": "sgd"},
    {"model": "llama-3.2-1b", "precision": "32-true", "batch_size": 2, "seq_len": 1024, "optimizer": "sgd-momentum"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 1024, "optimizer": "adafactor"},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 1024, "optimizer": "adafactor", "optimizer_impl": "for-loop"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 1024, "optimizer": "lion"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 1024, "optimizer": "galore-adamw"},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 1024, "optimizer": "galore-adamw", "galore_rank": 64},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 1024, "master_weights": True},
    {"model": "llama-3.2-1b", "precision": "16-true", "batch_size": 2, "seq_len": 1024, "master_weights": True, "optimizer_impl": "fused"},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 8, "seq_len": 1024, "attention": "eager"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 8, "seq_len": 1024, "checkpointing": "full"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 8192, "checkpointing": "full"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "checkpointing": "selective", "attention": "eager"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 2048, "lora_rank": 16},
    {"model": "llama-3.2-3b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 4, "seq_len": 4096, "checkpointing": "full"},
    {"model": "llama-3.2-3b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 4096, "attention": "eager", "checkpointing": "full"},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 4, "seq_len": 2048, "lora_rank": 64, "lora_targets": "all-linear"},
    {"model": "phi-3-mini", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048},
    {"model": "phi-3-mini", "precision": "bf16-true", "batch_size": 4, "seq_len": 1024, "lora_rank": 16, "lora_targets": "all-linear"},
    # activation-heavy: long sequences and big batches without checkpointing
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 16, "seq_len": 4096},
    {"model": "qwen2.5-0.5b", "precision": "bf16-mixed", "batch_size": 8, "seq_len": 4096, "attention": "eager"},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 8, "seq_len": 8192, "lora_rank": 16},
    {"model": "phi-3-mini", "precision": "bf16-mixed", "batch_size": 8, "seq_len": 4096, "lora_rank": 32, "lora_targets": "qkv_proj,o_proj", "quant": "nf4"},
    # 7-9B
    {"model": "llama-3.1-8b", "precision": "32-true"},
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 2048},
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 4096, "checkpointing": "full"},
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "optimizer_impl": "fused"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 1, "seq_len": 8192, "checkpointing": "full", "optimizer_impl": "fused"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 8, "seq_len": 2048, "checkpointing": "selective"},
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 2048, "attention": "eager"},
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 2048, "lora_rank": 16},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "lora_rank": 8, "lora_targets": "q_proj,k_proj,v_proj,o_proj"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 4, "seq_len": 2048, "lora_rank": 16, "quant": "nf4", "checkpointing": "full"},
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "lora_rank": 32, "quant": "int8"},
    {"model": "llama-3.1-8b", "precision": "32-true", "batch_size": 1, "seq_len": 1024, "optimizer": "sgd-momentum", "optimizer_impl": "for-loop"},
    {"model": "mistral-7b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 4096, "checkpointing": "full"},
    {"model": "mistral-7b", "precision": "bf16-true", "batch_size": 1, "seq_len": 2048, "lora_rank": 16, "lora_targets": "all-linear"},
    {"model": "qwen2.5-7b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048},
    {"model": "qwen2.5-7b", "precision": "bf16-true", "batch_size": 4, "seq_len": 1024, "lora_rank": 16, "quant": "nf4"},
    {"model": "qwen2.5-7b", "precision": "16-mixed", "batch_size": 1, "seq_len": 4096, "checkpointing": "full"},
    # 70B
    {"model": "llama-3.1-70b", "precision": "bf16-true", "batch_size": 1, "seq_len": 2048, "lora_rank": 16, "quant": "nf4", "checkpointing": "full"},
    {"model": "llama-3.1-70b", "precision": "bf16-true", "batch_size": 1, "seq_len": 4096, "lora_rank": 16},
    {"model": "qwen2.5-72b", "precision": "bf16-true", "batch_size": 1, "seq_len": 2048, "lora_rank": 8, "quant": "nf4", "checkpointing": "full"},
    # GPT-2 (dropout, LayerNorm, learned positions), Gemma-2 (soft-capping, four norms), Mixtral (MoE)
    {"model": "gpt2", "precision": "32-true", "batch_size": 8, "seq_len": 1024},
    {"model": "gpt2", "precision": "bf16-mixed", "batch_size": 16, "seq_len": 1024},
    {"model": "gpt2", "precision": "bf16-mixed", "batch_size": 8, "seq_len": 1024, "attention": "eager", "checkpointing": "full"},
    {"model": "gpt2", "precision": "bf16-mixed", "batch_size": 8, "seq_len": 1024, "lora_rank": 8, "lora_targets": "c_attn", "quant": "nf4"},  # Conv1D quantized
    {"model": "gemma-2-9b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 2048, "checkpointing": "full"},
    {"model": "gemma-2-9b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "lora_rank": 16},
    {"model": "gemma-2-9b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 2048, "attention": "eager", "lora_rank": 8},
    {"model": "mixtral-8x7b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "checkpointing": "full"},
    {"model": "mixtral-8x7b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 4096, "lora_rank": 8},
    # OLMo 2 (post-norms, whole-projection q/k norms), Gemma 3 (sliding and full layers), Qwen3-MoE (128 experts)
    {"model": "olmo-2-7b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 4096, "checkpointing": "full"},
    {"model": "olmo-2-13b", "precision": "bf16-true", "batch_size": 1, "seq_len": 4096, "lora_rank": 16},
    {"model": "gemma-3-1b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 2048},
    {"model": "gemma-3-4b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "lora_rank": 16},
    {"model": "gemma-3-12b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 2048, "attention": "eager", "checkpointing": "full"},
    {"model": "qwen3-30b-a3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "checkpointing": "full"},
    {"model": "qwen3-30b-a3b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 4096, "checkpointing": "selective"},
    # gpt-oss (sinks, eager attention, biased experts): the OpenAI cookbook's LoRA fine-tune on bf16 weights
    {"model": "gpt-oss-20b", "precision": "bf16-true", "batch_size": 4, "seq_len": 2048, "lora_rank": 8, "lora_targets": "all-linear", "checkpointing": "full"},
    # DeepSeek-V3 (latent attention, dense then MoE layers, grouped sigmoid router, shared experts)
    {"model": "moonlight-16b-a3b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "checkpointing": "full"},
    {"model": "deepseek-v3", "precision": "bf16-true", "batch_size": 1, "seq_len": 4096, "lora_rank": 16, "lora_targets": "all-linear", "checkpointing": "full"},
    # the training stacks' knobs (issue 11): accumulation, step in backward, losses, peft's adapters, paging, offload
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "grad_accum": 4},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "optimizer_in_backward": True},
    # an untied head over the chunked loss: its chunks' gradients summed in autograd's input buffer before it steps
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 1, "seq_len": 2048, "loss": "chunked", "optimizer_in_backward": True},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 1, "seq_len": 8192, "lora_rank": 16, "loss": "chunked"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 1, "seq_len": 8192, "lora_rank": 16, "loss": "fused-linear"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 16, "loss_dtype": "compute"},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "lora_targets": "all-linear", "lora_dropout": 0.05},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "lora_dtype": "compute"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "quant": "nf4", "kbit_prep": True, "lora_dropout": 0.05, "checkpointing": "full"},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "optimizer": "paged-adamw-8bit"},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "checkpointing": "full", "activation_offload": True},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "activation_offload": True},
    # LoRA on the output head (tied and untied); bitsandbytes before 0.43.2 (LitGPT's QLoRA, the QLoRA paper's)
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "lora_targets": "all-linear,lm_head", "lora_dropout": 0.1},
    {"model": "phi-3-mini", "precision": "bf16-true", "batch_size": 4, "seq_len": 512, "lora_rank": 8, "lora_targets": "all-linear,lm_head", "lora_dropout": 0.05, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 4},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 512, "lora_rank": 32, "quant": "nf4", "bnb_version": "legacy", "lora_dropout": 0.05, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 4},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 4, "seq_len": 528, "lora_rank": 64, "lora_targets": "all-linear", "quant": "nf4", "bnb_version": "legacy", "kbit_prep": True, "lora_dropout": 0.05, "checkpointing": "full"},
    # torch.compile per layer: traced (AOTAutograd + inductor's partitioner), estimated by the same min-cut and fusion
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 1024, "compile": True},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "checkpointing": "full", "compile": True},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "lora_targets": "all-linear", "compile": True},
    {"model": "qwen2.5-0.5b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 1024, "compile": True},
    {"model": "gemma-2-9b", "precision": "bf16-true", "batch_size": 1, "seq_len": 2048, "lora_rank": 16, "compile": True},
    # Gemma-2's softcapped eager attention compiled (the scores, the masks and the softmax's row max and sum saved)
    {"model": "gemma-2-9b", "precision": "bf16-mixed", "batch_size": 1, "seq_len": 2048, "attention": "eager", "lora_rank": 8, "compile": True},
    {"model": "mistral-7b", "precision": "bf16-true", "batch_size": 1, "seq_len": 4096, "lora_rank": 16, "checkpointing": "full", "compile": True},
    {"model": "mixtral-8x7b", "precision": "bf16-true", "batch_size": 1, "seq_len": 4096, "lora_rank": 16, "compile": True},
    {"model": "qwen3-30b-a3b", "precision": "bf16-true", "batch_size": 1, "seq_len": 2048, "lora_rank": 8, "compile": True},
    # torchtune's chunked loss compiled per chunk (compute_cross_entropy), as in docs/measured.md's torchtune-3b-ac
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "loss": "chunked",
     "checkpointing": "full", "optimizer_impl": "fused", "compile": True},
    # torchtune's model returning fp32 logits (--logits-upcast model), eager and with the layers alone compiled
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "optimizer_impl": "fused",
     "logits_upcast": "model"},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "optimizer_impl": "fused",
     "logits_upcast": "model", "compile": True, "eager_loss": True},
    {"model": "qwen2.5-0.5b", "precision": "bf16-mixed", "batch_size": 4, "seq_len": 1024, "compile": True, "eager_loss": True},
    # compiled layers inside torchtune's OffloadActivations: the partitioner's saved set is what goes to the host (the
    # weights it saves are the Parameters themselves, which stay); torchtune-3b-offload's and torchtune-3b-lora's setups
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "compile": True, "activation_offload": True},
    {"model": "llama-3.2-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 2048, "lora_rank": 16, "compile": True, "activation_offload": True},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "loss": "chunked", "checkpointing": "full",
     "optimizer_in_backward": True, "optimizer_impl": "fused", "compile": True, "activation_offload": True},
    {"model": "llama-3.2-3b", "precision": "bf16-true", "batch_size": 2, "seq_len": 4096, "loss": "chunked", "checkpointing": "full",
     "lora_rank": 64, "lora_targets": "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "optimizer_impl": "fused", "compile": True,
     "activation_offload": True},
    # torchtitan's op-level selective checkpointing (every other mm kept): flash, biased q/k/v + LoRA, eager
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 8192, "lora_rank": 16, "checkpointing": "selective-op"},
    {"model": "qwen2.5-0.5b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 1024, "lora_rank": 8, "lora_targets": "all-linear", "quant": "nf4", "checkpointing": "selective-op"},
    {"model": "gpt2", "precision": "bf16-true", "batch_size": 4, "seq_len": 1024, "attention": "eager", "checkpointing": "selective-op"},
    # torchao's Float8Linear (tensorwise) in the decoder layers: fp32 weights under autocast, op-level SAC, bf16 + full AC
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 1024, "float8": "tensorwise"},
    {"model": "llama-3.2-1b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 2048, "checkpointing": "selective-op", "float8": "tensorwise"},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 1, "seq_len": 8192, "checkpointing": "full", "optimizer": "sgd", "float8": "tensorwise"},
    # the biased q/k/v projections (Qwen2: `output + self.bias.to(output.dtype)`), Gemma 3, Phi-3's fused projections
    {"model": "qwen2.5-0.5b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 1024, "optimizer": "sgd", "float8": "tensorwise"},
    {"model": "gemma-3-1b", "precision": "bf16-true", "batch_size": 2, "seq_len": 1024, "optimizer": "sgd", "float8": "tensorwise"},
    {"model": "phi-3-mini", "precision": "bf16-true", "batch_size": 1, "seq_len": 1024, "optimizer": "sgd", "checkpointing": "full", "float8": "tensorwise"},
    # ... compiled into each layer's graph, as torchtitan compiles its checkpoint-wrapped blocks (the policy's tags
    # honoured by the partitioner): torchtitan's llama3_8b shape on one GPU, and LoRA (the adapters' mm counted too)
    {"model": "llama-3.1-8b", "precision": "bf16-mixed", "batch_size": 2, "seq_len": 8192, "checkpointing": "selective-op",
     "compile": True, "eager_loss": True},
    {"model": "llama-3.1-8b", "precision": "bf16-true", "batch_size": 2, "seq_len": 8192, "lora_rank": 16, "checkpointing": "selective-op",
     "compile": True},
    # --modeling litgpt: LitGPT's GPT (fused qkv, its LoRA layers) as its finetune/lora.py runs it
    {"model": "benchmarks/measured_models/llama-2-7b.json", "precision": "bf16-true", "batch_size": 2, "seq_len": 512, "lora_rank": 32, "lora_dropout": 0.05, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 4, "loss_dtype": "compute", "grad_accum": 2, "modeling": "litgpt"},
    {"model": "benchmarks/measured_models/llama-3.2-1b-untied.json", "precision": "bf16-true", "batch_size": 4, "seq_len": 1024, "lora_rank": 16, "lora_dropout": 0.05, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 8, "loss_dtype": "compute", "modeling": "litgpt"},
    {"model": "benchmarks/measured_models/tinyllama-1.1b.json", "precision": "bf16-true", "batch_size": 8, "seq_len": 512, "lora_rank": 32, "lora_targets": "all-linear,lm_head", "lora_dropout": 0.05, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 4, "loss_dtype": "compute", "modeling": "litgpt"},
    {"model": "phi-3-mini", "precision": "bf16-true", "batch_size": 4, "seq_len": 512, "lora_rank": 8, "lora_targets": "all-linear,lm_head", "lora_dropout": 0.05, "lora_dtype": "compute", "loss": "chunked", "loss_chunks": 4, "loss_dtype": "compute", "grad_accum": 2, "modeling": "litgpt"},
]


_ACTIVATION_PHASES = ("forward", "loss", "backward")


RANDOM_CHOICES = {
    "model": ["gpt2", "qwen2.5-0.5b", "llama-3.2-1b", "llama-3.2-3b", "phi-3-mini", "qwen2.5-7b", "mistral-7b", "llama-3.1-8b",
              "gemma-2-9b"],
    "precision": ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true"],
    "optimizer": ["adamw", "adamw", "sgd", "sgd-momentum", "lion", "adamw-8bit", "adafactor", "galore-adamw"],
    "optimizer_impl": ["foreach", "fused", "for-loop"],
    "checkpointing": ["none", "selective", "full"],
    "attention": ["eager", "flash"],
    "batch_size": [1, 2, 3, 4, 8, 16],
    "seq_len": [256, 384, 512, 1000, 1024, 2048, 3000, 4096, 8192],
    "lora": [0, 0, 8, 16, 64],
    "quant": ["none", "none", "nf4", "int8"],
    # the training stacks' knobs (issue 11), each drawn rarely enough that most rows keep the defaults
    "loss": ["standard", "standard", "standard", "chunked", "fused-linear"],
    "logits_upcast": ["loss", "loss", "loss", "model"],
    "grad_accum": [1, 1, 1, 1, 2, 3],
    "optimizer_in_backward": [False, False, False, False, True],
    "compile": [False, False, False, False, True],
}
STACK_DEFAULTS = {"loss": "standard", "logits_upcast": "loss", "grad_accum": 1, "optimizer_in_backward": False,
                  "compile": False}
# The other knobs of issue 11 and after, drawn from a second generator so that the rows above stay the ones the
# seed always drew; a row they make invalid is kept without them.
EXTRA_CHOICES = {
    "lora_dropout": [0.0, 0.0, 0.0, 0.05, 0.1],  # with LoRA
    "lora_dtype": ["fp32", "fp32", "compute"],  # with LoRA
    "kbit_prep": [False, False, True],  # with quantized weights
    "paged": [False, False, False, False, True],  # AdamW or 8-bit AdamW as bitsandbytes' paged one
    "activation_offload": [False, False, False, False, False, True],
    "float8": ["off", "off", "off", "off", "off", "off", "tensorwise"],
}
EXTRA_FIELDS = tuple(key for key in EXTRA_CHOICES if key in TrainingConfig.model_fields)  # not "paged"
_NO_DEFAULT = object()


def random_rows(count: int, seed: int) -> list[dict]:
    """Configurations drawn at random (seeded), kept to a size a laptop traces in seconds."""
    import random

    from memtui.engine.errors import InputError
    from memtui.engine.model.validation import check_config

    rng = random.Random(seed)
    extra_rng = random.Random(f"{seed}-extra")
    rows: list[dict] = []

    def valid(row: dict) -> bool:
        try:
            config = TrainingConfig(gpu="h100-80gb", **row)
            check_config(config, resolve_model(config.model), resolve_gpu(config.gpu))
        except (InputError, ValueError):
            return False
        return True

    while len(rows) < count:
        row = {key: rng.choice(values) for key, values in RANDOM_CHOICES.items() if key not in ("lora", "quant")}
        # the stacks' knobs at their defaults are left out of the row (and so of its label)
        row = {key: value for key, value in row.items() if STACK_DEFAULTS.get(key, _NO_DEFAULT) != value}
        if row["model"] == "gpt2":
            row["seq_len"] = min(row["seq_len"], 1024)
        if row["precision"] in ("16-true", "bf16-true") and rng.random() < 0.3:
            row["master_weights"] = True
        big = row["model"] in ("qwen2.5-7b", "mistral-7b", "llama-3.1-8b", "gemma-2-9b")
        if big and row["attention"] == "eager":
            row["seq_len"] = min(row["seq_len"], 2048)
        if row["batch_size"] * row["seq_len"] > 32768:
            continue
        lora = rng.choice(RANDOM_CHOICES["lora"])
        if lora:
            row["lora_rank"] = lora
            row["lora_targets"] = rng.choice(["all-linear", "default"])
            if row["lora_targets"] == "default":
                del row["lora_targets"]
            if row["precision"] != "32-true":
                row["quant"] = rng.choice(RANDOM_CHOICES["quant"])
        extra = {key: extra_rng.choice(values) for key, values in EXTRA_CHOICES.items()}
        if not valid(row):
            continue
        extended = dict(row)
        if "lora_rank" in row:
            extended.update(lora_dropout=extra["lora_dropout"], lora_dtype=extra["lora_dtype"])
        if row.get("quant", "none") != "none":
            extended["kbit_prep"] = extra["kbit_prep"]
        if extra["paged"] and row["optimizer"] in ("adamw", "adamw-8bit"):
            extended["optimizer"] = "paged-" + row["optimizer"]
        extended.update(activation_offload=extra["activation_offload"], float8=extra["float8"])
        # the knobs at their defaults are left out of the row (and so of its label)
        extended = {key: value for key, value in extended.items()
                    if key not in EXTRA_FIELDS or TrainingConfig.model_fields[key].default != value}
        rows.append(extended if valid(extended) else row)
    return rows


def label(row: dict) -> str:
    return " ".join(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")
                    for key, value in row.items() if value is not False)


def measure(row: dict) -> dict:
    config = TrainingConfig(gpu="h100-80gb", **row)
    spec, gpu = resolve_model(config.model), resolve_gpu(config.gpu)
    from memtui.engine.trace.runner import trace

    started = time.perf_counter()
    traced = trace(config, model=spec, gpu=gpu)
    seconds = time.perf_counter() - started
    budget = estimate(config, model=spec, gpu=gpu)
    workspace = cublas_workspace_bytes(gpu)
    estimated = budget.tensor_peak_bytes - workspace
    actual = traced.traced_tensor_peak_bytes
    # The forward/backward peak alone (steady step), where activations and temporaries decide it.
    traced_fb = max(p["peak_bytes"] for p in traced.phase_peaks if p["step"] == 2 and p["phase"] in _ACTIVATION_PHASES)
    estimated_fb = max(point.bytes for point in budget.timeline if point.phase in _ACTIVATION_PHASES) - workspace
    return {
        "fb_error": (estimated_fb - traced_fb) / traced_fb,
        "config": label(row),
        "traced": actual,
        "estimated": estimated,
        "error": (estimated - actual) / actual,
        "traced_phase": traced.peak_phase,
        "estimated_phase": budget.peak_phase,
        # every family is simulated (memtui.engine.estimator.sim); where the estimate says it does not model an
        # option (--compile on GPT-2 or with eager attention), its figure is eager PyTorch's, an upper bound
        "method": "upper bound (says so)" if any("the estimate does not model" in note for note in budget.notes)
        else "simulated",
        "seconds": seconds,
        "modelled": list(traced.modelled),  # what the trace did not run (its own words)
    }


COMPILE_NOTE = (
    "`--compile` rows: the trace runs each decoder layer and the loss (per chunk for the chunked loss) through "
    "AOTAutograd's min-cut partitioner and inductor's fusion on fake tensors; the estimator applies the same "
    "mechanism to each layer's and the loss's op program (engine/estimator/sim/compiled.py).")


def table_line(r: dict) -> str:
    return (f"| `{r['config']}` | {r['traced'] / 2**30:.3f} | {r['estimated'] / 2**30:.3f} | {100 * r['error']:+.3f}% "
            f"| {100 * r['fb_error']:+.3f}% | {r['traced_phase']} / {r['estimated_phase']} | {r['method']} | {r['seconds']:.1f} |")


def append_rows(path: Path, results: list[dict], command: str) -> None:
    """`--append`: each result's row in place of the table's row of the same configuration, or after the last row;
    the summary lines recomputed from the whole table, and `command` named in the "Measured" line."""
    lines = path.read_text().rstrip("\n").split("\n")
    for index, line in enumerate(lines):
        if line.startswith("Measured ") and f"`{command}`" not in line:
            lines[index] = line.rstrip(".") + f" then `{command}`."
    where = {match.group(1): index for index, line in enumerate(lines) if (match := _ROW.match(line))}
    for result in results:
        if result["config"] in where:
            lines[where[result["config"]]] = table_line(result)
        else:
            last = max(where.values())  # the new row goes after it: no row's index moves
            lines.insert(last + 1, table_line(result))
            where[result["config"]] = last + 1
    cells = [[cell.strip() for cell in lines[index].strip("|").split("|")] for index in where.values()]
    errors = [abs(float(row[3].rstrip("%"))) for row in cells]
    fb_errors = [abs(float(row[4].rstrip("%"))) for row in cells]
    full = [abs(float(row[3].rstrip("%"))) for row in cells if row[6] == "simulated"]
    start = next(index for index, line in enumerate(lines) if line.startswith("- all ") and "step peak" in line)
    end = start
    while end < len(lines) and lines[end].startswith("- "):
        end += 1
    lines[start:end] = _summary_lines(errors, fb_errors, full)
    path.write_text("\n".join(lines) + "\n")


_ROW = re.compile(r"\| `(--model [^`]*)` \|")


def _summary_lines(errors: list[float], fb_errors: list[float], full: list[float]) -> list[str]:
    """The summary under the heading, from every row's |error| (percent), its forward/backward peak's, and those of
    the rows the estimate models in full."""
    lines = [
        f"- all {len(errors)} configurations, step peak: median |error| {statistics.median(errors):.3f}%, "
        f"max {max(errors):.3f}%",
        f"- forward/backward peak alone (where activations decide it): median |error| "
        f"{statistics.median(fb_errors):.3f}%, max {max(fb_errors):.3f}%",
    ]
    if full:
        lines.append(
            f"- {len(full)} configurations the estimate models in full (the others' notes say they are eager upper "
            f"bounds): median {statistics.median(full):.3f}%, max {max(full):.3f}%"
        )
    return lines


def write_markdown(results: list[dict], path: Path, command: str) -> None:
    lines = [
        "# Estimator accuracy: `memtui estimate` vs `memtui trace`",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} with `{command}`.",
        "Traced = tensor peak of two real training steps of the real transformers architecture on fake tensors "
        "(`memtui trace`); estimated = `memtui estimate`'s tensor peak less its modelled cuBLAS workspace.",
        "",
        *_summary_lines([100 * abs(r["error"]) for r in results], [100 * abs(r["fb_error"]) for r in results],
                        [100 * abs(r["error"]) for r in results if r["method"] == "simulated"]),
    ]
    lines += [
        "",
        COMPILE_NOTE,
        "",
        "| configuration | traced GiB | estimated GiB | error | fwd/bwd peak error | peak (trace / estimate) | method | trace s |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    lines += [table_line(r) for r in results]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the rows whose flags contain this text")
    parser.add_argument("--limit", type=int, default=0, help="run at most N rows")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/accuracy.md alone")
    parser.add_argument("--random", type=int, default=0, metavar="N",
                        help="N random configurations drawn outside the matrix instead (written to docs/accuracy-random.md)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--append", action="store_true",
                        help="with --only: add the rows' lines to docs/accuracy.md's table (its summary stays the last "
                             "full run's)")
    args = parser.parse_args(argv)
    rows = [row for row in MATRIX if args.only in label(row)]
    if args.random:  # the same draw whatever --only keeps of it
        rows = [row for row in random_rows(args.random, args.seed) if args.only in label(row)]
    if args.limit:
        rows = rows[: args.limit]
    results = []
    for index, row in enumerate(rows, 1):
        result = measure(row)
        results.append(result)
        print(
            f"[{index:2d}/{len(rows)}] {100 * result['error']:+7.3f}% (fwd/bwd {100 * result['fb_error']:+7.3f}%)  traced {result['traced'] / 2**30:8.3f} GiB  "
            f"estimated {result['estimated'] / 2**30:8.3f} GiB  {result['seconds']:5.1f}s  {result['config']}",
            flush=True,
        )
    errors = [abs(r["error"]) for r in results]
    fb_errors = [abs(r["fb_error"]) for r in results]
    print(f"\n{len(errors)} configurations: median |error| {100 * statistics.median(errors):.3f}%, max {100 * max(errors):.3f}%;"
          f" forward/backward peak: median {100 * statistics.median(fb_errors):.3f}%, max {100 * max(fb_errors):.3f}%")
    if args.append and args.only and not args.random:
        path = Path(__file__).resolve().parent.parent / "docs" / "accuracy.md"
        append_rows(path, results, shlex.join(["uv", "run", "python", "benchmarks/accuracy.py", *(sys.argv[1:] if argv is None else argv)]))
        print(f"appended {len(results)} rows to {path}")
    if not args.no_write and not args.only and not args.limit:
        name = "accuracy-random.md" if args.random else "accuracy.md"
        command = "uv run python benchmarks/accuracy.py" + (f" --random {args.random} --seed {args.seed}" if args.random else "")
        path = Path(__file__).resolve().parent.parent / "docs" / name
        path.parent.mkdir(exist_ok=True)
        write_markdown(results, path, command)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
