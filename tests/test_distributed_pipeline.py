"""wavefront.distributed.pipeline on 2 gloo processes equals the single-process model (float64):
logits and memory for several segment counts, a short last segment and batch 2, streaming with
memory=, train_step's loss and each rank's parameter gradients, a model built on the meta device;
RMT and a gradient-truncating schedule refused. One spawn runs every case: each rank saves its
results and the parent compares them with the single-process model."""

import pytest
from distributed_harness import spawn_ranks
import torch
from conftest import SEG, build, ids_for, tiny_armt, tiny_rmt

WORLD = 2
pytestmark = pytest.mark.xdist_group("distributed_pipeline")  # one worker: the module's one spawn serves every test
# name -> (segments, batch, tokens short in the last segment)
FORWARD = {"S1": (1, 1, 0), "S2": (2, 1, 0), "S7": (7, 1, 0), "short_last": (3, 1, 2), "batch2": (4, 2, 0)}
TRAIN = (4, 2, 1)
SPLIT = [2, 1]


def meta_armt():
    """tiny_armt's architecture on the meta device, and the weights (state_dict plus
    non-persistent buffers) the pipeline fills this rank's layers from."""
    ref = tiny_armt()
    cfg = ref.config
    with torch.device("meta"):
        model = type(ref)(cfg).to(torch.float64).eval()
    return model, {**ref.state_dict(), **dict(ref.named_buffers())}


def run_cases(rank):
    from wavefront.distributed import pipeline
    from wavefront.distributed.layer_pipeline import PipelineNotSupported, ScheduleRefused
    out = {}
    model = tiny_armt()
    pp = pipeline(model, split=SPLIT)
    out["is_last"], out["layers"] = pp.is_last_stage, list(pp.layers)
    for name, (S, B, short) in FORWARD.items():
        o = pp(ids_for(S, batch=B, short_last=short))
        out[name] = (o.logits, pp.gather_memory(o.memory).leaves(), o.memory.segments_seen)
    ids = ids_for(5, batch=2)
    first = pp(ids[:, :2 * SEG])
    second = pp(ids[:, 2 * SEG:], memory=first.memory)
    out["stream"] = (None if second.logits is None else torch.cat([first.logits, second.logits], 1),
                     pp.gather_memory(second.memory).leaves())
    full = pp(ids[:, 2 * SEG:], memory=pp.gather_memory(first.memory))  # a full MemoryState works too
    out["stream_full_memory"] = full.logits
    # training: gradients of this rank's parameters, by name
    S, B, short = TRAIN
    ids = ids_for(S, batch=B, short_last=short, seed=3)
    model.zero_grad()
    loss = pp.train_step(ids, labels=ids)
    names = {id(p): n for n, p in model.named_parameters()}
    out["loss"] = loss
    out["grads"] = {names[id(p)]: None if p.grad is None else p.grad.clone() for p in pp.parameters()}
    out["memory_after_train"] = pp.gather_memory().leaves()
    try:  # a Hugging Face GPT-2 in wrap_armt: its head is tied to the embedding, on the other stage
        import transformers  # noqa: F401
    except ImportError:
        out["tied"] = None
    else:
        gpt2 = build("gpt2")
        tied = pipeline(gpt2, split=[1, 2])
        gpt2.zero_grad()
        ids = ids_for(3, batch=2, short_last=1, seed=4)
        tied.train_step(ids, labels=ids)
        names = {id(p): n for n, p in gpt2.named_parameters()}
        out["tied"] = {names[id(p)]: None if p.grad is None else p.grad.clone() for p in tied.parameters()}
    auto = pipeline(tiny_armt())  # split by parameter count
    out["auto_layers"] = list(auto.layers)
    # meta-device construction: each rank materialises its own layers only
    meta, weights = meta_armt()
    mp = pipeline(meta, split=[1, 2], weights=weights)
    o = mp(ids_for(3, batch=2, seed=5))
    out["meta"] = (o.logits, [i for i, layer in enumerate(meta.cell.layers)
                              if any(p.is_meta for p in layer.parameters())])
    errors = {}
    for what, call in {"rmt": lambda: pipeline(tiny_rmt()),
                       "gpipe": lambda: pipeline(tiny_armt(), schedule="ScheduleGPipe").train_step(
                           ids_for(2), labels=ids_for(2)),
                       "1f1b": lambda: pipeline(tiny_armt(), schedule="Schedule1F1B").train_step(
                           ids_for(3), labels=ids_for(3)),
                       "ragged": lambda: pp([[1, 2, 3], [4, 5]])}.items():
        try:
            call()
            errors[what] = "no error"
        except (PipelineNotSupported, ScheduleRefused, ValueError, TypeError) as e:
            errors[what] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    return out


def close(got, want, tol, what):
    """'' when got matches want to relative tolerance tol, else what is wrong."""
    if got is None or got.shape != want.shape:
        return f"{what}: {None if got is None else tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-300)
    return f"{what}: relative error {err:.3g} > {tol}" if not err <= tol else ""


def check_memory(got, want, what):
    return [close(g, w, 1e-12, f"{what} memory {i}") for i, (g, w) in enumerate(zip(got, want))] + \
        ([f"{what}: {len(got)} memory tensors for {len(want)}"] if len(got) != len(want) else [])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(str(tmp_path_factory.mktemp("pipeline")), run_cases, WORLD)


