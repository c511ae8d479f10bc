"""Matrix-state scans S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t: naive.py, chunked.py, triton.py, dispatch.py (matrix_scan)."""
