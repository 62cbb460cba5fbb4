"""Tests on real transformers models built from small configs, with peft as an oracle."""

from __future__ import annotations

import copy

import pytest
import torch

from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, spec_of, split_trainable

from conftest import copy_into_peft, randomise_lora_b, state_of, tiny_bert, tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(pattern, r=4, alpha=8.0, **params):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha, **params)))


def llama_inputs():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def test_llama_fresh_adapters_equal_base():
    model = tiny_llama()
    method = lora(LLAMA_TARGETS)
    tree = method.inject(state_of(model))
    ids = llama_inputs()

    out = functional_forward(model, method)(tree, input_ids=ids).logits

    torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=0, atol=0)


def test_llama_planned_on_meta_matches_real():
    with torch.device("meta"):
        meta_model = tiny_llama()
    method = lora(LLAMA_TARGETS)

    planned = method.inject(spec_of(meta_model))
    real = spec_of(method.inject(state_of(tiny_llama())))

    assert list(planned) == list(real)
    assert all(planned[k].shape == real[k].shape and planned[k].dtype == real[k].dtype for k in planned)
    assert sum(1 for k in planned if k.endswith("lora_A")) == 2 * len(LLAMA_TARGETS)


def test_llama_forward_equals_merged_forward():
    model = tiny_llama()
    method = lora(LLAMA_TARGETS)
    tree = randomise_lora_b(method.inject(state_of(model)))
    ids = llama_inputs()

    adapted = functional_forward(model, method)(tree, input_ids=ids).logits
    merged = functional_forward(model)(method.merge(tree), input_ids=ids).logits

    assert not torch.allclose(adapted, model(input_ids=ids).logits, atol=1e-3)
    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


def test_llama_tied_lm_head_adapter_stays_out_of_embedding():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    method = lora(["lm_head"])
    tree = randomise_lora_b(method.inject(state_of(model)))
    ids = llama_inputs()

    out = functional_forward(model, method)(tree, input_ids=ids, output_hidden_states=True)

    base = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], base.hidden_states[-1])
    adapted_head = tree["lm_head.weight"] + 2.0 * tree["lm_head.lora_B"] @ tree["lm_head.lora_A"]
    torch.testing.assert_close(out.logits, base.hidden_states[-1] @ adapted_head.T, rtol=1e-5, atol=1e-5)


def test_bert_forward_equals_merged_forward():
    model = tiny_bert()
    method = lora(r".*\.(query|key|value|dense)", r=2, alpha=4.0)
    tree = randomise_lora_b(method.inject(state_of(model)))
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)

    adapted = functional_forward(model, method)(tree, input_ids=ids, attention_mask=mask).last_hidden_state
    merged = functional_forward(model)(method.merge(tree), input_ids=ids, attention_mask=mask).last_hidden_state

    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)
    # Six per layer (query, key, value and three dense layers) plus the pooler.
    assert sum(1 for k in tree if k.endswith("lora_A")) == 2 * 6 + 1


def test_llama_matches_peft_oracle():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    method = lora(LLAMA_TARGETS, r=4, alpha=8.0)
    tree = randomise_lora_b(method.inject(state_of(model), generator=torch.Generator().manual_seed(0)))
    ids = llama_inputs()

    peft_model = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, lora_dropout=0.0),
    )
    assert copy_into_peft(peft_model, tree) == 2 * len(LLAMA_TARGETS)
    peft_model.eval()

    ours = functional_forward(model, method)(tree, input_ids=ids).logits
    theirs = peft_model(input_ids=ids).logits

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    merged_theirs = {k: v for k, v in peft_model.merge_and_unload().state_dict().items()}
    merged_ours = method.merge(tree)
    for key, value in merged_ours.items():
        torch.testing.assert_close(value, merged_theirs[key], rtol=1e-6, atol=1e-6)


def test_llama_grad_reaches_only_adapters():
    model = tiny_llama()
    method = lora(["q_proj", "v_proj"])
    tree = randomise_lora_b(method.inject(state_of(model)))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(model, method)
    ids = llama_inputs()

    def loss(trainable):
        return fn((trainable, frozen), input_ids=ids, labels=ids).loss

    grads = torch.func.grad(loss)(trainable)

    assert set(grads) == set(trainable)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.slow
def test_compile_fullgraph_on_llama_decoder_layer():
    torch._dynamo.reset()
    model = tiny_llama(num_layers=1)
    layer = model.model.layers[0]
    method = lora(LLAMA_TARGETS)
    tree = randomise_lora_b(method.inject(state_of(layer)))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(layer, method)
    hidden = torch.randn(2, 7, 32)
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(7)[None].expand(2, -1))

    def run(trainable, frozen, hidden):
        out = fn((trainable, frozen), hidden, position_embeddings=position_embeddings, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    def loss(trainable, frozen, hidden):
        return run(trainable, frozen, hidden).square().mean()

    eager_out, eager_grads = run(trainable, frozen, hidden), torch.func.grad(loss)(trainable, frozen, hidden)
    compiled_out = torch.compile(run, fullgraph=True)(trainable, frozen, hidden)
    compiled_grads = torch.compile(torch.func.grad(loss), fullgraph=True)(trainable, frozen, hidden)

    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for key in trainable:
        torch.testing.assert_close(compiled_grads[key], eager_grads[key], rtol=1e-4, atol=1e-6)


def test_gpt2_conv1d_matches_peft_oracle():
    peft = pytest.importorskip("peft")
    model = tiny_gpt2()
    targets = ["c_attn", "c_proj", "c_fc"]
    method = lora(targets, r=2, alpha=4.0, fan_in_fan_out=True)
    tree = randomise_lora_b(method.inject(state_of(model)))
    ids = llama_inputs()
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=True))

    assert copy_into_peft(peft_model, tree) == 2 * 4
    ours = functional_forward(model, method)(tree, input_ids=ids).logits
    merged = functional_forward(model)(method.merge(tree), input_ids=ids).logits

    torch.testing.assert_close(ours, peft_model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_match_peft(init):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    method = lora(["q_proj", "v_proj"], r=4, alpha=8.0, init=init)
    tree = method.inject(state_of(model))
    peft_state = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    ).state_dict()
    ids = llama_inputs()

    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        torch.testing.assert_close(tree[f"{layer}.lora_A"], peft_state[f"base_model.model.{layer}.lora_A.default.weight"])
        torch.testing.assert_close(tree[f"{layer}.lora_B"], peft_state[f"base_model.model.{layer}.lora_B.default.weight"])
        torch.testing.assert_close(tree[f"{layer}.weight"], peft_state[f"base_model.model.{layer}.base_layer.weight"])
    out = functional_forward(model, method)(tree, input_ids=ids).logits
    torch.testing.assert_close(out, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
