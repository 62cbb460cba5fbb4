"""Tests of adapter arithmetic against dense updates written out by hand."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from ftpeft import LoRA, LoRAConfig, LoRAParameters, functional_forward, spec_of
from ftpeft.arithmetic import (
    add_deltas,
    dare_merge,
    deltas_to_lora,
    dense_deltas,
    negate,
    scale_adapter,
    svd_compress,
    ties_merge,
    weighted_sum,
)

# Source 0: plain scale alpha / r, with a per-module rank and alpha on "down".
CONFIG_0 = LoRAConfig(
    module_name_pattern=["up", "down"],
    params=LoRAParameters(r=2, alpha=3.0),
    rank_pattern={"down": 3},
    alpha_pattern={"down": 6.0},
)
# Source 1: rsLoRA, scale alpha / sqrt(r), on "up" and "side". No other source adapts "side".
CONFIG_1 = LoRAConfig(module_name_pattern=["up", "side"], params=LoRAParameters(r=4, alpha=5.0, use_rslora=True))

SCALE_0 = {"up": 3.0 / 2, "down": 6.0 / 3}
SCALE_1 = {"up": 5.0 / math.sqrt(4), "side": 5.0 / math.sqrt(4)}

# (out, in) of each weight of the model below.
SIZES = {"up": (6, 5), "down": (3, 6), "side": (4, 5)}


class Net(nn.Module):
    """``down(relu(up(x)) + side(x)[..., :1])``: three linear layers, each reached through F.linear."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(5, 6)
        self.down = nn.Linear(6, 3)
        self.side = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)) + self.side(x)[..., :1])


def random_adapter(ranks: dict[str, int], generator: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    adapter = {}
    for module, rank in ranks.items():
        out_features, in_features = SIZES[module]
        adapter[f"{module}.lora_A"] = torch.randn(rank, in_features, generator=generator, dtype=dtype)
        adapter[f"{module}.lora_B"] = torch.randn(out_features, rank, generator=generator, dtype=dtype)
    return adapter


def two_sources():
    generator = torch.Generator().manual_seed(0)
    adapter_0 = random_adapter({"up": 2, "down": 3}, generator)
    adapter_1 = random_adapter({"up": 4, "side": 4}, generator)
    return (CONFIG_0, adapter_0), (CONFIG_1, adapter_1)


def hand_delta(adapter, module, scale):
    return scale * adapter[f"{module}.lora_B"].double() @ adapter[f"{module}.lora_A"].double()


def delta_of(config, adapter, module):
    """The update that LoRA applies for ``module``, computed from the config's scale."""
    return config.scale_of(module) * adapter[f"{module}.lora_B"].double() @ adapter[f"{module}.lora_A"].double()


def snapshot(adapter):
    return {key: leaf.clone() for key, leaf in adapter.items()}


def assert_unchanged(adapter, copy):
    assert list(adapter) == list(copy)
    for key in copy:
        assert torch.equal(adapter[key], copy[key]), key


def assert_close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5)


# weighted_sum


def test_weighted_sum_matches_hand_math():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()

    config, adapter = weighted_sum([(config_0, adapter_0), (config_1, adapter_1)], [0.5, -2.0])

    expected = {
        "up": 0.5 * hand_delta(adapter_0, "up", SCALE_0["up"]) - 2.0 * hand_delta(adapter_1, "up", SCALE_1["up"]),
        "down": 0.5 * hand_delta(adapter_0, "down", SCALE_0["down"]),
        "side": -2.0 * hand_delta(adapter_1, "side", SCALE_1["side"]),
    }
    for module, delta in expected.items():
        assert config.scale_of(module) == 1.0
        assert_close(delta_of(config, adapter, module), delta)


def test_weighted_sum_concatenates_ranks():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()

    config, adapter = weighted_sum([(config_0, adapter_0), (config_1, adapter_1)], [1.0, 1.0])

    assert {module: config.rank_of(module) for module in SIZES} == {"up": 6, "down": 3, "side": 4}
    assert adapter["up.lora_A"].shape == (6, 5)
    assert adapter["up.lora_B"].shape == (6, 6)
    assert torch.equal(adapter["up.lora_A"][:2], adapter_0["up.lora_A"])
    assert torch.equal(adapter["up.lora_A"][2:], adapter_1["up.lora_A"])
    assert config.params.use_rslora is False


