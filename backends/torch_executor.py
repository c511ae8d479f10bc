"""Run any valid Schedule cell by cell on a captured RecurrenceGraph, in eager torch.

Cell (l, s) evaluates the nodes capture assigned to layer l (node.meta["wavefront"]), with the
layer call itself running that layer's own traced GraphModule, on segment s's values. State
inputs of segment s are bound to segment s-1's state outputs, so any order that validate()
accepts gives the sequential forward's result, operation for operation.
"""
from __future__ import annotations


import torch
from torch import fx
from torch.utils._pytree import tree_unflatten

from wavefront.models.segment import MemoryState, SegmentLMOutput, check_input_ids, check_memory, segment_bounds
from wavefront.passes.dependence import build_grid
from wavefront.scheduler.capture import get_attr_path
from wavefront.scheduler.recurrence_graph import RecurrenceGraph
from wavefront.scheduler.schedule import Schedule, build_schedule, validate

_STATE_IN = object()  # marker in a cell program: bind this node to the previous segment's state


def _method_caller(name):
    return lambda obj, *args, **kwargs: getattr(obj, name)(*args, **kwargs)


class TorchExecutor:
    """Executes schedules of one captured model.

    >>> from wavefront.models import ARMT, ARMTConfig
    >>> from wavefront.scheduler import capture
    >>> model = ARMT(ARMTConfig(n_layers=2, segment_len=4))
    >>> ids = torch.randint(0, 256, (1, 10))
    >>> out = TorchExecutor(capture(model)).run(ids, "diagonal")
    >>> torch.allclose(out.logits, model(ids).logits)
    True
    """

    def __init__(self, rg: RecurrenceGraph, batched=None):
        self.rg = rg
        self.batched = batched  # passes.diagonal.BatchedRecurrence, or None: one call per cell
        gm = rg.graph_module
        self._params = [(n, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        state_index = {n: j for j, n in enumerate(rg.state_in_nodes) if n is not None}
        layer_index = {n: i for i, n in enumerate(rg.layer_nodes)}
        self._programs: list[list] = [[] for _ in range(rg.n_layers)]
        for n in gm.graph.nodes:
            meta = n.meta.get("wavefront", {})
            l = meta.get("cell_layer")
            if l is None:
                continue
            if n in state_index:
                self._programs[l].append((n, _STATE_IN, state_index[n]))
            elif n in layer_index:
                self._programs[l].append((n, rg.layer_graphs[layer_index[n]], None))
            elif n.op == "call_module":
                self._programs[l].append((n, gm.get_submodule(n.target), None))
            elif n.op == "call_function":
                self._programs[l].append((n, n.target, None))
            elif n.op == "call_method":
                self._programs[l].append((n, _method_caller(n.target), None))
            else:
                raise RuntimeError(f"unexpected node {n.format_node()} in cell {l}")
        # Each cell's program splits at its layer call: cells of one step run all their
        # "before" parts, then their layer calls (batched by kind), then their "after" parts.
        self._before, self._after = [], []
        for l, prog in enumerate(self._programs):
            cut = next(i for i, (n, _, _) in enumerate(prog) if n is rg.layer_nodes[l])
            self._before.append(prog[:cut])
            self._after.append(prog[cut + 1:])
        self._keep = set(rg.state_out_nodes) | {rg.logits_node}
        self._validated: dict = {}

    def _dtype_device(self):
        p = next(self.rg.cell.parameters())
        return p.dtype, p.device

    def _schedule(self, schedule, n_segments: int) -> Schedule:
        if schedule is None or isinstance(schedule, str):
            schedule = build_schedule(schedule or "sequential", self.rg.n_layers, n_segments)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule or its name, got {type(schedule).__name__}")
        if (schedule.n_layers, schedule.n_segments) != (self.rg.n_layers, n_segments):
            raise ValueError(f"the schedule covers {schedule.n_layers} layers x {schedule.n_segments} segments but "
                             f"this input has {n_segments} segments of {self.rg.segment_len} tokens over "
                             f"{self.rg.n_layers} layers: build the schedule for this input")
        key = id(schedule)
        if self._validated.get(key) is not schedule:
            validate(schedule, build_grid(self.rg, n_segments))
            self._validated = {key: schedule}
        return schedule

    def run(self, input_ids: torch.Tensor, schedule: Schedule | str | None = "sequential",
            memory: MemoryState | None = None) -> SegmentLMOutput:
        """Run the model on `input_ids` in the order `schedule` gives (validated first)."""
        check_input_ids(input_ids)
        dtype, device = self._dtype_device()
        if input_ids.device != device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}: move one of them")
        fresh = self.rg.initial_state(input_ids.shape[0], dtype, device)
        if memory is None:
            memory = MemoryState(fresh, 0)
        else:
            check_memory(memory, fresh)
        bounds = segment_bounds(input_ids.shape[1], self.rg.segment_len)
        schedule = self._schedule(schedule, len(bounds))
        params = {n: get_attr_path(self.rg.graph_module, t) for n, t in self._params}
        envs = []
        for s, (a, b) in enumerate(bounds):
            env = dict(params)
            env[self.rg.input_node] = input_ids[:, a:b]
            env[self.rg.first_node] = torch.tensor(memory.segments_seen + s == 0, device=device)
            envs.append(env)
        done = [0] * len(bounds)
        first = [memory.segments_seen + s == 0 for s in range(len(bounds))]
        lengths = [b - a for a, b in bounds]
        state_out = self.rg.state_out_nodes
        if self.batched is not None:
            self.batched.check()
        for step in schedule.steps:
            for l, s in step:
                self._run_nodes(self._before[l], envs, s, memory)
            for cells in self._layer_groups(step, first, lengths):
                self._run_layers(cells, envs)
            for l, s in step:
                self._run_nodes(self._after[l], envs, s, memory)
                done[s] += 1
                if done[s] == self.rg.n_layers:  # segment finished: keep only what others read
                    envs[s] = {n: envs[s][n] for n in self._keep}
        logits = torch.cat([env[self.rg.logits_node] for env in envs], dim=1)
        final = tuple(envs[-1][n] for n in state_out)
        return SegmentLMOutput(logits, MemoryState(final, memory.segments_seen + len(bounds)))


    def _run_nodes(self, program, envs, s, memory):
        env = envs[s]
        state_out = self.rg.state_out_nodes
        for node, fn, j in program:
            if fn is _STATE_IN:
                env[node] = memory.tensors[j] if s == 0 else envs[s - 1][state_out[j]]
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = fn(*args, **kwargs)

    def _layer_groups(self, step, first, lengths):
        """Cells of a step that one batched call can run: same kind, segment length and
        first-segment flag, consecutive layers of the kind. Without batching: one per cell."""
        if self.batched is None:
            return [[c] for c in step]
        groups: dict = {}
        for l, s in sorted(step):
            group, i = self.batched.position[l]
            key = (group.kind, lengths[s], first[s])
            runs = groups.setdefault(key, [])
            if runs and self.batched.position[runs[-1][-1][0]][1] == i - 1:
                runs[-1].append((l, s))
            else:
                runs.append([(l, s)])
        return [run for runs in groups.values() for run in runs]

    def _run_layers(self, cells, envs):
        if len(cells) == 1:
            (l, s), = cells
            node, fn, _ = self._programs[l][len(self._before[l])]
            env = envs[s]
            env[node] = fn(*fx.node.map_arg(node.args, env.__getitem__),
                           **fx.node.map_arg(node.kwargs, env.__getitem__))
            return
        group, a = self.batched.position[cells[0][0]]
        sig = self.batched.signatures[cells[0][0]]
        env0 = envs[cells[0][1]]
        shared = [env0[x] if isinstance(x, fx.Node) else x for x in (sig.leaves[i] for i in sig.shared_pos)]
        sigs = [(self.batched.signatures[l], envs[s]) for l, s in cells]
        lane_values = [torch.stack([env[sg.leaves[i]] for sg, env in sigs]) for i in sig.lane_pos]
        out_leaves, spec = group.cell(group.stack.slices(a, a + len(cells)), lane_values, shared)
        for k, (l, s) in enumerate(cells):
            envs[s][self.rg.layer_nodes[l]] = tree_unflatten([o[k] for o in out_leaves], spec)


def run_schedule(rg: RecurrenceGraph, input_ids, schedule="sequential", memory=None) -> SegmentLMOutput:
    """One-shot helper: TorchExecutor(rg).run(input_ids, schedule, memory)."""
    return TorchExecutor(rg).run(input_ids, schedule, memory)


__all__ = ["TorchExecutor", "run_schedule"]
