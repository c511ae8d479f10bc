"""Scans by family, as flash-linear-attention arranges them: each family's folder holds the naive
reference (naive.py) beside its fast forms (chunked.py, native.py, triton.py) and the op that
chooses among them (dispatch.py). linear/: h_t = a_t h_{t-1} + b_t; matrix/: S_t = diag(a_t)
S_{t-1} + k_t v_t^T; selective/: Mamba's selective scan. shapes.py: checks all forms share."""
