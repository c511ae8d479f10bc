"""Delta-rule scans S_t = decay_t S_{t-1} + beta_t k_t (v_t - (decay_t S_{t-1})^T k_t)^T, o_t = S_t^T q_t (DeltaNet, gated DeltaNet, KDA, DeltaProduct): naive.py, chunked.py."""
