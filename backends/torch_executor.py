"""Run any valid Schedule cell by cell on a captured RecurrenceGraph, in eager torch.

Cell (l, s) evaluates the nodes capture assigned to layer l (node.meta["wavefront"]), with the
layer call itself running that layer's own traced GraphModule, on segment s's values. State
inputs of segment s are bound to segment s-1's state outputs, so any order that validate()
accepts gives the sequential forward's result, operation for operation.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import fx
from torch.utils._pytree import tree_unflatten

from wavefront.models.segment import MemoryState, SegmentLMOutput, check_input_ids, check_memory, segment_bounds
from wavefront.passes.dependence import build_grid
from wavefront.scheduler.capture import get_attr_path
from wavefront.scheduler.recurrence_graph import RecurrenceGraph
from wavefront.scheduler.schedule import Schedule, build_schedule, validate

from .cell_parts import compile_part
from .inductor import compiled_label
from .step_timer import maybe_step


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
        owned: list[list[fx.Node]] = [[] for _ in range(rg.n_layers)]
        self._state_in: list[list[tuple[fx.Node, int]]] = [[] for _ in range(rg.n_layers)]
        for n in gm.graph.nodes:
            l = n.meta.get("wavefront", {}).get("cell_layer")
            if l is None:
                continue
            if n in state_index:
                self._state_in[l].append((n, state_index[n]))
            else:
                owned[l].append(n)
        # Each cell's program splits at its layer call: cells of one step run all their
        # "before" parts, then their layer calls (batched by kind), then their "after" parts.
        self._before, self._after = [], []
        for l, nodes in enumerate(owned):
            cut = nodes.index(rg.layer_nodes[l])
            self._before.append(compile_part(gm, nodes[:cut], f"Cell{l}Before"))
            self._after.append(compile_part(gm, nodes[cut + 1:], f"Cell{l}After"))
        self._keep = set(rg.state_out_nodes) | {rg.logits_node}
        self._validated: dict = {}
        self._flat_tuple: dict = {}
        self._diagonal: dict = {}
        self.program = None  # DiagonalProgram, built on the first call it applies to
        self.program_reason = ""  # why it does not apply to this model (never retried)
        self.step_timer = None  # a StepTimer while profile() runs
        self._lock = threading.Lock()  # calls that swap module state (vmap, the fold's first check) run one at a time

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
        """Run the model on `input_ids` in the order `schedule` gives (validated first).

        Safe to call from several threads at once. Calls that touch shared module state hold a
        lock: a kind batched by vmap (torch.func.functional_call swaps the layers' parameters for
        the call) and the lane fold's first call, whose self-check runs the layers in eval mode."""
        with self._lock if self._needs_lock() else contextlib.nullcontext():
            return self._run(input_ids, schedule, memory)

    def _needs_lock(self) -> bool:
        return self.batched is not None and any(
            getattr(g.cell, "mode", "") != "fold" or not getattr(g.cell, "checked", True) for g in self.batched.groups)

    def _run(self, input_ids, schedule, memory) -> SegmentLMOutput:
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
        if self.batched is not None:  # once per call: stacks current, fold assumptions, lane clones' modes
            self.batched.check()
        program = self._program_for(input_ids, schedule)
        if program is not None:
            return self._run_program(program, input_ids, memory)
        params = {n: get_attr_path(self.rg.graph_module, t) for n, t in self._params}
        envs = []
        for s, (a, b) in enumerate(bounds):
            env = dict(params)
            env[self.rg.input_node] = input_ids[:, a:b]
            env[self.rg.first_node] = torch.tensor(memory.segments_seen + s == 0, device=device)
            envs.append(env)
        done = [0] * len(bounds)
        lengths = [b - a for a, b in bounds]
        state_out = self.rg.state_out_nodes
        if self.step_timer is not None:
            self.step_timer.path = "step by step"
        for t, step in enumerate(schedule.steps):
            with maybe_step(self.step_timer, t):
                self._run_step(step, envs, memory, lengths)
            for l, s in step:
                done[s] += 1
                if done[s] == self.rg.n_layers:  # segment finished: keep only what others read
                    envs[s] = {n: envs[s][n] for n in self._keep}
                    for r in (s - 1, s):  # a state is dead once both its segment and the next are done
                        if 0 <= r < len(envs) - 1 and done[r] == done[r + 1] == self.rg.n_layers:
                            envs[r] = {self.rg.logits_node: envs[r][self.rg.logits_node]}
        logits = torch.cat([env[self.rg.logits_node] for env in envs], dim=1)
        final = tuple(envs[-1][n] for n in state_out)
        return SegmentLMOutput(logits, MemoryState(final, memory.segments_seen + len(bounds)))

    def _run_step(self, step, envs, memory, lengths):
        """One schedule step: each cell's part before its layer, the layers (batched where
        possible), each cell's part after."""
        state_out = self.rg.state_out_nodes
        for l, s in step:
            env = envs[s]
            for node, j in self._state_in[l]:
                env[node] = memory.tensors[j] if s == 0 else envs[s - 1][state_out[j]]
            self._before[l].run(env)
        for cells in self._layer_groups(step, lengths):
            self._run_layers(cells, envs)
        for l, s in step:
            self._after[l].run(envs[s])

    def _program_for(self, input_ids, schedule):
        """The one-program form of the diagonal schedule (backends/diagonal_program.py), where it
        applies: the diagonal schedule over whole segments, no gradient needed (the program reads
        the stacks as plain tensors), a single lane-folded layer kind that has checked itself."""
        if self.batched is None or self.program_reason or input_ids.shape[1] % self.rg.segment_len:
            return None
        if schedule is not self._diagonal_schedule(schedule):
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.rg.cell.parameters()):
            return None
        if getattr(self.batched.groups[0].cell, "mode", "") != "fold":  # the fold fell back since (a buffer changed)
            self.program = None
            return None
        if self.program is None:
            from .diagonal_program import DiagonalProgram, ProgramNotApplicable
            cell = self.batched.groups[0].cell
            if len(self.batched.groups) == 1 and getattr(cell, "mode", "") == "fold" and not cell.checked:
                return None  # the fold checks itself on a step-by-step call first
            try:
                self.program = DiagonalProgram(self)
            except ProgramNotApplicable as e:
                self.program_reason = str(e)
                return None
        return self.program

    def describe_program(self) -> str:
        """How whole-segment inference calls run (for explain())."""
        if self.batched is None:
            return ""
        if self.program_reason:
            return f"  step by step: {self.program_reason}"
        cell = self.batched.groups[0].cell
        if getattr(cell, "mode", "") != "fold":
            return (f"  step by step: the batched cell runs as {getattr(cell, 'mode', '?')!r}"
                    + (f" ({cell.fallback_reason})" if getattr(cell, "fallback_reason", "") else ""))
        if self.program is None:
            return "  whole-segment inference calls: one program (memory stacked per layer, hidden per lane), from the next call"
        how = (f"its batched cell {compiled_label(cell)}" if compiled_label(cell) else
               f"its batched cell eager (compile failed: {cell.compile_error})" if getattr(cell, "compile_error", "")
               else "eager")
        return (f"  whole-segment inference calls: one program, {how}: memory stacked per layer, hidden per lane, "
                "each step runs only its active lanes")

    def _diagonal_schedule(self, schedule: Schedule):
        """`schedule` if it is exactly the diagonal schedule for its size (else None)."""
        key = (schedule.n_layers, schedule.n_segments)
        if self._diagonal.get(key) is None:
            self._diagonal = {key: build_schedule("diagonal", *key)}
        return schedule if schedule.steps == self._diagonal[key].steps else None

    def _run_program(self, program, input_ids, memory):
        from .diagonal_program import stacked_memory, unstacked_memory
        B, T = input_ids.shape
        seg = self.rg.segment_len
        A, z = stacked_memory(memory.tensors, self.rg.n_layers)
        fresh = torch.tensor(memory.segments_seen == 0, device=input_ids.device)
        args = (input_ids.reshape(B, T // seg, seg), A, z, fresh)
        if self.step_timer is not None:
            self.step_timer.path = "one program"
        program.step_timer = self.step_timer
        try:
            logits, A, z = program(*args)
        finally:
            program.step_timer = None
        return SegmentLMOutput(logits, MemoryState(unstacked_memory(A, z), memory.segments_seen + T // seg))

    def _layer_groups(self, step, lengths):
        """Cells of a step that one batched call can run: same kind and segment length,
        consecutive layers of the kind (the first-segment flag is per lane). Without batching:
        one per cell."""
        if self.batched is None:
            return [[c] for c in step]
        groups: dict = {}
        for l, s in sorted(step):
            group, i = self.batched.position[l]
            key = (group.kind, lengths[s])
            runs = groups.setdefault(key, [])
            if runs and self.batched.position[runs[-1][-1][0]][1] == i - 1:
                runs[-1].append((l, s))
            else:
                runs.append([(l, s)])
        return [run for runs in groups.values() for run in runs]

    def _run_layers(self, cells, envs):
        if len(cells) == 1:
            (l, s), = cells
            node, env = self.rg.layer_nodes[l], envs[s]
            env[node] = self.rg.layer_graphs[l](*fx.node.map_arg(node.args, env.__getitem__),
                                                **fx.node.map_arg(node.kwargs, env.__getitem__))
            return
        group, a = self.batched.position[cells[0][0]]
        sigs = [(self.batched.signatures[l], envs[s]) for l, s in cells]
        lane_values = [torch.stack([env[sg.leaves[i]] for sg, env in sigs]) for i in sigs[0][0].lane_pos]
        names = getattr(group.cell, "param_names", None)  # what the batched cell reads (None: all)
        layers = [self.rg.cell.layers[l] for l, _ in cells]  # the user's modules: the fold checks itself against them
        out_leaves, spec = group.cell(group.stack.slices(a, a + len(cells), names), lane_values, layers=layers)
        per_lane = list(zip(*[o.unbind(0) for o in out_leaves]))
        as_tuple = self._flat_tuple.get(spec)
        if as_tuple is None:
            as_tuple = self._flat_tuple[spec] = spec.type is tuple and all(
                c.num_leaves == 1 and c.type is None for c in spec.children())
        for k, (l, s) in enumerate(cells):
            envs[s][self.rg.layer_nodes[l]] = per_lane[k] if as_tuple else tree_unflatten(list(per_lane[k]), spec)


def run_schedule(rg: RecurrenceGraph, input_ids, schedule="sequential", memory=None) -> SegmentLMOutput:
    """One-shot helper: TorchExecutor(rg).run(input_ids, schedule, memory)."""
    return TorchExecutor(rg).run(input_ids, schedule, memory)


__all__ = ["TorchExecutor", "run_schedule"]
