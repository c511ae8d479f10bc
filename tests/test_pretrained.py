"""save_pretrained / from_pretrained (wavefront/pretrained.py): an optimized model written in
Hugging Face's folder layout and built again gives the same outputs; the base model of an ARMT
over a Hugging Face model loads with transformers alone, with the same weights."""
import pytest
import torch

import wavefront
from wavefront.models import ARMT, ARMTConfig
from wavefront.testing import assert_close

F64 = torch.float64


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_an_optimized_armt_round_trips_with_its_options(tmp_path):
    torch.manual_seed(0)
    model = ARMT(ARMTConfig(n_layers=3, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4,
                            d_ff_per_layer=(32, 16, 32))).to(F64).eval()
    fast = wavefront.optimize(model, schedule="sequential")
    fast.save_pretrained(tmp_path)
    again = wavefront.from_pretrained(tmp_path)
    assert again.schedule_kind == "sequential" and not again.model.training
    _same_weights(again.model, model)
    ids = torch.randint(0, 256, (2, 11))
    assert_close(again(ids).logits, fast(ids).logits, 1e-12, "logits")
    assert wavefront.from_pretrained(tmp_path, schedule="diagonal").schedule_kind == "diagonal"


def test_loading_a_folder_not_written_by_wavefront_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not written by wavefront"):
        wavefront.from_pretrained(tmp_path)


def test_a_model_it_cannot_write_is_refused_with_what_to_do(tmp_path):
    fast = wavefront.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.save"):
        fast.save_pretrained(tmp_path)


@pytest.mark.hf
def test_an_armt_over_a_hugging_face_model_round_trips_and_its_base_loads_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from wavefront.models import wrap_armt
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2)).to(F64).eval()
    armt = wrap_armt(lm, segment_len=4, n_mem_tokens=2, d_mem=4)
    fast = wavefront.optimize(armt)  # diagonal batching: the layers' weights are views into shared stacks
    fast.save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).to(F64)
    _same_weights(base, lm)  # no layer's weights taken for another's (stacks share storage)
    again = wavefront.from_pretrained(tmp_path)
    _same_weights(again.model, armt)
    ids = torch.randint(0, 64, (2, 11))
    assert_close(again(ids).logits, fast(ids).logits, 1e-12, "logits")


@pytest.mark.hf
def test_a_hugging_face_model_under_a_route_round_trips(tmp_path):
    from wavefront import hf_families
    if "mamba" not in hf_families.available():
        pytest.skip("this transformers has no Mamba")
    model = hf_families.build("mamba")
    fast = wavefront.optimize(model)
    fast.save_pretrained(tmp_path)
    again = wavefront.from_pretrained(tmp_path)
    assert again.route == fast.route
    _same_weights(again.model, model)
    ids = hf_families.example_ids("mamba", 2, 30)
    with torch.no_grad():
        assert_close(again(ids, use_cache=False).logits, fast(ids, use_cache=False).logits, 1e-6, "logits")
