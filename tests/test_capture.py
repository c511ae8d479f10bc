"""capture(): the traced cell, its wiring, layer kinds, and clear errors."""
import pytest
import torch
from torch import nn

from conftest import N_LAYERS, build, ids_for, tiny_armt, tiny_rmt
from wavefront.contract.segment import SegmentCell, SegmentRecurrentLM
from wavefront.scheduler import CaptureError, capture, register_adapter
from wavefront.scheduler.adapters import BoundModel


@pytest.mark.parametrize("kind", ["armt", pytest.param("llama", marks=pytest.mark.hf),
                                  pytest.param("gpt2", marks=pytest.mark.hf)])
def test_armt_wiring(kind):
    rg = capture(build(kind))
    assert rg.n_layers == N_LAYERS and rg.uniform
    chain = {(l - 1, l) for l in range(1, N_LAYERS)}
    if kind == "armt":
        assert set(rg.structure.hidden_links) == chain
    else:  # the per-segment mask / rotary tables are built once, in layer 0's cell, and read by all
        assert set(rg.structure.hidden_links) == chain | {(0, l) for l in range(1, N_LAYERS)}
    assert [(s.name, s.producer, s.consumers) for s in rg.structure.state_links] == \
        [(f"{n}_{l}", l, (l,)) for l in range(N_LAYERS) for n in ("A", "z")]
    assert all(len(g.graph.nodes) > 10 for g in rg.layer_graphs)  # each layer traced on its own


def test_rmt_wiring():
    rg = capture(tiny_rmt())
    (link,) = rg.structure.state_links
    assert (link.name, link.producer, link.consumers) == ("memory_tokens", N_LAYERS - 1, (0,))


def test_every_node_is_assigned_to_a_cell():
    rg = capture(tiny_armt())
    roles = {}
    for n in rg.graph_module.graph.nodes:
        meta = n.meta["wavefront"]
        roles.setdefault(meta["role"], set()).add(meta["cell_layer"])
        if n.op in ("call_module", "call_function", "call_method"):
            assert meta["cell_layer"] is not None, n.format_node()
    assert roles["layer"] == set(range(N_LAYERS))
    assert roles["pre"] == {0} and roles["post"] >= {N_LAYERS - 1}


def test_captured_graph_is_executable_and_equals_the_cell():
    model = tiny_armt()
    rg = capture(model)
    ids = ids_for(1, batch=2)
    state = model.initial_memory(2).tensors
    first = torch.tensor(True)
    got = rg.graph_module(ids, first, state)
    ref = model.cell(ids, first, state)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))


def test_nothing_is_baked_in_as_a_constant():
    """No example input is used: no tensor constants appear, and one graph serves any length."""
    rg = capture(tiny_armt())
    for gm in (rg.graph_module, *rg.layer_graphs):
        assert not [n for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in n.target]
    model = tiny_armt()
    for n in (1, 4, 5):
        ids = torch.randint(0, 50, (1, n))
        state = model.initial_memory(1).tensors
        assert torch.equal(rg.graph_module(ids, torch.tensor(True), state)[0],
                           model.cell(ids, torch.tensor(True), state)[0])


def test_hybrid_stack_layers_are_grouped_by_kind():
    rg = capture(tiny_armt(d_ff_per_layer=(32, 48, 32)))
    assert rg.layer_kinds == (0, 1, 0) and not rg.uniform
    assert "2 layer kinds" in rg.describe()


class BranchyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, h):
        if h.sum() > 0:  # data-dependent control flow: cannot be captured
            return self.proj(h)
        return h


class BranchyCell(SegmentCell):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([BranchyLayer()])

    def initial_state(self, batch, dtype, device):
        return (torch.zeros(batch, 4, dtype=dtype, device=device),)

    def forward(self, input_ids, first, state):
        h = self.layers[0](self.embed(input_ids) + state[0][:, None])
        return h, (h.mean(1),)


def test_capture_error_names_module_and_operation():
    model = SegmentRecurrentLM(BranchyCell(), segment_len=4)
    with pytest.raises(CaptureError) as info:
        capture(model)
    msg = str(info.value)
    assert "cell.layers.0" in msg and "BranchyLayer" in msg and "if h.sum() > 0" in msg


def test_unknown_model_is_refused_with_the_adapters_tried():
    with pytest.raises(TypeError, match="no wavefront adapter recognises Linear.*published-armt"):
        capture(nn.Linear(2, 2))


class PlainCell(BranchyCell):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def test_cell_contract_violations_are_reported():
    class BadOutput(PlainCell):
        def forward(self, input_ids, first, state):
            return self.layers[0](self.embed(input_ids))

    class BadState(PlainCell):
        def forward(self, input_ids, first, state):
            h = self.layers[0](self.embed(input_ids))
            return h, (state[0],)

    with pytest.raises(CaptureError, match=r"must return \(logits, new_state\) with new_state holding 1 tensors"):
        capture(BoundModel("bad", "test", BadOutput(), 4))
    with pytest.raises(CaptureError, match="not computed by any layer"):
        capture(BoundModel("bad", "test", BadState(), 4))


def test_register_adapter_plugs_in_a_family():
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    class WrappedAdapter:
        name = "wrapped"

        def matches(self, model):
            return isinstance(model, Wrapped)

        def bind(self, model):
            return BoundModel("wrapped ARMT", self.name, model.inner.cell, model.inner.segment_len)

    register_adapter(WrappedAdapter())
    rg = capture(Wrapped(tiny_armt()))
    assert rg.adapter == "wrapped" and rg.n_layers == N_LAYERS