def test_weighted_sum_config_fits_lora_merge():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    base = Net().state_dict()

    config, adapter = weighted_sum([(config_0, adapter_0), (config_1, adapter_1)], [0.5, 0.25])
    merged = LoRA(config).merge({**base, **adapter})

    assert LoRA(config).targets(spec_of(base)) == ["down", "side", "up"]
    expected_up = base["up.weight"] + 0.5 * hand_delta(adapter_0, "up", SCALE_0["up"]) + 0.25 * hand_delta(
        adapter_1, "up", SCALE_1["up"]
    )
    assert_close(merged["up.weight"], expected_up)
    assert_close(merged["side.weight"], base["side.weight"] + 0.25 * hand_delta(adapter_1, "side", SCALE_1["side"]))
    assert_close(merged["down.weight"], base["down.weight"] + 0.5 * hand_delta(adapter_0, "down", SCALE_0["down"]))


def test_weighted_sum_forward_equals_sum_of_updates():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    model = Net()
    base = model.state_dict()
    x = torch.randn(7, 5)

    config, adapter = weighted_sum([(config_0, adapter_0), (config_1, adapter_1)], [1.0, -1.0])
    output = functional_forward(model, LoRA(config))((adapter, base), x)

    weights = dict(base)
    weights["up.weight"] = base["up.weight"] + hand_delta(adapter_0, "up", SCALE_0["up"]).float() - hand_delta(
        adapter_1, "up", SCALE_1["up"]
    ).float()
    weights["down.weight"] = base["down.weight"] + hand_delta(adapter_0, "down", SCALE_0["down"]).float()
    weights["side.weight"] = base["side.weight"] - hand_delta(adapter_1, "side", SCALE_1["side"]).float()
    torch.testing.assert_close(output, functional_forward(model)(weights, x), rtol=1e-4, atol=1e-4)


def test_weighted_sum_fan_in_fan_out_transposes():
    generator = torch.Generator().manual_seed(3)
    config = LoRAConfig(module_name_pattern=["c_attn"], params=LoRAParameters(r=2, alpha=4.0, fan_in_fan_out=True))
    # The weight is stored (in, out) = (5, 7), so A is (r, 5) and B is (7, r).
    first = {"c_attn.lora_A": torch.randn(2, 5, generator=generator), "c_attn.lora_B": torch.randn(7, 2, generator=generator)}
    second = {"c_attn.lora_A": torch.randn(2, 5, generator=generator), "c_attn.lora_B": torch.randn(7, 2, generator=generator)}

    result_config, result = weighted_sum([(config, first), (config, second)], [1.0, 3.0])

    assert result_config.params.fan_in_fan_out is True
    expected = (2.0 * first["c_attn.lora_B"] @ first["c_attn.lora_A"] + 3.0 * 2.0 * second["c_attn.lora_B"] @ second["c_attn.lora_A"]).T
    assert_close(dense_deltas(result_config, result)["c_attn.weight"], expected)
    assert dense_deltas(result_config, result)["c_attn.weight"].shape == (5, 7)


def test_weighted_sum_rejects_mixed_fan_in_fan_out():
    (config_0, adapter_0), _ = two_sources()
    transposed = config_0.model_copy(update={"params": config_0.params.model_copy(update={"fan_in_fan_out": True})})

    with pytest.raises(ValueError, match=r"fan_in_fan_out.*module 'up'"):
        weighted_sum([(config_0, adapter_0), (transposed, adapter_0)], [1.0, 1.0])


def test_weighted_sum_rejects_mismatched_shapes():
    (config_0, adapter_0), _ = two_sources()
    other = dict(adapter_0)
    other["up.lora_A"] = torch.randn(2, 9)

    with pytest.raises(ValueError, match=r"Module 'up' has \(out, in\) = \(6, 9\) in source 1 but \(6, 5\) in source 0"):
        weighted_sum([(config_0, adapter_0), (config_0, other)], [1.0, 1.0])


def test_weighted_sum_rejects_weight_count():
    source, _ = two_sources()

    with pytest.raises(ValueError, match="2 sources but 1 weights"):
        weighted_sum([source, source], [1.0])


