"""A config.json given with --model: whatever the file holds, one line naming the file and key, exit 2."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from memtui.cli import main
from memtui.engine.model import presets
from memtui.engine.model.architectures import MAX_CONFIG_BYTES, POSITION_LIMIT, SIZE_LIMIT, SUPPORTED_MODEL_TYPES

LLAMA = json.loads((presets.presets_dir() / "models" / "llama-3.2-1b.json").read_text(encoding="utf-8"))
GPT2 = json.loads((presets.presets_dir() / "models" / "gpt2.json").read_text(encoding="utf-8"))


def refused(capsys, *argv: str) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr and nothing on stdout."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtui: error: "), err
    assert "Traceback" not in err
    return lines[0]


def write_config(folder: Path, config: dict, name: str = "config.json") -> Path:
    path = folder / name
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def with_value(config: dict, key: str, value) -> dict:
    changed = dict(config)
    changed[key] = value
    return changed


# ---- one defect each: the inputs a newcomer met ------------------------------------------------------------

@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num_hidden_layers", -16, "num_hidden_layers: must be a whole number from 1"),
        ("hidden_size", -2048, "hidden_size: must be a whole number from 1"),
        ("head_dim", "64", 'head_dim: must be a whole number from 1 to 16,777,216, got "64"'),
        ("head_dim", 64.0, "head_dim: must be a whole number from 1 to 16,777,216, got 64.0"),
        ("head_dim", 0, "head_dim: must be a whole number"),
        ("vocab_size", "128256", "vocab_size: must be a whole number"),
        ("num_key_value_heads", -8, "num_key_value_heads: must be a whole number"),
        ("intermediate_size", SIZE_LIMIT + 1, "intermediate_size: must be a whole number from 1 to 16,777,216"),
        ("model_type", ["llama"], 'model_type: unsupported architecture ["llama"]'),
        ("tie_word_embeddings", "false", 'tie_word_embeddings: must be true or false, got "false"'),
        ("hidden_act", 3, "hidden_act: must be a string"),
        ("rope_theta", -1.0, "rope_theta: must be a positive number"),
        ("max_position_embeddings", 0, "max_position_embeddings: must be a whole number"),
        ("num_key_value_heads", 48, "num_key_value_heads: 48 does not divide num_attention_heads 32"),
        ("_memtui", [1], "_memtui: must be an object"),
    ],
)
def test_a_wrong_field_is_named_with_the_file(tmp_path, capsys, key, value, expected):
    path = write_config(tmp_path, with_value(LLAMA, key, value))
    line = refused(capsys, "estimate", "--model", str(path))
    assert f"{path}: {expected}" in line


def test_gpt2_dropout_outside_0_to_1_is_refused(tmp_path, capsys):
    path = write_config(tmp_path, with_value(GPT2, "resid_pdrop", 1.5))
    assert "resid_pdrop: must be a probability from 0 to 1" in refused(capsys, "estimate", "--model", str(path))


def test_heads_that_do_not_divide_the_width_are_refused_for_every_family(tmp_path, capsys):
    gemma = json.loads((presets.presets_dir() / "models" / "gemma-2-9b.json").read_text(encoding="utf-8"))
    config = with_value(gemma, "num_attention_heads", 4000)
    del config["head_dim"]  # derived as hidden // heads = 0 before
    path = write_config(tmp_path, config)
    assert "num_attention_heads: 4000 does not divide hidden_size" in refused(capsys, "estimate", "--model", str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"model_type": "llama", "hidden_size": NaN}', "hidden_size: NaN is not a number a config can hold"),
        ('{"model_type": "llama", "rope_theta": Infinity}', "rope_theta: Infinity is not a number"),
        ('{"model_type": "llama", "rope_theta": 1e999}', "rope_theta: 1e999 overflows to infinity"),
        ('{"model_type": "llama", "vocab_size": ' + "9" * 5000 + "}", "vocab_size: an integer of 5000 digits"),
        ('{"a": {"b": ' + "[" * 50 + "]" * 50 + "}}", "a.b" + "[0]" * 31 + ": nested deeper than 32 levels"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
    ],
)
def test_numbers_and_nesting_json_lets_through_are_named(tmp_path, capsys, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text, encoding="utf-8")
    assert f"{path}: {expected}" in refused(capsys, "estimate", "--model", str(path))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_file_in_another_encoding_is_one_line(tmp_path, capsys, encoding):
    path = tmp_path / "config.json"
    path.write_bytes(json.dumps(LLAMA).encode(encoding))
    assert f"{path}: not UTF-8 text" in refused(capsys, "estimate", "--model", str(path))


def test_a_binary_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "model.json"
    path.write_bytes(bytes(range(256)) * 4)
    assert f"{path}: not UTF-8 text" in refused(capsys, "estimate", "--model", str(path))


def test_a_file_above_the_size_cap_is_not_read(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA) + " " * MAX_CONFIG_BYTES, encoding="utf-8")
    assert f"{path}: larger than 4 MiB" in refused(capsys, "estimate", "--model", str(path))


def test_a_byte_order_mark_is_accepted(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(LLAMA).encode())
    assert main(["estimate", "--model", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["params"] == 1_235_814_400


@pytest.mark.timeout(20)
def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path, capsys):
    path = tmp_path / "config.json"
    os.mkfifo(path)
    result: dict[str, str] = {}
    reader = threading.Thread(target=lambda: result.update(line=refused(capsys, "estimate", "--model", str(path))),
                              daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # let the blocked open return, so the test ends instead of hanging
        with open(path, "w"):
            pass
        pytest.fail("reading a named pipe blocked waiting for a writer")
    assert f"{path}: not a regular file" in result["line"]


@pytest.mark.timeout(20)
@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero on this system")
def test_dev_zero_is_refused_without_reading_it():
    from memtui.engine.errors import InputError
    from memtui.engine.model.architectures import load_config_file

    with pytest.raises(InputError, match="/dev/zero: not a regular file"):
        load_config_file(Path("/dev/zero"))


def test_an_unexpandable_home_is_one_line(capsys):
    assert "cannot expand '~nosuchuser-memtui/config.json'" in refused(
        capsys, "estimate", "--model", "~nosuchuser-memtui/config.json"
    )


def test_a_path_too_long_for_the_file_system_is_one_line(capsys):
    refused(capsys, "estimate", "--model", "x" * 5000)


def test_trace_refuses_negative_sizes_before_torch(tmp_path, capsys):
    path = write_config(tmp_path, with_value(LLAMA, "num_hidden_layers", -2))
    assert "num_hidden_layers: must be a whole number" in refused(capsys, "trace", "--model", str(path))


# ---- generated: malformed configs of every shape -------------------------------------------------------------

CHECKED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
CHECKED_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
REQUIRED = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

json_scalars = st.none() | st.booleans() | st.text(max_size=8) | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(json_scalars | st.integers(), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
not_a_size = (
    st.integers(max_value=0) | st.integers(min_value=SIZE_LIMIT + 1)
    | st.integers(1, 4096).map(str) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
    | st.lists(st.integers(1, 64), min_size=1, max_size=2) | st.dictionaries(st.just("value"), st.integers(), min_size=1)
)
not_a_flag = st.integers() | st.sampled_from(["true", "false", "yes", ""]) | st.floats(allow_nan=False) | st.lists(
    st.booleans(), min_size=1, max_size=2)
not_a_model_type = (st.text(max_size=12).filter(lambda text: text not in SUPPORTED_MODEL_TYPES)
                    | st.integers() | st.lists(st.just("llama"), min_size=1, max_size=2) | st.booleans())


def _not_a_size_for(key: str) -> st.SearchStrategy:
    """Values `key` cannot take: a position count may go up to POSITION_LIMIT, a size to SIZE_LIMIT."""
    if key != "max_position_embeddings":
        return not_a_size
    return not_a_size.filter(lambda value: not (isinstance(value, int) and not isinstance(value, bool)
                                                and SIZE_LIMIT < value <= POSITION_LIMIT))


def _mutations() -> st.SearchStrategy[bytes]:
    """Files that no config can be: a field of the wrong kind, a missing field, raw bytes, bad numbers, nesting."""
    wrong_size = st.sampled_from(CHECKED_INTS).flatmap(
        lambda key: _not_a_size_for(key).map(lambda value: with_value(LLAMA, key, value)))
    wrong_flag = st.tuples(st.sampled_from(CHECKED_FLAGS), not_a_flag).map(lambda kv: with_value(LLAMA, *kv))
    wrong_type = not_a_model_type.map(lambda value: with_value(LLAMA, "model_type", value))
    missing = st.sampled_from(REQUIRED).map(lambda key: {k: v for k, v in LLAMA.items() if k != key})
    not_an_object = json_values.filter(lambda value: not isinstance(value, dict))
    as_json = (wrong_size | wrong_flag | wrong_type | missing | not_an_object).map(lambda value: json.dumps(value))
    bad_number = st.tuples(st.sampled_from(CHECKED_INTS), st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "1e999", "-" + "7" * 40, "9" * 4400])).map(
        lambda kv: json.dumps(LLAMA)[:-1] + f', "{kv[0]}": {kv[1]}}}')
    nested = st.integers(33, 3000).map(lambda depth: '{"model_type": "llama", "x": ' + "[" * depth + "]" * depth + "}")
    text = (as_json | bad_number | nested).map(str.encode)
    encoded = st.sampled_from(["utf-16", "utf-16-le", "utf-32"]).map(lambda codec: json.dumps(LLAMA).encode(codec))
    truncated = st.integers(0, len(json.dumps(LLAMA)) - 1).map(lambda cut: json.dumps(LLAMA)[:cut].encode())
    return text | encoded | truncated | st.binary(max_size=256)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(content=_mutations())
@example(content=b'[{"\\u0085": 1000000000000000000}]')  # a key holding a Unicode line break (NEL)
@example(content=json.dumps({**LLAMA, "max_position_embeddings": POSITION_LIMIT + 1}).encode())
def test_any_malformed_config_is_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    line = refused(capsys, "estimate", "--model", str(path))
    assert str(path) in line
