"""Structured pruning, coupling: what the dependency graph ties together, freezes and reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchslim.models as models
from torchslim.errors import ModelError
from torchslim.prune.structured import (
    ChannelPruning,
    PrunedMultiheadAttention,
    build_dependency_graph,
    masked_reference,
    prune_channels,
)



@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def _group_of(graph, name, role="out"):
    return next(g for g in graph.groups if (name, role) in g.slots)


def _assert_matches_masked(model, pruned, x, atol=1e-5):
    ref = masked_reference(model, pruned.torchslim_history[0]["ops"]).eval()
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), ref(x), atol=atol), (pruned(x) - ref(x)).abs().max()


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        y = self.bn(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(self.c(torch.relu(y)).view(x.size(0), -1))


def test_concat_offsets_and_flatten_columns():
    torch.manual_seed(0)
    model, x = Concat().eval(), torch.randn(2, 1, 4, 4)
    graph = build_dependency_graph(model, x)
    ga, gb = _group_of(graph, "a"), _group_of(graph, "b")
    assert len(ga) == 3 and len(gb) == 5
    # channel 1 of b is channel 3+1 of the concatenation, for the BatchNorm and the reader
    assert gb.units[1][("bn", "out")] == [4] and gb.units[1][("c", "in")] == [4]
    # a channel of c covers its 4x4 spatial positions in the flattened linear input
    gc = _group_of(graph, "c")
    assert gc.units[2][("fc", "in")] == list(range(32, 48))
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer")).model
    assert pruned.bn.num_features == pruned.c.in_channels == pruned.a.out_channels + pruned.b.out_channels
    assert pruned.fc.in_features == pruned.c.out_channels * 16
    _assert_matches_masked(model, pruned, x)


def test_residual_branches_share_channels():
    torch.manual_seed(0)
    model = models.create("resnet20", input_size=8, width=4, blocks=2).eval()
    x = torch.randn(2, 1, 8, 8)
    graph = build_dependency_graph(model, x)
    stage1 = _group_of(graph, "conv1")
    for name in ("layer1.0.conv2", "layer1.1.conv2", "layer2.0.shortcut.0"):
        assert (name, "out") in stage1.slots or (name, "in") in stage1.slots
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, importance="random")).model
    width = pruned.conv1.out_channels
    assert pruned.layer1[0].conv2.out_channels == pruned.layer1[1].conv2.out_channels == width < 4
    assert pruned.layer2[0].shortcut[0].in_channels == width
    _assert_matches_masked(model, pruned, x)


def test_classifier_outputs_never_pruned_and_input_frozen():
    model = models.create("lenet300_100", input_size=8, num_classes=4, hidden1=16, hidden2=8)
    graph = build_dependency_graph(model, torch.randn(1, 1, 8, 8))
    assert all(("classifier.4", "out") not in g.slots for g in graph.groups)
    assert any("output" in f.reason for f in graph.frozen)
    pruned = prune_channels(model, torch.randn(1, 1, 8, 8), ChannelPruning(ratio=0.8, max_ratio=0.95)).model
    assert pruned.classifier[4].out_features == 4 and pruned.classifier[0].in_features == 64


def test_depthwise_and_grouped_convs_remove_whole_groups():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),   # depthwise
        nn.Conv2d(8, 12, 1, groups=4), nn.ReLU(),                                   # 4 groups: 2 in, 3 out each
        nn.Conv2d(12, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()
    x = torch.randn(2, 1, 6, 6)
    graph = build_dependency_graph(model, x)
    # the depthwise conv ties its channels to conv 0's; group j of conv 6 reads two of them
    (g,) = graph.groups
    assert len(g) == 4 and g.units[1] == {("0", "out"): [2, 3], ("1", "out"): [2, 3], ("3", "groups"): [2, 3],
                                          ("4", "out"): [2, 3], ("6", "groups"): [1], ("8", "in"): [3, 4, 5]}
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer")).model
    assert pruned[3].groups == pruned[3].in_channels == pruned[0].out_channels
    assert pruned[6].groups == 2 and pruned[6].in_channels == 4 and pruned[6].out_channels == 6
    _assert_matches_masked(model, pruned, x)


class Tiny(nn.Module):
    def __init__(self, dim=8, heads=4, mlp=12):
        super().__init__()
        self.inp = nn.Linear(6, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out((h + self.mlp(h)).mean(1))


def test_attention_heads_and_mlp_hidden_units():
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 5, 6)
    graph = build_dependency_graph(model, x)
    assert len(_group_of(graph, "attn", "heads")) == 4
    assert len(_group_of(graph, "mlp.0")) == 12
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer")).model
    assert isinstance(pruned.attn, PrunedMultiheadAttention) and pruned.attn.num_heads == 2
    assert pruned.attn.embed_dim == 8 and pruned.mlp[0].out_features == 6
    _assert_matches_masked(model, pruned, x)
    again = prune_channels(pruned, x, ChannelPruning(ratio=0.5, scope="layer")).model  # a pruned attention prunes again
    assert again.attn.num_heads == 1 and len(again.torchslim_history) == 2


def test_attention_weights_used_freeze_heads():
    class UsesWeights(Tiny):
        def forward(self, x):
            h = self.inp(x)
            out, w = self.attn(h, h, h)
            return self.out(out.mean(1)) + w.sum()

    graph = build_dependency_graph(UsesWeights().eval(), torch.randn(2, 5, 6))
    assert all(("attn", "heads") not in g.slots for g in graph.groups)


class Rolls(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(torch.roll(self.b(torch.relu(self.a(x))), 1, dims=1))


def test_unknown_op_is_named_and_left_unpruned():
    model, x = Rolls().eval(), torch.randn(1, 1, 5, 5)
    result = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer"))
    pruned, report = result.model, result.report
    assert [u.op for u in report.unsupported] == ["roll"]
    assert pruned.b.out_channels == 4 and pruned.a.out_channels == 2  # b feeds roll; a is still free
    _assert_matches_masked(model, pruned, x)


def test_fixed_size_reshape_freezes_channels():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 9, 2)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 36))

    graph = build_dependency_graph(Fixed().eval(), torch.randn(1, 1, 3, 3))
    assert graph.groups == [] and any("fixed size" in u.reason for u in graph.unsupported)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.stem(x))).mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_names_op_and_exclusion_gets_past_it():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ModelError) as err:
        prune_channels(DataDependent(), x, ChannelPruning(ratio=0.5)).model
    msg = str(err.value)
    assert "'gate'" in msg and "if x.sum() > 0" in msg and "exclude=['gate']" in msg
    pruned = prune_channels(DataDependent(), x, ChannelPruning(ratio=0.5, exclude=["gate"])).model
    assert pruned.stem.out_channels == 4  # feeds the opaque module


def test_shared_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.mid = nn.Linear(6, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            return self.out(self.mid(torch.relu(self.mid(torch.relu(self.a(x))))))

    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(3, 4)
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer")).model
    # mid's inputs and outputs are the same channels (its output is fed back in)
    assert pruned.mid.in_features == pruned.mid.out_features == pruned.a.out_features == 3
    _assert_matches_masked(model, pruned, x)


def test_layernorm_opt_in_and_elementwise_parameter():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(8)
            self.scale = nn.Parameter(torch.rand(8))
            self.b = nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.norm(self.a(x)) * self.scale)

    torch.manual_seed(0)
    model, x = Mixer().eval(), torch.randn(3, 4)
    assert build_dependency_graph(model, x).groups == []
    pruned = prune_channels(model, x, ChannelPruning(ratio=0.5, allow_layernorm=True)).model
    assert pruned.norm.normalized_shape == (4,) and pruned.scale.shape == (4,) and pruned.b.in_features == 4
    assert pruned(x).shape == (3, 2)


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_attention_computes_what_torch_does(batch_first):
    from torchslim.prune.structured.surgery import apply_op_

    torch.manual_seed(0)
    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    reference = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    reference.load_state_dict(holder.attn.state_dict())
    apply_op_(holder, {"target": "attn", "role": "heads", "size": 2, "removed": []})  # all heads kept
    assert isinstance(holder.attn, PrunedMultiheadAttention)
    x = torch.randn(3, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
    if not batch_first:
        x = x.transpose(0, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in (dict(), dict(key_padding_mask=pad), dict(attn_mask=causal), dict(is_causal=True, attn_mask=causal)):
        for need in (True, False):
            with torch.no_grad():
                want, want_w = reference(x, x, x, need_weights=need, **kwargs)
                got, got_w = holder.attn(x, x, x, need_weights=need, **kwargs)
            assert torch.allclose(got, want, atol=1e-5), kwargs
            assert (got_w is None) == (want_w is None) and (got_w is None or torch.allclose(got_w, want_w, atol=1e-6))


# ---------------------------------------------------------------------------
# a channel rule for a layer type of the user's own
# ---------------------------------------------------------------------------


class ChannelScale(nn.Module):
    """A learned per-channel scale written with einsum, which the graph cannot see through."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, n))

    def forward(self, x):
        return torch.einsum("nchw,c->nchw", x, self.scale)


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.s = ChannelScale(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.b(torch.relu(self.s(self.a(x)))).mean(dim=(2, 3)))