def test_weighted_sum_rejects_empty_sources():
    with pytest.raises(ValueError, match="at least one"):
        weighted_sum([], [])


def test_adapter_rank_must_match_config():
    (config_0, adapter_0), _ = two_sources()
    wrong = LoRAConfig(module_name_pattern=["up", "down"], params=LoRAParameters(r=2))  # no rank_pattern: down has r=2

    with pytest.raises(ValueError, match=r"source 0: LoRA leaves of 'down' have shapes \(3, 6\).*r=2"):
        weighted_sum([(wrong, adapter_0)], [1.0])


def test_adapter_rejects_non_lora_key():
    (config_0, adapter_0), _ = two_sources()

    with pytest.raises(ValueError, match="key 'up.weight' is not a LoRA leaf"):
        dense_deltas(config_0, {**adapter_0, "up.weight": torch.zeros(6, 5)})


def test_adapter_rejects_missing_lora_b():
    (config_0, adapter_0), _ = two_sources()
    partial = {key: leaf for key, leaf in adapter_0.items() if key != "down.lora_B"}

    with pytest.raises(ValueError, match="module 'down' has no 'down.lora_B'"):
        scale_adapter(config_0, partial, 2.0)


def test_weighted_sum_does_not_mutate_inputs():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    copies = snapshot(adapter_0), snapshot(adapter_1)
    configs = config_0.model_dump_json(), config_1.model_dump_json()

    weighted_sum([(config_0, adapter_0), (config_1, adapter_1)], [0.5, -2.0])

    assert_unchanged(adapter_0, copies[0])
    assert_unchanged(adapter_1, copies[1])
    assert (config_0.model_dump_json(), config_1.model_dump_json()) == configs


def test_suffix_module_paths_keep_their_own_rank():
    # "q" is a dot-suffix of "attn.q", so a rank_pattern key for "q" also matches "attn.q".
    generator = torch.Generator().manual_seed(5)
    config = LoRAConfig(module_name_pattern=["q"], params=LoRAParameters(r=3, alpha=3.0))
    adapter = {
        "q.lora_A": torch.randn(3, 4, generator=generator),
        "q.lora_B": torch.randn(1, 3, generator=generator),  # out = 1 caps this module's SVD rank at 1
        "attn.q.lora_A": torch.randn(3, 4, generator=generator),
        "attn.q.lora_B": torch.randn(4, 3, generator=generator),
        "layers.attn.q.lora_A": torch.randn(3, 4, generator=generator),
        "layers.attn.q.lora_B": torch.randn(4, 3, generator=generator),
    }

    result_config, result = svd_compress(config, adapter, 3)

    assert result_config.rank_of("q") == 1
    assert result_config.rank_of("attn.q") == 3
    assert result_config.rank_of("layers.attn.q") == 3
    base = {"q.weight": torch.zeros(1, 4), "attn.q.weight": torch.zeros(4, 4), "layers.attn.q.weight": torch.zeros(4, 4)}
    merged = LoRA(result_config).merge({**base, **result})
    for module in ("q", "attn.q", "layers.attn.q"):
        assert_close(merged[f"{module}.weight"], hand_delta(adapter, module, 1.0))


# scale_adapter and negate


def test_scale_adapter_multiplies_update():
    _, (config_1, adapter_1) = two_sources()

    config, adapter = scale_adapter(config_1, adapter_1, 0.25)

    assert config == config_1
    for module in ("up", "side"):
        assert_close(delta_of(config, adapter, module), 0.25 * hand_delta(adapter_1, module, SCALE_1[module]))


def test_negate_flips_sign():
    (config_0, adapter_0), _ = two_sources()
    copy = snapshot(adapter_0)

    config, adapter = negate(config_0, adapter_0)

    for module in ("up", "down"):
        assert_close(delta_of(config, adapter, module), -hand_delta(adapter_0, module, SCALE_0[module]))
    assert_unchanged(adapter_0, copy)


def test_negated_adapter_cancels_original():
    (config_0, adapter_0), _ = two_sources()

    config, adapter = weighted_sum([(config_0, adapter_0), negate(config_0, adapter_0)], [1.0, 1.0])

    for delta in dense_deltas(config, adapter).values():
        assert delta.abs().max() < 1e-5


