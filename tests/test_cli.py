"""Tests of the ftpeft command on real checkpoints and adapters written to disk."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ftpeft.cli import main
from ftpeft.io import load_state, save_state

from conftest import tiny_llama

peft = pytest.importorskip("peft")


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama saved in two shards, a peft adapter for it, and peft's own merge as the reference."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    peft_model = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return tmp_path, expected


def test_merge_matches_peft_merge_and_unload(checkpoint, capsys):
    root, expected = checkpoint

    status = main(["merge", str(root / "base"), str(root / "adapter"), str(root / "out")])

    assert status == 0
    merged = load_state(root / "out")
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6)
    index = json.loads((root / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged)
    assert (root / "out" / "config.json").read_text() == (root / "base" / "config.json").read_text()
    assert "merged 8 adapter tensors" in capsys.readouterr().out


def test_merge_casts_dtype_and_records_it(checkpoint):
    root, expected = checkpoint

    assert main(["merge", str(root / "base"), str(root / "adapter"), str(root / "out"), "--dtype", "bfloat16", "--shard-size", "20KB"]) == 0

    merged = load_state(root / "out")
    assert all(value.dtype == torch.bfloat16 for value in merged.values())
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))
    assert json.loads((root / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert len(set(json.loads((root / "out" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1


def test_inspect_lists_targets_ranks_and_scales(checkpoint, capsys):
    root, _ = checkpoint

    assert main(["inspect", str(root / "adapter")]) == 0
    adapter_output = capsys.readouterr().out
    assert main(["inspect", str(root / "base")]) == 0
    checkpoint_output = capsys.readouterr().out

    assert "model.layers.1.self_attn.v_proj     2         2       (2, 32)       (16, 2)" in adapter_output
    assert "LoRA on 4 modules, r=2, alpha=4" in adapter_output
    assert "model.embed_tokens.weight" in checkpoint_output
    assert checkpoint_output.strip().splitlines()[-1].startswith("21 tensors")


def test_convert_round_trip_loads_in_peft(checkpoint):
    root, expected = checkpoint

    assert main(["convert", str(root / "adapter"), str(root / "ours"), "--to", "ftpeft"]) == 0
    assert main(["convert", str(root / "ours"), str(root / "back"), "--to", "peft"]) == 0

    assert load_file(root / "back" / "adapter_model.safetensors").keys() == load_file(root / "adapter" / "adapter_model.safetensors").keys()
    base = type(tiny_llama()).from_pretrained(root / "base")
    merged = peft.PeftModel.from_pretrained(base, root / "back").merge_and_unload().state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6)


def run_command(*args):
    return subprocess.run([sys.executable, "-m", "ftpeft.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("merge", "{root}/missing", "{root}/adapter", "{root}/out"), "base checkpoint directory '{root}/missing' does not exist"),
        (("merge", "{root}/base", "{root}/missing", "{root}/out"), "adapter folder '{root}/missing' does not exist"),
        (("merge", "{root}/base", "{root}/base", "{root}/out"), "neither adapter_config.json"),
        (("inspect", "{root}/missing"), "'{root}/missing' does not exist"),
        (("merge", "{root}/base", "{root}/adapter", "{root}/out", "--rename-prefix", "model"), "OLD=NEW"),
    ],
)
def test_user_mistakes_print_one_line(checkpoint, arguments, message):
    root, _ = checkpoint

    result = run_command(*(a.format(root=root) for a in arguments))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message.format(root=root) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_adapter_for_another_base_is_one_line(checkpoint, tmp_path):
    root, _ = checkpoint
    other = tiny_llama()
    other.config.hidden_size = 48
    bigger = type(other)(other.config)
    bigger.save_pretrained(tmp_path / "other")

    result = run_command("merge", tmp_path / "other", root / "adapter", tmp_path / "out")

    assert result.returncode == 1
    assert "another base model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_is_one_line(checkpoint):
    root, _ = checkpoint
    shard = sorted((root / "base").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])

    result = run_command("merge", root / "base", root / "adapter", root / "out")

    assert result.returncode == 1
    assert "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_merge_refuses_existing_checkpoint_directory(checkpoint):
    root, _ = checkpoint

    assert main(["merge", str(root / "base"), str(root / "adapter"), str(root / "out")]) == 0
    result = run_command("merge", root / "base", root / "adapter", root / "out")

    assert result.returncode == 1
    assert "already contains a checkpoint" in result.stderr


def test_convert_keeps_peft_fields_and_refuses_same_folder(checkpoint):
    root, _ = checkpoint
    config_path = root / "adapter" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data.update(base_model_name_or_path="my-org/tiny-llama", task_type="CAUSAL_LM", init_lora_weights=False)
    config_path.write_text(json.dumps(data))

    assert main(["convert", str(root / "adapter"), str(root / "ours"), "--to", "ftpeft"]) == 0
    assert main(["convert", str(root / "ours"), str(root / "back"), "--to", "peft"]) == 0
    same = run_command("convert", root / "adapter", root / "adapter", "--to", "peft")

    back = json.loads((root / "back" / "adapter_config.json").read_text())
    assert back["base_model_name_or_path"] == "my-org/tiny-llama"
    assert back["task_type"] == "CAUSAL_LM"
    assert back["init_lora_weights"] is False
    assert same.returncode == 1
    assert "must differ" in same.stderr


def test_version_and_non_safetensors_file(checkpoint):
    root, _ = checkpoint

    version = run_command("--version")
    wrong_file = run_command("inspect", root / "adapter" / "adapter_config.json")

    assert version.stdout.startswith("ftpeft ")
    assert wrong_file.returncode == 1
    assert "is not a safetensors file" in wrong_file.stderr


def assert_merge_matches(root, expected):
    """Run ``ftpeft merge`` on root/base and root/adapter and compare every merged tensor with ``expected``."""
    assert main(["merge", str(root / "base"), str(root / "adapter"), str(root / "out")]) == 0

    merged = load_state(root / "out")
    for key, value in merged.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    "options",
    [
        {"target_modules": ["q_proj", "embed_tokens"], "use_dora": True},
        {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    ],
    ids=["dora-embedding", "experts"],
)
def test_merge_handles_every_layer_kind(tmp_path, options):
    transformers = pytest.importorskip("transformers")
    if "target_parameters" in options:
        config = transformers.MixtralConfig(
            vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
        )
        model = transformers.MixtralForCausalLM(config).eval()
        # transformers writes Mixtral checkpoints in its older per-expert layout, which the adapter does not
        # target, so the base is written in the model's own layout.
        save_state(tmp_path / "base", model.state_dict())
    else:
        model = tiny_llama()
        model.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **options))
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    assert_merge_matches(tmp_path, expected)


def test_merge_warns_about_tied_embeddings(tmp_path, capsys):
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0

    assert "warning: config.json sets tie_word_embeddings, so the merged 'model.embed_tokens.weight'" in capsys.readouterr().err


def test_inspect_reads_expert_adapter_with_base(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2,
    )
    model = transformers.MixtralForCausalLM(config).eval()
    save_state(tmp_path / "base", model.state_dict())
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")

    assert main(["inspect", str(tmp_path / "adapter")]) == 1
    assert "Pass --base BASE_DIR" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")]) == 0
    assert "model.layers.0.mlp.experts.down_proj     2" in capsys.readouterr().out


def test_merge_rebuilds_residual_of_pissa_adapter(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}

    assert_merge_matches(tmp_path, expected)
