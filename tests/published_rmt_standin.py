"""A test stand-in for the public RMT implementation's wrapper classes (modeling_rmt).

Written for these tests from the published behaviour: a MemoryCell around a Hugging Face causal
LM that, per segment, runs the whole model on [memory; tokens; memory] (the learned memory
parameter for the first segment, then the previous segment's output) and returns the logits of
the token rows and the last hidden state's final rows as the next memory; with wrap_pos (GPT-2)
the position table grows by 2 * M rows, the read rows and tokens taking positions 0.. and the
write rows positions old + M ... A RecurrentWrapper cuts the input into segments.
"""

import torch
from torch import nn


class MemoryCell(nn.Module):
    def __init__(self, base_model, num_mem_tokens, wrap_pos=True):
        super().__init__()
        self.model, self.num_mem_tokens = base_model, num_mem_tokens
        emb = base_model.get_input_embeddings()
        self.memory = nn.Parameter(torch.randn(num_mem_tokens, emb.embedding_dim) * emb.weight.data.std())
        self.wrap_pos = wrap_pos
        if wrap_pos:
            wpe = base_model.transformer.wpe
            self.old_num_pos = wpe.num_embeddings
            new = nn.Embedding(self.old_num_pos + 2 * num_mem_tokens, wpe.embedding_dim)
            with torch.no_grad():
                new.weight[num_mem_tokens:self.old_num_pos + num_mem_tokens] = wpe.weight
            base_model.transformer.wpe = new

    def forward(self, input_ids, memory_state=None):
        m = self.num_mem_tokens
        if memory_state is None:
            memory_state = self.memory.repeat(input_ids.shape[0], 1, 1)
        emb = self.model.get_input_embeddings()(input_ids)
        h = torch.cat([memory_state, emb, memory_state], dim=1)
        kwargs = {"attention_mask": torch.ones(h.shape[:2], dtype=torch.long)}
        if self.wrap_pos:
            kwargs["position_ids"] = torch.cat([torch.arange(input_ids.shape[1] + m),
                                                torch.arange(self.old_num_pos + m, self.old_num_pos + 2 * m)])[None]
        out = self.model(inputs_embeds=h, output_hidden_states=True, use_cache=False, **kwargs)
        return out.logits[:, m:-m], out.hidden_states[-1][:, -m:]


class RecurrentWrapper(nn.Module):
    def __init__(self, memory_cell, **rmt_kwargs):
        super().__init__()
        self.memory_cell, self.rmt_config = memory_cell, rmt_kwargs

    def forward(self, input_ids):
        size = self.rmt_config["segment_size"]
        memory_state, logits = None, []
        for i in range(0, input_ids.shape[1], size):
            seg_logits, memory_state = self.memory_cell(input_ids[:, i:i + size], memory_state=memory_state)
            logits.append(seg_logits)
        return torch.cat(logits, dim=1)
