"""generate() and Hugging Face's call conventions on optimized models (wavefront/generation.py,
the segment route's forward): greedy tokens equal recomputing the model on the growing sequence
(float64, across segment boundaries, batch 2); sampling equals the same draws through
transformers' warpers; labels give transformers' loss; attention masks of ones are accepted,
padding refused; the routes wrapping Hugging Face models run the model's own generate()."""
import pytest
import torch

import wavefront
from wavefront.models import ARMT, ARMTConfig
from wavefront.testing import assert_close

F64 = torch.float64
SEG = 4


def _armt(seed=0):
    torch.manual_seed(seed)
    cfg = ARMTConfig(n_layers=3, d_model=16, n_heads=2, d_ff=32, segment_len=SEG, n_mem_tokens=2, d_mem=4,
                     vocab_size=64)
    return ARMT(cfg).to(F64).eval()


def _recompute(model, ids, new, choose=lambda scores: scores.argmax(-1), eos=None, pad=None):
    """Decoding by running the model on the whole growing sequence for every token."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new):
            token = choose(model(ids).logits[:, -1], ids)
            if eos is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
                done |= token == eos
            ids = torch.cat([ids, token[:, None]], dim=1)
            if eos is not None and bool(done.all()):
                break
    return ids


@pytest.mark.parametrize("prompt", [1, 4, 7, 9])
def test_greedy_tokens_equal_recomputing_the_model_across_segment_boundaries(prompt):
    model = _armt()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    got = fast.generate(ids, max_new_tokens=11)  # crosses two or three boundaries of 4-token segments
    want = _recompute(model, ids, 11, choose=lambda s, _: s.argmax(-1))
    assert got.dtype == torch.long and got.shape == (2, prompt + 11)
    assert torch.equal(got, want)


def test_each_token_costs_one_cached_run_of_the_cell_on_that_token():
    """The prompt's finished segments run once (the prefill, under the schedule); then the model's
    own cell runs the current segment's prompt tokens once and every new token alone, in a
    key/value window; the model's forward never runs the growing segment again."""
    model = _armt()
    fast = wavefront.optimize(model)
    assert fast.cached_decoder() is not None, fast.decode_reason  # the one-off check runs the cell here
    prefill, forward, calls, in_graph, prefilling = [], [], [], [], []
    logits_only = fast.cached_decoder().logits_only  # the cell without its write (calls leaving the segment open)
    assert logits_only is not None, fast.cached_decoder().logits_only_reason
    # the head runs in the cell and in the graph (a kept call): a hook on it sees every decode call
    # (a hook on the cell, which the graph's trace ran through, would make decoding run the cell)
    def prefills(m, args):
        prefill.append(args[0].shape[1])
        prefilling.append(True)

    handles = [fast.register_forward_pre_hook(prefills),
               fast.register_forward_hook(lambda m, args, out: prefilling.clear()),
               model.register_forward_pre_hook(lambda m, args: forward.append(args[0].shape[1])),
               logits_only.register_forward_pre_hook(lambda m, args: in_graph.append(True)),
               logits_only.register_forward_hook(lambda m, args, out: in_graph.clear()),
               model.cell.lm_head.register_forward_pre_hook(
                   lambda m, args: None if prefilling else calls.append(("logits" if in_graph else "cell",
                                                                        args[0].shape[1])))]
    try:
        fast.generate(torch.randint(0, 64, (1, 10)), max_new_tokens=7)
    finally:
        for h in handles:
            h.remove()
    assert prefill == [8] and forward == []  # the two finished prompt segments, under the schedule
    # the prompt's 2 current tokens, then 6 tokens one by one; the calls that fill a segment (offsets
    # 3 and 3 of segments of 4) run the cell and write its memory, the others leave the write out
    assert [n for _, n in calls] == [2, 1, 1, 1, 1, 1, 1]
    assert [what for what, _ in calls] == ["logits", "logits", "cell", "logits", "logits", "logits", "cell"]