# svd_compress


def hand_truncated_svd(delta, rank):
    u, singular, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :rank] @ torch.diag(singular[:rank]) @ vh[:rank]


def test_svd_compress_is_truncated_svd():
    _, (config_1, adapter_1) = two_sources()

    config, adapter = svd_compress(config_1, adapter_1, 2)

    for module in ("up", "side"):
        expected = hand_truncated_svd(hand_delta(adapter_1, module, SCALE_1[module]), 2)
        assert config.rank_of(module) == 2
        assert adapter[f"{module}.lora_A"].shape == (2, SIZES[module][1])
        assert_close(delta_of(config, adapter, module), expected)


def test_svd_compress_full_rank_reproduces_delta():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()

    for config, adapter, scales in ((config_0, adapter_0, SCALE_0), (config_1, adapter_1, SCALE_1)):
        compressed_config, compressed = svd_compress(config, adapter, 16)
        for module, scale in scales.items():
            assert compressed_config.rank_of(module) == min(config.rank_of(module), *SIZES[module])
            assert_close(delta_of(compressed_config, compressed, module), hand_delta(adapter, module, scale))


def test_svd_compress_rank_one_error_is_optimal():
    (config_0, adapter_0), _ = two_sources()
    delta = hand_delta(adapter_0, "down", SCALE_0["down"])

    config, adapter = svd_compress(config_0, adapter_0, 1)

    # Eckart-Young: the Frobenius error of the best rank-1 approximation is the norm of the remaining singular values.
    singular = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(delta - delta_of(config, adapter, "down"))
    assert abs(error.item() - singular[1:].norm().item()) < 1e-5


def test_svd_compress_rejects_bad_rank():
    (config_0, adapter_0), _ = two_sources()

    with pytest.raises(ValueError, match="positive integer rank, got 0"):
        svd_compress(config_0, adapter_0, 0)


def test_svd_compress_keeps_dtype_and_inputs():
    generator = torch.Generator().manual_seed(2)
    config = LoRAConfig(module_name_pattern=["up"], params=LoRAParameters(r=2, alpha=3.0))
    adapter = random_adapter({"up": 2}, generator, dtype=torch.float64)
    copy = snapshot(adapter)

    _, compressed = svd_compress(config, adapter, 1)

    assert compressed["up.lora_A"].dtype == torch.float64
    assert_unchanged(adapter, copy)


# ties_merge


def exact_adapter(delta, scale):
    """An adapter whose update is exactly ``delta``: A = I and B = delta / scale."""
    size = delta.shape[1]
    return {"w.lora_A": torch.eye(size, dtype=torch.float64), "w.lora_B": delta.double() / scale}


def test_ties_merge_small_example():
    config = LoRAConfig(module_name_pattern=["w"], params=LoRAParameters(r=2, alpha=4.0))  # scale 2
    delta_1 = torch.tensor([[4.0, -1.0], [2.0, 0.5]])
    delta_2 = torch.tensor([[-3.0, 2.0], [1.0, -6.0]])
    delta_3 = torch.tensor([[1.0, -3.0], [0.25, -1.0]])
    sources = [(config, exact_adapter(delta, 2.0)) for delta in (delta_1, delta_2, delta_3)]

    merged = ties_merge(sources, density=0.5)

    # Trim to the 2 largest magnitudes each; delta_3 keeps 3 entries because 1 and -1 tie:
    #   t1 = [[4, 0], [2, 0]], t2 = [[-3, 0], [0, -6]], t3 = [[1, -3], [0, -1]]
    # Elected sign of the sum [[2, -3], [2, -7]]: [[+, -], [+, -]].
    # Disjoint mean: (4 + 1) / 2, -3 / 1, 2 / 1, (-6 - 1) / 2.
    expected = torch.tensor([[2.5, -3.0], [2.0, -3.5]], dtype=torch.float64)
    assert_close(merged["w.weight"], expected)


