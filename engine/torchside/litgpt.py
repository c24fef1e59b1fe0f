"""LitGPT's GPT and LoRA layers, re-implemented for the trace (--modeling litgpt).

The same torch ops, in the same order, as litgpt/model.py and litgpt/lora.py at Lightning-AI/litgpt
26857050fe3ff627cd714fe92f5838f51a3d5efa (Apache-2.0) for its Llama-shaped configs: what is allocated and what
autograd saves is what LitGPT's own modules do (benchmarks/litgpt_probe.py traces LitGPT's code itself, and
tests compare the two). Written from LitGPT's code, not copied: no KV cache, sliding window, soft-capping,
parallel residual or interleaved RoPE (validation refuses the configs that need them). The module names are
LitGPT's (transformer.h[i].attn.qkv, mlp.fc_1, lm_head). The estimator's replay is
memtui.engine.estimator.sim.litgpt.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from memtui.engine.model.architectures import ModelSpec
from memtui.engine.model.specs import TrainingConfig
from memtui.engine.model.validation import adapts_head, litgpt_targets, resolve_lora_targets

QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    """litgpt/model.py:1301."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        norm_x = torch.mean(x * x, dim=-1, keepdim=True)
        x_normed = x * torch.rsqrt(norm_x + self.eps)
        return (x_normed * self.weight.float()).to(dtype=dtype)


