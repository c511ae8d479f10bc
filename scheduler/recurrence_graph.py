"""RecurrenceGraph: what capture found in a segment-recurrent model, as plain data plus FX graphs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils._pytree import tree_unflatten

from wavefront.contract.segment import as_memory_tensors


@dataclass(frozen=True)
class StateLink:
    """State tensor `index`: written by layer `producer` in segment s, read by `consumers` in s + 1."""

    index: int
    name: str
    producer: int
    consumers: tuple[int, ...]


@dataclass(frozen=True)
class RecurrenceStructure:
    """The dependence structure of one segment: enough to build the cell grid for any S.

    hidden_links: (k, l) means layer l of a segment reads a value layer k of the same segment made.
    """

    n_layers: int
    hidden_links: tuple[tuple[int, int], ...]
    state_links: tuple[StateLink, ...]


@dataclass(eq=False)
class RecurrenceGraph:
    """A captured segment-recurrent model.

    graph_module: the cell traced by torch.fx with each layer a single call (`layers.i`), state as
    explicit inputs (`state[j]`) and outputs; every node carries node.meta["wavefront"] =
    {"cell_layer": the layer whose cell runs it, "role": input/state_in/pre/layer/glue/post}.
    layer_graphs: each layer traced on its own (foreign blocks kept as opaque calls).
    layer_kinds: layers with the same kind have the same graph with different parameters.
    traced_modules: the modules whose Python code the traces ran (their constants are baked in).
    """

    family: str
    adapter: str
    cell: nn.Module
    segment_len: int
    graph_module: fx.GraphModule
    layer_graphs: tuple[fx.GraphModule, ...]
    layer_nodes: tuple[fx.Node, ...]
    state_in_nodes: tuple[fx.Node | None, ...]
    state_out_nodes: tuple[fx.Node, ...]
    logits_node: fx.Node
    input_node: fx.Node
    first_node: fx.Node
    structure: RecurrenceStructure
    layer_kinds: tuple[int, ...]
    state_names: tuple[str, ...] = field(default=())
    state_spec: object = None  # pytree structure of the state the cell returns (state_in/out_nodes are its leaves)
    traced_modules: tuple[nn.Module, ...] = field(default=())  # whose code torch.fx ran (capture_guard.py)

    @property
    def n_layers(self) -> int:
        return self.structure.n_layers

    @property
    def uniform(self) -> bool:
        """All layers structurally the same (same graph, different parameters)."""
        return len(set(self.layer_kinds)) == 1

    def initial_state(self, batch: int, dtype: torch.dtype, device):
        """The cell's fresh state as MemoryState holds it (a tuple whose items may nest, or a dict)."""
        return as_memory_tensors(self.cell.initial_state(batch, dtype, device))

    def state_from_leaves(self, leaves):
        """The state structure the cell returns, from its leaves in state_out_nodes' order."""
        return as_memory_tensors(tree_unflatten(list(leaves), self.state_spec))

    def describe(self) -> str:
        """A short human-readable summary of the captured structure."""
        s = self.structure
        kinds = "all layers alike" if self.uniform else f"{len(set(self.layer_kinds))} layer kinds {list(self.layer_kinds)}"
        lines = [f"{self.family} (adapter {self.adapter}): {s.n_layers} layers, segment_len {self.segment_len}, {kinds}",
                 "  hidden: " + ", ".join(f"{k}->{l}" for k, l in s.hidden_links)]
        for link in s.state_links:
            lines.append(f"  state {link.name}: layer {link.producer} (segment s) -> layers "
                         f"{list(link.consumers)} (segment s+1)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()
