"""What each option does, what it costs and when to reach for it: the planner's teaching text.

`summary` is the one line shown beside the option; the rest is the longer
explainer behind `?` / F1. Numbers come from the lecture notes and papers
collected in shared/reference/facts.md; the wording is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

from memtui.engine.model.options import OPTIONS


@dataclass(frozen=True)
class Explainer:
    key: str
    title: str
    summary: str
    what: str
    cost: str
    when: str

    def markdown(self) -> str:
        return (
            f"# {self.title}\n\n*{self.summary}*\n\n"
            f"## What it does\n\n{self.what}\n\n"
            f"## What it costs\n\n{self.cost}\n\n"
            f"## When to use it\n\n{self.when}\n"
        )


_EXPLAINERS = [
    # ---- model & hardware -------------------------------------------------
    Explainer(
        "model", "Model",
        "What you train; its size N drives all.",
        "Picks the architecture: layers, hidden size, vocabulary, attention heads. Every "
        "parameter costs memory several times over during training: once as a weight, once "
        "as a gradient and once or twice more inside the optimizer. Without any optimization "
        "that is 16 bytes per parameter (N) before a single activation is stored, so an 8B "
        "model needs about 128 GB just for its model states, more than an 80 GB GPU holds.\n\n"
        "Pick a preset, type in the list to search it, or give the path to a Hugging Face "
        "`config.json` (or the folder holding one) to plan for your own checkpoint.",
        "Bigger models are measurably better but grow memory linearly in N; the vocabulary "
        "size also matters, because the logits over a 128k-token vocabulary are often the "
        "single largest activation.",
        "Start from the model you want to train, then pick the optimizations that make it fit. "
        "If nothing does, a smaller sibling of the same family is the honest answer.",
    ),
    Explainer(
        "gpu", "GPU",
        "The card; its memory is the budget.",
        "Sets the capacity the budget is checked against: the total memory the driver reports "
        "(what nvidia-smi shows, a little less than the marketing number). When memtui finds a "
        "GPU on this machine it starts with that one and its real capacity. The card also decides "
        "whether bf16 is available (Ampere, compute capability 8.0, and newer).",
        "None in itself; cards without bf16 fall back to fp16, which needs loss scaling.",
        "Choose the card you have, or compare cards to see which one a job needs.",
    ),
    Explainer(
        "gpus", "GPU count",
        "Total GPUs; DP ranks = GPUs / (TP×PP).",
        "How many GPUs share the job. GPUs not used for tensor or pipeline parallelism become "
        "data-parallel ranks: each processes its own micro-batch with a full copy of the model. "
        "Plain data parallelism does not reduce memory per GPU at all; it is ZeRO/FSDP that turns "
        "extra ranks into memory savings by sharding the model states across them.",
        "More GPUs cost money, and sharding adds communication: gathering weights and reducing "
        "gradients every step.",
        "Raise it together with ZeRO, tensor or pipeline parallelism when one card is not enough.",
    ),
    # ---- workload ---------------------------------------------------------
    Explainer(
        "batch_size", "Batch size",
        "Sequences per GPU in each step.",
        "The micro-batch each GPU processes in one forward and backward pass. Activations grow "
        "linearly with it; weights, gradients and optimizer states do not change.",
        "Smaller micro-batches use the GPU less efficiently. Gradient accumulation over several "
        "micro-batches gives the same effective batch without the memory.",
        "Use the largest micro-batch that fits, and reach a larger effective batch by accumulating "
        "gradients.",
    ),
    Explainer(
        "seq_len", "Sequence length",
        "Tokens per sequence; grows activations.",
        "How many tokens each sequence holds. Most activations grow linearly with it; with eager "
        "attention the scores grow with its square (s x s per head), which is what long contexts "
        "run into first.",
        "Shorter sequences train on less context. Models with learned position embeddings "
        "(GPT-2) cannot go past the length they were built for.",
        "Match your data. For long contexts, combine flash attention and checkpointing.",
    ),
    # ---- precision & optimizer --------------------------------------------
    Explainer(
        "precision", "Precision",
        "Number format of weights and math.",
        "- **32-true**: everything in fp32, 4 bytes per number. With AdamW that is the 16 bytes per "
        "parameter baseline.\n"
        "- **16-mixed / bf16-mixed** (autocast): weights, gradients and optimizer states stay in fp32; "
        "the math and the saved activations run in 16 bits, so activations halve, but autocast keeps "
        "16-bit copies of the weights while the forward needs them. Model states stay at 16 bytes/param.\n"
        "- **16-true / bf16-true**: weights and gradients stored in 16 bits too: 2 + 2 bytes, and "
        "AdamW's two states in 16 bits, 8 bytes per parameter in all.\n\n"
        "fp16 has a small range (about +/-65,504) and needs loss scaling; bf16 keeps fp32's range "
        "with less precision and needs an Ampere or newer GPU.",
        "16-bit math is faster on tensor cores. Pure 16-bit weights lose small updates to rounding "
        "over long runs; an fp32 master copy (next option) fixes that for 12 more bytes per parameter.",
        "bf16-mixed is the safe default for fine-tuning; bf16-true when memory is tight; "
        "bf16-true with master weights for large pre-training runs, as Megatron and DeepSpeed do.",
    ),
    Explainer(
        "master_weights", "Master weights",
        "fp32 weight copy inside the optimizer.",
        "With 16-true or bf16-true, the optimizer keeps its own fp32 copy of every weight and "
        "fp32 moments, applies the update there and copies the result back to the 16-bit "
        "weights. This is the classic mixed-precision recipe: 2 (weights) + 2 (gradients) + "
        "4 (master) + 4 + 4 (Adam moments) = 16 bytes per parameter.",
        "Back to 16 bytes/param of model states, plus fp32 copies of the gradients during the step. "
        "In exchange, updates too small for 16 bits are not lost.",
        "Long pre-training runs, combined with ZeRO so the 12 bytes of fp32 state are sharded.",
    ),
    Explainer(
        "optimizer", "Optimizer",
        "Update rule; sets the state per param.",
        "- **adamw**: two moments per parameter (8 bytes in fp32).\n"
        "- **adamw-8bit**: the same two moments stored block-wise in 8 bits, about 2 bytes "
        "per parameter instead of 8 (bitsandbytes).\n"
        "- **sgd**: no state. **sgd-momentum**, **lion**: one state.\n"
        "- **adafactor**: factors the second moment of each matrix into a row and a column vector, "
        "almost no state.\n"
        "- **galore-adamw**: projects each gradient matrix to a low rank and keeps Adam's moments "
        "in that small space (see GaLore rank).\n"
        "- **paged-adamw-8bit**, **paged-adamw** (bitsandbytes PagedAdamW8bit / PagedAdamW32bit): "
        "8-bit or fp32 moments, and those of every tensor of 100,000 values or more live in CUDA "
        "unified memory (cudaMallocManaged), not in PyTorch's caching allocator. Smaller tensors "
        "(LoRA adapters of rank 16 on a 4096-wide model among them), tensors under 4096 values "
        "(fp32 moments) and the 8-bit absmax stay ordinary allocations.\n\n"
        "What memtui shows for paged states: they are not in the tensor peak "
        "(torch.cuda.max_memory_allocated does not see them); they are in the device peak and the "
        "optimizer states (nvidia-smi shows them while resident: bitsandbytes prefetches them to "
        "the GPU for each step) as far as the rest of the step leaves room on the card. The rest is "
        "paged out to host memory by the driver instead of running out of memory, so whether a run "
        "fits is decided without them; the budget's \"paged (unified memory)\" row and `paged_bytes` / "
        "`paged_evicted_bytes` in the JSON give both figures.",
        "8-bit states track 32-bit Adam closely in published results; SGD and Adafactor can converge "
        "differently and may need tuning; GaLore spends time on periodic projections. Paged states "
        "paged out to the host cost a transfer each step (PCIe bandwidth), nothing when they stay resident.",
        "adamw-8bit is the easy win for fine-tuning; Adafactor or GaLore when optimizer state is "
        "the wall and you can afford to tune; a paged optimizer when spikes (long sequences) would "
        "otherwise run out of memory, at the price of slow steps when they do.",
    ),
    Explainer(
        "optimizer_impl", "Optimizer implementation",
        "How the step runs: foreach/fused/loop.",
        "The same math, three implementations. **foreach** batches each operation over all "
        "tensors of a group and materialises temporaries the size of a whole state group; "
        "**fused** does the update in one kernel without temporaries; **for-loop** walks the "
        "tensors one by one with temporaries the size of the largest one.",
        "for-loop is the slowest; fused and foreach are fast. Only the step's transient peak "
        "differs, not the steady state.",
        "fused when your optimizer supports it; it removes a spike that often sets the peak.",
    ),
    Explainer(
        "galore_rank", "GaLore rank",
        "Gradient projection rank (GaLore).",
        "GaLore keeps each weight matrix full-rank but projects its gradient onto r directions "
        "before the optimizer sees it, so Adam's moments are max(m, n) x r instead of m x n. "
        "The projection is refreshed every few hundred steps.",
        "Lower ranks save more and approximate the gradient more coarsely; refreshing the projection "
        "costs an SVD per matrix now and then.",
        "Pre-training or full fine-tuning on a small card: the paper trains a 7B model on one 24 GB "
        "GPU with 8-bit GaLore. It does not combine with LoRA.",
    ),
    # ---- memory savers ----------------------------------------------------
    Explainer(
        "checkpointing", "Activation checkpointing",
        "Recompute activations, don't store.",
        "Normally every layer stores what its backward pass needs. With **full** checkpointing "
        "each layer stores only its input and recomputes the rest during backward; **selective** "
        "keeps the matmul and attention outputs and recomputes only the cheap pointwise work (norms, RoPE, activations). "
        "**selective-op** is torchtitan's op-level policy (`selective_ac_option = \"op\"`): it keeps the attention "
        "outputs, biased matmuls (addmm) and eager attention's bmm, but only every other plain matmul (mm) of each "
        "layer, the 1st, 3rd, ... in the order they run (LoRA's adapter matmuls count too); the rest is recomputed.",
        "Full recomputation adds roughly one extra forward pass, about a third more compute per step. "
        "Selective costs a few percent; selective-op also reruns half the layer's matmuls.",
        "Whenever activations dominate the bar: long sequences, big micro-batches. Often the "
        "single biggest switch for fine-tuning on one card.",
    ),
    Explainer(
        "attention", "Attention kernel",
        "flash: no s×s score matrix to keep.",
        "**eager** attention computes and keeps the full s x s score matrix per head for the "
        "backward pass. **flash** (PyTorch SDPA's fused kernel, FlashAttention) works in tiles "
        "and recomputes scores in backward, so its memory grows linearly with the sequence.",
        "None in practice: flash is also faster. Some exotic attention variants need eager.",
        "Always, unless your model needs eager. The longer the sequence, the more it saves.",
    ),
    Explainer(
        "offload", "CPU offload",
        "Keep states (and weights) on the CPU.",
        "ZeRO-Offload moves the optimizer states, and the step itself, to the CPU; gradients are "
        "streamed out as they are reduced. **optimizer+params** (ZeRO-Infinity style, needs ZeRO-3) "
        "also keeps the weights on the CPU and brings each layer in only while it computes.",
        "PCIe transfers every step and a CPU-side optimizer step: much slower. Needs plenty of "
        "host RAM.",
        "When a model is just too large for the GPUs you have and speed matters less than fitting.",
    ),
    # ---- parallelism ------------------------------------------------------
    Explainer(
        "zero", "ZeRO stage",
        "Shard states across data-parallel GPUs.",
        "Data parallelism keeps a full copy of everything on every GPU. ZeRO removes the "
        "redundancy: **1** shards the optimizer states, **2** also the gradients, **3** (FSDP) "
        "also the weights, gathering each layer only while it is used. With N_d ranks, "
        "mixed-precision Adam's 16 bytes per parameter become 4 + 12/N_d, 2 + 14/N_d and 16/N_d.",
        "More communication, growing with the stage; ZeRO-3 gathers weights in every forward and "
        "backward. With a single GPU it changes nothing.",
        "Any multi-GPU job whose model states do not fit: stage 1 or 2 first, 3 when weights alone "
        "are too big.",
    ),
    Explainer(
        "tp", "Tensor parallel",
        "Split each layer's matrices on GPUs.",
        "Each GPU holds a slice of every weight matrix and computes its part of each matmul; "
        "with sequence parallelism the activations are split too. Weights, gradients, states and "
        "activations all divide by the TP degree.",
        "Two all-reduces (or all-gather + reduce-scatter) per layer in both directions; it needs "
        "fast links, so keep it inside a node. The degree must divide the attention heads.",
        "Large models whose layers are too big for one card, typically TP 8 within an 8-GPU node.",
    ),
    Explainer(
        "pp", "Pipeline parallel",
        "Split the layers into GPU stages.",
        "Each GPU holds a contiguous block of layers (the first also the embedding, the last the head "
        "and loss); the batch is split into micro-batches (--microbatches) that flow through the stages. "
        "GPipe runs every forward before any backward, so each stage holds every micro-batch's activations; "
        "1F1B holds at most PP - rank on rank r (the first stage the most); interleaved 1F1B puts two "
        "smaller stages on each GPU. The budget is the rank with the largest peak; every rank's is listed.",
        "Idle time at the start and end of each step (the pipeline bubble), reduced by more "
        "micro-batches; uneven stages waste memory on the largest one.",
        "Across nodes, when tensor parallelism alone is not enough.",
    ),
    # ---- adapters & quantization ------------------------------------------
    Explainer(
        "lora_rank", "LoRA rank",
        "Train adapters only (0 = all weights).",
        "LoRA freezes the pretrained weights and learns a low-rank update B x A beside chosen "
        "matrices: r x (d_in + d_out) parameters each, usually well under 1% of the model. The "
        "frozen base needs no gradients and no optimizer state, so model states fall from 16 to "
        "about 4 bytes per parameter in fp32, 2 in 16 bits.",
        "Adapters are less expressive than full fine-tuning; quality depends on the rank and the "
        "targets. Activations are still needed for the backward through the base.",
        "Most fine-tuning on limited hardware. Ranks 8-64 are typical.",
    ),
    Explainer(
        "lora_targets", "LoRA targets",
        "Linear layers that get adapters.",
        "A comma list of layer names (q_proj, v_proj, ...) or all-linear for every linear layer "
        "in the decoder blocks. More targets mean more trainable parameters and more adapter "
        "activations, usually better quality.\n\n"
        "**lm_head** in the list (`all-linear,lm_head`, LitGPT's `lora_head: true`, peft's "
        "`target_modules=[..., \"lm_head\"]`) adapts the output head too: A is r x hidden, B is vocab x r "
        "(2M parameters at r 16 on a 128k vocabulary), with their gradients and optimizer states. Its "
        "forward adds a second vocabulary-wide product: lora_B's output, its scaled copy and the sum, each "
        "the size of the logits (fp32 with fp32 adapters, then cast back to the head's dtype), and autograd "
        "keeps lora_A's input (the final norm's output in the adapter's dtype, or its dropped-out copy and "
        "the one-byte mask with dropout) and the r-wide intermediate for backward. With tied embeddings "
        "the head's frozen weight stays the embedding's, and the adapter is the head's alone: peft's "
        "default `ensure_weight_tying=False` gives the embedding none (it warns), so the embedding's "
        "output is unchanged. Not with --loss fused-linear (its kernel takes the head's weight alone); "
        "on one GPU.",
        "More targets: more adapter memory and compute, still small next to the base; lm_head adds "
        "about two more logits-sized tensors at the loss.",
        "all-linear is the common modern choice (QLoRA's paper uses it); q_proj,v_proj was the "
        "original LoRA setting.",
    ),
    Explainer(
        "quant", "Quantized base",
        "Frozen base in 8 or 4 bits (QLoRA).",
        "The frozen base weights are stored in **int8** (1 byte) or **nf4** (4-bit NormalFloat, "
        "about half a byte with double-quantized scales) and dequantized layer by layer for the "
        "math, which runs in 16 bits. Only LoRA adapters train. QLoRA fine-tunes a 65B model on one "
        "48 GB GPU, against more than 780 GB for 16-bit full fine-tuning.",
        "Dequantization slows each step; 4-bit storage loses a little precision in the base, which "
        "adapters largely recover in published results. Needs LoRA and 16-bit compute.",
        "Fine-tuning a model whose 16-bit weights alone do not fit the card.",
    ),
    Explainer(
        "grad_accum", "Gradient accumulation",
        "Micro-batches per optimizer step.",
        "The step runs N forwards and backwards and adds their gradients before stepping the optimizer "
        "once. From the second micro-batch on the whole set of gradients is alive through forward and "
        "backward (DDP under no_sync keeps them unsharded; FSDP2 keeps its shards), so the peak can be "
        "the second micro-batch's backward rather than the first's. `memtui trace` runs up to 4 "
        "micro-batches per step (the rest are identical).",
        "N times the compute per optimizer step; the full gradients for the whole step.",
        "When the batch you want does not fit: shrink --batch-size and raise this. Not with "
        "--optimizer-in-backward.",
    ),
    Explainer(
        "optimizer_in_backward", "Optimizer in backward",
        "Step each weight as its gradient lands.",
        "torchtune's optimizer_in_bwd: one optimizer per parameter, stepped in a post-accumulate-grad "
        "hook during backward, the gradient set to None right after. A full set of gradients never "
        "exists: at most one parameter's gradient and its step's temporaries (a tied embedding's "
        "gradient waits for the embedding's backward). The step after backward has nothing left to do.",
        "No gradient accumulation, no gradient clipping over the whole model, no GradScaler, no "
        "ZeRO/FSDP sharding of the optimizer; each parameter's step is a small kernel launch.",
        "Full fine-tuning on one GPU where the gradients tip the step over the card.",
    ),
    Explainer(
        "lora_dropout", "LoRA dropout",
        "Adapter input dropout; keeps a copy.",
        "peft's `lora_dropout`: each adapted layer runs `lora_B(lora_A(dropout(x)))`, with an "
        "nn.Dropout of probability P on the adapter's input (nn.Identity at 0, the default). While "
        "training, autograd keeps the dropped-out input for lora_A's weight gradient (where 0 kept the "
        "input the layer already had: after autocast's cast, the 16-bit copy) and, where the input "
        "needs a gradient, the one-byte mask of CUDA's fused dropout kernel. Per adapted layer and token "
        "that is the layer's input width again, in the adapter's dtype, plus a byte per element.",
        "A second copy of every adapted layer's input, saved until backward (all-linear adapts most "
        "layers' inputs); with checkpointing only for the layer being recomputed.",
        "Regularization on small fine-tuning sets (0.05-0.1 is common: QLoRA, LitGPT, torchtune, "
        "Axolotl). At 0 peft skips it entirely.",
    ),
    Explainer(
        "lora_dtype", "LoRA dtype",
        "fp32 adapters (peft) or model dtype.",
        "**fp32** is peft's default (`autocast_adapter_dtype=True`): 16-bit adapters are upcast to fp32, "
        "so their weights, gradients and optimizer states take 4 bytes each, and peft's "
        "`Linear.forward` casts each adapted layer's input to the adapter's dtype "
        "(`x = self._cast_input_dtype(x, lora_A.weight.dtype)`): on a bf16 model that is an fp32 copy "
        "of the input per adapted layer, and without autocast the adapter's matmuls run in fp32 too. "
        "Under autocast (-mixed) the matmuls still run in 16 bits; there the model's weights are fp32 "
        "anyway and both settings are the same.\n\n"
        "**compute** keeps the adapters in the dtype of the layers they adapt, as LitGPT and torchtune "
        "do (peft's `autocast_adapter_dtype=False`): bf16 under bf16-true, the compute dtype on a "
        "quantized base, fp32 under -mixed. No input copy, 2-byte adapter states.",
        "compute: adapter updates in 16 bits (their optimizer states too, without master weights).",
        "16-bit (-true) or quantized training where each adapted layer's fp32 input copy matters, or to "
        "match LitGPT's or torchtune's memory.",
    ),
    Explainer(
        "fsdp_param_dtype", "FSDP dtype",
        "What FSDP2 gathers the weights in.",
        "**stored** (memtui's default) gathers each layer's parameters in the dtype they are stored in, "
        "fp32 under bf16-mixed, and torch.autocast casts them for each matmul: autograd keeps each "
        "layer's bf16 weight copies and the fp32 residual stream for backward.\n\n"
        "**compute** is FSDP2's `MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`, as "
        "torchtitan applies it: the all-gather casts the shards to bf16, the layers run on bf16 "
        "parameters with no autocast (activations as bf16-true's), and each layer's bf16 gradients are "
        "copied into an fp32 reduce-scatter input, so the shards, their gradients and the optimizer "
        "states stay fp32. The gradients' reduce-scatter output lives in the reduce-scatter stream's "
        "own allocator pool until zero_grad.",
        "None in the model states; the gathered layers and the activations take half the bytes. The "
        "gradients are reduced in fp32 (as precise as stored).",
        "FSDP2 (ZeRO-2/3 across several GPUs) with bf16-mixed, to plan or match a torchtitan run.",
    ),
    Explainer(
        "float8", "Float8",
        "Float8 matmuls in the layers (torchao).",
        "**tensorwise** swaps every linear layer of the decoder (not the output head) for torchao's "
        "`Float8Linear`, as torchtitan's float8 converter does: each matmul casts its input and weight to "
        "float8 with one dynamic scale per tensor and runs `torch._scaled_mm`. Autograd still keeps the "
        "bf16 input and weight for backward (not their float8 copies), and backward casts the output "
        "gradient (twice), the weight and the input again. Each cast makes fp32 copies of the tensor on "
        "its way to float8 (`x.float() * scale`, clamped): temporaries of four to eight bytes per element "
        "of the largest activations and weights. Under torchtitan's op-level selective checkpointing the "
        "`_scaled_mm` outputs are saved like the other matmuls'. FSDP2's float8 all-gather is not modelled "
        "(the layers are gathered in bf16).",
        "Nothing saved: the activations are those of bf16 training; the casts add temporaries at each "
        "matmul, most in backward. The gain is speed (float8 tensor cores, sm_89 or later), not memory.",
        "To plan or match a torchtitan run with `--model.converters float8` on H100-class GPUs.",
    ),
    Explainer(
        "modeling", "Model code",
        "Whose model code runs the step.",
        "**hf** (memtui's default) replays transformers' model, with peft's LoRA layers.\n\n"
        "**litgpt** replays LitGPT's GPT (litgpt/model.py, litgpt/lora.py): one fused qkv projection whose "
        "split views are q, k and v, so attention's saved v keeps the whole qkv output; RoPE in fp32; grouped "
        "keys and values repeated to every head; LoRAQKVLinear zero-pads its adapters' output into the qkv "
        "width with index_copy_, which keeps that output for backward. Modelled for untied Llama-shaped models "
        "on one GPU, unquantized, with LitGPT's chunked head and loss.",
        "None in the model states; more activations than transformers' for the same options (about 4% on "
        "Llama 2 7B LoRA).",
        "To plan or match a LitGPT fine-tune (litgpt finetune_lora at bf16-true).",
    ),
    Explainer(
        "kbit_prep", "k-bit prep",
        "Unquantized weights to fp32 (peft).",
        "What most QLoRA tutorials, TRL and Axolotl call before adding the adapters: every 16-bit "
        "parameter that is not 4-bit, meaning the norms, the embeddings, the head (when not quantized), "
        "and the quantized layers' biases, is cast to **fp32** "
        "(int8 and 4-bit weights stay as they are). The fp32 embedding makes the hidden states fp32 "
        "from the first layer on: without autocast every norm, attention and residual runs in fp32 and "
        "each quantized layer casts its input back to 16 bits (bitsandbytes' compute dtype) and its "
        "output up to fp32.\n\n"
        "Checkpointing: peft's own default (`use_gradient_checkpointing=True`) also turns on gradient "
        "checkpointing and makes the embedding's output require a gradient. TRL and Axolotl pass their "
        "`gradient_checkpointing` setting instead, and so does memtui: `--checkpointing` decides (give "
        "`--checkpointing full` for peft's default); with checkpointing on, the input require-grads is "
        "modelled as transformers and peft apply it.\n\n"
        "bitsandbytes: memtui models 0.43.2 and later by default (0.50 here), whose 4-bit matmul keeps "
        "only the quantized weight for backward; `--bnb-version legacy` models the releases before "
        "(see its explainer). Quantized layers' "
        "biases are counted in fp32; bitsandbytes casts a 4-bit layer's bias back to 16 bits on its "
        "first forward (a few hundred kilobytes at most).",
        "The unquantized weights double in size (the embeddings and head of a 128k vocabulary: about "
        "2 GB more at 8B), and without autocast the activations between layers are fp32.",
        "When reproducing a TRL, Axolotl or tutorial QLoRA run (they call it by default). Only with "
        "--quant nf4 or int8.",
    ),
    Explainer(
        "bnb_version", "bitsandbytes release",
        "4-bit matmul before or after 0.43.2.",
        "**current** (0.43.2 and later): bitsandbytes' 4-bit matmul (MatMul4Bit) keeps only the "
        "quantized weight for backward; the gradient of its input needs nothing else.\n\n"
        "**legacy** (before 0.43.2: LitGPT pinned 0.42.0, the QLoRA paper ran 0.39): "
        "`MatMul4Bit.forward` also kept its input, `if any(ctx.needs_input_grad[:2]): ctx.tensors = (A, B)` "
        "(bitsandbytes/autograd/_functions.py; removed by PR #1270, commit 9e75374, \"fix QLoRA mem bug: "
        "delete useless buffered activation\", released in 0.43.2). A is the layer's input in the compute "
        "dtype (Linear4bit casts it first), kept wherever it needs a gradient: every 4-bit layer after the "
        "first adapted one. It is a ctx attribute, not a saved tensor, so backward never releases it and no "
        "saved-tensor hook sees it: it lives until the step's graph is freed (the loss dropped after "
        "backward), and activation checkpointing does not drop it. Where the input was saved anyway (lora_A "
        "keeps the same 16-bit tensor when the adapters are in the compute dtype without dropout) it costs "
        "nothing until backward, then is held to its end instead of freed layer by layer.",
        "legacy: a 16-bit copy of each quantized layer's input per token, held through backward; with "
        "checkpointing, every layer's, as if it were off for them.",
        "To compare with QLoRA figures measured before mid-2024 (the QLoRA paper, LitGPT's tables). New "
        "runs use current. Only nf4 (the int8 path is not modelled), on one GPU.",
    ),
    Explainer(
        "compile", "torch.compile",
        "torch.compile of each decoder layer.",
        "torch.compile of each decoder layer, as torchtune (compile: True) and torchtitan (training.compile) "
        "do. AOTAutograd traces the layer's forward and backward as one graph and inductor's min-cut partitioner "
        "splits it: matmul and attention outputs are kept for backward, cheap pointwise work (norms, RoPE, "
        "SiLU, casts) is recomputed there instead of saved. Inductor fuses pointwise ops into one kernel, so "
        "their intermediates never exist.\n\n"
        "`memtui trace` runs exactly that on fake tensors: each layer through AOTAutograd with inductor's "
        "decompositions and partitioner (no code generated), the two graphs run op by op, and an op inductor "
        "would fuse allocates nothing unless its value is saved, returned, or read by a matmul or attention "
        "kernel. The loss is compiled too, as torchtune and torchtitan compile it: torchtune's chunked "
        "cross-entropy one chunk at a time, transformers' loss as one graph; it saves the logits in their "
        "dtype and two fp32 values per row for backward instead of fp32 log-probabilities (LitGPT's chunked "
        "loss and Liger's fused kernel stay eager; `Eager loss` keeps any loss eager, as torchtune's "
        "full-finetune recipes and torchtitan without \"loss\" in compile.components do). Not modelled: buffers inductor reuses in place, its "
        "workspaces, graph breaks (a layer is one graph). With checkpointing the checkpoint runs around "
        "the compiled layer.\n\n"
        "The estimate records each layer's eager op program and applies the same mechanism by op kind: "
        "matmuls and attention are kernels whose inputs and outputs exist, reductions are never recomputed, "
        "pointwise chains are fused, and what backward needs is saved at the minimum cut (max-flow over the "
        "layer's tensors, as the partitioner does); backward's kernels free what they read at its last use. "
        "Llama-like families (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo 2, Mixtral, Qwen3-MoE; checked "
        "against the trace on all but Qwen3 and Gemma 1, with LoRA and full checkpointing) are modelled; "
        "GPT-2, DeepSeek and gpt-oss layers, eager attention, --quant, selective "
        "checkpointing and tensor parallelism get eager figures (an upper bound), with "
        "a note (llama-3.2-1b, bf16-true, batch 2 x 1024 tokens: 1.68 GiB less than eager, the estimate "
        "within 0.001% of the trace). A live run compiles for real on CUDA; on a CPU it skips compile and runs eagerly, "
        "with a note (inductor's CPU code is not what a GPU runs).",
        "Compile time at the first step (about a minute for a 7B model's layer); nothing at run time.",
        "When reproducing a torchtune or torchtitan run with compile on. The trace compiles on one GPU without "
        "--quant or selective checkpointing; otherwise it traces the step eagerly and says so.",
    ),
    Explainer(
        "activation_offload", "Activation offloading",
        "Saved activations wait in CPU memory.",
        "torchtune's OffloadActivations: saved-tensor hooks around the decoder's forward copy every tensor "
        "autograd saves for backward to pinned CPU memory and keep only the copy; backward copies each back "
        "to the GPU when its node runs, and frees it when the node is done. What stays on the GPU: tensors "
        "under 1024 bytes, Parameters saved as themselves (norm weights; GPT-2's Conv1D weights), and "
        "everything the head and the loss save (torchtune turns the hooks off for the output layer, and the "
        "loss runs outside them). A linear layer's weight is saved as its transpose, a view that is no "
        "Parameter, so it is copied out and back too: backward briefly holds a copy of each weight.\n\n"
        "With activation checkpointing (torchtune requires it), the checkpoint's own hooks are innermost inside "
        "each layer: only what the checkpoint saves for itself, the layer's input, goes to the CPU, and the "
        "recompute in backward runs on the GPU. Without checkpointing every saved activation goes.\n\n"
        "With torch.compile (torchtune compiles each layer inside these hooks) a layer is one autograd node "
        "that saves what inductor's partitioner chose: those tensors are what goes to the CPU (the weights it "
        "saves are the Parameters themselves, which stay), all of them come back when the layer's backward "
        "starts, and each is freed at its last use in the compiled backward.\n\n"
        "memtui runs torchtune's single-stream path; its default use_streams=True overlaps the copies on a "
        "second stream and keeps up to 5 recently offloaded tensors, and the previous node's copies, on the GPU "
        "a little longer (not modelled; compiled, a node is a whole layer). The pinned host memory is reported apart (\"Offloaded to CPU\", "
        "`offloaded_activation_bytes`): it is not GPU memory. In a live run on a CPU the copies are made "
        "within the same memory, so the hook is a no-op in effect there.",
        "Every saved activation crosses PCIe twice: slower steps unless the copies overlap the compute. "
        "Host RAM: pinned memory the size of what the layers save.",
        "Long sequences where the saved activations (or, with checkpointing, the layer inputs) are what the "
        "card cannot hold.",
    ),
    # ---- budget components ------------------------------------------------
    Explainer(
        "weights", "Weights",
        "The parameters as stored on this GPU.",
        "N parameters times the bytes of their format: 4 in fp32, 2 in 16 bits, 1 in int8, about "
        "0.5 in nf4, divided by tensor/pipeline/ZeRO-3 sharding. Autocast's temporary 16-bit "
        "copies are counted with the activations.",
        "-", "Shrink with 16-bit precision, quantization (with LoRA), ZeRO-3 or offload.",
    ),
    Explainer(
        "gradients", "Gradients",
        "One per trainable parameter.",
        "Backward produces a gradient for every trainable parameter. Frozen parameters (LoRA, "
        "quantized bases) have none.",
        "-", "Shrink with 16-bit precision, LoRA, ZeRO-2/3.",
    ),
    Explainer(
        "optimizer_states", "Optimizer states",
        "What the optimizer keeps between steps.",
        "AdamW keeps two moments per trainable parameter (8 bytes in fp32), plus a 4-byte "
        "master copy when master weights are on. Usually the largest model state.",
        "-", "Shrink with 8-bit or factored optimizers, GaLore, LoRA, ZeRO-1+ or offload.",
    ),
    Explainer(
        "activations", "Activations",
        "Saved by the forward for the backward.",
        "Every layer saves inputs and intermediate results the backward needs: they scale with "
        "batch x sequence x hidden size x layers, and eager attention adds s x s scores per head. "
        "The logits over a large vocabulary are often the single biggest one.",
        "-", "Shrink with checkpointing, flash attention, a smaller micro-batch or sequence, TP/SP.",
    ),
    Explainer(
        "temporary", "Temporaries",
        "Short-lived buffers at the peak moment.",
        "Transient tensors that exist for milliseconds: the loss's fp32 logits and softmax, a "
        "layer's backward workspace, the optimizer implementation's temporaries, cuBLAS workspace. "
        "They set the peak because they come on top of everything else.",
        "-", "A fused optimizer removes the step's temporaries; checkpointing does not help here.",
    ),
    Explainer(
        "overhead", "CUDA overhead",
        "CUDA context + allocator slack.",
        "The CUDA context and kernels (about 300-500 MB with lazy loading), plus memory PyTorch's "
        "caching allocator reserved but is not using at the peak (fragmentation, rounding to "
        "blocks). This is why nvidia-smi shows more than torch.cuda.max_memory_allocated.",
        "-", "Leave headroom for it; it is not optional.",
    ),
    # ---- the head and loss -------------------------------------------------
    Explainer(
        "loss", "Loss",
        "fp32 logits, in chunks, or none at all.",
        "**standard** is what Hugging Face models do: the head writes the logits (batch x sequence x "
        "vocabulary) in the compute dtype, the loss upcasts them to fp32 and keeps fp32 log-probabilities "
        "for backward. With a 128k vocabulary that is often the largest tensor of the step.\n\n"
        "**chunked** is torchtune's CEWithChunkedOutputLoss: the head runs on N chunks of the sequence "
        "(`Loss chunks`, 8) and each chunk is upcast to fp32 on its own, so only one chunk's fp32 copy "
        "exists at a time; the compute-dtype logits and the saved log-probabilities still add up to the "
        "whole sequence.\n\n"
        "**fused-linear** is Liger's fused linear cross-entropy (Apple's cut-cross-entropy is alike): the "
        "head is fused into the loss, which computes the gradients of the hidden states and of the head "
        "weight during forward, chunk by chunk; the full logits never exist.",
        "chunked: nothing measurable. fused-linear: the gradients of the hidden states (one per token) "
        "and of the head weight (vocabulary x hidden, fp32) are held from the loss to backward.",
        "Long sequences and large vocabularies, where the logits dominate. fused-linear saves the most; "
        "on CUDA memtui's live run uses liger-kernel or cut-cross-entropy when installed.",
    ),
    Explainer(
        "loss_dtype", "Loss dtype",
        "The chunked loss upcast to fp32, or not.",
        "**fp32** is torchtune's chunked loss: each chunk of logits is upcast to fp32 inside the "
        "cross-entropy, and the log-probabilities kept for backward are fp32 (4 bytes per vocabulary "
        "entry and token).\n\n"
        "**compute** is LitGPT's fine-tuning step (`litgpt/finetune/lora.py` with "
        "`lm_head_chunk_size=128`, `chunked_cross_entropy` in `litgpt/utils.py`): the head's chunks "
        "stay in the compute dtype and the cross-entropy runs on them as they are (reduction none, "
        "summed), so the log-probabilities and their gradients are 16-bit under bf16-true (autocast "
        "still runs log_softmax in fp32 under -mixed). LitGPT shifts by slicing the last chunk of "
        "logits, and its loop keeps the list of logits referenced until backward is done; memtui "
        "models both. LitGPT's chunked head returns before soft-capping, so a model with "
        "final_logit_softcapping is modelled without the cap. Set `Loss chunks` to the sequence "
        "length / 128 to match LitGPT's 128-token chunks.",
        "compute: the loss in 16 bits (LitGPT's own choice); the logits stay alive through backward.",
        "To match LitGPT's fine-tuning memory (its `--from` mapping sets it with a LoRA config).",
    ),
    Explainer(
        "logits_upcast", "Logits upcast",
        "Logits made fp32 in the loss or model.",
        "**loss** is transformers: the model returns the head's logits in the compute dtype and "
        "ForCausalLMLoss upcasts them to fp32 inside the loss (inside the compiled loss under Compile, "
        "which then keeps the 16-bit logits for backward).\n\n"
        "**model** is torchtune's TransformerDecoder (`self.output(h).float()`, "
        "torchtune/modules/transformer.py): the 16-bit logits are a temporary, the model returns fp32 "
        "logits and the loss takes them as they are. Eagerly that is lighter at the loss (no 16-bit copy "
        "beside the fp32 ones); compiled, the loss keeps the fp32 logits (4 bytes per vocabulary entry and "
        "token) for backward and hands back an fp32 gradient, which the upcast's backward casts down. "
        "Only the standard loss: torchtune's chunked output stays in the compute dtype and "
        "CEWithChunkedOutputLoss upcasts each chunk itself.",
        "model: compiled, twice the saved logits of loss; eager, one 16-bit copy fewer at the loss.",
        "To match torchtune's recipes with a non-chunked loss (its stack and `--from` mapping set it).",
    ),
    Explainer(
        "eager_loss", "Eager loss",
        "With Compile: the loss left eager.",
        "**off** (the default) compiles the loss with the layers, as torchtune's compile_loss and torchtitan's "
        "default compile.components do: the partitioner keeps the logits and two fp32 values per row for "
        "backward instead of fp32 log-probabilities.\n\n"
        "**on** compiles the decoder layers alone and runs the loss eagerly. torchtitan does that when "
        "compile.components leaves out \"loss\"; torchtune's full_finetune_single_device and "
        "full_finetune_distributed call `training.compile_loss(self._loss_fn)` without keeping its result, and "
        "for a whole-module loss (nn.CrossEntropyLoss) that result is the only compiled copy "
        "(torchtune/training/_compile.py compile_loss: `loss = torch.compile(loss)`), so their loss stays eager; "
        "the chunked loss's compute_cross_entropy is compiled in place either way.",
        "on: the eager loss's fp32 log-probabilities are kept for backward.",
        "To match a framework that compiles its layers but not its loss.",
    ),
]

_EXPLAINERS.append(Explainer(
    "stack", "Stack",
    "A training framework's defaults.",
    "Sets the options a training framework decides when you leave them unset: the Hugging Face Trainer "
    "(hf), TRL's SFTTrainer (trl), torchtune, LitGPT, PyTorch Lightning, torchtitan and Axolotl. Each value "
    "comes from the framework's own code, cited below for the stack chosen (all of them in docs/stacks.md). "
    "Options changed afterwards override it; choosing another stack replaces the options the previous one "
    "set, and none puts memtui's own defaults back. Where memtui approximates what a framework does, or "
    "cannot model it yet, a note says so when the stack is chosen.",
    "None in itself: it changes other options, whose costs are theirs (TRL turns checkpointing on, LitGPT "
    "accumulates 16 micro-batches, torchtitan starts at batch 8).",
    "When you train with one of these frameworks and want the budget to start where your run starts. Same "
    "as `--stack NAME` on the command line.",
))

EXPLAINERS: dict[str, Explainer] = {explainer.key: explainer for explainer in _EXPLAINERS}


def stack_explainer(stack: str) -> str:
    """The stack explainer, with the chosen stack's defaults and their sources (every stack's with none)."""
    from memtui.engine.model.stacks import stack_markdown, stacks_markdown

    table = stacks_markdown() if stack == "none" else stack_markdown(stack)
    return EXPLAINERS["stack"].markdown() + "\n" + table.replace("## ", "### ")

# The options' explainers in the registry's order (memtui.engine.model.options): this module keeps the texts.
OPTION_KEYS: tuple[str, ...] = tuple(option.explainer_key for option in OPTIONS.values())


def explainer_for(key: str) -> Explainer | None:
    return EXPLAINERS.get(key)


def summary(key: str) -> str:
    explainer = EXPLAINERS.get(key)
    return explainer.summary if explainer else ""


LADDER_INTRO = (
    "# The savings ladder\n\n"
    "Without any optimization, training with AdamW keeps 16 bytes per parameter before a single "
    "activation: a 4-byte weight, a 4-byte gradient and two 4-byte optimizer moments. The ladder "
    "starts there, with the current model, GPU, batch and sequence, and switches on the "
    "optimizations you chose one at a time, in a fixed order: precision and optimizer, then "
    "adapters and quantization, then parallelism and sharding, then what shrinks activations. "
    "Each row says what that step removed from the device peak. With everything combined, "
    "model states can reach 1-2 bytes per parameter.\n"
)

OVERVIEW = (
    "# Reading memtui\n\n"
    "memtui predicts what one training step needs on each GPU, component by component, and "
    "whether it fits.\n\n"
    "- **Left**: the model, the GPU and every option. Each has a one-line description; focus one "
    "and press `?` (or F1) for the full story. Bad values are refused in place, with the reason.\n"
    "- **Verdict and bar**: the device peak (what nvidia-smi would show) split into weights, "
    "gradients, optimizer states, activations, temporaries and CUDA overhead, against the GPU's "
    "capacity (the marker).\n"
    "- **Table and timeline**: GiB and share per component at the peak, and memory through the "
    "step: forward, loss, backward, optimizer.\n"
    "- **Savings ladder**: from the unoptimized 16 bytes per parameter to your configuration, one "
    "optimization at a time, with what each removed. Highlight a row and press `?` to read why.\n\n"
    "Keys: `ctrl+p` presets (models, GPUs, recipes), `p` pin and compare, `e` export Markdown and "
    "JSON, `t` light/dark theme, `q` quit. Tab moves between fields; the mouse works too.\n"
)
