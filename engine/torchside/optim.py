"""Optimizers torch.optim does not ship, written the way their reference implementations allocate.

- Lion (Chen et al., 2023; lion-pytorch's update): one momentum buffer; the
  update is sign(beta1 * m + (1 - beta1) * g).
- GaLore AdamW (Zhao et al., 2024; galore-torch's GaLoreProjector): 2-D weights
  get their gradient projected onto its top-r singular vectors (recomputed every
  `update_proj_gap` steps with an SVD), Adam moments of the projected size, and
  the update projected back. Other tensors get plain AdamW.
- MasterWeights: DeepSpeed / Megatron style mixed precision: the model holds
  16-bit weights and gradients; the optimizer keeps an fp32 master copy,
  copies the 16-bit gradients into fp32 at step time, steps the masters and
  writes them back.
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim import Optimizer


class Lion(Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, foreach: bool = True):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "foreach": foreach})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            if group["foreach"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                updates = torch._foreach_mul(exp_avgs, beta1)
                torch._foreach_add_(updates, grads, alpha=1 - beta1)
                torch._foreach_sign_(updates)
                torch._foreach_add_(params, updates, alpha=-group["lr"])
                del updates
                torch._foreach_mul_(exp_avgs, beta2)
                torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)
            else:
                for p, grad, exp_avg in zip(params, grads, exp_avgs):
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    update = exp_avg.clone().mul_(beta1).add(grad, alpha=1 - beta1).sign_()
                    p.add_(update, alpha=-group["lr"])
                    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)
        return None


class GaLoreAdamW(Optimizer):
    """AdamW whose 2-D weights are updated in a rank-r projection of their gradient."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale}
        super().__init__(params, defaults)

    @staticmethod
    def _project(grad: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
        return grad @ projector.t() if grad.shape[0] >= grad.shape[1] else projector.t() @ grad

    @staticmethod
    def _project_back(low_rank: torch.Tensor, projector: torch.Tensor, tall: bool) -> torch.Tensor:
        return low_rank @ projector if tall else projector @ low_rank

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                galore = group.get("galore", False) and grad.dim() == 2
                if galore:
                    tall = grad.shape[0] >= grad.shape[1]
                    rank = min(group["rank"], *grad.shape)
                    if "projector" not in state or state["step"] % group["update_proj_gap"] == 1:
                        # galore-torch: SVD of the float gradient, keep the top-r singular vectors.
                        u, _s, vh = torch.linalg.svd(grad.float(), full_matrices=False)
                        vectors = vh[:rank, :] if tall else u[:, :rank]
                        state["projector"] = vectors.to(grad.dtype)
                        del u, _s, vh, vectors
                    grad = self._project(grad, state["projector"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                denom = (exp_avg_sq.sqrt() / bias2**0.5).add_(group["eps"])
                update = exp_avg / bias1 / denom
                del denom
                if galore:
                    update = self._project_back(update, state["projector"], tall) * group["scale"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                del update, grad
        return None


def galore_adamw(model, *, rank: int, foreach: bool = False, fused: bool = False) -> GaLoreAdamW:
    """GaLore on the decoder layers' 2-D weights, AdamW on everything else (galore-torch's recipe)."""
    galore_params, other_params = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        in_layers = ".layers." in name or ".h." in name
        (galore_params if in_layers and parameter.dim() == 2 else other_params).append(parameter)
    groups = [{"params": other_params}]
    if galore_params:
        groups.append({"params": galore_params, "galore": True})
    return GaLoreAdamW(groups, rank=rank)


class MasterWeights(Optimizer):
    """fp32 master copies of 16-bit parameters, stepped by the wrapped optimizer."""

    def __init__(self, inner: Optimizer):
        self.inner_template = inner
        model_params = [p for group in inner.param_groups for p in group["params"]]
        self.model_params = model_params
        self.masters = [p.detach().float().requires_grad_(True) for p in model_params]
        master_groups = []
        offset = 0
        for group in inner.param_groups:
            count = len(group["params"])
            master_group = {key: value for key, value in group.items() if key != "params"}
            master_group["params"] = self.masters[offset : offset + count]
            master_groups.append(master_group)
            offset += count
        self.inner = type(inner)(master_groups, **{k: v for k, v in inner.defaults.items() if k in _init_args(type(inner))})
        super().__init__(self.masters, {})
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    @torch.no_grad()
    def step(self, closure=None):
        # DeepSpeed converts the 16-bit gradients into fp32 gradients of the masters before stepping.
        for model_param, master in zip(self.model_params, self.masters):
            master.grad = None if model_param.grad is None else model_param.grad.float()
        self.inner.step()
        for model_param, master in zip(self.model_params, self.masters):
            master.grad = None
            model_param.copy_(master)
        return None

    def zero_grad(self, set_to_none: bool = True):
        for model_param in self.model_params:
            model_param.grad = None

    def memtui_state_tensors(self):
        """The masters are optimizer state too (fp32 copies of the weights)."""
        return list(self.masters), []


def _init_args(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self", "params"}


# ---- bitsandbytes' Adam: AdamW8bit, PagedAdamW8bit, PagedAdamW32bit ------------------------------------------
# bitsandbytes/optim/optimizer.py (Optimizer2State.init_state, Optimizer8bit.get_state_buffer): two moments per
# tensor; uint8 with an fp32 absmax per 256 values for the 8-bit optimizers, except tensors under min_8bit_size
# (4096 values), which keep fp32 moments, as the 32-bit optimizer does for all (fp32 whatever the parameter's
# dtype); a paged optimizer takes the moments of tensors of at least 100,000 values from F.get_paged, CUDA unified
# memory (cudaMallocManaged) that PyTorch's caching allocator never sees. The absmax and the smaller tensors'
# moments are torch.zeros on the device as usual.
BNB_MIN_8BIT_NUMEL = 4096
BNB_BLOCK = 256
BNB_PAGED_MIN_NUMEL = 100_000


@contextlib.contextmanager
def memory_kind(kind: str):
    """Tensors made inside are `kind` memory ("unified_memory": CUDA managed, "host_memory": pinned CPU), not the
    caching allocator's: a memory tracker on the dispatch stack that knows the protocol (a context method of that
    name) counts them apart."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    with contextlib.ExitStack() as stack:
        for mode in _get_current_dispatch_mode_stack():
            enter = getattr(mode, kind, None)
            if enter is not None:
                stack.enter_context(enter())
        yield


def unified_memory():
    return memory_kind("unified_memory")


class BnbAdamReplica(Optimizer):
    """bitsandbytes' Adam states, allocation for allocation (see above). The update is applied in place, as
    bitsandbytes' fused kernels do; it is not numerically Adam."""

    def __init__(self, params, *, optim_bits: int = 8, paged: bool = False, lr: float = 1e-4, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.optim_bits, self.paged = optim_bits, paged

    def _state_buffer(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.paged and param.numel() >= BNB_PAGED_MIN_NUMEL:
            with unified_memory():
                return torch.zeros_like(param, dtype=dtype)
        return torch.zeros_like(param, dtype=dtype)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    eight_bit = self.optim_bits == 8 and param.numel() >= BNB_MIN_8BIT_NUMEL
                    dtype = torch.uint8 if eight_bit else torch.float32
                    state["state1"] = self._state_buffer(param, dtype)
                    state["state2"] = self._state_buffer(param, dtype)
                    if eight_bit:
                        blocks = -(-param.numel() // BNB_BLOCK)
                        state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
                        state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(param.grad, alpha=-group["lr"])
        return None


def paged_adamw(params, *, optim_bits: int, device_type: str, paged: bool = True):
    """bitsandbytes' PagedAdamW8bit / PagedAdamW32bit on CUDA; the allocation-exact replica elsewhere (the trace:
    paged states made as unified memory; a live CPU run: `paged=False`, every state in ordinary memory)."""
    params = list(params)
    on_cuda = all(param.device.type == "cuda" for param in params if isinstance(param, torch.Tensor))
    if device_type == "cuda" and on_cuda and torch.cuda.is_available():  # the trace's fake parameters are on the CPU
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit if optim_bits == 8 else bnb.optim.PagedAdamW32bit
        return optimizer(params, lr=1e-4, weight_decay=0.01)
    return BnbAdamReplica(params, optim_bits=optim_bits, paged=paged)