def test_use_cache_false_runs_each_token_s_current_segment_whole_with_the_same_tokens():
    model = _armt()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    forward = []
    handle = model.register_forward_pre_hook(lambda m, args: forward.append(args[0].shape[1]))
    try:
        plain = fast.generate(ids, max_new_tokens=5, use_cache=False)
    finally:
        handle.remove()
    assert forward == [2, 3, 4, 1, 2]  # the current segment as it grows, a new one after each fill
    assert torch.equal(plain, fast.generate(ids, max_new_tokens=5))


@pytest.mark.parametrize("prompt", [1, 4, 6, 9])
def test_memory_writes_false_reads_the_memory_and_grows_the_last_segment_as_the_public_client(prompt):
    """The public ARMT client's generate: the prompt's finished segments write memory; its last
    segment and every new token are one segment growing past segment_len that reads it, never
    writing (the model's own cell on that tail is the reference)."""
    model = _armt()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    got = fast.generate(ids, max_new_tokens=10, memory_writes=False)
    k = (prompt - 1) // SEG
    with torch.no_grad():
        memory = model(ids[:, :k * SEG]).memory if k else model.initial_memory(2)
        want = ids
        for _ in range(10):
            logits, _ = model.cell(want[:, k * SEG:], torch.tensor(memory.segments_seen == 0), memory.tensors)
            want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, want)
    assert not torch.equal(got, fast.generate(ids, max_new_tokens=10))  # writing memory changes the tokens
    with pytest.raises(ValueError, match="memory_writes=False grows the prompt's last segment"):
        fast.generate(ids, max_new_tokens=2, memory_writes=False, use_cache=False)


def test_a_cell_that_ignores_the_window_runs_its_current_segment_whole_and_says_why():
    """A cell whose blocks take no key/value cache fails the decoder's check: generate() then runs
    each token's current segment through the model's own forward, with the same tokens."""
    from wavefront.contract import kv_window

    model = _armt()
    fast = wavefront.optimize(model)
    real = kv_window.active_window
    try:  # the blocks see no window, as a foreign block that takes no cache would
        import wavefront.models.decoder as decoder
        decoder.active_window = lambda: None
        assert fast.cached_decoder() is None
    finally:
        decoder.active_window = real
    assert "no block of the cell took the key/value window" in fast.decode_reason
    assert "generate(): no key/value cache (torch.float64 on cpu: cached decoding differs" in str(fast.explain())
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    forward = []
    handle = model.register_forward_pre_hook(lambda m, args: forward.append(args[0].shape[1]))
    try:
        got = fast.generate(ids, max_new_tokens=5)
    finally:
        handle.remove()
    assert forward == [2, 3, 4, 1, 2]  # the current segment as it grows, a new one after each fill
    assert torch.equal(got, _recompute(model, ids, 5, choose=lambda s, _: s.argmax(-1)))


def test_eos_finishes_a_row_and_pads_it_as_transformers_does():
    model = _armt()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    free = fast.generate(ids, max_new_tokens=10)
    eos = int(free[0, 7])  # a token row 0 emits by its third step
    first = 5 + int((free[0, 5:] == eos).nonzero()[0])
    got = fast.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    want = _recompute(model, ids, 10, choose=lambda s, _: s.argmax(-1), eos=eos, pad=0)
    assert torch.equal(got, want)
    assert int(got[0, first]) == eos and bool((got[0, first + 1:] == 0).all())


