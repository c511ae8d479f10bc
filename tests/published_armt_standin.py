"""A test stand-in for the public ARMT implementation's wrapper classes.

Written for these tests from the published behaviour (class and attribute names, mutable
per-layer memory W_mem / z and first_seg flag, memory tokens appended after the segment, the
whole Hugging Face model run per segment through layers wrapped in place), so the duck-typing
adapter can be checked against that behaviour without installing the original code.
The layer output is read as out[0] on transformers 4.x (tuple) and out on 5.x (tensor).
"""

import torch
import torch.nn.functional as F
from torch import nn


class DPFP:
    def __init__(self, nu):
        self.nu = nu

    def __call__(self, x):
        x = torch.cat([torch.relu(x), torch.relu(-x)], dim=-1)
        rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)
        return torch.cat([x] * self.nu, dim=-1) * rolled


class AssociativeLayerWrapper(nn.Module):
    """The base branch's layer wrapper; `experimental=True` gives the experimental branch's variant
    (memory split into `n_heads` heads, phi features L2-normalised, no 1e-5 in the gamma
    denominator, `gating`: a per-channel beta of width d_model instead of one per head)."""

    def __init__(self, layer, d_model, num_mem_tokens, d_mem, correction=True, n_heads=1, gating=False,
                 experimental=False):
        super().__init__()
        assert d_mem % n_heads == 0 and d_model % n_heads == 0
        self.d_model, self.num_mem_tokens, self.d_mem = d_model, num_mem_tokens, d_mem
        self.n_heads, self.gating, self.experimental = n_heads, gating, experimental
        self.phi = DPFP(3)
        self.d_key = 2 * 3 * d_mem
        self.W_mq = nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = nn.Linear(d_model, d_model, bias=False)
        self.W_mb = nn.Linear(d_model, d_model if gating else n_heads)
        self.layer = layer
        self.correction = correction
        self.seg_num = 0
        self.zero_mem()

    def zero_mem(self):
        self.first_seg = True
        h = self.n_heads
        self.W_mem = torch.zeros(1, h, self.d_key // h, self.d_model // h) if self.experimental else \
            torch.zeros(1, self.d_key, self.d_model)
        self.z = torch.zeros(1, h, self.d_key // h) if self.experimental else torch.zeros(1, self.d_key)
        self.seg_num = 0

    def _heads(self, x):  # [b, t, c] -> [b, heads, t, c / heads]
        b, t, c = x.shape
        return x.reshape(b, t, self.n_heads, c // self.n_heads).transpose(1, 2)

    def _keys(self, proj, x):
        if not self.experimental:
            return self.phi(proj(x))
        return F.normalize(self.phi(self._heads(proj(x))), dim=-1)

    def associate(self, h):
        mq = self._keys(self.W_mq, h)
        W_mem, z = self.W_mem.to(h), self.z.to(h)
        if not self.experimental:
            num = torch.einsum("ijk,ikt->ijt", mq, W_mem)
            denom = torch.einsum("ik,ijk->ij", z, mq)[..., None] + 1e-5
            return num / denom
        num = torch.einsum("bhjk,bhkt->bhjt", mq, W_mem)
        denom = torch.einsum("bhk,bhjk->bhj", z, mq)[..., None] + 1e-5
        out = num / denom
        return out.transpose(1, 2).reshape(h.shape)

    def forward(self, hidden_states, *args, **kwargs):  # transformers 5.x GPT-2 passes some positionally
        if not self.first_seg:
            hidden_states = self.associate(hidden_states) + hidden_states
        out = self.layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        self.update_mem(h[:, -self.num_mem_tokens:])
        self.first_seg = False
        return out

    def update_mem(self, mem_tokens):
        W_mem, z = self.W_mem.to(mem_tokens), self.z.to(mem_tokens)
        mk = self._keys(self.W_mk, mem_tokens)
        new_mv = self.W_mv(mem_tokens)
        if self.experimental:
            new_mv = self._heads(new_mv)
        spec = "bhjk,bhkt->bhjt" if self.experimental else "ijk,ikt->ijt"
        zspec = "bhj,bhkj->bhk" if self.experimental else "ij,ikj->ik"
        if not self.first_seg:
            num = torch.einsum(spec, mk, W_mem)
            denom = torch.einsum(zspec, z, mk)[..., None] + 1e-5
            prev_mv = num / denom
            eps = 0.0 if self.experimental else 1e-5
            coef = torch.clip(1 - denom / (torch.linalg.norm(mk, dim=-1) ** 2 + eps)[..., None], 0, 1).detach() \
                if self.correction else 1
        else:
            prev_mv, coef = torch.zeros_like(new_mv), 1
        mb = torch.sigmoid(self.W_mb(mem_tokens))
        if not self.experimental:
            self.W_mem = W_mem + torch.einsum("ijk,ijt,ij->ikt", mk, new_mv - prev_mv, mb[..., 0])
        elif self.gating:
            self.W_mem = W_mem + torch.einsum("bhjk,bhjt,bhjt->bhkt", mk, new_mv - prev_mv, self._heads(mb))
        else:
            self.W_mem = W_mem + torch.einsum("bhjk,bhjt,bhj->bhkt", mk, new_mv - prev_mv, mb.transpose(1, 2))
        self.z = z + (coef * mk).sum(dim=-2)
        self.seg_num += 1


class AssociativeMemoryCell(nn.Module):
    def __init__(self, base_model, num_mem_tokens, d_mem, layers_attr="model.layers", wrap_pos=False, **layer_options):
        super().__init__()
        self.model, self.num_mem_tokens, self.d_mem = base_model, num_mem_tokens, d_mem
        d_model = base_model.get_input_embeddings().embedding_dim
        self.layers = base_model
        for attr in layers_attr.split("."):
            self.layers = getattr(self.layers, attr)
        for i in range(len(self.layers)):
            self.layers[i] = AssociativeLayerWrapper(self.layers[i], d_model, num_mem_tokens, d_mem, **layer_options)
        emb = base_model.get_input_embeddings()
        self.memory = nn.Parameter(torch.randn(num_mem_tokens, d_model) * emb.weight.data.std())
        self.wrap_pos = wrap_pos
        if wrap_pos:  # memory tokens take M extra rows at the end of GPT-2's position table
            wpe = base_model.transformer.wpe
            new = nn.Embedding(wpe.num_embeddings + num_mem_tokens, wpe.embedding_dim)
            with torch.no_grad():
                new.weight[: wpe.num_embeddings] = wpe.weight
            base_model.transformer.wpe = new

    def zero_mem(self):
        for layer in self.layers:
            layer.zero_mem()

    def forward(self, input_ids):
        emb = self.model.get_input_embeddings()(input_ids)
        h = torch.cat([emb, self.memory.repeat(input_ids.shape[0], 1, 1)], dim=1)
        # An all-ones 2-D mask (what the published code builds when given attention_mask): without it,
        # transformers 5.x reads the wrapped position ids as packed sequences and masks memory off.
        kwargs = {"attention_mask": torch.ones(h.shape[:2], dtype=torch.long)}
        if self.wrap_pos:
            p = self.model.transformer.wpe.weight.shape[0]
            kwargs["position_ids"] = torch.cat([torch.arange(input_ids.shape[1]),
                                                torch.arange(p - self.num_mem_tokens, p)])[None]
        out = self.model(inputs_embeds=h, use_cache=False, **kwargs)
        return out.logits[:, :-self.num_mem_tokens]


class AssociativeRecurrentWrapper(nn.Module):
    def __init__(self, memory_cell, **rmt_kwargs):
        super().__init__()
        self.memory_cell, self.rmt_config = memory_cell, rmt_kwargs

    def forward(self, input_ids):
        size = self.rmt_config["segment_size"]
        self.memory_cell.zero_mem()
        logits = [self.memory_cell(input_ids[:, i:i + size]) for i in range(0, input_ids.shape[1], size)]
        self.memory_cell.zero_mem()
        return torch.cat(logits, dim=1)


