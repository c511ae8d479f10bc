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
from wavefront.backends.segment_program import SegmentProgram
from wavefront.backends.step_timer import maybe_step
from wavefront.passes.dependence import build_grid
from wavefront.passes.graph_parts import compile_part
from wavefront.passes.lanes.fold_cell import compiled_label, structural_mismatch
from wavefront.passes.segment_plan import ProgramNotApplicable, plan_segment_program
from wavefront.scheduler.capture import get_attr_path
from wavefront.scheduler.recurrence_graph import RecurrenceGraph
from wavefront.scheduler.schedule import Schedule, build_schedule, validate
from wavefront.scheduler.train_mode import eval_mode

from wavefront.contract.segment import (
    MemoryState,
    SegmentLMOutput,
    check_input_ids,
    check_memory,
    segment_bounds,
)


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
        self.program = None  # SegmentProgram for whole-segment inference calls (build_program)
        self.program_reason = "not built"  # why there is none
        self.last_path = ""  # how the latest call ran: "one program" or "step by step" (for tests and profiles)
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
        self.last_path = "step by step" if program is None else "one program"
        if program is not None:
            return self._run_program(program, input_ids, memory)
        params = {n: get_attr_path(self.rg.graph_module, t) for n, t in self._params}
        envs = []
        for s, (a, b) in enumerate(bounds):
            env = dict(params)
            env[self.rg.input_node] = input_ids[:, a:b]
            env[self.rg.first_node] = torch.tensor(memory.segments_seen + s == 0, device=device)
            envs.append(env)
        leaves = memory.leaves()
        done = [0] * len(bounds)
        lengths = [b - a for a, b in bounds]
        state_out = self.rg.state_out_nodes
        if self.step_timer is not None:
            self.step_timer.path = "step by step"
        for t, step in enumerate(schedule.steps):
            with maybe_step(self.step_timer, t):
                self._run_step(step, envs, leaves, lengths)
            for l, s in step:
                done[s] += 1
                if done[s] == self.rg.n_layers:  # segment finished: keep only what others read
                    envs[s] = {n: envs[s][n] for n in self._keep}
                    for r in (s - 1, s):  # a state is dead once both its segment and the next are done
                        if 0 <= r < len(envs) - 1 and done[r] == done[r + 1] == self.rg.n_layers:
                            envs[r] = {self.rg.logits_node: envs[r][self.rg.logits_node]}
        logits = torch.cat([env[self.rg.logits_node] for env in envs], dim=1)
        final = self.rg.state_from_leaves(envs[-1][n] for n in state_out)
        return SegmentLMOutput(logits, MemoryState(final, memory.segments_seen + len(bounds)))

    def _run_step(self, step, envs, memory_leaves, lengths):
        """One schedule step: each cell's part before its layer, the layers (batched where
        possible), each cell's part after."""
        state_out = self.rg.state_out_nodes
        for l, s in step:
            env = envs[s]
            for node, j in self._state_in[l]:
                env[node] = memory_leaves[j] if s == 0 else envs[s - 1][state_out[j]]
            self._before[l].run(env)
        for cells in self._layer_groups(step, lengths):
            self._run_layers(cells, envs)
        for l, s in step:
            self._after[l].run(envs[s])

    def build_program(self):
        """Choose how whole-segment inference calls run, once (optimize(), or a new capture): the
        one-program form (backends/segment_program.py) if the plan applies to this model and the
        program gives the step-by-step result on a synthetic input (two rows, three segments,
        in eval mode, without gradients; the lane fold checks itself on the same run). Returns
        the program, or None with `program_reason` saying why (such calls run step by step)."""
        self.program, self.program_reason = None, ""
        if self.batched is None:
            return None
        modules = list(self.rg.cell.modules())
        try:
            plan = plan_segment_program(self.rg, self.batched.signatures)
            ids = synthetic_input_ids(self.rg.cell, 2, 3 * self.rg.segment_len)
            with torch.no_grad(), eval_mode(modules):
                plan.classify(ids, self.rg.segment_len)
                ref = self._run(ids, self._schedule("diagonal", 3), None)  # step by step: self.program is None
                program = SegmentProgram(plan, self.batched.groups[0])
                got = self._run_program(program, ids, MemoryState(self.rg.initial_state(2, *self._dtype_device()), 0))
            why = _differs([ref.logits, *ref.memory.leaves()], [got.logits, *got.memory.leaves()])
            if why:
                raise ProgramNotApplicable(f"on a synthetic input it gave another result than step by step ({why})")
        except ProgramNotApplicable as e:
            self.program_reason = str(e)
            return None
        except Exception as e:  # the model's own code refused the synthetic input: stay step by step, say why
            self.program_reason = (f"the one-program check on a synthetic input raised {type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200] if str(e) else ''}")
            return None
        self.program = program
        return program

    def _program_for(self, input_ids, schedule):
        """The one program (build_program) when this call may use it: the diagonal schedule over
        whole segments, no gradient needed (the program reads the stacks as plain tensors), the
        lane fold still in use."""
        if self.program is None or input_ids.shape[1] % self.rg.segment_len or schedule.lower() is None:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.rg.cell.parameters()):
            return None
        if getattr(self.batched.groups[0].cell, "mode", "") != "fold":  # the fold fell back since (a buffer changed)
            self.program, self.program_reason = None, "the lane-folded cell fell back to vmap after a change"
            return None
        return self.program

    def describe_program(self) -> str:
        """How whole-segment inference calls run (for explain())."""
        if self.batched is None:
            return ""
        if self.program is None:
            return f"  whole-segment inference calls: step by step ({self.program_reason})"
        cell = self.batched.groups[0].cell
        how = (f"its batched cell {compiled_label(cell)}" if compiled_label(cell) else
               f"its batched cell eager (compile failed: {cell.compile_error})" if getattr(cell, "compile_error", "")
               else "eager")
        return (f"  whole-segment inference calls: one program, {how}: state stacked per layer, hidden per lane, "
                "each step runs only its active lanes")

    def _run_program(self, program, input_ids, memory):
        B, T = input_ids.shape
        seg = self.rg.segment_len
        stacked = program.plan.stack_state(memory.leaves())
        fresh = torch.tensor(memory.segments_seen == 0, device=input_ids.device)
        if self.step_timer is not None:
            self.step_timer.path = "one program"
        program.step_timer = self.step_timer
        try:
            logits, *stacked = program(input_ids.reshape(B, T // seg, seg), *stacked, fresh)
        finally:
            program.step_timer = None
        state = self.rg.state_from_leaves(program.plan.unstack_state(stacked))
        return SegmentLMOutput(logits, MemoryState(state, memory.segments_seen + T // seg))

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


def synthetic_input_ids(cell, batch: int, tokens: int) -> torch.Tensor:
    """Random token ids for a self-check: within the first embedding's vocabulary (zeros when
    the cell has none), drawn from a generator of its own (the user's random state is left alone)."""
    emb = next((m for m in cell.modules() if isinstance(m, torch.nn.Embedding)), None)
    device = next(cell.parameters()).device
    if emb is None:
        return torch.zeros(batch, tokens, dtype=torch.long, device=device)
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, emb.num_embeddings, (batch, tokens), generator=gen).to(device)


def _differs(ref, got) -> str:
    """Why two lists of results differ beyond rounding ("" when they agree)."""
    if len(ref) != len(got):
        return f"{len(got)} results for {len(ref)}"
    return next((f"result {i}: {why}" for i, (r, g) in enumerate(zip(ref, got)) if (why := structural_mismatch(g, r))), "")


__all__ = ["TorchExecutor", "synthetic_input_ids"]
