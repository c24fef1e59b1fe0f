"""LitGPT's own model and fine-tuning loop, traced on fake tensors with memtui's tracker.

    git clone https://github.com/Lightning-AI/litgpt && git -C litgpt checkout 26857050f   # or 00af8b0d9
    uv run python benchmarks/litgpt_probe.py --litgpt litgpt Llama-2-7b-hf --batch-size 2 --seq-len 512 --lora-rank 32

What LitGPT's finetune/lora.py allocates, for comparing with memtui's estimate of the same setup (which
replays transformers' model with peft's adapters) and with LitGPT's published figures. litgpt/model.py,
config.py and lora.py are taken from the checkout as they are; from utils.py only the functions they and the
loop use (the rest imports Lightning). The loop is fit()'s: bf16-true weights, LoRA on the query and value
slices of the fused qkv projection with dropout, the head in 128-token chunks, chunked_cross_entropy, torch's
AdamW, two steps of two micro-batches, `logits` kept between iterations. Prints the tensor peak in GB (1e9),
without cuBLAS's workspace (memtui's tensor peak has it: subtract `cublas_workspace_bytes` to compare), and with
AdamW's step counters (host tensors on CUDA, which memtui leaves out: 512 bytes per trainable tensor here).
`memtui trace --modeling litgpt` runs memtui's re-implementation of these modules (engine/torchside/litgpt.py).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

_UTILS = ("find_multiple", "map_old_state_dict_weights", "chunked_cross_entropy")


def _package(checkout: Path, into: Path) -> None:
    """A `litgpt` package of the checkout's model, config and LoRA, and the utils functions they need."""
    package = into / "litgpt"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("model", "config", "lora"):
        (package / f"{name}.py").write_text((checkout / "litgpt" / f"{name}.py").read_text())
    source = (checkout / "litgpt" / "utils.py").read_text()
    # find_multiple moved to config.py in later commits: take the functions utils.py still has
    functions = [_function(source, name) for name in _UTILS if _function(source, name)]
    (package / "utils.py").write_text("import torch\nfrom typing import Dict, List, Mapping, Union\n\n\n"
                                      + "\n\n".join(functions))
    converter = checkout / "litgpt" / "scripts" / "convert_hf_checkpoint.py"
    if converter.exists():  # later commits' model.py and lora.py import qkv_reassemble from it (it imports Lightning)
        (package / "scripts").mkdir()
        (package / "scripts" / "__init__.py").write_text("")
        (package / "scripts" / "convert_hf_checkpoint.py").write_text(
            "from __future__ import annotations\n\nimport torch\nfrom litgpt.config import Config\n\n\n" + _function(converter.read_text(), "qkv_reassemble"))


def _function(source: str, name: str) -> str:
    found = re.search(rf"^def {name}\(.*?(?=^def |^class |^@|\Z)", source, re.M | re.S)
    return found.group(0) if found else ""


def trace_litgpt(name: str, batch_size: int, seq_len: int, lora_rank: int, micro_batches: int = 2) -> int:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
    from litgpt.utils import chunked_cross_entropy
    from memtui.engine.trace.analysis import summarize
    from memtui.engine.trace.cuda_dropout import cuda_dropout
    from memtui.engine.trace.cuda_sdpa import cuda_sdpa
    from memtui.engine.trace.fake_step import quiet_libraries, watch_model
    from memtui.engine.trace.tracker import MemoryTracker

    tracker = MemoryTracker()
    with quiet_libraries(), FakeTensorMode(allow_non_fake_inputs=True):
        config = Config.from_name(name, lora_r=lora_rank, lora_alpha=16, lora_dropout=0.05, lora_query=True,
                                  lora_key=False, lora_value=True, lora_projection=False, lora_mlp=False,
                                  lora_head=False)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # fabric.init_module under bf16-true
        model = GPT(config)
        torch.set_default_dtype(default)
        mark_only_lora_as_trainable(model)
        model.train()
        watch_model(tracker, model, set())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, foreach=True)
        model.max_seq_length = seq_len  # fit(): the rope cache rebuilt for the longest sample
        with cuda_sdpa(), cuda_dropout(), tracker:
            input_ids = torch.randint(0, config.padded_vocab_size, (batch_size, seq_len))
            targets = input_ids.clone()
            for step in (1, 2):
                tracker.step = step
                for _micro in range(micro_batches):
                    tracker.mark("forward")
                    torch.set_default_dtype(torch.bfloat16)  # HalfPrecision.forward_context
                    logits = model(input_ids, lm_head_chunk_size=128)
                    torch.set_default_dtype(default)
                    logits[-1] = logits[-1][..., :-1, :]
                    tracker.mark("loss")
                    loss = chunked_cross_entropy(logits, targets[..., 1:])
                    tracker.mark("backward")
                    (loss / micro_batches).backward()
                tracker.mark("optimizer")
                optimizer.step()
                optimizer.zero_grad()
        tracker.detach_finalizers()
    return summarize(tracker.log).peak_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--litgpt", type=Path, required=True, help="a LitGPT checkout (26857050f and 00af8b0d9 were traced)")
    parser.add_argument("name", help="a LitGPT model name (Config.from_name), e.g. Llama-2-7b-hf")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        _package(args.litgpt, Path(folder))
        sys.path.insert(0, folder)
        peak = trace_litgpt(args.name, args.batch_size, args.seq_len, args.lora_rank)
    print(f"{args.name} batch {args.batch_size} x {args.seq_len}, LoRA rank {args.lora_rank}: "
          f"tensor peak {peak / 1e9:.3f} GB ({peak:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
