"""Checkpoints and configs from strangers: every corruption ends in one clean error naming the file (and the tensor
or key), valid files load exactly as before, and nothing outside the model directory is opened."""

import json
import os
import shutil
import struct

import numpy as np
import pytest

from moejax import LLM
from moejax.checkpoints import orbax_store
from moejax.checkpoints.safetensors import CheckpointError, SafetensorsReader
from moejax.cli import main
from moejax.config import ConfigError, ModelConfig
from moejax.engine.llm import default_model_path

SRC = default_model_path()
WEIGHTS = "model.safetensors"


def split(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def join(path, header, data: bytes):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture()
def model(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(SRC, d)
    return str(d)


def edit_header(model, change):
    path = os.path.join(model, WEIGHTS)
    header, data = split(path)
    header = change(header)
    join(path, header, data)


def edit_json(model, name, change):
    path = os.path.join(model, name)
    data = json.load(open(path))
    json.dump(change(data), open(path, "w"))


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _set(d, key, value):
    d[key] = value
    return d


def _tensor(change):
    def apply(h):
        change(h[first_tensor(h)], h)
        return h
    return apply


def _share_bytes(h):  # two tensors of one shape pointing at the same bytes
    names = [k for k in h if k != "__metadata__"]
    a = next(n for n in names if any(h[m]["shape"] == h[n]["shape"] and m != n for m in names))
    b = next(m for m in names if m != a and h[m]["shape"] == h[a]["shape"])
    h[b]["data_offsets"] = list(h[a]["data_offsets"])
    return h


CASES = {
    # name: (file edited, edit, words the one-line error must contain)
    "entry without data_offsets": (WEIGHTS, _tensor(lambda e, h: e.pop("data_offsets")), ["data_offsets"]),
    "header is a list": (WEIGHTS, lambda h: list(h), ["JSON object"]),
    "offsets before the data section": (WEIGHTS, _tensor(lambda e, h: e.update(data_offsets=[-64, 0])),
                                        ["data_offsets"]),
    "two tensors share bytes": (WEIGHTS, _share_bytes, ["overlaps"]),
    "shape is a string": (WEIGHTS, _tensor(lambda e, h: e.update(shape="abc")), ["shape"]),
    "metadata not a string map": (WEIGHTS, lambda h: _set(h, "__metadata__", {"format": 5}), ["__metadata__"]),
    "config is a list": ("config.json", lambda c: list(c), ["JSON object"]),
    "hidden_size is a word": ("config.json", lambda c: _set(c, "hidden_size", "big"),
                              ["hidden_size must be a positive integer", "'big'"]),
    "eos id is a word": ("generation_config.json", lambda c: _set(c, "eos_token_id", "x"), ["eos_token_id"]),
    "tokenizer_config is a list": ("tokenizer_config.json", lambda c: [c], ["JSON object"]),
}


def _tensor_name(case, model):
    if CASES[case][0] != WEIGHTS or case in ("header is a list", "metadata not a string map"):
        return None
    header, _ = split(os.path.join(SRC, WEIGHTS))
    return first_tensor(header) if case != "two tensors share bytes" else None


def one_line_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_files_fail_with_one_line_naming_the_file(case, model, capsys):
    name, change, words = CASES[case]
    if name == WEIGHTS:
        edit_header(model, change)
    else:
        edit_json(model, name, change)
    err = one_line_error(capsys, ["generate", model, "--prompt", "hi", "--max-tokens", "2"])
    assert os.path.join(model, name) in err, err
    tensor = _tensor_name(case, model)
    assert tensor is None or repr(tensor) in err, err
    for w in words:
        assert w in err, err


def test_corrupt_tokenizer_json_names_the_file(model, capsys):
    with open(os.path.join(model, "tokenizer.json"), "w") as f:
        f.write('{"version": 1, 5: }')
    err = one_line_error(capsys, ["generate", model, "--prompt", "hi", "--max-tokens", "2"])
    assert os.path.join(model, "tokenizer.json") in err, err


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/model.safetensors", ""])
def test_index_naming_files_outside_the_directory_is_refused_unopened(shard, model, tmp_path, monkeypatch):
    # A valid copy outside the model directory: were it opened, the load would succeed.
    shutil.copy(os.path.join(model, WEIGHTS), tmp_path / "outside.safetensors")
    header, _ = split(os.path.join(model, WEIGHTS))
    index = {"weight_map": {n: shard for n in header if n != "__metadata__"}}
    json.dump(index, open(os.path.join(model, "model.safetensors.index.json"), "w"))
    opened = []
    real_open = open

    def spy(path, *a, **k):
        opened.append(os.path.abspath(os.fspath(path)))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(CheckpointError, match="weight_map names"):
        SafetensorsReader(model)
    assert all(p.startswith(os.path.abspath(model) + os.sep) for p in opened), opened


def test_tampered_converted_metadata_is_refused(tmp_path):
    config = ModelConfig.from_file(SRC)
    good = {"family": config.family, "num_layers": config.num_layers, "dtype": "float32", "quantization": None,
            "quantized": {"layers.0.mlp.experts.w_gate": {"bits": 4, "group_size": 128, "zero_point": False}}}
    d = tmp_path / "ckpt"
    d.mkdir()
    path = d / orbax_store.METADATA

    def check(meta):
        path.write_text(json.dumps(meta))
        return orbax_store.read_metadata(str(d), config)

    assert check(good)["family"] == config.family
    for change in (lambda m: m.pop("dtype"), lambda m: m.update(dtype=5), lambda m: m.update(quantized=[]),
                   lambda m: m.update(num_layers=config.num_layers + 1), lambda m: m.update(family="mixtral"),
                   lambda m: m.update(quantized={"layers.9.mlp": {"bits": 4, "group_size": 128}}),
                   lambda m: m.update(quantized={"layers.0.mlp": {"bits": "4", "group_size": 128}}),
                   lambda m: m.update(quantization="int3")):
        meta = json.loads(json.dumps(good))
        change(meta)
        with pytest.raises(CheckpointError, match=str(path)):
            check(meta)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        orbax_store.read_metadata(str(d), config)


# -- the property test --------------------------------------------------------------------------------------

def _wrong_values(value, rng):
    """Values of another JSON type than `value` (or out of its range), for type-confusion mutations."""
    if isinstance(value, bool):
        options = [1, "yes", [value], None if rng.random() < 0.1 else {"x": 1}]
    elif isinstance(value, int):
        options = ["12", [str(value)], {"n": value}, True, -3, value + 0.5]
    elif isinstance(value, float):
        options = ["1e-5", [value], {"v": 1}, False]
    elif isinstance(value, str):
        options = [7, [7], {"s": value}, True]
    elif isinstance(value, list):
        options = ["abc", {"l": 1}, [["x"]], 3.5]
    else:
        options = ["abc", 5, [1.5]]
    return options[int(rng.integers(len(options)))]


def _mutate_header(header, rng):
    names = [k for k in header if k != "__metadata__"]
    name = names[int(rng.integers(len(names)))]
    entry = header[name]
    op = int(rng.integers(9))
    if op == 0:
        entry.pop(["dtype", "shape", "data_offsets"][int(rng.integers(3))])
    elif op == 1:
        entry["dtype"] = ["F4", "bf16", 3, None, "F32" if entry["dtype"] != "F32" else "F16"][int(rng.integers(5))]
    elif op == 2:
        entry["shape"] = _wrong_values(entry["shape"], rng)
    elif op == 3 and entry["shape"]:
        i = int(rng.integers(len(entry["shape"])))
        entry["shape"][i] += int(rng.choice([-1, 1, 7]))
    elif op == 4 and len(entry["shape"]) > 1:
        entry["shape"] = entry["shape"][::-1]  # same bytes, transposed shape: the loader must catch it
    elif op == 5:
        i = int(rng.integers(2))
        entry["data_offsets"][i] += int(rng.choice([-2, 2, -4096, 1 << 40]))
    elif op == 6:
        entry["data_offsets"] = _wrong_values(entry["data_offsets"], rng)
    elif op == 7:
        header[f"extra.{rng.integers(100)}"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    else:
        header[name] = _wrong_values(entry, rng)
    return header


def _mutate_config(config, rng):
    keys = sorted(config)
    key = keys[int(rng.integers(len(keys)))]
    if rng.random() < 0.15:
        config.pop(key)
    else:
        config[key] = _wrong_values(config[key], rng)
    return config


def test_random_corruptions_load_identically_or_fail_cleanly(tmp_path):
    rng = np.random.default_rng(20261201)
    d = tmp_path / "model"
    shutil.copytree(SRC, d)
    weights, config_path = str(d / WEIGHTS), str(d / "config.json")
    header0, data0 = split(os.path.join(SRC, WEIGHTS))
    config0 = json.load(open(os.path.join(SRC, "config.json")))
    reference = SafetensorsReader(SRC)
    parsed0 = ModelConfig.from_file(SRC)
    logits0 = None
    outcomes = {"failed": 0, "identical": 0, "loaded": 0}
    for case in range(300):
        join(weights, json.loads(json.dumps(header0)), data0)
        json.dump(config0, open(config_path, "w"))
        if case % 2:
            join(weights, _mutate_header(json.loads(json.dumps(header0)), rng), data0)
            where = weights
        else:
            json.dump(_mutate_config(json.loads(json.dumps(config0)), rng), open(config_path, "w"))
            where = config_path
        try:
            reader = SafetensorsReader(str(d))
            parsed = ModelConfig.from_file(str(d))
        except (CheckpointError, ConfigError) as e:
            assert where in str(e) and "\n" not in str(e), (case, str(e))
            outcomes["failed"] += 1
            continue
        same_tensors = {n: (t.dtype, t.shape, t.nbytes) for n, t in reader.tensors.items()} == \
            {n: (t.dtype, t.shape, t.nbytes) for n, t in reference.tensors.items()} and \
            all(np.array_equal(reader.get(n).view(np.uint8), reference.get(n).view(np.uint8)) for n in reader.names())
        if same_tensors and parsed == parsed0:
            outcomes["identical"] += 1
            continue
        # Valid on its face but not the same model (a transposed shape, say): the full load decides.
        try:
            llm = LLM(str(d), dtype="float32", max_model_len=64)
        except ValueError as e:
            assert str(d) in str(e) and "\n" not in str(e), (case, str(e))
            outcomes["failed"] += 1
            continue
        if logits0 is None:
            logits0 = LLM(SRC, dtype="float32", max_model_len=64).logits([1, 2, 3])
        np.testing.assert_array_equal(llm.logits([1, 2, 3]), logits0)
        outcomes["loaded"] += 1
    assert outcomes["failed"] > 150 and outcomes["identical"] > 10, outcomes
