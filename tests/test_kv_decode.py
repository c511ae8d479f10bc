"""Cached decoding (wavefront/kv_decode.py, wavefront/contract/kv_window.py): the model's own cell
run a few tokens at a time in a key/value window gives the model's own forward's logits for every
token and, at each segment's end, its memory (float64, 1e-12), for wavefront's ARMT and for ARMT
over Hugging Face Llama and GPT-2 layers; a window whose calls do not match is refused."""
import pytest
import torch

import wavefront
from wavefront.contract.kv_window import KVWindow
from wavefront.kv_decode import CachedSegmentDecoder
from wavefront.models import ARMT, ARMTConfig
from wavefront.testing import assert_close

F64 = torch.float64
SEG = 5


def _armt():
    torch.manual_seed(0)
    return ARMT(ARMTConfig(n_layers=3, d_model=16, n_heads=2, d_ff=32, segment_len=SEG, n_mem_tokens=2, d_mem=4,
                           vocab_size=64)).to(F64).eval()


def _hf_armt(family):
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from wavefront.models import wrap_armt
    torch.manual_seed(0)
    if family == "llama":  # grouped keys/values: 2 query heads share one
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1))
    else:
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                        bos_token_id=0, eos_token_id=0))
    return wrap_armt(lm.to(F64).eval(), segment_len=SEG, n_mem_tokens=2, d_mem=4)


def _stream_matches_forward(model, pieces, batch=2, prefill=0):
    """Feed a stream in `pieces` after `prefill` tokens of forward; every token's logits and each
    full segment's memory equal the model's own forward on the same tokens."""
    total = prefill + sum(pieces)
    ids = torch.randint(0, 64, (batch, total), generator=torch.Generator().manual_seed(total))
    decoder = CachedSegmentDecoder(model.cell, SEG)
    assert decoder.check(F64, "cpu"), decoder.reason
    with torch.no_grad():
        memory = model(ids[:, :prefill]).memory if prefill else None
        stream = decoder.stream(memory, batch, F64, "cpu")
        at, got = prefill, []
        for n in pieces:
            got.append(stream.feed(ids[:, at:at + n]))
            at += n
            if (at - prefill) % SEG == 0 or at % SEG == 0:
                want = model(ids[:, :at])
                if at % SEG == 0:  # a full segment: the memory it wrote is the forward's
                    for a, b in zip(stream.memory.leaves(), want.memory.leaves()):
                        assert_close(a, b, 1e-12, f"memory after {at} tokens")
                    assert stream.memory.segments_seen == want.memory.segments_seen
        want = model(ids).logits[:, prefill:]
    assert_close(torch.cat(got, dim=1), want, 1e-12, f"logits of the stream fed in {pieces}")


@pytest.mark.parametrize("pieces", [[1] * 12, [3, 2, 1, 4, 1, 1], [5, 5, 2]])
def test_a_stream_fed_in_pieces_gives_the_forward_s_logits_and_memory(pieces):
    _stream_matches_forward(_armt(), pieces)


def test_a_stream_continues_from_a_prefilled_memory():
    _stream_matches_forward(_armt(), [2, 1, 1, 1, 3], prefill=10)


@pytest.mark.hf
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hugging_face_layers_take_the_window_as_their_cache(family):
    model = _hf_armt(family)
    decoder = CachedSegmentDecoder(model.cell, SEG)
    if not decoder.check(F64, "cpu"):  # transformers 4.x GPT-2 takes `layer_past` tuples, not a Cache
        import transformers
        assert family == "gpt2" and transformers.__version__.startswith("4."), decoder.reason
        assert "no block of the cell took the key/value window" in decoder.reason
        return
    _stream_matches_forward(model, [1, 1, 3, 2, 1, 2], prefill=5)


@pytest.mark.hf
def test_generate_over_hugging_face_layers_equals_recomputing():
    model = _hf_armt("llama")
    fast = wavefront.optimize(model)
    assert fast.cached_decoder() is not None, fast.decode_reason
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    want = ids
    with torch.no_grad():
        for _ in range(9):
            want = torch.cat([want, model(want).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast.generate(ids, max_new_tokens=9), want)


def test_feeding_past_the_segment_s_end_is_refused():
    stream = CachedSegmentDecoder(_armt().cell, SEG).stream(None, 1, F64, "cpu")
    with torch.no_grad():
        stream.feed(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="feed\\(\\) takes 1 to 2 tokens here, got 3"):
            stream.feed(torch.zeros(1, 3, dtype=torch.long))


def test_a_window_refuses_more_attention_calls_than_its_cache_holds():
    past = [(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))]
    with KVWindow(past, offset=2, keep=1) as w:
        w.attend(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
        with pytest.raises(RuntimeError, match="attention call 2, but the cache holds 1"):
            w.attend(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))


def test_the_window_mask_lets_each_row_see_the_cache_and_the_rows_up_to_it():
    w = KVWindow([], offset=2, keep=1)
    assert w.allowed(2, "cpu").tolist() == [[True, True, True, False], [True, True, True, True]]
    assert w.positions(2, "cpu").tolist() == [2, 3]


def test_the_reason_names_the_dtype_cached_decoding_was_refused_for(monkeypatch):
    decoder = CachedSegmentDecoder(_armt().cell, SEG)
    prove = decoder._prove

    def float32_fails(dtype, device):  # stands for a block that ignores the window in one dtype only
        if dtype == torch.float32:
            raise AssertionError("logits differ")
        prove(dtype, device)

    monkeypatch.setattr(decoder, "_prove", float32_fails)
    assert decoder.check(F64, "cpu") and decoder.reason == ""
    assert not decoder.check(torch.float32, "cpu")
    assert decoder.check(F64, "cpu")  # still used in float64, and the reason says where it is not
    assert decoder.reason.startswith("torch.float32 on cpu: ") and "logits differ" in decoder.reason
    assert "float64" not in decoder.reason