@pytest.fixture
def _restore_registries():
    """The rule and surgery tables are global: put them back after a test registers into them."""
    from torchslim.prune.structured import SURGERY
    from torchslim.prune.structured.registry import CHANNEL_RULES

    rules, surgery = dict(CHANNEL_RULES), dict(SURGERY)
    yield
    CHANNEL_RULES.clear()
    CHANNEL_RULES.update(rules)
    SURGERY.clear()
    SURGERY.update(surgery)


def test_a_user_layer_is_unsupported_without_a_rule_and_pruned_with_one(_restore_registries):
    from torchslim.prune.structured import per_channel_layer, register_channel_rule, register_surgery

    torch.manual_seed(0)
    model, x = ScaledNet().eval(), torch.randn(2, 1, 6, 6)
    result = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer"))
    assert [u.op for u in result.report.unsupported] == ["einsum"]  # traced into, and not understood
    assert result.model.a.out_channels == 8 and result.model.s.scale.numel() == 8

    @register_channel_rule(ChannelScale)
    def _scale_rule(b, node, m):
        return per_channel_layer(b, node, m, dim=1, n_params=m.scale.numel())

    @register_surgery(ChannelScale, "out", size=lambda m: m.scale.numel())
    def _scale_out(m, keep):
        m.scale = nn.Parameter(m.scale.detach()[keep].clone())

    graph = build_dependency_graph(model, x)
    assert graph.unsupported == []
    assert _group_of(graph, "a").names == ["a", "b", "s"]  # the scale sits in a's group, b reads it
    result = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer"))
    pruned = result.model
    assert result.report.unsupported == []
    assert pruned.a.out_channels == 4 and pruned.s.scale.numel() == 4 and pruned.b.in_channels == 4
    kept = [i for i in range(8) if i not in pruned.torchslim_history[0]["ops"][0]["removed"]]
    assert torch.equal(pruned.s.scale, model.s.scale[kept])  # the right entries survived
    _assert_matches_masked(model, pruned, x)
    # an excluded layer of a user type is opaque: its channels stay
    kept_whole = prune_channels(model, x, ChannelPruning(ratio=0.5, scope="layer", exclude=["s"])).model
    assert kept_whole.s.scale.numel() == 8 and kept_whole.a.out_channels == 8