def hand_ties(deltas, density):
    """TIES-merging written entry by entry."""
    trimmed = []
    for delta in deltas:
        magnitudes = sorted(delta.abs().flatten().tolist(), reverse=True)
        threshold = magnitudes[math.ceil(density * len(magnitudes)) - 1]
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))

    result = torch.zeros_like(deltas[0])
    rows, columns = result.shape
    for i in range(rows):
        for j in range(columns):
            total = sum(t[i, j].item() for t in trimmed)
            sign = (total > 0) - (total < 0)
            agreeing = [t[i, j].item() for t in trimmed if t[i, j].item() != 0 and ((t[i, j].item() > 0) - (t[i, j].item() < 0)) == sign]
            result[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return result


def test_ties_merge_matches_entrywise_reference():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    weights = [1.0, 0.5]

    merged = ties_merge([(config_0, adapter_0), (config_1, adapter_1)], density=0.3, weights=weights)

    up = [1.0 * hand_delta(adapter_0, "up", SCALE_0["up"]), 0.5 * hand_delta(adapter_1, "up", SCALE_1["up"])]
    assert_close(merged["up.weight"], hand_ties(up, 0.3))
    # A module in one source only: the elected sign is its own, so the result is its trimmed delta.
    side = 0.5 * hand_delta(adapter_1, "side", SCALE_1["side"])
    assert_close(merged["side.weight"], hand_ties([side], 0.3))
    assert set(merged) == {"up.weight", "down.weight", "side.weight"}


def test_ties_merge_density_one_single_source_is_identity():
    (config_0, adapter_0), _ = two_sources()
    copy = snapshot(adapter_0)

    merged = ties_merge([(config_0, adapter_0)], density=1.0)

    assert_close(merged["down.weight"], hand_delta(adapter_0, "down", SCALE_0["down"]))
    assert_unchanged(adapter_0, copy)


def test_ties_merge_rejects_bad_density():
    source, _ = two_sources()

    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ties_merge([source], density=0.0)


def test_merges_reject_mismatched_shapes():
    (config_0, adapter_0), _ = two_sources()
    other = dict(adapter_0)
    other["up.lora_B"] = torch.randn(8, 2)

    with pytest.raises(ValueError, match=r"'up.weight' has shape \(8, 5\) in source 1 but \(6, 5\) in source 0"):
        ties_merge([(config_0, adapter_0), (config_0, other)], density=0.5)


# dare_merge


def test_dare_merge_matches_documented_draws():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    weights, p = [2.0, -1.0], 0.4

    merged = dare_merge(
        [(config_0, adapter_0), (config_1, adapter_1)],
        drop_probability=p,
        weights=weights,
        generator=torch.Generator().manual_seed(11),
    )

    # Draws go over weight keys in sorted order, and within a key over the sources in order.
    generator = torch.Generator().manual_seed(11)
    deltas = {
        "down.weight": [(2.0, hand_delta(adapter_0, "down", SCALE_0["down"]))],
        "side.weight": [(-1.0, hand_delta(adapter_1, "side", SCALE_1["side"]))],
        "up.weight": [(2.0, hand_delta(adapter_0, "up", SCALE_0["up"])), (-1.0, hand_delta(adapter_1, "up", SCALE_1["up"]))],
    }
    for weight_key, terms in deltas.items():
        expected = torch.zeros_like(terms[0][1])
        for weight, delta in terms:
            keep = torch.rand(delta.shape, generator=generator) >= p
            expected = expected + weight * torch.where(keep, delta / (1 - p), torch.zeros_like(delta))
        assert_close(merged[weight_key], expected)


def test_dare_merge_zero_drop_is_weighted_sum():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()

    merged = dare_merge([(config_0, adapter_0), (config_1, adapter_1)], drop_probability=0.0, weights=[0.5, 2.0])

    expected_up = 0.5 * hand_delta(adapter_0, "up", SCALE_0["up"]) + 2.0 * hand_delta(adapter_1, "up", SCALE_1["up"])
    assert_close(merged["up.weight"], expected_up)


def test_dare_merge_generator_reproducible():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    sources = [(config_0, adapter_0), (config_1, adapter_1)]

    first = dare_merge(sources, drop_probability=0.5, generator=torch.Generator().manual_seed(1))
    second = dare_merge(sources, drop_probability=0.5, generator=torch.Generator().manual_seed(1))
    third = dare_merge(sources, drop_probability=0.5, generator=torch.Generator().manual_seed(2))

    assert torch.equal(first["up.weight"], second["up.weight"])
    assert not torch.equal(first["up.weight"], third["up.weight"])


def test_dare_merge_mean_is_unbiased():
    (config_0, adapter_0), _ = two_sources()
    generator = torch.Generator().manual_seed(0)

    runs = [dare_merge([(config_0, adapter_0)], drop_probability=0.5, generator=generator)["up.weight"] for _ in range(2000)]

    mean = torch.stack(runs).mean(dim=0)
    delta = hand_delta(adapter_0, "up", SCALE_0["up"])
    # Each entry of a run is 0 or 2 * delta, so the mean of 2000 runs has standard error |delta| / sqrt(2000).
    assert ((mean.double() - delta).abs() <= 5 * delta.abs() / math.sqrt(2000) + 1e-6).all()


def test_dare_merge_rejects_bad_probability():
    source, _ = two_sources()

    with pytest.raises(ValueError, match=r"drop_probability must be in \[0, 1\)"):
        dare_merge([source], drop_probability=1.0)


# deltas_to_lora and add_deltas


def test_deltas_to_lora_is_truncated_svd():
    generator = torch.Generator().manual_seed(4)
    deltas = {"up.weight": torch.randn(6, 5, generator=generator), "down.weight": torch.randn(3, 6, generator=generator)}

    config, adapter = deltas_to_lora(deltas, 2)

    for key, delta in deltas.items():
        module = key.rpartition(".")[0]
        assert_close(delta_of(config, adapter, module), hand_truncated_svd(delta, 2))
    full_config, full = deltas_to_lora(deltas, 6)
    assert full_config.rank_of("down") == 3
    assert_close(delta_of(full_config, full, "up"), deltas["up.weight"])


def test_deltas_to_lora_fan_in_fan_out():
    delta = torch.randn(5, 7)  # stored (in, out)

    config, adapter = deltas_to_lora({"c_attn.weight": delta}, 5, fan_in_fan_out=True)

    assert adapter["c_attn.lora_A"].shape == (5, 5)
    assert adapter["c_attn.lora_B"].shape == (7, 5)
    assert_close(dense_deltas(config, adapter)["c_attn.weight"], delta)


def test_deltas_to_lora_half_delta_gives_float32_leaves():
    _, adapter = deltas_to_lora({"w.weight": torch.randn(4, 4).to(torch.bfloat16)}, 2)

    assert adapter["w.lora_A"].dtype == torch.float32


def test_deltas_to_lora_rejects_non_weight_key():
    with pytest.raises(ValueError, match="'w.bias' does not end in 'weight'"):
        deltas_to_lora({"w.bias": torch.randn(4, 4)}, 2)


def test_ties_merge_into_base_tree():
    (config_0, adapter_0), (config_1, adapter_1) = two_sources()
    base = Net().state_dict()
    base_copy = snapshot(base)

    merged_deltas = ties_merge([(config_0, adapter_0), (config_1, adapter_1)], density=0.5)
    merged = add_deltas(base, merged_deltas)

    assert_close(merged["up.weight"], base["up.weight"] + merged_deltas["up.weight"])
    assert merged["up.bias"] is base["up.bias"]
    assert merged["up.weight"].dtype == torch.float32
    assert_unchanged(base, base_copy)


def test_add_deltas_rejects_missing_weight_and_shape():
    base = Net().state_dict()

    with pytest.raises(KeyError, match="'nothing.weight'"):
        add_deltas(base, {"nothing.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"'up.weight' has shape \(5, 6\) but the weight has \(6, 5\)"):
        add_deltas(base, {"up.weight": torch.zeros(5, 6)})


def test_dense_deltas_match_lora_merge():
    (config_0, adapter_0), _ = two_sources()
    model = nn.Sequential(OrderedDict(up=nn.Linear(5, 6), down=nn.Linear(6, 3)))
    base = model.state_dict()

    merged = LoRA(config_0).merge({**base, **adapter_0})

    # merge fuses the product and the sum in one addmm, so the float32 sums may differ in the last bit.
    torch.testing.assert_close(add_deltas(base, dense_deltas(config_0, adapter_0))["down.weight"], merged["down.weight"], rtol=1e-6, atol=1e-6)