@pytest.mark.hf
def test_sampling_draws_like_transformers_warpers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    model = _armt()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    warpers = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.9)]

    def draw(scores, seen):
        for w in warpers:
            scores = w(seen, scores)
        return torch.multinomial(torch.softmax(scores.float(), -1), 1).squeeze(1)
    torch.manual_seed(5)
    got = fast.generate(ids, max_new_tokens=9, do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    torch.manual_seed(5)
    want = _recompute(model, ids, 9, choose=draw)
    assert torch.equal(got, want)


def test_generate_says_what_it_cannot_take():
    fast = wavefront.optimize(_armt())
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(TypeError, match="num_beams"):
        fast.generate(ids, max_new_tokens=3, num_beams=4)
    with pytest.raises(ValueError, match="padding"):
        fast.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
    assert torch.equal(fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3),
                       fast.generate(ids, max_new_tokens=3))
    with pytest.raises(TypeError, match="must hold integer token ids"):  # as forward says it
        fast.generate(ids.float())
    assert fast.generate(ids).shape == (2, 20)  # no length given: transformers' max_length of 20
    with pytest.warns(UserWarning, match="nothing is generated"):
        assert torch.equal(fast.generate(ids, max_length=3), ids)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        fast.generate(ids, max_new_tokens=-1)


def _hf_loss(logits, labels):
    from transformers.loss.loss_utils import ForCausalLMLoss
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


@pytest.mark.hf
def test_labels_give_transformers_causal_lm_loss_and_its_gradients():
    pytest.importorskip("transformers")
    model = _armt()
    fast = wavefront.optimize(model)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100  # not counted
    out = fast(ids, labels=labels)
    assert out.loss is not None and out.logits.shape == (2, 11, 64) and out.memory.segments_seen == 3
    # transformers computes the loss in float32 even for float64 logits: equal to its rounding
    assert_close(out.loss, _hf_loss(out.logits, labels), 1e-6, "loss vs transformers")
    assert_close(out.loss.float(), _hf_loss(out.logits.float(), labels), 1e-6, "float32 loss vs transformers")
    own = model(ids, labels=labels)
    assert_close(out.loss, own.loss, 1e-12, "loss vs the model's own")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params)
    own_grads = torch.autograd.grad(model(ids, labels=labels).loss, params)
    for g, r in zip(grads, own_grads):
        assert_close(g, r, 1e-10, "loss gradients")
    assert fast(ids).loss is None


def test_bad_labels_and_masks_are_refused_with_the_reason():
    fast = wavefront.optimize(_armt())
    ids = torch.randint(0, 64, (2, 6))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        fast(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="padding"):
        fast(ids, attention_mask=torch.tensor([[1] * 6, [0] + [1] * 5]))
    assert torch.equal(fast(ids, attention_mask=torch.ones_like(ids)).logits, fast(ids).logits)


@pytest.mark.hf
def test_an_armt_over_a_hugging_face_model_generates_with_its_generation_config():
    pytest.importorskip("transformers")
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from wavefront.models import wrap_armt
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)).to(F64).eval()
    armt = wrap_armt(lm, segment_len=SEG, n_mem_tokens=2, d_mem=4)
    fast = wavefront.optimize(armt)
    assert fast.config is lm.config and fast.generation_config is lm.generation_config
    lm.generation_config = GenerationConfig(max_new_tokens=6)
    ids = torch.randint(0, 64, (2, 6))
    got = fast.generate(ids)  # max_new_tokens from the model's generation config
    assert torch.equal(got, _recompute(armt, ids, 6, choose=lambda s, _: s.argmax(-1)))


@pytest.mark.hf
@pytest.mark.parametrize("family", ["mamba", "mamba2", "qwen3_next", "kimi_linear", "rwkv", "recurrent_gemma"])
def test_a_route_over_a_hugging_face_model_runs_its_own_generate(family):
    """transformers' generate with a cache, every forward under the route: the decode kernels
    (selective_state_update, causal_conv1d_update, fused_recurrent_*) run inside the model where the
    seam is filled, the lifted loops elsewhere; the tokens equal the model's own generate."""
    from wavefront import hf_families
    if family not in hf_families.available():
        pytest.skip(f"this transformers has no {family}")
    model = hf_families.build(family)
    fast = wavefront.optimize(model)
    ids = hf_families.example_ids(family, 2, 70)  # past a chunk of 64: chunked prefill, then decode steps
    got = fast.generate(ids, max_new_tokens=8, do_sample=False)
    want = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