# ---------------------------------------------------------------------------
# names that match nothing fail at once
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"exclude": ["gate"]}, r"exclude: 'gate' matches no module or parameter of the model; modules and parameters that exist: "
                               r"a, s, b, fc, a\.weight"),
    ({"exclude": ["re:block\\..*"]}, r"exclude: 're:block\\\\\.\.\*' matches no module or parameter"),
    ({"overrides": {"no_such_layer": 0.5}}, r"overrides: 'no_such_layer' matches no prunable layer.*: a, "),
    ({"overrides": {"re:conv.*": 0.5}}, r"overrides: 're:conv\.\*' matches no prunable layer"),
])
def test_structured_names_that_match_nothing_fail(kwargs, match):
    from torchslim.errors import ConfigError
    from torchslim.prune import check_layer_names, check_pruning
    from torchslim.prune.structured import check_channel_names

    model, x = ScaledNet().eval(), torch.randn(1, 1, 6, 6)
    config = ChannelPruning(ratio=0.5, **kwargs)
    for check in (lambda: prune_channels(model, x, config), lambda: check_channel_names(model, x, config),
                  lambda: check_layer_names(model, config, x), lambda: check_pruning(model, config, x)):
        with pytest.raises(ConfigError, match=match):
            check()


def test_a_structured_override_on_a_module_outside_every_group_fails():
    from torchslim.errors import ConfigError
    from torchslim.prune.structured import check_channel_names

    model, x = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)).eval(), torch.randn(1, 1, 6, 6)
    config = ChannelPruning(ratio=0.5, overrides={"1": 0.0})  # the ReLU exists, but owns no channels
    check_channel_names(model, None, config)  # without inputs only the module names are known
    with pytest.raises(ConfigError, match="overrides: '1' matches no prunable layer of the model; prunable "
                                          "layers that exist: 0, 2"):
        check_channel_names(model, x, config)
    with pytest.raises(ConfigError, match="overrides: '1' matches no prunable layer"):
        prune_channels(model, x, config)
