"""The diagonal schedule as a pipeline over ranks: stage = a contiguous group of layers,
micro-batch = segment.

`pp = wavefront.distributed.pipeline(model)`, called on every rank of an initialised process
group, gives rank r the layers [a_r, b_r) (split by parameter count unless `split=` says how many
per rank) and their memory. Each segment goes through the ranks in ascending order: rank r runs
segment s while rank r + 1 runs segment s - 1, which is the diagonal schedule with a stage in
place of a layer (cell (stage, s) at step stage + s). `pp(input_ids)` gives the logits on the
last stage (None elsewhere) and each rank's share of the memory; `pp.gather_memory()` the full
MemoryState; `pp.train_step(input_ids, labels=...)` runs backpropagation through the memory of
every segment and leaves each rank's parameter gradients equal to the single-process ones.

How the stages are found: `wavefront.scheduler.capture` (structure, not names). Each node of the
captured cell belongs to one layer cell (the part before the layers to layer 0's, the final norm
and head to the top layer's); a stage runs its cells' parts of the captured graph and calls the
user's own layer modules; what cells below the stage computed and its cells read (the hidden
rows, values every layer reads alike such as rotary tables) arrives from the previous rank, in the
captured graph's order. A model whose memory crosses stages is refused with the reason:
`passes/dependence.py`'s verdict (RMT: the top layer's output is the next segment's memory, the
edge (L-1, s) -> (0, s+1)), or a state read on another stage than the one writing it.

Why torch.distributed point-to-point ops and not torch.distributed.pipelining: a prototype on
torch 2.13 found its stages usable for the forward (they keep module state across micro-batches
and run forwards in ascending order), but (1) a PipelineStage takes one example shape for every
micro-batch, while the last segment may be shorter; (2) without examples a stage runs an extra
forward of micro-batch 0 to infer shapes, writing it into the memory; (3) for gradients each
segment's incoming memory must be a fresh leaf with the next segment's memory gradient injected,
and only LoopedBFS runs backwards in descending segment order: every other schedule would
truncate gradients silently; (4) its tracing frontend (pipe_split) unrolls the segment loop and
replicates the layers. So the stages here send and receive with dist.isend / dist.recv (shapes
announced once per kind of segment, pipeline_comm.py) and run the one order that is exact,
forwards ascending and backwards descending (pipeline_order.py's guard refuses any other,
including torch's GPipe / 1F1B / interleaved / zero-bubble orders, with the reason).

Inside a stage: the stage holds one segment in flight at a time (it must have segment s's memory
before it runs segment s + 1, and the previous rank delivers one segment after the other), so its
layers run one after the other on that segment; the diagonal happens across ranks. Diagonal
batching inside a stage (layer a on s + 1 beside layer a + 1 on s) is not done: it would need
two segments buffered per stage and gains nothing at one layer per stage.

Models too large for one device: build the model on the meta device and pass `weights=` (a
mapping of the model's parameter and buffer names to tensors: a state_dict plus non-persistent
buffers, e.g. loaded with torch.load(..., mmap=True)); each rank materialises only the
parameters and buffers its own cells run (torch.empty_like on `device`, as Module.to_empty does)
and fills them from `weights`; the other ranks' layers stay on meta.

Speed: on CPU cores the pipeline is about as fast as one process using the same cores (the ranks
split the work but hand segments along); its value is memory capacity and several devices.

Launch on several nodes with torchrun (each process runs the same script)::

    # torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py
    dist.init_process_group("nccl"); torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    with torch.device("meta"): model = ARMT(config)
    pp = wavefront.distributed.pipeline(model, weights=torch.load("armt.pt", mmap=True), device="cuda")
    opt = torch.optim.AdamW(pp.parameters()); pp.train_step(ids.cuda(), labels=ids.cuda()); opt.step()
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from wavefront.contract.segment import (
    MemoryState,
    causal_lm_loss,
    check_attention_mask,
    check_input_ids,
    segment_bounds,
)
from wavefront.distributed.pipeline_comm import StageLink, wait_all
from wavefront.distributed.pipeline_order import (
    ScheduleRefused,
    check_order,
    schedule_order,
)
from wavefront.distributed.pipeline_stage import (
    PipelineNotSupported,
    cell_tensors,
    check_pipelinable,
    check_split,
    choose_split,
    layer_costs,
    materialise,
    plan_stage,
)
from wavefront.distributed.process_group import position
from wavefront.scheduler.capture import capture, get_attr_path


@dataclass(frozen=True)
class StageMemory:
    """One rank's share of the memory: `leaves` maps the index of each memory leaf this stage
    carries (in MemoryState.leaves() order) to its tensor; `segments_seen` as in MemoryState."""

    leaves: dict
    segments_seen: int = 0


@dataclass
class PipelineOutput:
    """`logits` on the last stage (None on the others), this rank's memory, and the loss
    (train_step's, on every rank)."""

    logits: torch.Tensor | None
    memory: StageMemory
    loss: torch.Tensor | None = None


class Pipeline:
    """This rank's stage of a segment model run as a pipeline. Build it with pipeline()."""

    def __init__(self, model: nn.Module, group=None, split=None, weights=None, device=None, schedule=None):
        self.rank, self.n_stages = position(group, "wavefront.distributed.pipeline needs", "build the pipeline")
        self.group, self.model, self.schedule = group, model, schedule
        rg = capture(model)
        sizes = check_split(split, rg.n_layers, self.n_stages) if split is not None else \
            choose_split(layer_costs(rg), self.n_stages)
        starts = [sum(sizes[:r]) for r in range(self.n_stages)]
        self.ranges = [range(a, a + n) for a, n in zip(starts, sizes)]
        check_pipelinable(rg, self.ranges)
        mine = [t for l in self.ranges[self.rank] for t in cell_tensors(rg, l)]
        if any(t.is_meta for t in mine):
            materialise(model, mine, weights, torch.device(device) if device is not None else torch.device("cpu"))
            rg = capture(model)  # the captured graph reads the materialised tensors
        self.rg = rg
        self.stage = plan_stage(rg, self.ranges, self.rank)
        own = [t for l in self.stage.layers for t in cell_tensors(rg, l)]
        if any(t.is_meta for t in own):
            raise PipelineNotSupported("this rank's layers are still on the meta device after materialising")
        first = next((t for t in own if t.is_floating_point()), None)
        self.dtype = first.dtype if first is not None else torch.get_default_dtype()
        self.device = own[0].device if own else torch.device(device or "cpu")
        self._prev = StageLink(group, self.rank - 1, self.device) if self.rank > 0 else None
        self._next = StageLink(group, self.rank + 1, self.device) if self.rank < self.n_stages - 1 else None
        self.last_memory: StageMemory | None = None
        # parameters several stages run with (tied embedding and head): their gradients are summed
        owners: dict = {}
        for r, layers in enumerate(self.ranges):
            for l in layers:
                for t in cell_tensors(rg, l):
                    if isinstance(t, nn.Parameter):
                        owners.setdefault(id(t), set()).add(r)
        self._shared = [(n, p, self.rank in owners[id(p)]) for n, p in model.named_parameters()
                        if len(owners.get(id(p), ())) > 1]

    @property
    def is_first_stage(self) -> bool:
        return self.stage.is_first

    @property
    def is_last_stage(self) -> bool:
        return self.stage.is_last

    @property
    def layers(self) -> range:
        """The layers this rank holds."""
        return self.stage.layers

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank's cells run with (give them to the optimizer)."""
        seen, out = set(), []
        for l in self.stage.layers:
            for t in cell_tensors(self.rg, l):
                if isinstance(t, nn.Parameter) and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
        return out

    def initial_memory(self, batch: int) -> StageMemory:
        leaves = self.rg.initial_state(batch, self.dtype, self.device)
        flat = MemoryState(leaves, 0).leaves()
        return StageMemory({j: flat[j] for j in self.stage.states}, 0)

    def __call__(self, input_ids, memory=None, attention_mask=None) -> PipelineOutput:
        """Run `input_ids` through the pipeline (every rank calls it with the same input), without
        gradients. `memory`: this rank's StageMemory from a previous call, or a full MemoryState.

        >>> out = pp(input_ids)                            # doctest: +SKIP
        >>> out.logits if pp.is_last_stage else out.memory  # doctest: +SKIP
        """
        with torch.no_grad():
            out, _ = self._run(input_ids, memory, attention_mask, training=False)
        return out

    def train_step(self, input_ids, labels, memory=None, attention_mask=None) -> torch.Tensor:
        """transformers' causal-LM loss of the whole sequence and its backward through every
        segment's memory: each rank's parameters get (accumulate) their full gradients. Returns
        the loss (detached) on every rank; the memory after the call is `last_memory`.

        >>> loss = pp.train_step(ids, labels=ids); optimizer.step()  # doctest: +SKIP
        """
        if not isinstance(labels, torch.Tensor) or not isinstance(input_ids, torch.Tensor) \
                or tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError("train_step needs labels= on every rank: token ids of input_ids' shape "
                             f"{tuple(getattr(input_ids, 'shape', ()))} (-100 where not counted)")  # before any transfer
        before = [p.grad for _, p, mine in self._shared if mine]
        for _, p, mine in self._shared:
            if mine:
                p.grad = None
        out, _ = self._run(input_ids, memory, attention_mask, training=True, labels=labels)
        self._sum_shared_grads(before)
        return out.loss

    def _sum_shared_grads(self, before) -> None:
        """A parameter several stages run with (a head tied to the embedding) got part of its
        gradient on each: sum the parts over the group (every rank joins, in the model's order)."""
        old = iter(before)
        for _, p, mine in self._shared:
            part = p.grad if mine and p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=self.device)
            dist.all_reduce(part, group=self.group)
            if mine:
                prev = next(old)
                p.grad = part if prev is None else prev + part

    def gather_memory(self, memory: StageMemory | None = None) -> MemoryState:
        """The full MemoryState from every rank's share (a collective: call it on every rank).

        >>> full = pp.gather_memory(out.memory)  # doctest: +SKIP
        """
        memory = memory if memory is not None else self.last_memory
        if not isinstance(memory, StageMemory):
            raise TypeError("gather_memory takes this rank's StageMemory (out.memory of a pipeline call)")
        shares = [None] * self.n_stages
        dist.all_gather_object(shares, (memory.segments_seen, {j: t.cpu() for j, t in memory.leaves.items()}),
                               group=self.group)
        if len({s for s, _ in shares}) != 1:
            raise ValueError(f"the ranks' memories have seen different numbers of segments: {[s for s, _ in shares]}")
        leaves = {j: t for _, part in shares for j, t in part.items()}
        n = len(self.rg.state_out_nodes)
        state = self.rg.state_from_leaves(leaves[j].to(self.device) for j in range(n))
        return MemoryState(state, shares[0][0])

    # -- internals ---------------------------------------------------------------------------

    def _memory(self, memory, batch: int) -> StageMemory:
        fresh = self.initial_memory(batch)
        if memory is None:
            return fresh
        if isinstance(memory, MemoryState):
            flat = memory.leaves()
            if len(flat) != len(self.rg.state_out_nodes):
                raise ValueError(f"memory holds {len(flat)} tensors but this model carries "
                                 f"{len(self.rg.state_out_nodes)}")
            memory = StageMemory({j: flat[j] for j in self.stage.states}, memory.segments_seen)
        if not isinstance(memory, StageMemory) or set(memory.leaves) != set(fresh.leaves):
            raise TypeError("memory must be this rank's StageMemory from a previous call (out.memory) or a full "
                            "MemoryState (gather_memory())")
        for j, t in memory.leaves.items():
            want = fresh.leaves[j]
            if t.shape != want.shape or t.dtype != want.dtype:
                raise ValueError(f"memory tensor {j} is {t.dtype} {tuple(t.shape)}, expected {want.dtype} "
                                 f"{tuple(want.shape)} (another batch size than the call that produced it?)")
        return StageMemory({j: t.to(self.device) for j, t in memory.leaves.items()}, memory.segments_seen)

    def _check_input(self, input_ids, attention_mask):
        if isinstance(input_ids, (list, tuple)) and len({len(r) for r in input_ids if hasattr(r, "__len__")}) > 1:
            raise ValueError("a ragged batch (rows of different lengths) is not supported: every stage cuts each "
                             "row into the same segments; pass rows of equal length, or one row per call")
        check_input_ids(input_ids)
        check_attention_mask(attention_mask, input_ids)
        return input_ids.to(self.device)

    def _run(self, input_ids, memory, attention_mask, training: bool, labels=None):
        ids = self._check_input(input_ids, attention_mask)
        B = ids.shape[0]
        mem = self._memory(memory, B)
        bounds = segment_bounds(ids.shape[1], self.rg.segment_len)
        S = len(bounds)
        name, actions = schedule_order(self.schedule, self.n_stages, self.rank, S, training)
        check_order(actions, S, training, name)
        rg, stage = self.rg, self.stage
        params = {n: get_attr_path(rg.graph_module, n.target) for n, _ in stage.params}
        state = dict(mem.leaves)
        handles, records, logits, shown = [], [None] * S, [None] * S, []
        loss, state_grads = None, {}
        for kind, s in actions:
            a, b = bounds[s]
            key = (B, b - a, training)
            if kind == "F":
                env = dict(params)
                env[rg.input_node] = ids[:, a:b]
                env[rg.first_node] = torch.tensor(mem.segments_seen + s == 0, device=self.device)
                received = self._prev.recv(key, training) if self._prev is not None else []
                env.update(zip(stage.receives, received))
                state_in = {j: t.detach().requires_grad_() if training and t.requires_grad else t
                            for j, t in state.items()}
                for cell in stage.cells:
                    cell.run(env, state_in)
                sent = [env[n] for n in stage.sends]
                if self._next is not None:
                    handles += self._next.send(sent, key)
                state = {j: env[rg.state_out_nodes[j]] for j in stage.states}
                if stage.is_last:
                    logits[s] = env[rg.logits_node]
                    shown.append(logits[s].detach())
                records[s] = (received, state_in, sent, dict(state)) if training else None
            else:
                if loss is None:
                    wait_all(handles)
                    loss, dlogits = self._loss(logits, labels)
                state_grads = self._backward(records[s], logits[s], dlogits and dlogits[s], state_grads, handles)
                records[s] = logits[s] = None  # segment s's graph is spent
        wait_all(handles)
        final = StageMemory({j: t.detach() for j, t in state.items()}, mem.segments_seen + S)
        self.last_memory = final
        out_logits = torch.cat(shown, dim=1) if stage.is_last else None
        return PipelineOutput(out_logits, final, loss), records

    def _loss(self, logits, labels):
        """The loss on the last stage, broadcast to every rank; the logits' gradients (last stage)."""
        last = dist.get_global_rank(self.group, self.n_stages - 1) if self.group is not None else self.n_stages - 1
        value = torch.zeros((), dtype=torch.float64, device=self.device)
        dlogits = None
        if self.stage.is_last:
            if labels is None:
                raise ValueError("train_step needs labels= (token ids of the input's shape, -100 where not counted)")
            leaves = [x.detach().requires_grad_() for x in logits]
            loss = causal_lm_loss(torch.cat(leaves, dim=1), labels.to(self.device))
            loss.backward()
            dlogits = [x.grad for x in leaves]
            value = loss.detach().to(torch.float64)
        dist.broadcast(value, src=last, group=self.group)
        return value.to(self.dtype if self.dtype.is_floating_point else torch.float32), dlogits

    def _backward(self, record, logits, dlogits, state_grads, handles) -> dict:
        """One segment's backward: the gradients of its outputs (its logits on the last stage, the
        values it sent to the next rank, its memory output: `state_grads` from the later segment's
        backward) through this stage's cells; the gradients of what it received go back to the
        previous rank. Returns its incoming memory's gradients (for the segment before)."""
        received, state_in, sent, state_out = record
        outs, grads = [], []
        if dlogits is not None and logits.requires_grad:
            outs.append(logits)
            grads.append(dlogits)
        if self._next is not None:
            tracked = [t for t in _tensors(sent) if t.requires_grad]
            outs += tracked
            grads += self._next.recv_grads(tracked)
        for j, t in state_out.items():
            if state_grads.get(j) is not None and t.requires_grad:
                outs.append(t)
                grads.append(state_grads[j])
        if outs:
            torch.autograd.backward(outs, grads)
        if self._prev is not None:
            leaves = [t for t in _tensors(received) if t.requires_grad]
            handles += self._prev.send_grads([t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves])
        return {j: t.grad for j, t in state_in.items() if t.requires_grad}


def _tensors(values) -> list[torch.Tensor]:
    return [x for x in tree_flatten(values)[0] if isinstance(x, torch.Tensor)]


def pipeline(model: nn.Module, *, group=None, split=None, weights=None, device=None, schedule=None) -> Pipeline:
    """This rank's stage of `model` (a segment model wavefront captures) run as a pipeline over the
    ranks of `group` (default: the default process group); call it on every rank. `split`: layers
    per rank (default: balanced by parameter count); `weights` / `device`: for a model built on the
    meta device, the weights and the device of this rank's layers; `schedule`: None (forwards
    ascending, backwards descending), or an order to check (refused if it breaks the recurrence).

    >>> import torch.distributed as dist, wavefront          # doctest: +SKIP
    >>> dist.init_process_group("gloo")                      # doctest: +SKIP
    >>> pp = wavefront.distributed.pipeline(model, split=[2, 1])  # doctest: +SKIP
    >>> out = pp(input_ids); pp.is_last_stage and out.logits.shape  # doctest: +SKIP
    """
    return Pipeline(model, group=group, split=split, weights=weights, device=device, schedule=schedule)


__all__ = ["Pipeline", "PipelineNotSupported", "PipelineOutput", "ScheduleRefused", "StageMemory", "pipeline"]
