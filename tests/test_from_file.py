"""`--from FILE`: a framework's training config read onto memtui's options, the same budget as the flags."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from memtui.cli import main
from memtui.engine.model.framework_configs import detect_format, preset_for_name, read_framework_config
from tests.test_cli import run_cli

DATA = Path(__file__).parent / "data" / "frameworks"

# Each example file, the flags that say the same, and the keys it has that memtui cannot express yet.
CASES = {
    "torchtune_llama3_2_1b_lora_single_device.yaml": (
        "torchtune",
        ["--model", "llama-3.2-1b", "--lora-rank", "64", "--lora-targets",
         "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj", "--batch-size", "4", "--precision", "bf16-true",
         "--checkpointing", "none", "--optimizer", "adamw", "--optimizer-impl", "fused", "--seq-len", "2048",
         "--grad-accum", "8", "--loss", "chunked", "--loss-chunks", "8", "--lora-dtype", "compute"],
        [],
    ),
    "torchtune_llama3_2_1b_lora_offload_paged.yaml": (
        "torchtune",
        ["--model", "llama-3.2-1b", "--lora-rank", "64", "--lora-targets",
         "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj", "--batch-size", "4", "--precision", "bf16-true",
         "--checkpointing", "full", "--activation-offload", "--optimizer", "paged-adamw-8bit", "--seq-len", "2048",
         "--grad-accum", "8", "--loss", "chunked", "--loss-chunks", "8", "--lora-dtype", "compute"],
        [],
    ),
    # LinearCrossEntropyLoss is the chunked loss, as for --stack torchtune (through a LoRA head as well).
    "torchtune_mistral_7b_lora_output.yaml": (
        "torchtune",
        ["--model", "mistral-7b", "--lora-rank", "64", "--lora-targets",
         "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj,lm_head", "--batch-size", "4", "--precision", "bf16-true",
         "--checkpointing", "full", "--optimizer", "adamw", "--optimizer-impl", "fused", "--seq-len", "1024",
         "--grad-accum", "8", "--loss", "chunked", "--loss-chunks", "8", "--lora-dtype", "compute"],
        [],
    ),
    "axolotl_llama3_2_1b_qlora.yaml": (
        "axolotl",
        ["--model", "llama-3.2-1b", "--batch-size", "2", "--seq-len", "2048", "--precision", "bf16-true",
         "--checkpointing", "full", "--attention", "flash", "--lora-rank", "32", "--lora-targets", "all-linear",
         "--quant", "nf4", "--optimizer", "paged-adamw-8bit", "--grad-accum", "4", "--lora-dropout", "0.05",
         "--no-kbit-prep"],
        [],
    ),
    "litgpt_llama3_2_1b_lora.yaml": (
        "litgpt",
        ["--model", "llama-3.2-1b", "--precision", "bf16-true", "--quant", "nf4", "--batch-size", "2",
         "--seq-len", "512", "--lora-rank", "32", "--lora-targets", "q_proj,v_proj", "--gpus", "1",
         "--grad-accum", "4", "--lora-dropout", "0.05", "--lora-dtype", "compute", "--loss", "chunked",
         "--loss-chunks", "4", "--loss-dtype", "compute"],
        [],
    ),
    "torchtitan_llama3_8b.toml": (
        "torchtitan",
        ["--model", "llama-3.1-8b", "--batch-size", "1", "--seq-len", "8192", "--gpus", "8", "--zero", "3",
         "--precision", "bf16-mixed", "--checkpointing", "full", "--optimizer-impl", "fused", "--compile",
         "--fsdp-param-dtype", "compute"],
        [],
    ),
    "trl_sft_qwen2_5_0_5b.json": (
        "hf",
        ["--model", "qwen2.5-0.5b", "--batch-size", "4", "--checkpointing", "full", "--precision", "bf16-true",
         "--optimizer-impl", "fused", "--seq-len", "1024", "--attention", "flash", "--lora-rank", "16",
         "--lora-targets", "q_proj,k_proj,v_proj,o_proj", "--grad-accum", "4", "--lora-dropout", "0.05"],
        [],
    ),
    "hf_training_args_llama3_1_8b_zero3.yaml": (
        "hf",
        ["--model", "llama-3.1-8b", "--batch-size", "2", "--checkpointing", "full", "--precision", "bf16-mixed",
         "--seq-len", "4096", "--zero", "3", "--offload", "optimizer", "--compile"],
        [],
    ),
}


def estimate_json(capsys, *argv: str) -> dict:
    code, out, err = run_cli(capsys, "estimate", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("name", list(CASES))
def test_from_file_gives_the_flags_budget_and_notes_what_it_ignored(capsys, name):
    kind, flags, ignored = CASES[name]
    path = DATA / name
    assert read_framework_config(path).format == kind
    from_file = estimate_json(capsys, "--from", str(path))
    from_flags = estimate_json(capsys, *flags)
    assert from_file["config"] == from_flags["config"]
    assert from_file["tensor_peak_bytes"] == from_flags["tensor_peak_bytes"]
    notes = "\n".join(from_file["notes"])
    for key_value in ignored:
        assert f"ignored: {key_value} (" in notes
    assert "ignored: lora_dropout" not in notes and "ignored: model.lora_dropout" not in notes  # mapped now
    # Keys that do not touch memory stay quiet.
    assert "learning_rate" not in notes and "lr=" not in notes and "seed" not in notes


def test_flags_typed_beside_from_override_the_file(capsys):
    path = str(DATA / "axolotl_llama3_2_1b_qlora.yaml")
    data = estimate_json(capsys, "--from", path, "--batch-size", "8", "--checkpointing", "none")
    assert data["config"]["batch_size"] == 8 and data["config"]["checkpointing"] == "none"
    assert data["config"]["lora_rank"] == 32  # the rest still from the file


def test_recipe_comes_before_the_file(capsys):
    path = str(DATA / "torchtitan_llama3_8b.toml")
    data = estimate_json(capsys, "--recipe", "qlora-24gb", "--from", path)
    assert data["config"]["seq_len"] == 8192 and data["config"]["model"] == "llama-3.1-8b"


def test_a_gpus_note_is_dropped_once_gpus_is_typed(capsys):
    path = str(DATA / "hf_training_args_llama3_1_8b_zero3.yaml")
    assert any(note.startswith("gpus not set") for note in estimate_json(capsys, "--from", path)["notes"])
    assert not any(note.startswith("gpus not set")
                   for note in estimate_json(capsys, "--from", path, "--gpus", "8")["notes"])


@pytest.mark.parametrize(("name", "text", "key", "reason"), [
    ("bad.yaml", "base_model: meta-llama/Llama-3.2-1B\nmicro_batch_size: 0\n", "micro_batch_size",
     "must be at least 1"),
    ("bad.yaml", "model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\nbatch_size: four\n", "batch_size",
     "'four' is not a whole number"),
    ("bad.json", '{"per_device_train_batch_size": 2, "optim": "adamw_anyprecision"}', "optim",
     "'adamw_anyprecision' is not a value memtui can model"),
    ("bad.toml", '[model]\nname = "llama3"\nflavor = "8B"\n[activation_checkpoint]\nmode = "sometimes"\n',
     "activation_checkpoint.mode", "'sometimes' is not a value memtui can model"),
    ("bad.yaml", "checkpoint_dir: checkpoints/meta-llama/Llama-3.2-1B\nprecision: bf17\ntrain:\n  micro_batch_size: 1\n",
     "precision", "'bf17' is not a value memtui can model"),
    ("bad.json", '{"per_device_train_batch_size": 1, "bf16": true, "fp16": true}', "fp16", "both on"),
    # torchtune's llama3_2 builders raise on it: the output projection is the tied embedding.
    ("bad.yaml", "model:\n  _component_: torchtune.models.llama3_2.lora_llama3_2_1b\n  lora_attn_modules: [q_proj]\n"
     "  apply_lora_to_output: true\n", "model.apply_lora_to_output", "tied to its embeddings"),
])
def test_a_bad_value_is_one_line_naming_the_file_and_key(tmp_path, capsys, name, text, key, reason):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run_cli(capsys, "estimate", "--from", str(path), "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"memtui: error: {path}: {key}: ")
    assert reason in err


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("broken.yaml", "model: [unclosed\n", "malformed YAML at line"),
    ("broken.toml", "[training\n", "malformed TOML"),
    ("broken.json", "{", "malformed JSON"),
    ("list.yaml", "- 1\n- 2\n", "not a training config"),
    ("other.yaml", "name: something else\n", "not a training config memtui reads"),
])
def test_a_malformed_file_is_one_line(tmp_path, capsys, name, content, reason):
    path = tmp_path / name
    path.write_text(content)
    code, _, err = run_cli(capsys, "estimate", "--from", str(path))
    assert code == 2 and err.count("\n") == 1 and reason in err and str(path) in err


def test_a_directory_or_missing_file_is_one_line(tmp_path, capsys):
    for target, reason in ((tmp_path, "not a regular file"), (tmp_path / "none.yaml", "no such file")):
        code, _, err = run_cli(capsys, "fit", "--from", str(target))
        assert code == 2 and err.count("\n") == 1 and reason in err


def test_deepspeed_names_and_fsdp_strings_name_the_zero_stage(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("per_device_train_batch_size: 1\ndeepspeed: configs/zero2_offload.json\n")
    assert read_framework_config(path).options.items() >= {"zero": 2, "offload": "optimizer"}.items()
    path.write_text("per_device_train_batch_size: 1\nfsdp: shard_grad_op auto_wrap\n")
    assert read_framework_config(path).options["zero"] == 2
    path.write_text("per_device_train_batch_size: 1\nfsdp: full_shard offload auto_wrap\n")
    assert read_framework_config(path).options.items() >= {"zero": 3, "offload": "optimizer+params"}.items()


def test_model_names_map_to_presets_or_hub_ids(tmp_path):
    presets = ["llama-3.2-1b", "gpt2", "qwen2.5-7b", "qwen2.5-72b", "phi-3-mini"]
    assert preset_for_name("meta-llama/Meta-Llama-3.2-1B-Instruct", presets) == "llama-3.2-1b"
    assert preset_for_name("Qwen/Qwen2.5-72B-Instruct", presets) == "qwen2.5-72b"
    assert preset_for_name("microsoft/Phi-3-mini-4k-instruct", presets) == "phi-3-mini"
    assert preset_for_name("openai-community/gpt2-medium", presets) is None  # a different size
    path = tmp_path / "args.json"
    path.write_text('{"model_name_or_path": "HuggingFaceTB/SmolLM2-135M", "per_device_train_batch_size": 1}')
    assert read_framework_config(path).options["model"] == "HuggingFaceTB/SmolLM2-135M"
    path.write_text('{"model_name_or_path": "/nonexistent/checkpoint", "per_device_train_batch_size": 1}')
    config = read_framework_config(path)
    assert "model" not in config.options and any(note.startswith("model not set") for note in config.notes)


def test_format_detection():
    assert detect_format({"model": {"_component_": "x"}}, ".yaml") == "torchtune"
    assert detect_format({"base_model": "x"}, ".yml") == "axolotl"
    assert detect_format({"train": {"micro_batch_size": 1}}, ".yaml") == "litgpt"
    assert detect_format({"per_device_train_batch_size": 1}, ".json") == "hf"
    assert detect_format({"training": {}}, ".toml") == "torchtitan"
    assert detect_format({"name": "x"}, ".yaml") is None


def test_fit_and_trace_take_from_and_report_its_notes(tmp_path, capsys):
    path = tmp_path / "sft.json"
    path.write_text('{"model_name_or_path": "openai-community/gpt2", "per_device_train_batch_size": 2, '
                    '"max_length": 128, "gradient_accumulation_steps": 16, "optim": "adamw_torch_fused", '
                    '"padding_free": true}')
    code, out, err = run_cli(capsys, "fit", "--from", str(path), "--gpu", "t4", "--max-batch", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["config"]["model"] == "gpt2" and data["config"]["seq_len"] == 128
    assert data["config"]["grad_accum"] == 16
    assert any("ignored: padding_free=true" in note for note in data["notes"])
    code, out, err = run_cli(capsys, "trace", "--from", str(path), "--json")
    assert code == 0, err
    traced = json.loads(out)
    assert traced["config"]["optimizer_impl"] == "fused" and traced["config"]["batch_size"] == 2
    assert traced["config"]["grad_accum"] == 16
    assert any("ignored: padding_free=true" in note for note in traced["notes"])


# Each format's torch.compile key, in a small file of that format, and the flags that say the same without it.
_LLAMA_1B = ["--model", "llama-3.2-1b", "--batch-size", "2", "--seq-len", "1024"]
COMPILE_KEYS = {
    "hf": ("sft.json", '{"model_name_or_path": "meta-llama/Llama-3.2-1B", "per_device_train_batch_size": 2, '
                       '"max_length": 1024, "torch_compile": true}', ["--precision", "bf16-mixed"]),
    "hf-mode": ("sft.json", '{"model_name_or_path": "meta-llama/Llama-3.2-1B", "per_device_train_batch_size": 2, '
                            '"max_length": 1024, "torch_compile_mode": "default"}', ["--precision", "bf16-mixed"]),
    # transformers turns torch_compile on when a backend or mode is given, whatever torch_compile says.
    "hf-backend": ("sft.json", '{"model_name_or_path": "meta-llama/Llama-3.2-1B", "per_device_train_batch_size": 2, '
                               '"max_length": 1024, "torch_compile": false, "torch_compile_backend": "inductor"}',
                   ["--precision", "bf16-mixed"]),
    "torchtune": ("recipe.yaml", "model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\nbatch_size: 2\n"
                                 "tokenizer:\n  max_seq_len: 1024\ndtype: bf16\ncompile: true\n",
                  ["--precision", "bf16-true"]),
    "torchtitan": ("job.toml", '[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 2\n'
                               'seq_len = 1024\n[parallelism]\ndata_parallel_shard_degree = 8\n'
                               '[activation_checkpoint]\nmode = "none"\n[compile]\nenable = true\n',
                   ["--model", "llama-3.1-8b", "--gpus", "8", "--zero", "3", "--checkpointing", "none",
                    "--optimizer-impl", "fused", "--fsdp-param-dtype", "compute"]),
    "torchtitan-old": ("job.toml", '[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 2\n'
                                   'seq_len = 1024\ncompile = true\n[parallelism]\ndata_parallel_shard_degree = 8\n'
                                   '[activation_checkpoint]\nmode = "none"\n',
                       ["--model", "llama-3.1-8b", "--gpus", "8", "--zero", "3", "--checkpointing", "none",
                        "--optimizer-impl", "fused", "--fsdp-param-dtype", "compute"]),
    # compile.components without "loss": the layers alone (torchtitan's train.py compiles the loss only when named).
    "torchtitan-layers": ("job.toml", '[model]\nname = "llama3"\nflavor = "8B"\n[training]\nlocal_batch_size = 2\n'
                                      'seq_len = 1024\n[parallelism]\ndata_parallel_shard_degree = 8\n'
                                      '[activation_checkpoint]\nmode = "none"\n[compile]\nenable = true\n'
                                      'components = ["model"]\n',
                          ["--model", "llama-3.1-8b", "--gpus", "8", "--zero", "3", "--checkpointing", "none",
                           "--optimizer-impl", "fused", "--fsdp-param-dtype", "compute", "--eager-loss"]),
    "axolotl": ("axolotl.yml", "base_model: meta-llama/Llama-3.2-1B\nmicro_batch_size: 2\nsequence_len: 1024\n"
                               "bf16: true\ntorch_compile: true\n", ["--precision", "bf16-true"]),
    "axolotl-auto": ("axolotl.yml", "base_model: meta-llama/Llama-3.2-1B\nmicro_batch_size: 2\nsequence_len: 1024\n"
                                    "bf16: true\ntorch_compile: auto\n", ["--precision", "bf16-true"]),
}


@pytest.mark.parametrize("case", list(COMPILE_KEYS))
def test_each_formats_compile_key_is_compile(tmp_path, capsys, case):
    name, text, flags = COMPILE_KEYS[case]
    path = tmp_path / name
    path.write_text(text)
    from_file = estimate_json(capsys, "--from", str(path))
    # The file's own flags come last, so a torchtitan model overrides the Llama 3.2 1B of the shared ones.
    compiled = estimate_json(capsys, *_LLAMA_1B, *flags, "--compile")
    eager = estimate_json(capsys, *_LLAMA_1B, *flags)
    assert from_file["config"]["compile"] is True
    assert from_file["tensor_peak_bytes"] == compiled["tensor_peak_bytes"] != eager["tensor_peak_bytes"]
    assert not any("compile" in note and note.startswith("ignored") for note in from_file["notes"])


@pytest.mark.parametrize(("name", "text", "note"), [
    # torchtitan compiling the loss alone compiles no layer.
    ("job.toml", '[model]\nname = "llama3"\nflavor = "8B"\n[compile]\nenable = true\ncomponents = ["loss"]\n',
     "ignored: compile.enable=true ("),
    # Axolotl hands a backend to the Trainer only with torch_compile on.
    ("axolotl.yml", "base_model: meta-llama/Llama-3.2-1B\ntorch_compile_backend: inductor\n", None),
    ("axolotl.yml", "base_model: meta-llama/Llama-3.2-1B\ntorch_compile: false\n", None),
])
def test_files_that_compile_no_layer_are_not_compile(tmp_path, capsys, name, text, note):
    path = tmp_path / name
    path.write_text(text)
    data = estimate_json(capsys, "--from", str(path), "--gpus", "8")
    assert data["config"]["compile"] is False
    if note:
        assert any(line.startswith(note) for line in data["notes"])


def test_a_cuda_graph_compile_mode_is_noted(tmp_path, capsys):
    path = tmp_path / "sft.json"
    path.write_text('{"model_name_or_path": "meta-llama/Llama-3.2-1B", "torch_compile_mode": "reduce-overhead"}')
    data = estimate_json(capsys, "--from", str(path))
    assert data["config"]["compile"] is True
    assert any(note.startswith("ignored: torch_compile_mode=reduce-overhead (CUDA graphs") for note in data["notes"])


def test_memtui_file_opens_the_planner_on_a_yaml_or_toml_config(monkeypatch):
    import memtui.tui.app

    opened = []
    monkeypatch.setattr(memtui.tui.app, "run_app", lambda config, gpu_chosen: opened.append(config) or 0)
    try:
        assert main([str(DATA / "torchtitan_llama3_8b.toml")]) == 0
        assert main([str(DATA / "axolotl_llama3_2_1b_qlora.yaml"), "--batch-size", "8"]) == 0
    finally:
        gc.enable()  # open_planner pauses the collector until the app's first frame
    assert (opened[0].model, opened[0].zero, opened[0].seq_len) == ("llama-3.1-8b", 3, 8192)
    assert (opened[1].quant, opened[1].batch_size) == ("nf4", 8)


@pytest.mark.parametrize("command", ["estimate", "fit", "trace", "run"])
def test_every_command_takes_from_and_refuses_a_bad_value_in_one_line(tmp_path, capsys, command):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  _component_: torchtune.models.llama3_2.lora_llama3_2_1b\n  lora_rank: -4\n")
    code, _, err = run_cli(capsys, command, "--from", str(path))
    assert code == 2 and err == f"memtui: error: {path}: model.lora_rank: must be at least 1, got -4\n"


def test_fsdp2_without_resharding_after_forward_is_zero_2(tmp_path):
    path = tmp_path / "args.json"
    path.write_text('{"per_device_train_batch_size": 1, "fsdp": "full_shard auto_wrap", '
                    '"fsdp_config": {"fsdp_version": 2, "reshard_after_forward": false, "activation_checkpointing": true}}')
    assert read_framework_config(path).options.items() >= {"zero": 2, "checkpointing": "full"}.items()


def test_axolotl_fsdp2_config_alone_shards(tmp_path):
    path = tmp_path / "fsdp2.yaml"
    path.write_text("base_model: meta-llama/Llama-3.1-8B\nfsdp_version: 2\nfsdp_config:\n  offload_params: true\n"
                    "  reshard_after_forward: true\n  activation_checkpointing: true\n")
    options = read_framework_config(path).options
    assert options.items() >= {"zero": 3, "offload": "optimizer+params", "checkpointing": "full"}.items()


@pytest.mark.parametrize(("name", "text", "expected"), [
    # TRL: ModelConfig's lora_dropout defaults to 0.05; since TRL 0.26 SFTTrainer no longer runs
    # prepare_model_for_kbit_training and casts a quantized model's adapters to bf16.
    ("sft.json", '{"per_device_train_batch_size": 1, "use_peft": true, "load_in_4bit": true}',
     {"quant": "nf4", "kbit_prep": False, "lora_dtype": "compute", "lora_dropout": 0.05}),
    ("sft.json", '{"per_device_train_batch_size": 1, "use_peft": true, "lora_dropout": 0.1, "load_in_8bit": true}',
     {"quant": "int8", "kbit_prep": False, "lora_dtype": "compute", "lora_dropout": 0.1}),
    # Under fp16 autocast memtui's compute-dtype adapters would be fp16 (refused with the GradScaler): fp32 stays.
    ("sft.json", '{"per_device_train_batch_size": 1, "use_peft": true, "load_in_4bit": true, "fp16": true}',
     {"quant": "nf4", "kbit_prep": False, "lora_dtype": None}),
    # Under DeepSpeed ZeRO-3 an unquantized model's adapters stay in its dtype (autocast_adapter_dtype=False).
    ("sft.json", '{"per_device_train_batch_size": 1, "use_peft": true, "deepspeed": "ds_zero3.json"}',
     {"zero": 3, "lora_dtype": "compute"}),
    # Axolotl: lora_dropout 0.0 unless given; k-bit prep on an 8-bit base, undone by its casts back to 16 bits.
    ("qlora.yaml", "base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nload_in_8bit: true\n",
     {"quant": "int8", "kbit_prep": False}),
    ("lora.yaml", "base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nlora_dropout: 0.1\n",
     {"lora_dropout": 0.1}),
    # LitGPT: lora_dropout 0.05 by default, adapters in the model's dtype.
    ("lora.yaml", "checkpoint_dir: checkpoints/meta-llama/Llama-3.2-1B\nlora_r: 8\ntrain:\n  micro_batch_size: 1\n",
     {"lora_dropout": 0.05, "lora_dtype": "compute"}),
])
def test_lora_dropout_dtype_and_kbit_prep_map_from_each_framework(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    options = read_framework_config(path).options
    assert {key: options.get(key) for key in expected} == expected
    if "kbit_prep" not in expected:
        assert "kbit_prep" not in options


def test_a_bad_lora_dropout_in_a_file_names_its_key(tmp_path, capsys):
    path = tmp_path / "qlora.yaml"
    path.write_text("base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nlora_dropout: 1.5\n")
    code, _, err = run_cli(capsys, "estimate", "--from", str(path))
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"memtui: error: {path}: lora_dropout: ")


@pytest.mark.parametrize(("loss", "expected"), [
    ("torch.nn.CrossEntropyLoss", {"loss": None, "logits_upcast": "model"}),
    ("torchtune.modules.loss.CEWithChunkedOutputLoss", {"loss": "chunked", "logits_upcast": None}),
])
def test_torchtunes_whole_output_is_upcast_in_the_model(tmp_path, loss, expected):
    """torchtune's TransformerDecoder returns self.output(h).float() unless its output is chunked."""
    path = tmp_path / "3B_full_single_device.yaml"
    path.write_text(f"model:\n  _component_: torchtune.models.llama3_2.llama3_2_3b\nbatch_size: 2\n"
                    f"loss:\n  _component_: {loss}\n")
    options = read_framework_config(path).options
    assert {key: options.get(key) for key in expected} == expected