def test_two_ranks_match_the_single_process_model(results):
    first, last = results
    failures = []
    if (first["is_last"], last["is_last"], first["layers"], last["layers"]) != (False, True, [0, 1], [2]):
        failures.append(f"stages: {first['layers']} / {last['layers']}")
    model = tiny_armt()
    with torch.no_grad():
        for name, (S, B, short) in FORWARD.items():
            ref = model(ids_for(S, batch=B, short_last=short))
            failures.append(close(last[name][0], ref.logits, 1e-12, f"{name} logits"))
            if first[name][0] is not None:
                failures.append(f"{name}: logits on the first stage")
            for r in results:  # every rank gathers the full memory
                failures += check_memory(r[name][1], ref.memory.leaves(), name)
                if r[name][2] != S:
                    failures.append(f"{name}: segments_seen {r[name][2]}")
        ids = ids_for(5, batch=2)
        ref = model(ids)
        failures.append(close(last["stream"][0], ref.logits, 1e-12, "stream logits"))
        failures.append(close(last["stream_full_memory"], ref.logits[:, 2 * SEG:], 1e-12, "stream from a MemoryState"))
        failures += check_memory(first["stream"][1], ref.memory.leaves(), "stream")
        ref = tiny_armt()(ids_for(3, batch=2, seed=5))
        failures.append(close(last["meta"][0], ref.logits, 1e-12, "meta-device model logits"))
        if (first["meta"][1], last["meta"][1]) != ([1, 2], [0]):
            failures.append(f"layers left on meta: rank 0 {first['meta'][1]}, rank 1 {last['meta'][1]}")
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)


def test_train_step_gives_the_single_process_loss_and_gradients(results):
    S, B, short = TRAIN
    ids = ids_for(S, batch=B, short_last=short, seed=3)
    model = tiny_armt()
    out = model(ids, labels=ids)
    out.loss.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    failures = [close(r["loss"], out.loss.detach(), 1e-12, f"rank {i} loss") for i, r in enumerate(results)]
    owned = [set(r["grads"]) for r in results]
    if owned[0] & owned[1] or owned[0] | owned[1] != set(want):
        failures.append(f"parameters per rank: {sorted(owned[0])} / {sorted(owned[1])}")
    for i, r in enumerate(results):
        failures += [close(g, want[n], 1e-10, f"rank {i} grad {n}") for n, g in r["grads"].items()]
    failures += check_memory(results[0]["memory_after_train"], out.memory.leaves(), "after train_step")
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)


@pytest.mark.hf
def test_tied_head_and_embedding_on_two_stages_get_the_whole_gradient(results):
    if results[0]["tied"] is None:
        pytest.skip("transformers is not installed")
    ids = ids_for(3, batch=2, short_last=1, seed=4)
    model = build("gpt2")
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    failures = [close(g, want[n], 1e-10, f"rank {i} grad {n}") for i, r in enumerate(results)
                for n, g in r["tied"].items()]
    assert set(results[0]["tied"]) | set(results[1]["tied"]) == set(want)
    assert not [f for f in failures if f], "\n".join(f for f in failures if f)


def test_default_split_balances_parameters(results):
    assert results[0]["auto_layers"] + results[1]["auto_layers"] == [0, 1, 2]
    assert results[0]["auto_layers"] and results[1]["auto_layers"]


def test_refusals_name_the_reason(results):
    for r in results:
        e = r["errors"]
        assert e["rmt"].startswith("PipelineNotSupported") and "(2, s) -> (0, s+1)" in e["rmt"], e["rmt"]
        assert "ScheduleGPipe runs ('B', 0) where segment 1's backward is next" in e["gpipe"], e["gpipe"]
        assert "Schedule1F1B runs ('B', 0) before the forward" in e["1f1b"], e["1f1b"]
        assert "ragged batch" in e["ragged"], e["ragged"]


def test_without_a_process_group_says_how_to_start_one():
    import torch.distributed as dist

    from wavefront.distributed import pipeline
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"torch\.distributed\.init_process_group"):
        pipeline(tiny_armt())


def test_the_order_guard_accepts_bptt_and_refuses_what_breaks_the_recurrence():
    from wavefront.distributed.pipeline_order import (
        ScheduleRefused,
        bptt_order,
        check_order,
        schedule_order,
    )
    assert check_order(bptt_order(3, True), 3, True) == bptt_order(3, True)
    assert schedule_order("ScheduleLoopedBFS", 2, 0, 3, True)[1] == bptt_order(3, True)
    refused = {"forward out of order": ([("F", 1), ("F", 0)], False),
               "backward ascending": ([("F", 0), ("F", 1), ("B", 0), ("B", 1)], True),
               "backward before the last forward": ([("F", 0), ("B", 0), ("F", 1), ("B", 1)], True),
               "a backward missing": ([("F", 0), ("F", 1), ("B", 1)], True)}
    for what, (actions, training) in refused.items():
        with pytest.raises(ScheduleRefused):
            check_order(actions, 2, training, what)
    for name in ["ScheduleGPipe", "Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleZBVZeroBubble", "ScheduleDualPipeV"]:
        for rank in range(2):
            with pytest.raises(ScheduleRefused):
                check_order(schedule_order(name, 2, rank, 4, True)[1], 4, True, name)
    custom = lambda n_stages, rank, S, training: bptt_order(S, training)  # noqa: E731
    assert schedule_order(custom, 2, 1, 2, True)[1] == bptt_order(2, True)


def test_split_by_parameter_count_and_a_given_split_is_checked():
    from wavefront.distributed.pipeline_stage import (
        PipelineNotSupported,
        check_split,
        choose_split,
    )
    assert choose_split([4, 1, 1, 1, 1], 2) == [1, 4]
    assert choose_split([1, 1, 1], 3) == [1, 1, 1]
    with pytest.raises(PipelineNotSupported, match="one layer"):
        choose_split([1, 1], 3)
    with pytest.raises(PipelineNotSupported, match="split="):
        check_split([3, 0], 3, 2)