class LoRALinear(nn.Module):
    """litgpt/lora.py:89 LoRALinear (r = 0: the plain linear)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.r = r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else (lambda x: x)
        if r > 0:
            self.lora_A = nn.Parameter(torch.empty((r, in_features)))
            self.lora_B = nn.Parameter(torch.zeros((out_features, r)))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # litgpt/lora.py:165
        pretrained = self.linear(x)
        if self.r == 0:
            return pretrained
        lora = (self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling
        return pretrained + lora


class LoRAQKVLinear(nn.Module):
    """litgpt/lora.py:175 LoRAQKVLinear: one lora_A for the enabled q/k/v slices, lora_B applied by a grouped
    conv1d, zero-padded into the fused width when not all three are enabled."""

    def __init__(self, in_features: int, head_size: int, n_head: int, n_query_groups: int, r: int, alpha: int,
                 dropout: float, enable: tuple[bool, bool, bool]) -> None:
        super().__init__()
        out_features = (n_head + 2 * n_query_groups) * head_size
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.n_head, self.n_query_groups, self.enable = n_head, n_query_groups, enable
        self.r = r if any(enable) else 0
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else (lambda x: x)
        if self.r > 0:
            shapes = (head_size * n_head * enable[0], head_size * n_query_groups * enable[1],
                      head_size * n_query_groups * enable[2])
            self.qkv_shapes = [s for s in shapes if s]
            self.lora_A = nn.Parameter(torch.empty((r * sum(enable), in_features)))
            self.lora_B = nn.Parameter(torch.zeros(sum(self.qkv_shapes), r))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.scaling = alpha / r
        if self.r > 0 and not all(enable):  # lora.py:265 lora_ind: made on zero_pad's first call, kept as a buffer
            q, kv = head_size * n_head, head_size * n_query_groups
            index: list[int] = []  # lora.py:265 lora_ind
            if enable[0]:
                index.extend(range(0, q))
            if enable[1]:
                index.extend(range(q, q + kv))
            if enable[2]:
                index.extend(range(q + kv, out_features))
            self.register_buffer("_lora_ind", torch.tensor(index), persistent=False)

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:  # lora.py:288
        if all(self.enable):
            return x
        result = x.new_zeros(*x.shape[:-1], self.linear.out_features)
        return result.index_copy_(dim=-1, index=self._lora_ind.clone(), source=x)

    def conv1d(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # lora.py:328
        if self.n_head == self.n_query_groups:
            return F.conv1d(input, weight, groups=sum(self.enable))
        input_splitted = input.chunk(sum(self.enable), dim=1)
        weight_splitted = weight.split(self.qkv_shapes)
        return torch.cat([F.conv1d(a, b) for a, b in zip(input_splitted, weight_splitted)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # lora.py:381
        pretrained = self.linear(x)
        if self.r == 0:
            return pretrained
        after_A = F.linear(self.lora_dropout(x), self.lora_A)
        after_B = self.conv1d(after_A.transpose(-2, -1), self.lora_B.unsqueeze(-1)).transpose(-2, -1)
        lora = self.zero_pad(after_B) * self.scaling
        return pretrained + lora


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """litgpt/model.py:1144."""
    head_size_half = x.size(-1) // 2
    x1 = x[..., :head_size_half]
    x2 = x[..., head_size_half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    dims_diff = x.dim() - cos.dim()
    if dims_diff > 0:
        new_shape = cos.shape[0:1] + (1,) * dims_diff + cos.shape[1:]
        cos = cos.view(*new_shape)
        sin = sin.view(*new_shape)
    roped = (x * cos) + (rotated * sin)
    return roped.to(dtype=x.dtype)


class CausalSelfAttention(nn.Module):
    """litgpt/model.py:390 (forward at :430, without a KV cache or a sliding window)."""

    def __init__(self, spec: ModelSpec, lora: dict) -> None:
        super().__init__()
        self.n_head, self.n_query_groups, self.head_size = spec.num_heads, spec.num_kv_heads, spec.head_dim
        # LitGPT's configs set sliding_window_size where the model's has a window (Mistral 7B v0.1, Phi-3 mini 4k),
        # on every layer (config.py: sliding_window_indices defaults to all ones).
        self.window = spec.config.get("sliding_window") or 0
        self.qkv = LoRAQKVLinear(spec.hidden_size, self.head_size, self.n_head, self.n_query_groups,
                                 enable=tuple(name in lora["targets"] for name in QKV), **lora["args"])
        self.proj = LoRALinear(self.head_size * self.n_head, spec.hidden_size,
                               **(lora["args"] if "o_proj" in lora["targets"] else lora["off"]))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        head_size, n_head, n_query_groups = self.head_size, self.n_head, self.n_query_groups
        rope_n_elem = head_size  # rotary_percentage 1
        B, T, _C = x.size()
        qkv = self.qkv(x)
        query_size = n_head * head_size
        key_size = value_size = n_query_groups * head_size
        q, k, v = qkv.split((query_size, key_size, value_size), dim=-1)
        q = q.view(B, T, n_head, head_size).transpose(1, 2)
        k = k.view(B, T, n_query_groups, head_size).transpose(1, 2)
        v = v.view(B, T, n_query_groups, head_size).transpose(1, 2)
        q_roped = apply_rope(q[..., :rope_n_elem], cos, sin)
        k_roped = apply_rope(k[..., :rope_n_elem], cos, sin)
        q = torch.cat((q_roped, q[..., rope_n_elem:]), dim=-1)
        k = torch.cat((k_roped, k[..., rope_n_elem:]), dim=-1)
        if n_query_groups != n_head:
            q_per_kv = n_head // n_query_groups
            k = k.repeat_interleave(q_per_kv, dim=1)
            v = v.repeat_interleave(q_per_kv, dim=1)
        mask = None
        if self.window:  # litgpt/model.py:552-563
            mask = torch.ones(T, T, dtype=q.dtype, device=q.device).triu(diagonal=1)
            mask.masked_fill_(mask.bool(), float("-inf"))
            mask = mask.view(1, 1, *mask.shape)
            sliding_window_mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device)
            for i in range(T):
                window_start = max(0, i - self.window + 1)
                sliding_window_mask[i, window_start : i + 1] = 0.0
            mask = sliding_window_mask.view(1, 1, T, T)
        scale = 1.0 / math.sqrt(head_size)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale, is_causal=mask is None)
        y = y.transpose(1, 2)
        y = y.reshape(B, T, head_size * n_head)
        return self.proj(y)


class LLaMAMLP(nn.Module):
    """litgpt/model.py:818."""

    def __init__(self, spec: ModelSpec, lora: dict) -> None:
        super().__init__()
        args = lora["args"] if "gate_proj" in lora["targets"] else lora["off"]
        self.fc_1 = LoRALinear(spec.hidden_size, spec.intermediate_size, **args)
        self.fc_2 = LoRALinear(spec.hidden_size, spec.intermediate_size, **args)
        self.proj = LoRALinear(spec.intermediate_size, spec.hidden_size, **args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fc_1 = self.fc_1(x)
        x_fc_2 = self.fc_2(x)
        x = F.silu(x_fc_1) * x_fc_2
        return self.proj(x)


class Block(nn.Module):
    """litgpt/model.py:309, non-parallel residual (forward at :345)."""

    def __init__(self, spec: ModelSpec, lora: dict, eps: float) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(spec.hidden_size, eps)
        self.attn = CausalSelfAttention(spec, lora)
        self.norm_2 = RMSNorm(spec.hidden_size, eps)
        self.mlp = LLaMAMLP(spec, lora)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_normed = self.norm_1(x)
        attention_output = self.attn(x_normed, cos, sin)
        x = attention_output + x
        x_normed = self.norm_2(x)
        return self.mlp(x_normed) + x


class Transformer(nn.Module):
    """GPT.transformer (wte, h, ln_f) and GPT.forward up to the head (litgpt/model.py:64, without input_pos)."""

    def __init__(self, spec: ModelSpec, lora: dict, eps: float) -> None:
        super().__init__()
        self.wte = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.h = nn.ModuleList(Block(spec, lora, eps) for _ in range(spec.num_layers))
        self.ln_f = RMSNorm(spec.hidden_size, eps)

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> SimpleNamespace:
        T = input_ids.size(1)
        cos, sin = cos[:T].unsqueeze(0), sin[:T].unsqueeze(0)
        x = self.wte(input_ids)
        for block in self.h:
            x = block(x, cos, sin)
        return SimpleNamespace(last_hidden_state=self.ln_f(x))


class GPT(nn.Module):
    """litgpt/lora.py GPT: lm_head (registered first, as LitGPT does), transformer, fp32 RoPE buffers
    (litgpt/model.py build_rope_cache; the fine-tune loop rebuilds them for its max_seq_length, outside the
    bf16 default dtype). The trace's loss (torchside.build.causal_lm_loss) runs the head in chunks."""

    base_model_prefix = "body"  # causal_lm_loss calls getattr(model, base_model_prefix)(input_ids=...)

    def __init__(self, spec: ModelSpec, lora: dict, seq_len: int) -> None:
        super().__init__()
        eps = float(spec.config.get("rms_norm_eps", 1e-5))
        self.lm_head = LoRALinear(spec.hidden_size, spec.vocab_size, **(lora["args"] if lora["head"] else lora["off"]))
        self.transformer = Transformer(spec, lora, eps)
        theta = float(spec.config.get("rope_theta", 10000.0))
        half = spec.head_dim // 2
        with torch.device(self.lm_head.linear.weight.device):
            inverse = 1.0 / (theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32)[:half] / spec.head_dim))
            angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inverse).repeat(1, 2)
            self.register_buffer("cos", torch.cos(angles), persistent=False)
            self.register_buffer("sin", torch.sin(angles), persistent=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.transformer

    def body(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return self.transformer(input_ids, self.cos, self.sin)

    forward = body


def build_litgpt(spec: ModelSpec, config: TrainingConfig, dtype: torch.dtype, device) -> GPT:
    """The GPT in `dtype` (Fabric's bf16-true init_module), its LoRA as finetune/lora.py sets it up (alpha 16)
    and mark_only_lora_as_trainable; validation has checked the options it models."""
    targets = set(litgpt_targets(resolve_lora_targets(config, spec))) if config.uses_lora else set()
    args = {"r": config.lora_rank, "alpha": 16, "dropout": config.lora_dropout}
    lora = {"targets": targets, "args": args, "off": {"r": 0, "alpha": 1, "dropout": 0.0},
            "head": config.uses_lora and adapts_head(config)}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT(spec, lora, config.seq_len)
    finally:
        torch.set_default_dtype(previous)
    if config.uses_lora:  # litgpt/lora.py mark_only_lora_as_trainable
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "lora_" in name
    model.train()
    return model
