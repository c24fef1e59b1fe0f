

def test_stack_sets_it_where_modelled(tmp_path):
    from memtui.engine.model.stacks import apply_stack

    config = _config(tmp_path)
    given = {"model": config.model, "precision": "bf16-true", "lora_rank": 8, "seq_len": 512}
    assert apply_stack("litgpt", given)[0]["modeling"] == "litgpt"
    # bf16-mixed (LitGPT's own default precision) is not modelled: transformers' model stands in, with a note
    options, notes = apply_stack("litgpt", {**given, "precision": "bf16-mixed"})
    assert options.get("modeling", "hf") == "hf" and any("modeling" in note for note in notes)
